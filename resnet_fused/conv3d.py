"""3-D convolutions (torchvision's video ResNets) on the 2-D kernels, on the CPU.

A channels_last_3d tensor (N, C, T, H, W) lies in memory as N*T channels_last frames.
So a conv with one temporal tap (kernel (1, R, S): mc3_18's Conv3DNoTemporal, R(2+1)D's
spatial halves, the 1x1x1 downsamples) is a 2-D conv over those frames, and dispatch
picks its kernel as for a ResNet's (Winograd, conv1x1, oneDNN). A conv with kt
temporal taps of 3x3 (r3d_18's 3x3x3 convs), stride 1 and 'same' temporal padding is
the sum of kt 2-D convs, tap j over the frames shifted by j: where the 2-D conv takes
the Winograd kernel, winograd_conv3d computes the sum with fewer multiplies than
oneDNN's direct 3-D conv, each tap's products added in the Winograd domain before one
output transform (F(2x2) only, see _TILES). Measured one conv at a time with a residual
and ReLU (AMD EPYC Zen 4, 2 threads, fp32, batch 1, 3x3x3 with padding 1; ms, medians of
15, direct against winograd_conv3d; in brackets, the release before's taps as three 2-D
Winograd convs summed in place, another run): 64 channels at 16x56x56 49.0 against 26.2
(28.1), 128 at 8x28x28 22.2 against 11.6 (12.2), 256 at 4x14x14 9.9 against 5.6 (5.5), 512
at 4x7x7 10.4 against 7.1 (7.1), 512 at 2x7x7 4.8 against 3.2 (3.3), 128 at 2x28x28 4.1
against 2.1 (2.2). As fast as the taps in place, then: the output transforms and residual
passes saved were a small part of the time. bfloat16 runs the same where its Winograd
kernel does (F(2x2), AVX512_BF16), the taps summed in fp32 and rounded once: r3d_18
(one clip of 16x112x112) erred 1.0x torchvision's bf16 error against fp64 (3.9e-3 both;
the taps rounded one by one: 1.4x), in 119.9 ms against eager channels_last_3d's 183.0
(ad hoc, medians of 7). Other 3-D convs (stride 2, R(2+1)D's temporal (3,1,1)
ones) take conv_bias_act's 3-D path: oneDNN's direct conv, one op.
"""

from dataclasses import dataclass, field

import torch

from . import dispatch, ops
from .huge_pages import to_huge_pages

# The video ResNets' convs over frames take F(2x2) Winograd only, not F(4x4): per conv
# F(4x4) errs 4-5x a direct conv against fp64, F(2x2) about 1x, and with F(4x4) in every
# 3x3 conv of layers 1-3 the logits' error reached 2-3x torchvision's own on small
# clips, past the 2x that `resnet-fused verify` holds every model to (README's Video
# ResNets section has the figures and the price in speed).
_TILES = (2,)


@dataclass
class Prepared3d:
    """A folded Conv3d: its direct form and its centre temporal tap as a 2-D conv."""
    direct: dispatch.PreparedConv  # the 5-D weight, for conv_bias_act's 3-D path
    frames: dispatch.PreparedConv  # the centre tap over the frames, with the bias: computes
    #                                a conv with one tap; its 2-D rules choose the Winograd
    #                                tile for winograd_conv3d
    t_kernel: int
    t_stride: int
    t_padding: int
    t_dilation: int
    dtype: torch.dtype
    winograd: dict = field(default_factory=dict)  # tile -> winograd_conv3d's weight

    # The direct form's, as a PreparedConv's.
    weight = property(lambda self: self.direct.weight)
    bias = property(lambda self: self.direct.bias)
    stride = property(lambda self: self.direct.stride)
    padding = property(lambda self: self.direct.padding)
    dilation = property(lambda self: self.direct.dilation)


