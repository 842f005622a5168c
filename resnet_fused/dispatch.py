"""Which kernel runs a folded conv, for this device, dtype, shape and CPU: the one
place that knows.

`prepare(weight, bias, conv, dtype)` turns a folded conv into a `PreparedConv`
(with the Winograd-domain weight where Winograd pays, and a per-shape cache of
oneDNN-packed weights); `conv` and `conv_add_relu_` run it. The model, the CLI and
the tests read the dtype tables here.
"""

import os
from dataclasses import dataclass, field

import torch

from . import _extension, ops


def tracing():
    """Under torch.compile or torch.export (which trace the fold and the ops)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and (compiler.is_compiling()
                              or getattr(compiler, "is_exporting", lambda: False)()))


# ---- what runs where --------------------------------------------------------

# Constants, so that torch.compile traces the checks that use them.
CPU_DTYPES = (torch.float32,) + (
    (torch.bfloat16,) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtypes_for(device_type):
    """The dtypes our kernels compute in on this device type."""
    return {"cpu": CPU_DTYPES, "cuda": CUDA_DTYPES}.get(device_type, ())


# The CUDA conv kernels compile but have not yet been verified on a GPU, so the
# model uses them only when asked (the ops themselves are callable).
CUDA_CONV_BUILT = _extension.has_kernel("conv_bias_act", "cuda")
_USE_CUDA = os.environ.get("RESNET_FUSED_UNVERIFIED_CUDA", "") == "1"
# Device types whose conv kernels FusedResNet uses.
KERNEL_DEVICES = frozenset(d for d in ("cpu", "cuda") if _extension.has_kernel("conv_bias_act", d)
                           and (d != "cuda" or _USE_CUDA))


def unsupported(device, dtype):
    """Why the fused kernels cannot run on this device in this dtype, or None."""
    dev = device.type
    if dev not in KERNEL_DEVICES:
        if dev == "cuda" and CUDA_CONV_BUILT:
            return ("the CUDA conv kernels are not yet verified on a GPU; set "
                    "RESNET_FUSED_UNVERIFIED_CUDA=1 to use them")
        return f"resnet_fused has no {dev} kernels in this build"
    if dev == "cuda" and not tracing():
        arch_error = _extension.cuda_arch_error(device)
        if arch_error:
            return arch_error
    if dtype not in dtypes_for(dev):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes_for(dev))
        return f"the {dev} kernels support {names}, not {str(dtype).replace('torch.', '')}"
    return None


# ---- one conv, prepared ------------------------------------------------------

@dataclass
class PreparedConv:
    """A conv with its BN folded in, ready for the ops."""
    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    dtype: torch.dtype             # dtype this conv computes in (fp32 if fp16 would overflow)
    winograd: torch.Tensor = None  # weight in the Winograd domain, for winograd_conv3x3
    cached: bool = True            # kept across forwards, so worth packing per input shape
    packed: dict = field(default_factory=dict)  # input shape -> weight in oneDNN's layout

    # oneDNN's packed layout is chosen for one input shape; used with another it is
    # re-laid out on every call (measured: ResNet-50 batch 1 at 83 ms instead of 34
    # with weights packed for batch 8). So packs are kept per shape, for a few
    # shapes; beyond those the plain weight is used, still correct.
    MAX_PACKED_SHAPES = 4

    def weight_for(self, x):
        if not self.cached or tracing() or x.device.type != "cpu":
            return self.weight
        shape = tuple(x.shape)
        w = self.packed.get(shape)
        if w is None:
            if len(self.packed) >= self.MAX_PACKED_SHAPES:
                return self.weight
            w = ops.pack_weight(self.weight, self.stride, self.padding, self.dilation,
                                self.groups, shape)
            self.packed[shape] = w
        return w


def prepare(weight, bias, conv, dtype, cached=True):
    """A PreparedConv of a folded (weight, bias) for `conv`'s geometry, computing in
    `dtype`. cached=False (a fold made for one forward: traced, or carrying
    gradients) skips what pays only across forwards: the Winograd weight and
    oneDNN's packed weights."""
    c = PreparedConv(weight.contiguous(memory_format=torch.channels_last), bias,
                     tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups,
                     dtype, cached=cached)
    if cached and _winograd_fits(c):
        c.winograd = ops.winograd_weight(c.weight)
    return c


# ---- Winograd rules ------------------------------------------------------------

def _winograd_fits(c):
    # 3x3 stride-1 convs: 2.25x fewer multiplies (measured 1.3-2.0x faster than
    # oneDNN's direct kernel on ResNet-50's layers with AVX2 and AVX-512, and more
    # accurate in fp32).
    return (c.weight.device.type == "cpu" and c.dtype == torch.float32
            and tuple(c.weight.shape[2:]) == (3, 3) and c.stride == (1, 1)
            and c.padding == (1, 1) and c.dilation == (1, 1) and c.groups == 1
            and _extension.winograd_kernel_available())


# Winograd re-reads its 16 transformed weight matrices once per block of tiles;
# with fewer than this many 2x2 output tiles per thread, that traffic outweighs
# the multiplies it saves (measured, 512 channels at 7x7: 0.70x and 0.93x of
# oneDNN's speed with 16 and 32 tiles per thread; 1.21x with 64).
_WINOGRAD_MIN_TILES_PER_THREAD = 24


def _winograd_pays(x):
    n, _, h, w = x.shape
    tiles = n * ((h + 1) // 2) * ((w + 1) // 2)
    return tiles >= _WINOGRAD_MIN_TILES_PER_THREAD * torch.get_num_threads()


# ---- running it ------------------------------------------------------------------

def conv(x, c, *, relu, finite, residual=None):
    """act(conv(x) + bias [+ residual]) with the kernel that suits x and c."""
    dt = x.dtype
    if c.dtype != dt:  # fp16 layer kept in fp32 (see fold.cast_folded)
        x = x.to(c.dtype)
        residual = None if residual is None else residual.to(c.dtype)
    if c.winograd is not None and _winograd_pays(x):
        y = ops.winograd_conv3x3(x, c.weight, c.winograd, c.bias, residual, relu=relu,
                                 assume_finite=finite)
    else:
        y = ops.conv_bias_act(x, c.weight_for(x), c.bias, residual, c.stride, c.padding,
                              c.dilation, c.groups, relu=relu, assume_finite=finite)
    return y.to(dt)


def conv_add_relu_(identity, x, c, *, finite):
    """relu(conv(x) + bias + identity), accumulated into `identity` where a kernel can
    (identity must be dead after this call); returns the result."""
    needs_grad = torch.is_grad_enabled() and (identity.requires_grad or x.requires_grad
                                              or c.weight.requires_grad)
    if c.dtype != x.dtype or (c.winograd is not None and _winograd_pays(x)) or needs_grad:
        return conv(x, c, relu=True, finite=finite, residual=identity)
    ops.conv_bias_add_relu_(identity, x, c.weight_for(x), c.bias, c.stride, c.padding,
                            c.dilation, c.groups, assume_finite=finite)
    return identity
