"""Which kernel runs a folded conv, for this device, dtype, shape and CPU: the one
place that knows.

`prepare(weight, bias, conv, dtype)` turns a folded conv into a `PreparedConv`
(which makes its Winograd-domain weight on first use where Winograd pays, and
keeps a per-shape cache of oneDNN-packed weights); `conv` and `conv_add_relu_`
run it. The model, the CLI and
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
    cached: bool = True            # kept across forwards, so worth packing per input shape
    winograd_fits: bool = False    # winograd_conv3x3 computes this conv
    winograd: torch.Tensor = None  # F(4x4, 3x3) weight, made on the first input it pays for
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

    def winograd_for(self, x):
        """The Winograd-domain weight if winograd_conv3x3 should compute x, else None.
        Made on first use, so that a model never run where Winograd pays (for one,
        at batch 1 with many threads) does not hold it: it is 4x the weight."""
        if not self.winograd_fits or tracing() or not _winograd_pays(x, self.weight):
            return None
        if self.winograd is None:
            self.winograd = ops.winograd_weight(self.weight, tile=4)
        return self.winograd


def prepare(weight, bias, conv, dtype, cached=True):
    """A PreparedConv of a folded (weight, bias) for `conv`'s geometry, computing in
    `dtype`. cached=False (a fold made for one forward: traced, or carrying
    gradients) skips what pays only across forwards: the Winograd weight and
    oneDNN's packed weights."""
    c = PreparedConv(weight.contiguous(memory_format=torch.channels_last), bias,
                     tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups,
                     dtype, cached=cached)
    c.winograd_fits = cached and _winograd_fits(c)
    return c


# ---- Winograd rules ------------------------------------------------------------

def _winograd_fits(c):
    # 3x3 stride-1 convs, by F(4x4, 3x3): 4x fewer multiplies (measured 2.1-3.2x
    # faster than oneDNN's direct kernel on ResNet-50's layers at batch 8, with
    # AVX2 and AVX-512; benchmarks/cpu_kernels.py).
    return (c.weight.device.type == "cpu" and c.dtype == torch.float32
            and tuple(c.weight.shape[2:]) == (3, 3) and c.stride == (1, 1)
            and c.padding == (1, 1) and c.dilation == (1, 1) and c.groups == 1
            and _extension.winograd_kernel_available())


# Each thread reads the 36 transformed weight matrices (36*C*K floats) once per
# block of 4x4 output tiles, and spends 36*C*K multiply-adds per tile on them: with
# too few tiles per thread the kernel waits on that read. Where the weight fits in
# cache (up to 256x256 channels: 9.4 MB) 4 tiles per thread suffice; a 512x512
# weight (38 MB) streams from memory and needs 16, and AVX2's narrower multiply
# block re-reads it too often to win at all. Measured on AMD EPYC Zen 4 against
# oneDNN, 1-2 threads (RESNET_FUSED_CPU_ISA=avx2 for AVX2): 256 channels at 7x7,
# 4 tiles/thread: 0.27 vs 0.48 ms; 512 channels at 7x7, 12 tiles/thread: 5.65 vs
# 5.33 ms, 16 tiles/thread: 6.00 vs 7.06 ms (AVX2: 11.2 vs 8.0 ms).
_WINOGRAD_CACHED_WEIGHT = 256 * 256
_WINOGRAD_MIN_TILES_PER_THREAD = 4
_WINOGRAD_MIN_TILES_PER_THREAD_STREAMED = 16


def _winograd_pays(x, weight):
    n, _, h, w = x.shape
    tiles_per_thread = n * ((h + 3) // 4) * ((w + 3) // 4) / torch.get_num_threads()
    if weight.shape[0] * weight.shape[1] <= _WINOGRAD_CACHED_WEIGHT:
        return tiles_per_thread >= _WINOGRAD_MIN_TILES_PER_THREAD
    return (_extension.cpu_isa() == "avx512"
            and tiles_per_thread >= _WINOGRAD_MIN_TILES_PER_THREAD_STREAMED)


# ---- running it ------------------------------------------------------------------

def conv(x, c, *, relu, finite, residual=None):
    """act(conv(x) + bias [+ residual]) with the kernel that suits x and c."""
    dt = x.dtype
    if c.dtype != dt:  # fp16 layer kept in fp32 (see fold.cast_folded)
        x = x.to(c.dtype)
        residual = None if residual is None else residual.to(c.dtype)
    u = c.winograd_for(x)
    if u is not None:
        y = ops.winograd_conv3x3(x, c.weight, u, c.bias, residual, relu=relu,
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
    if c.dtype != x.dtype or needs_grad or c.winograd_for(x) is not None:
        return conv(x, c, relu=True, finite=finite, residual=identity)
    ops.conv_bias_add_relu_(identity, x, c.weight_for(x), c.bias, c.stride, c.padding,
                            c.dilation, c.groups, assume_finite=finite)
    return identity