class _Geometry2d:
    """The spatial part of a Conv3d's geometry, as dispatch.prepare reads a conv."""

    def __init__(self, conv):
        self.stride, self.padding = tuple(conv.stride[1:]), tuple(conv.padding[1:])
        self.dilation, self.groups = tuple(conv.dilation[1:]), conv.groups


def prepare(weight, bias, conv, dtype, cached=True):
    frames = dispatch.prepare(weight[:, :, weight.shape[2] // 2].contiguous(), bias,
                              _Geometry2d(conv), dtype, cached=cached)
    frames.winograd_tiles = _TILES
    direct = dispatch.prepare(weight, bias, conv, dtype, cached=cached, direct=True)
    return Prepared3d(direct, frames, weight.shape[2], conv.stride[0], conv.padding[0],
                      conv.dilation[0], dtype)


def _frames(x):
    """(N, C, T, H, W) as (N*T, C, H, W) channels_last: a view of a channels_last_3d x."""
    n, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(n * t, c, h, w).contiguous(memory_format=torch.channels_last)


def _volume(y, n, t):
    """_frames' inverse: (N*T, K, H, W) channels_last as (N, K, T, H, W) channels_last_3d."""
    return y.unflatten(0, (n, t)).transpose(1, 2)


def _winograd_weight(c, x):
    """winograd_conv3d's weight where it computes c on x (stride 1, 'same' temporal
    padding, a Winograd tile for the same 2-D conv over x's frames), else None."""
    kt = c.t_kernel
    if (kt == 1 or kt % 2 == 0 or c.t_stride != 1 or c.t_dilation != 1 or c.t_padding != kt // 2
            or c.frames.stride != (1, 1) or x.dtype not in (torch.float32, torch.bfloat16)):
        return None
    n, ch, t, h, w = x.shape
    # The 2-D rules read only the frames' shape, dtype and device.
    tile = c.frames.winograd_tile_for(x.new_empty(()).expand(n * t, ch, h, w))
    if tile is None:
        return None
    u = c.winograd.get(tile)
    if u is None:
        u = c.winograd[tile] = to_huge_pages(ops.winograd_weight(c.weight, tile=tile))
    return u


def _route(c, x):
    """How a conv with several temporal taps runs x: "winograd" or "direct"."""
    return "direct" if _winograd_weight(c, x) is None else "winograd"


def conv(x, c, *, relu, finite, residual=None):
    """act(conv3d(x) + bias [+ residual]), as dispatch.conv for a 5-D x; channels_last_3d,
    as the graph keeps its values."""
    n, x = x.shape[0], x.contiguous(memory_format=torch.channels_last_3d)
    if c.t_kernel == 1 and c.t_padding == 0:
        x = x[:, :, ::c.t_stride] if c.t_stride > 1 else x
        res = None if residual is None else _frames(residual)
        return _volume(dispatch.conv(_frames(x), c.frames, relu=relu, finite=finite,
                                     residual=res), n, x.shape[2])
    u = _winograd_weight(c, x)
    if u is None:
        return dispatch.conv(x, c.direct, relu=relu, finite=finite, residual=residual)
    return ops.winograd_conv3d(x, c.weight, u, c.bias, residual, relu=relu, assume_finite=finite)


def conv_add_relu_(identity, x, c, *, finite):
    """relu(conv3d(x) + bias + identity), as dispatch.conv_add_relu_ for a 5-D x:
    accumulated into identity's frames where the 2-D op can (identity must be dead
    after this call); returns the result."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    if c.t_kernel == 1 and c.t_padding == 0:
        x = x[:, :, ::c.t_stride] if c.t_stride > 1 else x
        out = dispatch.conv_add_relu_(_frames(identity), _frames(x), c.frames, finite=finite)
        return _volume(out, x.shape[0], x.shape[2])
    u = _winograd_weight(c, x)
    if u is None:
        return dispatch.conv_add_relu_(identity, x, c.direct, finite=finite)
    return ops.winograd_conv3d(x, c.weight, u, c.bias, identity, relu=True, assume_finite=finite)
