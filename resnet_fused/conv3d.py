"""3-D convolutions (torchvision's video ResNets) on the 2-D kernels, on the CPU.

A channels_last_3d tensor (N, C, T, H, W) lies in memory as N*T channels_last frames.
So a conv with one temporal tap (kernel (1, R, S): mc3_18's Conv3DNoTemporal, R(2+1)D's
spatial halves, the 1x1x1 downsamples) is a 2-D conv over those frames, and dispatch
picks its kernel as for a ResNet's (Winograd, conv1x1, oneDNN). A conv with kt
temporal taps is the sum of kt 2-D convs, tap j over the frames shifted by j: where
those take the Winograd kernel (3x3, stride 1; F(2x2) only, see _TILES), the sum costs
fewer multiplies than oneDNN's direct 3-D conv. Measured one conv at a time with a
residual and ReLU (AMD EPYC Zen 4, 2 threads, fp32, batch 1, 3x3x3 with padding 1; ms,
median of 15, direct against the taps accumulated in place, _taps_in_place, by F(2x2)
and, for comparison, F(4x4)): 64 channels at 16x56x56 49.6 against 28.1 (20.1), 128 at
8x28x28 22.1 against 12.2 (8.7), 256 at 4x14x14 9.8 against 5.5 (5.0), 512 at 4x7x7 9.5
against 7.1 (5.6), 512 at 2x7x7 4.4 against 3.3 (3.3), 128 at 2x28x28 4.0 against 2.2
(1.5). The out-of-place taps over zero-padded frames (_padded_taps, when gradients are
needed; F(2x2)) measured 33.6, 13.7, 6.9, 8.7, 4.9 and 3.8: slower than direct where a
third of the taps' frames are padding and the channels many. At stride 2 (64 to 128 at 16x56x56) the padded
taps measured 12.1 against 12.4. bfloat16 takes the taps where its Winograd kernel runs
(F(2x2), AVX512_BF16): each tap's sum is rounded to bfloat16, so r3d_18 erred 1.4x
torchvision's bf16 error against fp64 (6.3e-3 against 4.5e-3; 4.1e-3 without the taps)
in 137.0 ms against 168.8 without them (two runs; one clip of 16 frames at 112x112).
Other 3-D convs take conv_bias_act's 3-D path:
oneDNN's direct conv, one op.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dispatch, ops

# The video ResNets' convs over frames take F(2x2) Winograd only, not F(4x4): per conv
# F(4x4) errs 4-5x a direct conv against fp64, F(2x2) about 1x, and with F(4x4) in every
# 3x3 conv of layers 1-3 the logits' error reached 2-3x torchvision's own on small
# clips, past the 2x that `resnet-fused verify` holds every model to (README's Video
# ResNets section has the figures and the price in speed).
_TILES = (2,)

# _padded_taps read zero frames at the temporal padding; below this share of useful
# tap work the direct conv was faster (2 frames: 4 of 6 taps useful, measured slower; 4
# frames: 10 of 12, faster).
_MIN_USEFUL_TAP_SHARE = 0.8


@dataclass
class Prepared3d:
    """A folded Conv3d: its direct form and its 2-D taps."""
    direct: dispatch.PreparedConv  # the 5-D weight, for conv_bias_act's 3-D path
    taps: list                     # dispatch.PreparedConv per temporal tap (bias: _centre's)
    t_kernel: int
    t_stride: int
    t_padding: int
    t_dilation: int
    dtype: torch.dtype

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


def _centre(kt, padding, dilation):
    """The tap that reads frame t for output frame t (every output frame, with 'same'
    temporal padding), or 0 where none does."""
    j, off = divmod(padding, dilation)
    return j if off == 0 and j < kt else 0


def prepare(weight, bias, conv, dtype, cached=True):
    kt = weight.shape[2]
    geometry = _Geometry2d(conv)
    centre = _centre(kt, conv.padding[0], conv.dilation[0])  # holds the bias
    taps = [dispatch.prepare(weight[:, :, j].contiguous(), bias if j == centre else None,
                             geometry, dtype, cached=cached) for j in range(kt)]
    for tap in taps:
        tap.winograd_tiles = _TILES
    direct = dispatch.prepare(weight, bias, conv, dtype, cached=cached, direct=True)
    return Prepared3d(direct, taps, kt, conv.stride[0], conv.padding[0], conv.dilation[0], dtype)


def _frames(x):
    """(N, C, T, H, W) as (N*T, C, H, W) channels_last: a view of a channels_last_3d x."""
    n, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(n * t, c, h, w).contiguous(memory_format=torch.channels_last)


def _volume(y, n, t):
    """_frames' inverse: (N*T, K, H, W) channels_last as (N, K, T, H, W) channels_last_3d."""
    return y.unflatten(0, (n, t)).transpose(1, 2)


def _out_frames(c, t):
    return (t + 2 * c.t_padding - c.t_dilation * (c.t_kernel - 1) - 1) // c.t_stride + 1


