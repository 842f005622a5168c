"""Python layer over torch.ops.resnet_fused.*: argument normalisation, fake
(meta) kernels so torch.compile and torch.export trace through the ops, and a
clear error when the compiled library is missing."""

import os

import torch
from torch._prims_common import suggest_memory_format

from . import _extension


def _int(v):
    # Python and numpy integers (not bool, not float), as plain ints.
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError
    return v.__index__()


def _ints(v, name, n=2):
    """v as a list of n ints (one per spatial dimension); an int is repeated."""
    try:
        if isinstance(v, (str, torch.Tensor)):
            raise TypeError
        pair = [_int(v)] * n if hasattr(v, "__index__") and not isinstance(v, bool) else [
            _int(i) for i in v]
        if len(pair) != n:
            raise TypeError
    except TypeError:
        what = "a pair of ints" if n == 2 else f"{n} ints"
        raise ValueError(f"{name}: expected an int or {what}, got {v!r}") from None
    return pair


def _spatial_dims(t):
    # A 3-D convolution's (5-D input): 3; anything else is the op's to reject.
    return 3 if isinstance(t, torch.Tensor) and t.dim() == 5 else 2


def _require():
    if not _extension.available():
        raise RuntimeError(_extension.load_error())


def _no_backward(op, alternative, **tensors):
    # The in-place ops have no backward formula: a gradient through them would be
    # silently wrong, so recording one is refused.
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"{op}: expected no operand that requires grad (the in-place "
                                   f"op has no backward), got {name} requiring grad; use "
                                   f"{alternative}, or call it under torch.no_grad()")


def conv_bias_act(input, weight, bias=None, residual=None, stride=1, padding=0, dilation=1,
                  groups=1, *, relu=True, assume_finite=False):
    """act(conv2d(input, weight, stride, padding, dilation, groups) + bias [+ residual]),
    act = ReLU if `relu` else identity, in one pass. Returns the input's memory format.
    On CPU, a 5-D input and weight make it conv3d (stride, padding, dilation: 3 each).
    assume_finite=True promises input and residual hold no NaN/Inf (saves a scan on CPU;
    with a NaN present the ReLU may then turn it into 0)."""
    _require()
    n = _spatial_dims(input)
    return torch.ops.resnet_fused.conv_bias_act(
        input, weight, bias, residual, _ints(stride, "stride", n), _ints(padding, "padding", n),
        _ints(dilation, "dilation", n), groups, relu=relu, assume_finite=assume_finite)


def conv_bias_add_relu_(residual, input, weight, bias=None, stride=1, padding=0, dilation=1,
                        groups=1, *, assume_finite=False):
    """residual = relu(residual + conv2d(input, weight) + bias), in place (conv3d for a
    5-D input on CPU, as conv_bias_act)."""
    _require()
    _no_backward("conv_bias_add_relu_", "conv_bias_act(input, weight, bias, residual, ...)",
                 residual=residual, input=input, weight=weight, bias=bias)
    n = _spatial_dims(input)
    torch.ops.resnet_fused.conv_bias_add_relu_(
        residual, input, weight, bias, _ints(stride, "stride", n), _ints(padding, "padding", n),
        _ints(dilation, "dilation", n), groups, assume_finite=assume_finite)
    return residual


def add_relu(a, b):
    """relu(a + b) in one pass; NaN propagates as in torch.relu."""
    _require()
    return torch.ops.resnet_fused.add_relu(a, b)


def add_relu_(a, b):
    """a = relu(a + b), in place."""
    _require()
    _no_backward("add_relu_", "add_relu(a, b)", a=a, b=b)
    torch.ops.resnet_fused.add_relu_(a, b)
    return a


def _winograd_g(points):
    """G of Winograd's F(m, 3) for the finite interpolation `points` and infinity:
    the row of a point a is (1, a, a^2) / prod_{b != a} (a - b) (its Lagrange
    denominator, so that the kernel's B^T and A^T stay dyadic), infinity's is
    (0, 0, 1). F(2, 3) on 0, 1, -1 gives the familiar rows (1, 0, 0),
    (1/2, 1/2, 1/2) up to sign, which B^T's signs absorb."""
    rows = []
    for a in points:
        den = 1.0
        for b in points:
            if b != a:
                den *= a - b
        rows.append((1 / den, a / den, a * a / den))
    return rows + [(0.0, 0.0, 1.0)]


# F(2x2, 3x3) on 0, 1, -1 (in the signs the kernel's B^T expects), F(4x4, 3x3)
# on 0, 1/2, -1/2, 2, -2 (winograd_kernel.h's bt6/at6); both with infinity.
_WINOGRAD_G = {2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
               4: tuple(_winograd_g((0, 0.5, -0.5, 2, -2)))}


def winograd_panel(k, dtype=torch.float32):
    """Output channels per panel of winograd_weight for K = k: brgemm_panel() (bfloat16:
    64) where that divides k, else one panel of all k."""
    p = 64 if dtype == torch.bfloat16 else brgemm_panel()
    return p if k % p == 0 else k


# F(2x2, 3x3) at stride 2 (csrc/cpu/winograd_kernel.h): the distinct rows of its G,
# g1 (which the odd input samples meet), g0, g0 + g2 and g2 (the even ones, F(2, 2)).
_WINOGRAD_G_STRIDE2 = ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.0, 1.0), (0.0, 0.0, 1.0))


def all_finite(input):
    """Whether a CPU floating-point tensor holds no NaN or Inf: one pass over its bits
    (float32, bfloat16, float64), where torch.isfinite(input).all() makes a bool tensor
    first."""
    _require()
    return torch.ops.resnet_fused.all_finite(input)


def winograd_weight(weight, tile=2, stride=1):
    """A [K, C, 3, 3] weight in the Winograd domain of F(tile x tile, 3x3) for
    winograd_conv3x3, computed in float64 (once, at fold time). float32 at stride 1:
    [16, K / P, C, P] for tile=2, [36, K / P, C, P] for tile=4, the [C, K] matrix of each
    of the 16 (36) points cut into panels of P = winograd_panel(K) output channels, so
    that a thread computing some of the output channels reads a contiguous part of it.
    The shape tells the op which tile to run. At stride 2 (tile=2 only): [4, 4, K / P,
    C, P], the 4 x 4 distinct matrices of its 25 points. A bfloat16 weight (tile=2,
    stride 1, even C) gives [16, K / P, C/2, P, 2] bfloat16: the rows of each panel in the
    interleaved pairs (VNNI) of the bfloat16 GEMM. A [K, C, kt, 3, 3] weight (stride 1)
    gives one such weight per temporal tap, stacked: [kt, ...], for winograd_conv3d."""
    if (isinstance(weight, torch.Tensor) and weight.dim() == 5 and weight.shape[3:] == (3, 3)
            and stride == 1):
        return torch.stack([winograd_weight(weight[:, :, j], tile)
                            for j in range(weight.shape[2])])
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2:] != (3, 3):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"winograd_weight: expected a [K, C, 3, 3] weight (or [K, C, kt, 3, 3] "
                         f"at stride 1), got {got}")
    if tile not in _WINOGRAD_G:
        raise ValueError(f"winograd_weight: expected tile 2 or 4, got {tile!r}")
    if stride not in (1, 2) or (stride == 2 and tile != 2):
        raise ValueError(f"winograd_weight: expected stride 1, or 2 with tile 2, got stride "
                         f"{stride!r} with tile {tile}")
    bf16 = weight.dtype == torch.bfloat16
    if bf16 and (tile != 2 or stride != 1 or weight.shape[1] % 2):
        raise ValueError(f"winograd_weight: a bfloat16 weight needs tile 2, stride 1 and an even "
                         f"number of input channels, got tile {tile}, stride {stride} and "
                         f"{weight.shape[1]} channels")
    rows = _WINOGRAD_G_STRIDE2 if stride == 2 else _WINOGRAD_G[tile]
    g = torch.tensor(rows, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ia,kcab,jb->ijck", g, weight.to(torch.float64), g)
    points = len(rows) ** 2
    k, c = weight.shape[:2]
    u = u.reshape(points, c, k)
    p = winograd_panel(k, weight.dtype)
    if bf16:  # [16, K / P, C / 2, P, 2]: each panel's rows in VNNI pairs
        u = u.to(torch.bfloat16).reshape(16, c // 2, 2, k // p, p)
        return u.permute(0, 3, 1, 4, 2).contiguous()
    u = u.to(torch.float32).reshape(points, c, k // p, p).transpose(1, 2).contiguous()
    return u.reshape(4, 4, *u.shape[1:]) if stride == 2 else u


def winograd_conv3x3(input, weight, winograd_weight, bias=None, residual=None, *, stride=1,
                     relu=True, assume_finite=False):
    """conv_bias_act(input, weight, bias, residual, stride=stride, padding=1, relu=relu) for
    a 3x3 float32 or bfloat16 weight, computed on CPU by Winograd's minimal filtering. At
    stride 1: F(2x2, 3x3) (2.25x fewer multiplies) or, in float32, F(4x4, 3x3) (4x
    fewer); `winograd_weight` must be winograd_weight(weight, tile=2) or
    winograd_weight(weight, tile=4), its shape selects which. At stride 2 (float32):
    F(2x2, 3x3) (1.44x fewer), with winograd_weight(weight, tile=2, stride=2). Only
    winograd_weight's shape is checked: made from another weight, it gives wrong results
    (checking its values would cost the transform it saves)."""
    _require()
    return torch.ops.resnet_fused.winograd_conv3x3(input, weight, winograd_weight, bias, residual,
                                                   stride=stride, relu=relu,
                                                   assume_finite=assume_finite)


def winograd_conv3d(input, weight, winograd_weight, bias=None, residual=None, *, relu=True,
                    assume_finite=False):
    """conv_bias_act(input, weight, bias, residual, padding=(kt // 2, 1, 1), relu=relu) for
    a [K, C, kt, 3, 3] float32 or bfloat16 weight (kt odd, stride 1), on CPU: each
    temporal tap a 2-D Winograd conv over the frames (as winograd_conv3x3 at stride 1),
    the taps summed in the Winograd domain before one output transform. `winograd_weight`
    is winograd_weight(weight, tile=2|4): one per tap, stacked. Returns the input's memory
    format (channels_last_3d is what the kernel reads and writes)."""
    _require()
    return torch.ops.resnet_fused.winograd_conv3d(input, weight, winograd_weight, bias, residual,
                                                  relu=relu, assume_finite=assume_finite)


CONV1X1_PANEL = 64  # output channels per product block (csrc/cpu/conv1x1.cpp)

# oneDNN's levels (ONEDNN_MAX_CPU_ISA) from which its brgemm runs AVX-512 code.
_ONEDNN_WIDE_ISAS = ("ALL", "DEFAULT", "AVX512", "AVX10")


def brgemm_panel():
    """Output channels per weight panel for the products of conv1x1 and
    winograd_conv3x3 here: 64 where our kernels and oneDNN's brgemm both run AVX-512
    code, else 32. oneDNN's AVX2 brgemm multiplies ~1.35x faster from 32-wide panels
    than from 64-wide ones; its AVX-512 one runs both alike (csrc/cpu/conv1x1_epilogue.h
    gives the figures)."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    wide = _extension.cpu_isa() == "avx512" and onednn.startswith(_ONEDNN_WIDE_ISAS)
    return 64 if wide else 32


def conv1x1_weight(weight, panel=None):
    """A [K, C, 1, 1] float32 weight as conv1x1's panels of P output channels,
    [K / P, C, P], P = panel (32 or 64; default brgemm_panel()), K a multiple of 64;
    made once, at fold time. A bfloat16 weight (even C) gives [K / P, C / 2, P, 2]: each
    panel's rows in the interleaved pairs (VNNI) of the bfloat16 GEMM, P = 64 by default
    (its brgemm multiplies 32- and 64-wide panels alike)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2:] != (1, 1):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"conv1x1_weight: expected a [K, C, 1, 1] weight, got {got}")
    k, c = weight.shape[:2]
    if k % CONV1X1_PANEL:
        raise ValueError(f"conv1x1_weight: expected a multiple of {CONV1X1_PANEL} output "
                         f"channels, got {k}")
    bf16 = weight.dtype == torch.bfloat16
    if bf16 and c % 2:
        raise ValueError(f"conv1x1_weight: a bfloat16 weight needs an even number of input "
                         f"channels (its rows go in pairs), got {c}")
    p = (64 if bf16 else brgemm_panel()) if panel is None else panel
    if p not in (32, 64):
        raise ValueError(f"conv1x1_weight: expected panel 32 or 64, got {panel!r}")
    panels = weight.reshape(k // p, p, c).transpose(1, 2)  # [K / P, C, P]
    if bf16:
        return panels.reshape(k // p, c // 2, 2, p).transpose(2, 3).contiguous()
    return panels.contiguous()


def conv1x1(input, weight, weight_panels, bias=None, residual=None, *, relu=True, stride=1):
    """conv_bias_act(input, weight, bias, residual, stride, relu=relu) for an unpadded 1x1
    conv, computed on CPU as one matrix product on oneDNN's brgemm micro-kernel, the
    weight read as `weight_panels` (conv1x1_weight(weight)); only their shape is checked.
    NaN and Inf propagate as in torch."""
    _require()
    return torch.ops.resnet_fused.conv1x1(input, weight, weight_panels, bias, residual, relu=relu,
                                          stride=stride)


def conv1x1_add_relu_(residual, input, weight, weight_panels, bias=None):
    """residual = relu(residual + conv1x1(input, weight) + bias), in place."""
    _require()
    _no_backward("conv1x1_add_relu_", "conv1x1(input, weight, weight_panels, bias, residual)",
                 residual=residual, input=input, weight=weight, bias=bias)
    torch.ops.resnet_fused.conv1x1_add_relu_(residual, input, weight, weight_panels, bias)
    return residual


def conv1x1_sum(input, weight, weight_panels, input2, weight2, weight2_panels, bias=None, *,
                stride2=1, relu=True):
    """act(conv1x1(input, weight) + conv1x1(input2, weight2, stride=stride2) + bias): two
    unpadded 1x1 convs with the same output shape, their products summed per output block
    so that neither is stored alone (a Bottleneck's last conv and its downsample). The
    weights are read as their panels (conv1x1_weight). Returns input's memory format."""
    _require()
    return torch.ops.resnet_fused.conv1x1_sum(input, weight, weight_panels, input2, weight2,
                                              weight2_panels, bias, stride2=stride2, relu=relu)


GROUPED_CONV_MIN_BLOCK = 16  # output channels per weight block at least (grouped_conv3x3)


def grouped_conv_block(kg):
    """Output channels per block of grouped_conv_weight for kg output channels per group."""
    return max(kg, GROUPED_CONV_MIN_BLOCK)


def grouped_conv_fits(weight, groups):
    """Whether grouped_conv3x3's kernel computes this [K, C / groups, 3, 3] weight: K / groups
    a multiple of 16, or K / groups = C / groups = 4 or 8 with whole blocks of 16 output
    channels (else it calls conv_bias_act)."""
    k, cg = weight.shape[:2]
    kg = k // groups
    return k % groups == 0 and (kg % GROUPED_CONV_MIN_BLOCK == 0 or (
        kg in (4, 8) and cg == kg and k % grouped_conv_block(kg) == 0))


def grouped_conv_weight(weight, groups):
    """A [K, C / groups, 3, 3] weight as grouped_conv3x3's blocks, [K / L, 9, C / groups, L]:
    L = max(K / groups, 16) output channels per block (one group's, or 16 / (K / groups)
    whole groups'), the 3x3 taps, then per input channel j of the group its L weights
    contiguous. Groups of 4 or 8 channels (as many in as out, Kg) share a vector, whose
    inputs the kernel rotates within each group: there row j holds, in lane l, the weight
    of input channel (l + j) mod Kg. Made once, at fold time."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2:] != (3, 3):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"grouped_conv_weight: expected a [K, C / groups, 3, 3] weight, got {got}")
    k, cg = weight.shape[:2]
    if not isinstance(groups, int) or groups < 1 or k % groups:
        raise ValueError(f"grouped_conv_weight: expected groups a positive divisor of the weight's "
                         f"{k} output channels, got {groups!r}")
    kg = k // groups
    block = grouped_conv_block(kg)
    if k % block:
        raise ValueError(f"grouped_conv_weight: expected {k} output channels to be a multiple of "
                         f"{block} (blocks of max(K / groups, 16))")
    blocks = weight.reshape(k // block, block, cg, 9).permute(0, 3, 2, 1)  # [b, tap, c, l]
    if kg in (4, 8) and cg == kg:
        lane = torch.arange(block, device=weight.device)
        c = (lane[None, :] + torch.arange(kg, device=weight.device)[:, None]) % kg  # [j, l]
        blocks = blocks.gather(2, c.expand(k // block, 9, kg, block))
    return blocks.contiguous()


def grouped_conv3x3(input, weight, packed_weight, bias=None, residual=None, *, stride=1,
                    relu=True):
    """conv_bias_act(input, weight, bias, residual, stride=stride, padding=1,
    groups=C / weight.size(1), relu=relu) for a 3x3 float32 weight, computed on CPU by a
    direct kernel for grouped convs (ResNeXt's), the weight read as `packed_weight`
    (grouped_conv_weight(weight, groups)). NaN and Inf propagate as in torch; a tap on
    the padding is a product with zero, as in torch's float64 convolution. Only
    packed_weight's shape is checked: packed for other groups (or another weight) it
    gives wrong results, as any pre-packed weight would."""
    _require()
    return torch.ops.resnet_fused.grouped_conv3x3(input, weight, packed_weight, bias, residual,
                                                  stride=stride, relu=relu)


STEM_CONV_BLOCK = 32  # stem_conv's kernel computes K a multiple of this (else conv_bias_act)


def stem_conv_weight(weight):
    """A [K, C, R, S] weight as stem_conv's, [R, C, S, K]: per tap (kh, c, kw) its K
    output channels contiguous, the order the kernel reads them in. Made once, at fold
    time."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"stem_conv_weight: expected a [K, C, R, S] weight, got {got}")
    return weight.permute(2, 1, 3, 0).contiguous()


def stem_conv(input, weight, packed_weight, bias=None, residual=None, *, stride=1, padding=0,
              relu=True):
    """conv_bias_act(input, weight, bias, residual, stride, padding, relu=relu) for an
    ungrouped, undilated float32 conv at stride 1 or 2, computed on CPU by a direct kernel
    made for few input channels (ResNet's stem: 3 channels, 7x7, stride 2), the weight
    read as `packed_weight` (stem_conv_weight(weight)); K must be a multiple of
    STEM_CONV_BLOCK for the kernel to run (else conv_bias_act computes it). NaN and Inf
    propagate as in torch; a tap on the padding is a product with zero, as in torch's
    float64 convolution. Only packed_weight's shape is checked."""
    _require()
    return torch.ops.resnet_fused.stem_conv(input, weight, packed_weight, bias, residual,
                                            stride=_ints(stride, "stride"),
                                            padding=_ints(padding, "padding"), relu=relu)


def im2col(input, kernel_size, stride=1, padding=0, dilation=1, tap_begin=0, tap_end=None):
    """The patches that conv2d(input, weight of kernel_size, stride, padding, dilation)
    reads, as rows (CPU, any dtype): channels_last [N, taps * C, OH, OW], where pixel
    (n, oh, ow) holds, for each tap (kh, kw) in [tap_begin, tap_end) (default: all of
    them; row-major), the C channels that tap reads, zeros where it reads padding. So
    conv2d(input, weight) = conv1x1(im2col(input, ...), w, conv1x1_weight(w)) with
    w = weight.permute(0, 2, 3, 1).reshape(K, -1, 1, 1), over the same taps."""
    _require()
    kernel_size = _ints(kernel_size, "kernel_size")
    tap_end = kernel_size if tap_end is None else _ints(tap_end, "tap_end")
    return torch.ops.resnet_fused.im2col(input, kernel_size, _ints(stride, "stride"),
                                         _ints(padding, "padding"), _ints(dilation, "dilation"),
                                         _ints(tap_begin, "tap_begin"), tap_end)


def max_pool2d(input, kernel_size, stride=None, padding=0):
    """F.max_pool2d(input, kernel_size, stride, padding) on CPU (float32 or bfloat16) or
    CUDA (float16 too); no dilation, floor rounding, stride defaulting to kernel_size;
    without the argmax indices ATen computes alongside (its gradient recomputes them). Returns the input's
    memory format; fastest on channels_last input."""
    _require()
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        stride = kernel_size
    return torch.ops.resnet_fused.max_pool2d(input, _ints(kernel_size, "kernel_size"),
                                             _ints(stride, "stride"), _ints(padding, "padding"))


def mean_linear(input, weight, bias=None):
    """F.linear(input.mean((2, 3)), weight, bias) on CPU in float32: ResNet's head (average
    pool to 1x1, flatten, fc) as one op, each dot product summed in 16 interleaved
    partial sums (the same bits on every CPU)."""
    _require()
    return torch.ops.resnet_fused.mean_linear(input, weight, bias)


def pack_weight(weight, stride, padding, dilation, groups, input_size):
    """The weight re-laid out for the backend's kernel (done once, at fold time)."""
    _require()
    n = _spatial_dims(weight)
    return torch.ops.resnet_fused.pack_weight(
        weight, _ints(stride, "stride", n), _ints(padding, "padding", n),
        _ints(dilation, "dilation", n), groups, list(input_size))


def _conv_out_shape(input, weight, stride, padding, dilation):
    return (input.shape[0], weight.shape[0],
            *((size + 2 * p - d * (k - 1) - 1) // s + 1
              for size, k, s, p, d in zip(input.shape[2:], weight.shape[2:], stride, padding,
                                          dilation)))


def _strided_out(input, weight, stride):
    """The output of a conv that keeps the size at stride 1 (1x1 unpadded, 3x3 padded by
    1) and takes every stride-th pixel at stride s, in the input's memory format (what
    the kernels return)."""
    shape = (input.shape[0], weight.shape[0], (input.shape[2] - 1) // stride + 1,
             (input.shape[3] - 1) // stride + 1)
    return input.new_empty(shape).contiguous(memory_format=suggest_memory_format(input))


def _same_device(op, first, **others):
    # The fake kernels also run for a meta tensor beside real ones (the dispatcher
    # picks them), where the real kernels' device checks never run.
    for name, t in others.items():
        torch._check(t is None or t.device == first.device,
                     lambda: f"{op}: expected {name} on {first.device}, got {t.device}")


def _register_fakes():
    lib = "resnet_fused::"

    @torch.library.register_fake(lib + "conv_bias_act")
    def _(input, weight, bias, residual, stride, padding, dilation, groups, *, relu=True,
          assume_finite=False):
        _same_device("conv_bias_act", input, weight=weight, bias=bias, residual=residual)
        torch._check(input.dim() in (4, 5) and weight.dim() == input.dim(),
                     lambda: "conv_bias_act: input and weight must be 4-D, or 5-D on CPU")
        torch._check(input.shape[1] == weight.shape[1] * groups,
                     lambda: f"conv_bias_act: expected input with {weight.shape[1] * groups} "
                             f"channels, got {input.shape[1]}")
        shape = _conv_out_shape(input, weight, stride, padding, dilation)
        fmt = suggest_memory_format(input)  # what the kernels return
        return input.new_empty(shape).contiguous(memory_format=fmt)

    @torch.library.register_fake(lib + "conv_bias_add_relu_")
    def _(residual, input, weight, bias, stride, padding, dilation, groups, *, assume_finite=False):
        _same_device("conv_bias_add_relu_", input, weight=weight, bias=bias, residual=residual)
        return None

    @torch.library.register_fake(lib + "winograd_conv3x3")
    def _(input, weight, winograd_weight, bias, residual, *, stride=1, relu=True,
          assume_finite=False):
        _same_device("winograd_conv3x3", input, weight=weight, winograd_weight=winograd_weight,
                     bias=bias, residual=residual)
        torch._check(input.dim() == 4 and weight.dim() == 4,
                     lambda: "winograd_conv3x3: input and weight must be 4-D")
        torch._check(stride in (1, 2),
                     lambda: f"winograd_conv3x3: expected stride 1 or 2, got {stride}")
        return _strided_out(input, weight, stride)

    @torch.library.register_fake(lib + "winograd_conv3d")
    def _(input, weight, winograd_weight, bias, residual, *, relu=True, assume_finite=False):
        _same_device("winograd_conv3d", input, weight=weight, winograd_weight=winograd_weight,
                     bias=bias, residual=residual)
        torch._check(input.dim() == 5 and weight.dim() == 5,
                     lambda: "winograd_conv3d: input and weight must be 5-D")
        shape = (input.shape[0], weight.shape[0], *input.shape[2:])  # 'same' at stride 1
        return input.new_empty(shape).contiguous(memory_format=suggest_memory_format(input))

    @torch.library.register_fake(lib + "add_relu")
    def _(a, b):
        _same_device("add_relu", a, b=b)
        return torch.empty_like(a)

    @torch.library.register_fake(lib + "add_relu_")
    def _(a, b):
        _same_device("add_relu_", a, b=b)
        return None

    @torch.library.register_fake(lib + "conv1x1")
    def _(input, weight, weight_panels, bias, residual, *, relu=True, stride=1):
        _same_device("conv1x1", input, weight=weight, weight_panels=weight_panels, bias=bias,
                     residual=residual)
        torch._check(input.dim() == 4 and weight.dim() == 4,
                     lambda: "conv1x1: input and weight must be 4-D")
        torch._check(stride > 0, lambda: f"conv1x1: expected stride > 0, got {stride}")
        return _strided_out(input, weight, stride)

    @torch.library.register_fake(lib + "conv1x1_sum")
    def _(input, weight, weight_panels, input2, weight2, weight2_panels, bias, *, stride2=1,
          relu=True):
        _same_device("conv1x1_sum", input, weight=weight, weight_panels=weight_panels,
                     input2=input2, weight2=weight2, weight2_panels=weight2_panels, bias=bias)
        torch._check(input.dim() == 4 and weight.dim() == 4 and input2.dim() == 4
                     and weight2.dim() == 4,
                     lambda: "conv1x1_sum: inputs and weights must be 4-D")
        torch._check(stride2 > 0, lambda: f"conv1x1_sum: expected stride2 > 0, got {stride2}")
        return _strided_out(input, weight, 1)

    @torch.library.register_fake(lib + "conv1x1_add_relu_")
    def _(residual, input, weight, weight_panels, bias):
        _same_device("conv1x1_add_relu_", input, weight=weight, weight_panels=weight_panels,
                     bias=bias, residual=residual)
        return None

    @torch.library.register_fake(lib + "grouped_conv3x3")
    def _(input, weight, packed_weight, bias, residual, *, stride=1, relu=True):
        _same_device("grouped_conv3x3", input, weight=weight, packed_weight=packed_weight,
                     bias=bias, residual=residual)
        torch._check(input.dim() == 4 and weight.dim() == 4,
                     lambda: "grouped_conv3x3: input and weight must be 4-D")
        torch._check(stride in (1, 2),
                     lambda: f"grouped_conv3x3: expected stride 1 or 2, got {stride}")
        return _strided_out(input, weight, stride)

    @torch.library.register_fake(lib + "stem_conv")
    def _(input, weight, packed_weight, bias, residual, *, stride, padding, relu=True):
        _same_device("stem_conv", input, weight=weight, packed_weight=packed_weight, bias=bias,
                     residual=residual)
        torch._check(input.dim() == 4 and weight.dim() == 4,
                     lambda: "stem_conv: input and weight must be 4-D")
        torch._check(tuple(stride) in ((1, 1), (2, 2)),
                     lambda: f"stem_conv: expected stride (1, 1) or (2, 2), got {tuple(stride)}")
        shape = _conv_out_shape(input, weight, stride, padding, (1, 1))
        return input.new_empty(shape).contiguous(memory_format=suggest_memory_format(input))

    @torch.library.register_fake(lib + "max_pool2d")
    def _(input, kernel_size, stride, padding):
        # The kernel's checks (csrc/checks.h), so that a trace fails where a run would.
        torch._check(input.dim() == 4, lambda: "max_pool2d: input must be 4-D")
        if input.device.type == "cuda":
            torch._check(input.dtype in (torch.float16, torch.bfloat16, torch.float32),
                         lambda: f"max_pool2d: expected float16, bfloat16 or float32 input, got "
                                 f"{input.dtype}")
        else:
            torch._check(input.dtype in (torch.float32, torch.bfloat16),
                         lambda: f"max_pool2d: expected float32 or bfloat16 input, got "
                                 f"{input.dtype}")
        torch._check(all(len(v) == 2 for v in (kernel_size, stride, padding)),
                     lambda: "max_pool2d: expected kernel_size, stride and padding of length 2")
        torch._check(all(k > 0 and s > 0 and 0 <= 2 * p <= k
                         for k, s, p in zip(kernel_size, stride, padding)),
                     lambda: f"max_pool2d: expected kernel_size > 0, stride > 0 and 0 <= padding "
                             f"<= kernel_size / 2, got {kernel_size}, {stride}, {padding}")
        n, c, h, w = input.shape
        torch._check(c > 0 and h > 0 and w > 0,
                     lambda: f"max_pool2d: expected input with non-empty channel and spatial "
                             f"dimensions, got shape {tuple(input.shape)}")
        torch._check(all(size + 2 * p >= k for size, k, p in zip((h, w), kernel_size, padding)),
                     lambda: f"max_pool2d: input spatial size {[h, w]} with padding "
                             f"{list(padding)} is smaller than the kernel {list(kernel_size)}")
        shape = (n, c) + tuple((size + 2 * p - k) // s + 1 for size, k, s, p in
                               zip((h, w), kernel_size, stride, padding))
        return input.new_empty(shape).contiguous(memory_format=suggest_memory_format(input))

    @torch.library.register_fake(lib + "im2col")
    def _(input, kernel_size, stride, padding, dilation, tap_begin, tap_end):
        torch._check(input.dim() == 4, lambda: "im2col: input must be 4-D")
        torch._check(all(len(v) == 2 for v in (kernel_size, stride, padding, dilation,
                                               tap_begin, tap_end)),
                     lambda: "im2col: expected kernel_size, stride, padding, dilation, tap_begin "
                             "and tap_end of length 2")
        torch._check(all(0 <= b < e <= k for b, e, k in zip(tap_begin, tap_end, kernel_size)),
                     lambda: f"im2col: expected 0 <= tap_begin < tap_end <= kernel_size "
                             f"{list(kernel_size)}, got {list(tap_begin)} and {list(tap_end)}")
        oh, ow = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                  zip(input.shape[2:], kernel_size, stride, padding, dilation))
        taps = (tap_end[0] - tap_begin[0]) * (tap_end[1] - tap_begin[1])
        shape = (input.shape[0], taps * input.shape[1], oh, ow)
        return input.new_empty(shape).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake(lib + "mean_linear")
    def _(input, weight, bias):
        _same_device("mean_linear", input, weight=weight, bias=bias)
        torch._check(input.dim() == 4 and weight.dim() == 2 and weight.shape[1] == input.shape[1],
                     lambda: f"mean_linear: expected input (N, C, H, W) and weight (K, C), got "
                             f"{tuple(input.shape)} and {tuple(weight.shape)}")
        return input.new_empty((input.shape[0], weight.shape[0]))

    @torch.library.register_fake(lib + "huge_page_copy")
    def _(input, huge_page_bytes):
        power_of_two = huge_page_bytes & (huge_page_bytes - 1) == 0
        torch._check(0 < huge_page_bytes <= 1 << 30 and power_of_two,
                     lambda: f"huge_page_copy: expected huge_page_bytes a power of two up to 2^30, "
                             f"got {huge_page_bytes}")
        return torch.empty_like(input)  # the op's strides are empty_like's

    @torch.library.register_fake(lib + "pack_weight")
    def _(weight, stride, padding, dilation, groups, input_size):
        # CUDA packs to KRSC = channels_last; CPU's oneDNN layout is opaque.
        return torch.empty_like(weight, memory_format=torch.channels_last if weight.dim() == 4
                                else torch.channels_last_3d)


def _relu_grad(grad, out, relu):
    # torch.relu's own backward rule (NaN outputs pass their gradient on).
    return torch.ops.aten.threshold_backward(grad, out, 0) if relu else grad


def _conv_backward(ctx, grad, geometry):
    """(grad_input, grad_weight, grad_bias, grad_residual) of act(conv + bias [+ residual])."""
    input, weight, out = ctx.saved_tensors
    g = _relu_grad(grad, out, ctx.relu)
    stride, padding, dilation, groups = geometry
    if weight.is_mkldnn:  # a oneDNN-packed weight: its logical values
        weight = weight.to_dense()
    need_in, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias
    gi, gw, gb = torch.ops.aten.convolution_backward(
        g, input, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding,
        dilation, False, [0] * len(stride), groups, [need_in, need_w, need_b])
    return gi, gw, gb, (g if ctx.has_residual else None)


def _register_autograd():
    lib = "resnet_fused::"

    def save(ctx, inputs, output, relu, bias, residual):
        # The output only for the ReLU's mask: without the ReLU an in-place op on the
        # output (an activation with inplace=True after conv-BN) must not break backward.
        ctx.save_for_backward(inputs[0], inputs[1], output if relu else None)
        ctx.relu, ctx.has_bias, ctx.has_residual = relu, bias is not None, residual is not None

    def conv_setup(ctx, inputs, keyword_only_inputs, output):
        save(ctx, inputs, output, keyword_only_inputs.get("relu", True), inputs[2], inputs[3])
        ctx.geometry = tuple(inputs[4:8])

    def conv_backward(ctx, grad):
        gi, gw, gb, gr = _conv_backward(ctx, grad, ctx.geometry)
        return gi, gw, gb, gr, None, None, None, None

    torch.library.register_autograd(lib + "conv_bias_act", conv_backward,
                                    setup_context=conv_setup)

    # The gradient of the weight goes to `weight`; winograd_weight is derived from
    # it (ops.winograd_weight) and gets none.
    def winograd_setup(ctx, inputs, keyword_only_inputs, output):
        save(ctx, inputs, output, keyword_only_inputs.get("relu", True), inputs[3], inputs[4])
        ctx.stride = keyword_only_inputs.get("stride", 1)

    def winograd_backward(ctx, grad):
        s = ctx.stride
        gi, gw, gb, gr = _conv_backward(ctx, grad, ((s, s), (1, 1), (1, 1), 1))
        return gi, gw, None, gb, gr

    torch.library.register_autograd(lib + "winograd_conv3x3", winograd_backward,
                                    setup_context=winograd_setup)

    def winograd3d_setup(ctx, inputs, keyword_only_inputs, output):
        save(ctx, inputs, output, keyword_only_inputs.get("relu", True), inputs[3], inputs[4])
        ctx.padding = (inputs[1].shape[2] // 2, 1, 1)

    def winograd3d_backward(ctx, grad):
        gi, gw, gb, gr = _conv_backward(ctx, grad, ((1, 1, 1), ctx.padding, (1, 1, 1), 1))
        return gi, gw, None, gb, gr

    torch.library.register_autograd(lib + "winograd_conv3d", winograd3d_backward,
                                    setup_context=winograd3d_setup)

    # Likewise conv1x1's weight_panels.
    def conv1x1_backward(ctx, grad):
        s = ctx.stride
        gi, gw, gb, gr = _conv_backward(ctx, grad, ((s, s), (0, 0), (1, 1), 1))
        return gi, gw, None, gb, gr

    torch.library.register_autograd(lib + "conv1x1", conv1x1_backward,
                                    setup_context=winograd_setup)

    # Each product's gradients as conv1x1's; the panels get none.
    def conv1x1_sum_setup(ctx, inputs, keyword_only_inputs, output):
        ctx.relu = keyword_only_inputs.get("relu", True)
        ctx.save_for_backward(inputs[0], inputs[1], inputs[3], inputs[4],
                              output if ctx.relu else None)
        ctx.stride2 = keyword_only_inputs.get("stride2", 1)
        ctx.has_bias = inputs[6] is not None

    def conv1x1_sum_backward(ctx, grad):
        x, w, x2, w2, out = ctx.saved_tensors
        g = _relu_grad(grad, out, ctx.relu)
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, [w.shape[0]] if ctx.has_bias else None, [1, 1], [0, 0], [1, 1], False,
            [0, 0], 1, [need[0], need[1], ctx.has_bias and need[6]])
        s = ctx.stride2
        gx2, gw2, _ = torch.ops.aten.convolution_backward(
            g, x2, w2, None, [s, s], [0, 0], [1, 1], False, [0, 0], 1, [need[3], need[4], False])
        return gx, gw, None, gx2, gw2, None, gb

    torch.library.register_autograd(lib + "conv1x1_sum", conv1x1_sum_backward,
                                    setup_context=conv1x1_sum_setup)

    # Likewise grouped_conv3x3's packed_weight; groups = C / weight.size(1).
    def grouped_setup(ctx, inputs, keyword_only_inputs, output):
        winograd_setup(ctx, inputs, keyword_only_inputs, output)
        ctx.groups = inputs[0].shape[1] // inputs[1].shape[1]

    def grouped_backward(ctx, grad):
        s = ctx.stride
        gi, gw, gb, gr = _conv_backward(ctx, grad, ((s, s), (1, 1), (1, 1), ctx.groups))
        return gi, gw, None, gb, gr

    torch.library.register_autograd(lib + "grouped_conv3x3", grouped_backward,
                                    setup_context=grouped_setup)

    # Likewise stem_conv's packed_weight.
    def stem_setup(ctx, inputs, keyword_only_inputs, output):
        save(ctx, inputs, output, keyword_only_inputs.get("relu", True), inputs[3], inputs[4])
        ctx.geometry = (tuple(keyword_only_inputs["stride"]), tuple(keyword_only_inputs["padding"]),
                        (1, 1), 1)

    def stem_backward(ctx, grad):
        gi, gw, gb, gr = _conv_backward(ctx, grad, ctx.geometry)
        return gi, gw, None, gb, gr

    torch.library.register_autograd(lib + "stem_conv", stem_backward, setup_context=stem_setup)

    def mean_linear_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.has_bias = inputs[2] is not None

    def mean_linear_backward(ctx, grad):
        x, w = ctx.saved_tensors
        h, wd = x.shape[2:]
        gx = (grad @ w)[:, :, None, None].expand_as(x) / (h * wd) if ctx.needs_input_grad[0] \
            else None
        gw = grad.t() @ x.mean((2, 3)) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb

    torch.library.register_autograd(lib + "mean_linear", mean_linear_backward,
                                    setup_context=mean_linear_setup)

    # The op skips the argmax; its gradient recomputes it with ATen's max-pool.
    def max_pool_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.geometry = tuple(inputs[1:4])

    def max_pool_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding = ctx.geometry
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, kernel_size, stride, padding, [1, 1], False, indices)
        return gx, None, None, None

    torch.library.register_autograd(lib + "max_pool2d", max_pool_backward,
                                    setup_context=max_pool_setup)

    # im2col is linear: its gradient sums each row's taps back onto the pixels they read,
    # which F.fold does for all taps of the kernel (those left out get zero gradient).
    def im2col_setup(ctx, inputs, output):
        ctx.input_shape = inputs[0].shape
        ctx.geometry = tuple(tuple(v) for v in inputs[1:])

    def im2col_backward(ctx, grad):
        (kh, kw), stride, padding, dilation, begin, end = ctx.geometry
        n, c, h, w = ctx.input_shape
        oh, ow = grad.shape[2:]
        taps = grad.permute(0, 2, 3, 1).reshape(n, oh * ow, end[0] - begin[0],
                                                end[1] - begin[1], c)
        full = taps.new_zeros((n, oh * ow, kh, kw, c))
        full[:, :, begin[0]:end[0], begin[1]:end[1]] = taps
        cols = full.permute(0, 4, 2, 3, 1).reshape(n, c * kh * kw, oh * ow)
        gx = torch.nn.functional.fold(cols, (h, w), (kh, kw), dilation=dilation,
                                      padding=padding, stride=stride)
        return gx, None, None, None, None, None, None

    torch.library.register_autograd(lib + "im2col", im2col_backward, setup_context=im2col_setup)

    def add_relu_setup(ctx, inputs, output):
        ctx.save_for_backward(output)

    def add_relu_backward(ctx, grad):
        g = _relu_grad(grad, ctx.saved_tensors[0], True)
        return g, g

    torch.library.register_autograd(lib + "add_relu", add_relu_backward,
                                    setup_context=add_relu_setup)


# Fake kernels and autograd formulas need the schemas; registering them without the
# library would turn a clear "not built" message into an unrelated import-time crash.
if _extension.available():
    _register_fakes()
    _register_autograd()