def _taps_pay(c, x, in_place):
    """Whether the sum of 2-D taps (accumulated in place, or out of place over padded
    frames) beats the direct conv on x (see the module docstring)."""
    if (c.t_kernel == 1 or c.t_stride != 1 or x.dtype not in (torch.float32, torch.bfloat16)
            or dispatch.tracing()):  # traced: no Winograd (PreparedConv.kernel_for)
        return False
    t, t_out = x.shape[2], _out_frames(c, x.shape[2])
    if t_out < 1:
        return False
    useful = sum(min(t_out, t + c.t_padding - j * c.t_dilation)
                 - max(0, c.t_padding - j * c.t_dilation) for j in range(c.t_kernel))
    if not in_place and useful < _MIN_USEFUL_TAP_SHARE * c.t_kernel * t_out:
        return False
    # kernel_for reads only the frames' shape, dtype and device.
    n, ch, _, h, w = x.shape
    frames = x.new_empty(()).expand(n * t_out, ch, h, w)
    return c.taps[0].kernel_for(frames)[0] == "winograd"


def conv(x, c, *, relu, finite, residual=None):
    """act(conv3d(x) + bias [+ residual]), as dispatch.conv for a 5-D x; channels_last_3d,
    as the graph keeps its values."""
    n, x = x.shape[0], x.contiguous(memory_format=torch.channels_last_3d)
    if c.t_kernel == 1 and c.t_padding == 0:
        x = x[:, :, ::c.t_stride] if c.t_stride > 1 else x
        res = None if residual is None else _frames(residual)
        return _volume(dispatch.conv(_frames(x), c.taps[0], relu=relu, finite=finite,
                                     residual=res), n, x.shape[2])
    route = _route(c, x, residual)
    if route == "direct":
        return dispatch.conv(x, c.direct, relu=relu, finite=finite, residual=residual)
    if route == "taps in place":
        return _taps_in_place(x, c, relu, finite, residual)
    return _padded_taps(x, c, relu, finite, residual)


def _route(c, x, residual):
    """How a conv with several temporal taps runs x: "taps in place" (stride 1, 'same'
    temporal padding, no gradients), "padded taps" or "direct"."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, c.weight, c.bias))
    in_place = (not needs_grad and c.t_stride == 1 and _out_frames(c, x.shape[2]) == x.shape[2]
                and _centre(c.t_kernel, c.t_padding, c.t_dilation) * c.t_dilation == c.t_padding)
    if not _taps_pay(c, x, in_place):
        return "direct"
    return "taps in place" if in_place else "padded taps"


def _padded_taps(x, c, relu, finite, residual):
    """The taps over zero-padded frames, out of place: every tap covers every output
    frame (any stride; differentiable)."""
    n, t_out, p = x.shape[0], _out_frames(c, x.shape[2]), c.t_padding
    xp = F.pad(x, (0, 0, 0, 0, p, p)).contiguous(memory_format=torch.channels_last_3d) if p else x
    acc = None if residual is None else _frames(residual)
    for j, tap in enumerate(c.taps):
        start = j * c.t_dilation
        frames = _frames(xp[:, :, start:start + c.t_stride * (t_out - 1) + 1:c.t_stride])
        last = j == c.t_kernel - 1
        acc = dispatch.conv(frames, tap, relu=relu and last, finite=finite, residual=acc)
    return _volume(acc, n, t_out)


def _taps_in_place(x, c, relu, finite, residual):
    """The taps at stride 1 with 'same' temporal padding: the centre tap (every output
    frame, with the bias and residual) first, then each other tap accumulated in place
    into the output frames it reaches (no padding frames read or computed, no output per
    tap); the last one applies the ReLU, the frames it does not reach get theirs after."""
    n, t = x.shape[0], x.shape[2]
    frames = _frames(x)
    centre = _centre(c.t_kernel, c.t_padding, c.t_dilation)
    acc = dispatch.conv(frames, c.taps[centre], relu=False, finite=finite,
                        residual=None if residual is None else _frames(residual))
    others = [j for j in range(c.t_kernel) if j != centre]
    for j in others:
        shift = j * c.t_dilation - c.t_padding  # output frame o reads input frame o + shift
        lo, hi = max(0, -shift), min(t, t - shift)
        last = j == others[-1]
        for s in range(n):
            out = acc[s * t + lo:s * t + hi]
            if hi > lo:
                _accumulate_(out, frames[s * t + lo + shift:s * t + hi + shift], c.taps[j],
                             relu=relu and last, finite=finite)
            if relu and last:  # the frames this tap does not reach
                acc[s * t:s * t + lo].relu_()
                acc[s * t + max(hi, lo):(s + 1) * t].relu_()
    return _volume(acc, n, t)


def _accumulate_(out, x, tap, *, relu, finite):
    """out = act(out + conv(x)), in place, by winograd_conv3x3_add_ where the tap takes
    the Winograd kernel on x."""
    kind, u = tap.kernel_for(x)
    if kind == "winograd":
        ops.winograd_conv3x3_add_(out, x, tap.weight, u, tap.bias, stride=tap.stride[0],
                                  relu=relu, assume_finite=finite)
    else:
        out.copy_(dispatch.conv(x, tap, relu=relu, finite=finite, residual=out))


def conv_add_relu_(identity, x, c, *, finite):
    """relu(conv3d(x) + bias + identity), as dispatch.conv_add_relu_ for a 5-D x:
    accumulated into identity's frames where the 2-D op can (identity must be dead
    after this call); returns the result."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    if c.t_kernel == 1 and c.t_padding == 0:
        x = x[:, :, ::c.t_stride] if c.t_stride > 1 else x
        out = dispatch.conv_add_relu_(_frames(identity), _frames(x), c.taps[0], finite=finite)
        return _volume(out, x.shape[0], x.shape[2])
    if _route(c, x, identity) == "direct":
        return dispatch.conv_add_relu_(identity, x, c.direct, finite=finite)
    return conv(x, c, relu=True, finite=finite, residual=identity)

