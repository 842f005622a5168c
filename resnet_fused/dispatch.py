"""Which kernel runs a folded conv, for this device, dtype, shape and CPU: the one
place that knows.

`prepare(weight, bias, conv, dtype)` turns a folded conv into a `PreparedConv`
(which makes its Winograd-domain weight on first use where Winograd pays, and
keeps a per-shape cache of oneDNN-packed weights); `conv` and `conv_add_relu_`
run it. The model, the CLI and
the tests read the dtype tables here.
"""

import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.modules.module as _module

from . import _extension, ops
from .huge_pages import to_huge_pages


def compiling():
    """Under torch.compile or torch.export (Dynamo: Python it cannot trace is skipped)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and (compiler.is_compiling()
                              or getattr(compiler, "is_exporting", lambda: False)()))


def tracing():
    """Under torch.compile, torch.export or torch.jit.trace (which record the fold and the
    ops: a fold cached by an earlier call would be recorded differently from one made
    in the call, and torch.jit.trace checks that two recordings agree)."""
    return torch.jit.is_tracing() or compiling()


def without_autograd():
    """A context in which the ops dispatch straight to their kernels. Their autograd
    layer is Python (torch.library), ~15 us a call even under no_grad: for a
    forward that records no graph (a cached fold) it is skipped."""
    return torch._C._AutoDispatchBelowADInplaceOrView()


# ---- what runs where --------------------------------------------------------

# Constants, so that torch.compile traces the checks that use them.
CPU_DTYPES = (torch.float32,) + (
    (torch.bfloat16,) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtypes_for(device_type):
    """The dtypes our kernels compute in on this device type."""
    return {"cpu": CPU_DTYPES, "cuda": CUDA_DTYPES}.get(device_type, ())


# The CUDA conv kernels, where this build has them (checked on an H200: scripts/gpu_check.sh).
CUDA_CONV_BUILT = _extension.has_kernel("conv_bias_act", "cuda")
# Device types whose conv kernels FusedResNet uses.
KERNEL_DEVICES = frozenset(d for d in ("cpu", "cuda") if _extension.has_kernel("conv_bias_act", d))


def unsupported(device, dtype):
    """Why the fused kernels cannot run on this device in this dtype, or None."""
    dev = device.type
    if dev not in KERNEL_DEVICES:
        return f"resnet_fused has no {dev} kernels in this build"
    if dev == "cuda" and not compiling():
        arch_error = _extension.cuda_arch_error(device)
        if arch_error:
            return arch_error
    if dtype not in dtypes_for(dev):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes_for(dev))
        return f"the {dev} kernels support {names}, not {str(dtype).replace('torch.', '')}"
    return None


# CUDA paths written but not yet measured on a GPU, each taken only when named in
# RESNET_FUSED_CUDA_TRY (comma-separated; benchmarks/cuda_notes.md has their predictions):
#   pad_channels  A conv with fewer input channels than a 16-byte vector (ResNet's stem:
#                 3) appends zero channels to input and weight and takes the vector
#                 kernel, not the scalar-load one (the stem: 1.67 ms at batch 256 in fp16
#                 on an H200, cuDNN's fused conv 0.60 ms). The same sums.
#   max_pool      The max-pool by ops.max_pool2d, without the int64 argmax ATen's CUDA
#                 kernel writes (0.82 ms after the stem at batch 256, fp16, H200).
#   plan          FusedResNet's recorded walk replayed from C++ (op_plan.py), as on the
#                 CPU: at batch 1 fp16 on an H200 the Python walk cost ~0.65 ms of host
#                 time (1.41 ms a forward, 0.76 ms captured in a CUDA graph).
CUDA_TRY_NAMES = ("pad_channels", "max_pool", "plan")
CUDA_TRY = frozenset(n.strip() for n in os.environ.get("RESNET_FUSED_CUDA_TRY", "").split(",")
                     if n.strip())
if CUDA_TRY - set(CUDA_TRY_NAMES):
    warnings.warn(f"RESNET_FUSED_CUDA_TRY: expected names from {', '.join(CUDA_TRY_NAMES)}, "
                  f"got {', '.join(sorted(CUDA_TRY - set(CUDA_TRY_NAMES)))}; ignoring those",
                  RuntimeWarning, stacklevel=2)


def padded_channels(channels, dtype):
    """`channels` rounded up to whole 16-byte vectors of `dtype`."""
    vec = 16 // dtype.itemsize
    return -(-channels // vec) * vec


def _pad_to(c):
    """The input channels a CUDA conv is padded to for the vector kernel, or 0 where that
    cannot help: grouped convs, fewer than 16 output channels (the direct kernel), input
    channels already whole vectors."""
    k, cin = c.weight.shape[:2]
    channels = padded_channels(cin, c.dtype)
    return channels if (c.weight.device.type == "cuda" and c.groups == 1 and k >= 16
                        and channels != cin) else 0


def _tf32_convs():
    """Whether fp32 convs may use TF32, as our CUDA kernel asks (per op). torch 2.9+ reads
    the new flags: the conv's, else cuDNN's, else the global one ("none" defers to the
    next; all "none" is IEEE). The legacy flag raises there once the two APIs disagree."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        for precision in (conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                          getattr(torch.backends, "fp32_precision", "none")):
            if precision != "none":
                return precision == "tf32"
        return False
    return torch.backends.cudnn.allow_tf32


def _tensor_core_conv(x):
    """Whether our CUDA kernel would take its tensor-core path for x, which the padding
    is for (sm_80 and newer; fp32 only with TF32 allowed); else padding only adds work."""
    return (torch.cuda.get_device_capability(x.device)[0] >= 8
            and (x.dtype != torch.float32 or _tf32_convs()))


def pad_channels(t, channels):
    """t (N, C, H, W) with zero channels appended up to `channels`, channels_last. One
    op (constant_pad_nd, which keeps the layout; F.pad reaches a recording under
    inference mode as aten::pad, with a string), so that a recorded plan holds it."""
    out = torch.constant_pad_nd(t, (0, 0, 0, 0, 0, channels - t.shape[1]), 0.0)
    return out.contiguous(memory_format=torch.channels_last)


# ---- one conv, prepared ------------------------------------------------------

def make_room(cache, cap):
    """Drops a dict's oldest entries (insertion order: its users put an entry back last
    on each use) until one more fits under cap; returns the keys dropped. Safe with
    threads sharing the dict: list() copies it in one step, and pop tolerates a key
    another thread dropped first."""
    stale = list(cache)[:max(0, len(cache) - cap + 1)]
    for key in stale:
        cache.pop(key, None)
    return stale


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
    winograd: dict = field(default_factory=dict)  # tile -> Winograd-domain weight
    winograd_tiles: tuple = (4, 2)  # the tile sizes it may take (conv3d's: F(2x2) only)
    conv1x1_fits: bool = False     # conv1x1 computes this conv
    conv1x1_panels: torch.Tensor = None  # its weight in panels, made on first use
    summed_bias: tuple = None      # (downsample, its bias + ours), for conv_sum_relu
    im2col: dict = field(default_factory=dict)  # taps -> (weight over them as a 1x1 conv's,
    #                                             its conv1x1 panels), made on first use
    grouped_fits: bool = False     # grouped_conv3x3 computes this conv
    grouped_weight: torch.Tensor = None  # its weight in blocks, made on first use
    stem_fits: bool = False        # stem_conv computes this conv
    stem_weight: torch.Tensor = None  # its weight as stem_conv reads it, made on first use
    pad_to: int = 0                # CUDA: input channels the "padded" route pads to (_pad_to)
    padded_weight: torch.Tensor = None  # the weight with those zero channels, made on first use
    float32: "PreparedConv" = None  # bfloat16: this conv in float32, made on first use (_choose)
    packed: dict = field(default_factory=dict)  # input shape -> weight in oneDNN's layout
    routes: dict = field(default_factory=dict)  # (input shape, threads) -> kernel_for's answer

    # oneDNN's packed layout is chosen for one input shape; used with another it is
    # re-laid out on every call (measured: ResNet-50 batch 1 at 83 ms instead of 34
    # with weights packed for batch 8). So packs are kept per shape, for the few
    # shapes used last: a new one takes the place of the least recently used (a
    # service's warm-up sizes must not leave its traffic on a re-laid-out weight).
    MAX_PACKED_SHAPES = 4

    def kernel_for(self, x):
        """("winograd", its weight), ("conv1x1", its weight panels), ("im2col", (im2col's
        arguments, the weight over the taps read as a 1x1 conv's, its panels)), ("grouped",
        its weight blocks), ("stem", its weight as stem_conv reads it), ("padded", its
        weight with zero input channels), ("float32", this conv as a float32
        PreparedConv) or ("conv_bias_act", its weight): the op that suits x. Remembered
        per input shape and thread count outside tracing: the choice is a few microseconds
        of Python per call, ~0.3 ms of a 53-conv forward."""
        if tracing():
            return self._choose(x)
        key = (x.shape, torch.get_num_threads())
        route = self.routes.get(key)
        if route is None:
            route = self._choose(x)
            if not (self.cached and x.device.type == "cpu"):
                return route
            make_room(self.routes, 2 * self.MAX_PACKED_SHAPES)
        else:
            self.routes.pop(key, None)  # put back last: the most recently used
            pack = self.packed.pop(tuple(x.shape), None)  # and its shape's pack with it
            if pack is not None:
                self.packed[tuple(x.shape)] = pack
        self.routes[key] = route
        return route

    def _choose(self, x):
        u = self.winograd_for(x)
        if u is not None:
            return "winograd", u
        if self.conv1x1_fits and not tracing() and _conv1x1_pays(x, self.stride[0]):
            if self.conv1x1_panels is None:
                self.conv1x1_panels = to_huge_pages(ops.conv1x1_weight(self.weight))
            return "conv1x1", self.conv1x1_panels
        if self.stem_fits and not tracing() and _stem_pays(x, self):
            if self.stem_weight is None:
                self.stem_weight = ops.stem_conv_weight(self.weight)
            return "stem", self.stem_weight
        if self.cached and not tracing() and _im2col_pays(x, self):
            return "im2col", self.im2col_for(x)
        if self.grouped_fits and not tracing():
            if self.grouped_weight is None:
                self.grouped_weight = to_huge_pages(ops.grouped_conv_weight(self.weight,
                                                                            self.groups))
            return "grouped", self.grouped_weight
        # (x's channel count is checked by the op; a wrong one must still reach it.)
        if (self.pad_to and "pad_channels" in CUDA_TRY and not tracing() and x.is_cuda
                and x.shape[1] == self.weight.shape[1] and _tensor_core_conv(x)):
            return "padded", self.padded_weight_for()
        # conv_bias_act computes a bfloat16 conv with an output extent of 1 in float32
        # (csrc/cpu/conv_bias_act.cpp: the oneDNN torch ships errs there), converting its
        # weight on every call: 0.4-2 ms for each of R(2+1)D's layer3-4 convs on clips of 4
        # frames, whose time axis ends at 1. So such a conv keeps a float32 copy instead.
        if (self.dtype == torch.bfloat16 and self.cached and x.device.type == "cpu"
                and not tracing() and 1 in _output_extents(x, self)):
            if self.float32 is None:
                self.float32 = prepare(self.weight.float(), _float(self.bias), self,
                                       torch.float32, direct=self.weight.dim() == 5)
                self.float32.winograd_tiles = self.winograd_tiles
            return "float32", self.float32
        return "conv_bias_act", self.weight_for(x)

    def padded_weight_for(self):
        w = self.padded_weight
        if w is None or not self.cached:
            w = pad_channels(self.weight, self.pad_to)
            if self.cached:
                self.padded_weight = w
        return w

    def weight_for(self, x):
        if not self.cached or tracing() or x.device.type != "cpu":
            return self.weight
        shape = tuple(x.shape)
        w = self.packed.get(shape)
        if w is None:
            w = ops.pack_weight(self.weight, self.stride, self.padding, self.dilation,
                                self.groups, shape)
            for old in make_room(self.packed, self.MAX_PACKED_SHAPES):
                # Routes hold their shape's pack: theirs go too, so that no more than
                # MAX_PACKED_SHAPES packs per conv stay alive.
                for key in [k for k in list(self.routes) if tuple(k[0]) == old]:
                    self.routes.pop(key, None)
        else:
            self.packed.pop(shape, None)  # put back last: the most recently used
        self.packed[shape] = w
        return w

    def im2col_for(self, x):
        """(ops.im2col's arguments after x, weight, panels): im2col over the kernel taps
        that read any of x (the others read only padding), and the weight over those taps
        as a 1x1 conv's, [K, taps * C, 1, 1] in im2col's order, with its conv1x1 panels."""
        taps = _taps_read(x, self)
        pair = self.im2col.get(taps)
        if pair is None:
            (h0, w0), (h1, w1) = taps
            k = self.weight.shape[0]
            # (All taps: a view of the channels_last weight. conv1x1 reads only its panels.)
            w = self.weight.permute(0, 2, 3, 1)[:, h0:h1, w0:w1].reshape(k, -1, 1, 1)
            pair = self.im2col[taps] = (w, to_huge_pages(ops.conv1x1_weight(w)))
        args = (tuple(self.weight.shape[2:]), self.stride, self.padding, self.dilation) + taps
        return (args,) + pair

    def winograd_tile_for(self, x):
        """The Winograd tile size winograd_conv3x3 should compute x with, or None (conv3d
        asks it of a 3-D conv's centre tap, for winograd_conv3d)."""
        if not self.winograd_fits or tracing():
            return None
        return _winograd_tile(x, self.weight, self.stride[0], self.winograd_tiles)

    def winograd_for(self, x):
        """The Winograd-domain weight if winograd_conv3x3 should compute x, else None.
        Made on first use, per tile size, so that a model holds only the ones its
        inputs need: they are 16/9 (F(2x2)) and 4x (F(4x4)) the weight's size."""
        tile = self.winograd_tile_for(x)
        if tile is None:
            return None
        u = self.winograd.get(tile)
        if u is None:
            u = ops.winograd_weight(self.weight, tile=tile, stride=self.stride[0])
            u = self.winograd[tile] = to_huge_pages(u)
        return u


def _taps_read(x, c):
    """((first, first), (end, end)): per axis, the range of kernel taps that read some
    pixel of x rather than only its padding (as tap_begin, tap_end of ops.im2col); None
    where no tap does (then the conv's output is its bias)."""
    begin, end = [], []
    for size, out, k, s, p, d in zip(x.shape[2:], _output_extents(x, c), c.weight.shape[2:],
                                     c.stride, c.padding, c.dilation):
        read = [t for t in range(k) if any(0 <= o * s + t * d - p < size for o in range(out))]
        if not read:
            return None
        begin.append(read[0])
        end.append(read[-1] + 1)
    return tuple(begin), tuple(end)


def _output_extents(x, c):
    return [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
            zip(x.shape[2:], c.weight.shape[2:], c.stride, c.padding, c.dilation)]


def _float(t):
    return None if t is None else t.float()


def prepare(weight, bias, conv, dtype, cached=True, direct=False):
    """A PreparedConv of a folded (weight, bias) for `conv`'s geometry, computing in
    `dtype`. cached=False (a fold made for one forward: traced, or carrying
    gradients) skips what pays only across forwards: the Winograd weight and
    oneDNN's packed weights. A 3-D conv (5-D weight) gets a conv3d.Prepared3d, whose
    direct form is the PreparedConv made here with direct=True."""
    if weight.dim() == 5 and not direct:
        from . import conv3d
        return conv3d.prepare(weight, bias, conv, dtype, cached)
    if weight.dim() == 5:
        return PreparedConv(weight.contiguous(memory_format=torch.channels_last_3d), bias,
                            tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
                            conv.groups, dtype, cached=cached)
    c = PreparedConv(weight.contiguous(memory_format=torch.channels_last), bias,
                     tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups,
                     dtype, cached=cached)
    c.winograd_fits = cached and _winograd_fits(c)
    c.conv1x1_fits = cached and _conv1x1_fits(c)
    c.grouped_fits = cached and _grouped_fits(c)
    c.stem_fits = cached and _stem_fits(c)
    c.pad_to = _pad_to(c)
    if c.pad_to and cached:
        # Made now, on the fold's stream before its syncing check, not on the first
        # padded call: a call on another stream could read it before it is written.
        c.padded_weight = pad_channels(c.weight, c.pad_to)
    return c


# ---- Winograd rules ------------------------------------------------------------

# Our bfloat16 kernels (Winograd, conv1x1) were measured where oneDNN's bfloat16
# convolutions run on AVX512_BF16. With AMX, oneDNN's run on the tile unit at several
# times that rate, and ours have not been measured there (nor their brgemm's AMX path
# run), so on AMX CPUs oneDNN keeps those convs unless RESNET_FUSED_BF16_ON_AMX=1 (or
# the older RESNET_FUSED_BF16_WINOGRAD_ON_AMX=1; or oneDNN is capped below AMX by
# ONEDNN_MAX_CPU_ISA, as on the CPUs they were measured on).
_ONEDNN_ISA = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
_AMX = (bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        and (_ONEDNN_ISA in ("ALL", "DEFAULT") or "AMX" in _ONEDNN_ISA))
_BF16_ON_AMX = "1" in (os.environ.get("RESNET_FUSED_BF16_ON_AMX", ""),
                       os.environ.get("RESNET_FUSED_BF16_WINOGRAD_ON_AMX", ""))


def _winograd_fits(c):
    # 3x3 stride-1 convs, by F(4x4, 3x3) (4x fewer multiplies) or F(2x2, 3x3) (2.25x
    # fewer), and fp32 stride-2 ones by F(2x2, 3x3) at stride 2 (1.44x fewer);
    # _winograd_tile says where each beats oneDNN's direct kernel. bfloat16: F(2x2) at
    # stride 1 on AVX-512, with whole 16-channel vectors (winograd.cpp), not on AMX.
    k, cin = c.weight.shape[:2]
    bf16 = (c.dtype == torch.bfloat16 and _extension.winograd_bf16_kernel_available()
            and (not _AMX or _BF16_ON_AMX) and k % 16 == 0 and cin % 16 == 0)
    strides = ((1, 1), (2, 2)) if c.dtype == torch.float32 else ((1, 1),)
    return (c.weight.device.type == "cpu" and (c.dtype == torch.float32 or bf16)
            and tuple(c.weight.shape[2:]) == (3, 3) and c.stride in strides
            and c.padding == (1, 1) and c.dilation == (1, 1) and c.groups == 1
            and _extension.winograd_kernel_available())


# Where the weight is not split across threads (_winograd_splits), each thread reads
# the alpha^2 transformed weight matrices (alpha = tile + 2) once per block of output
# tiles and spends alpha^2 * C * K multiply-adds per tile on them: with too few tiles
# per thread it waits on that read. In a model the weight is not in cache when its
# layer starts (ResNet-50's weights are 100 MB). So F(4x4) (36 matrices) needs 16 of
# its tiles per thread; below that F(2x2) (16 matrices) pays from 24 of its tiles per
# thread if its weight (64 * C * K bytes) is small enough to come from L3 (up to
# 256x256 channels), and where F(4x4) is not allowed from twice as many with a larger
# one; below that oneDNN's direct kernel is faster. With more channels F(4x4) pays first
# (with AVX2 since its weight comes in 32-wide panels, ops.brgemm_panel:
# 512 channels at 14x14, batch 16, warm, F(4x4) 34.1 ms against oneDNN's 67.2 and F(2x2)'s
# 35.5; AVX-512 33.3 / 61.3 / 34.3; in 64-wide panels AVX2 had lost there). Measured on AMD
# EPYC Zen 4, 2 threads, in ResNet-50 and alone (benchmarks/cpu_kernels.py), before the
# split existed, ms:
#                                    tiles/thread  F(4x4)  F(2x2)  oneDNN
#   256 ch, 14x14, batch 1, in the model   8 / 24     0.91       -    1.02
#     (ResNet-18 batch 1: 15.2 ms with F(2x2) there, 16.8 with F(4x4))
#   512 ch, 7x7, batch 8, in the model    16 / 64      5.6       -     7.2
# Those weight-bound shapes now split, and the cost model below picks for them.
# Where F(4x4) is not allowed (the video ResNets' convs over frames, conv3d._TILES),
# R(2+1)D's layer3 takes F(2x2) with a large weight in one piece: cold weights, 2
# threads, alternating, ms (oneDNN / F(2x2)): 256 -> 576 channels at 14x14, 4 frames
# (98 tiles per thread) 8.73 / 4.92, 256 -> 460 7.07 / 4.17 (576 -> 256 8.71 / 4.88); 512
# -> 921 at 7x7 (one panel of 921 channels) 16 tiles per thread 3.79 / 4.62, 32 tiles
# 6.83 / 7.41 (so R(2+1)D's layer4 at 2 frames stays on oneDNN), 48 tiles 13.36 / 11.54.
_WINOGRAD_MIN_TILES_PER_THREAD = {4: 16, 2: 24}
_WINOGRAD_L3_WEIGHT = 256 * 256  # C * K up to which F(2x2) pays from 24 tiles per thread
_WINOGRAD_F2_LARGE_WEIGHT_TILES = 2  # past it, from this many times as many


# winograd_conv3x3 computes an image smaller than one tile, and F(4x4) with fewer
# input channels than this, directly (csrc/cpu/winograd.cpp says why); F(2x2) is
# then still worth choosing.
_WINOGRAD_F4_MIN_CHANNELS = 16


# bfloat16 runs F(2x2) only: its rounding of V and U to bfloat16 costs 1.0-1.4x the
# error of oneDNN's direct bfloat16 kernel per layer, where F(4x4)'s larger transform
# entries would cost more. Its products run at twice fp32's rate, so the weight
# matters at half the tiles: with more than 256x256 channels F(2x2) pays from 48 tiles
# per thread where the weight is not split; split, the fp32 cost model holds (half the
# bytes per weight, twice the multiply-adds per second): 512 ch, 7x7, batch 1, 0.60 ms
# against oneDNN's 0.66, batch 2 0.99 against 1.09 (`benchmarks/cpu_kernels.py --cold
# --dtype bfloat16`). Measured before the split on AMD EPYC Zen 4 (AVX512_BF16), 2
# threads, cold caches, ms:
#                          oneDNN bf16  F(2x2) bf16
#   64 ch, 56x56, batch 1        0.67        0.40
#   256 ch, 14x14, batch 1       0.64        0.39   (24 tiles per thread)
#   512 ch, 7x7, batch 1         0.61        0.80   (24 tiles per thread)
#   512 ch, 7x7, batch 8         4.15        3.21   (64 tiles per thread)
#   64 ch, 56x56, batch 8        4.26        3.13


def _winograd_splits(c, k, tiles, threads, dtype=torch.float32):
    """Whether winograd_conv3x3 splits this call's output channels across threads
    (csrc/cpu/winograd.cpp decides the same way): its weight comes in more than one
    panel and is larger than the transformed input and output of all its tiles, so the
    threads share each tile and read the weight once between them."""
    return threads > 1 and ops.winograd_panel(k, dtype) < k and c * k > tiles * (c + k)


# Where the weight is split, each variant reads its weight once and spends its
# multiply-adds: per input-output channel pair, F(m x m) reads alpha^2 floats and spends
# alpha^2 per tile, the direct kernel 9 and 9 per pixel. Time ~ bytes * R + multiply-adds,
# R = multiply-adds per byte of memory traffic, ~1.9 per thread on AMD EPYC Zen 4 (~48 G
# fp32 multiply-adds/s per thread, ~25 GB/s). Fitted to these times (2 threads, cold
# weights, alternating, ms; AVX2 by RESNET_FUSED_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2):
#                             oneDNN  F(2x2)  F(4x4)   model's pick
#   512 ch, 7x7, batch 1        1.33    1.11    1.57   F(2x2)
#   512 ch, 7x7, batch 2        2.13    1.77    1.80   F(2x2)
#   512 ch, 7x7, batch 4        3.89    3.06    2.38   F(4x4)
#   512 ch, 7x7, batch 8, AVX2  8.14    6.77    4.97   F(4x4)
#   256 ch, 14x14, batch 1      1.16    0.67    0.69   F(2x2)  (AVX2: 1.18, 0.73, 0.81)
_BYTES_TO_MACS_PER_THREAD = 1.9


# With AVX2, products with few tiles ran 1.35x slower than with AVX-512 while U came in
# 64-wide panels (512 channels at 7x7, batch 1, F(2x2): 1.49 ms against 1.11), and the
# model had left them to oneDNN there. In 32-wide panels (ops.brgemm_panel) they take
# 1.07 ms against oneDNN's 1.31 (`benchmarks/cpu_kernels.py --batch-sizes 1 --cold`
# capped to AVX2), and in the model, two models alternating, layer4's stride-1 3x3 convs
# on F(2x2) against oneDNN gave ResNet-50 at batch 1 35.24 vs 35.77 and 36.16 vs 36.48
# ms, ResNet-18 11.52 vs 11.91 and 11.58 vs 12.08 (AMD EPYC Zen 4 capped to AVX2, 2
# threads): one cost model serves both ISAs.


def _cost(c, k, weight_floats, macs, threads):
    """The time model above, per call: weight_floats and macs per channel pair."""
    return c * k * (4 * weight_floats * _BYTES_TO_MACS_PER_THREAD * threads + macs)


# Stride 2, F(2x2): 25 multiply-adds per 2x2 output tile for the direct kernel's 36, on
# 16 distinct weight matrices; its 25 small products run ~1.2x slower per multiply-add
# than oneDNN's direct kernel (measured 1.15-1.21x its speed where the tiles cover the
# output exactly, 0.86-0.91x at a 7x7 output, where 16 tiles hold 64 outputs for 49:
# AMD EPYC Zen 4, 2 threads, cold weights, alternating; ResNet's stride-2 shapes at
# batch 1 and 8). The cost model with that factor decides every stride-2 call (their
# weights are split or small beside their tiles' work) and picks it from 14x14 outputs.
_STRIDE2_MAC_COST = 1.2


def _winograd_tile(x, weight, stride=1, allowed=(4, 2)):
    """The Winograd tile size (4 or 2, of those allowed) that beats oneDNN on x, or None."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    threads = torch.get_num_threads()
    small = k * c <= _WINOGRAD_L3_WEIGHT
    if stride == 2:
        ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        if x.dtype != torch.float32 or ho < 2 or wo < 2:
            return None
        tiles = n * -(-ho // 2) * -(-wo // 2)
        direct = _cost(c, k, 9, 9 * n * ho * wo, threads)
        return 2 if _cost(c, k, 16, 25 * _STRIDE2_MAC_COST * tiles, threads) < direct else None
    if x.dtype == torch.bfloat16:
        if h < 2 or w < 2:
            return None
        tiles2 = n * -(-h // 2) * -(-w // 2)
        # Split, as fp32: half the bytes per weight, twice the rate.
        if _winograd_splits(c, k, tiles2, threads, x.dtype):
            direct = _cost(c, k, 9, 9 * n * h * w, threads)
            return 2 if _cost(c, k, 16, 16 * tiles2, threads) < direct else None
        needed = _WINOGRAD_MIN_TILES_PER_THREAD[2]
        needed *= 1 if small else _WINOGRAD_F2_LARGE_WEIGHT_TILES
        return 2 if tiles2 >= needed * threads else None
    tiles = {t: n * -(-h // t) * -(-w // t) for t in allowed
             if h >= t and w >= t and (t == 2 or c >= _WINOGRAD_F4_MIN_CHANNELS)}
    if any(_winograd_splits(c, k, count, threads) for count in tiles.values()):
        costs = {None: _cost(c, k, 9, 9 * n * h * w, threads)}
        costs.update({t: _cost(c, k, (t + 2) ** 2, (t + 2) ** 2 * count, threads)
                      for t, count in tiles.items()})
        return min(costs, key=costs.get)
    for tile, needed in _WINOGRAD_MIN_TILES_PER_THREAD.items():
        if tile not in tiles:
            continue
        if tile == 2 and not small:
            if 4 in allowed:  # F(4x4) pays first; measured without it only
                continue
            needed *= _WINOGRAD_F2_LARGE_WEIGHT_TILES
        if tiles[tile] >= needed * threads:
            return tile
    return None


# ---- conv1x1 rules ---------------------------------------------------------------

def _conv1x1_computes(dtype, k, reduction):
    # conv1x1's kernel (conv1x1.cpp): whole 64-channel weight panels; float32, and
    # bfloat16 with an even reduction on AVX-512 (not on AMX, as for Winograd above).
    bf16 = (dtype == torch.bfloat16 and _extension.conv1x1_bf16_kernel_available()
            and (not _AMX or _BF16_ON_AMX) and reduction % 2 == 0)
    return ((dtype == torch.float32 or bf16) and k % ops.CONV1X1_PANEL == 0
            and _extension.conv1x1_kernel_available())


def _conv1x1_fits(c):
    # Unpadded 1x1 convs (stride 1, or the same stride along both axes) that conv1x1's
    # kernel computes.
    k, cin = c.weight.shape[:2]
    return (c.weight.device.type == "cpu" and _conv1x1_computes(c.dtype, k, cin)
            and tuple(c.weight.shape[2:]) == (1, 1) and c.stride[0] == c.stride[1]
            and c.padding == (0, 0) and c.groups == 1)


# conv1x1 computes the 1x1 convs that fit it: called from our op, it skips
# ATen's work around oneDNN's convolution (descriptors, primitive cache, scratchpad:
# 70-220 us per call inside ResNet-50 at batch 1), and it splits the weight's panels
# across threads where rows are few (conv1x1.cpp). Measured on AMD EPYC Zen 4, 2
# threads, ResNet-50 with it against one with oneDNN for the 1x1 convs of layer1 and
# layer2 (and at batch 8 of all), whole forwards alternating (ABBA): 35.89 vs 36.53 and
# 34.96 vs 35.56 ms at batch 1 (within that method's bias: the same model twice gave the
# second 0.981-0.998 of the first), 259.2 vs 272.4 at batch 8; in separate processes against
# the release before, 35.25 vs 34.92 and 253.1 vs 254.9 (README). Per op it loses only on
# layer1's projection shortcut, 64 -> 256 at 56x56 without ReLU or residual (+0.03 ms
# of 0.66 at batch 1, +0.36 of 4.9 at batch 8), which it keeps for a simpler rule.
# With AVX2 (RESNET_FUSED_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2),
# oneDNN's AVX2 1x1 convolution runs 10-17% faster per call where rows are many (batch 8:
# 512 -> 128 at 28x28 4.34-4.49 vs 5.03-5.09 ms; 64 -> 256 at 56x56 with the residual
# 4.47-4.48 vs 5.04-5.11) and slower where they are few (batch 8 at 7x7: 4.05-4.13 vs
# 4.45-4.56 with the residual; at batch 1, 0.46 ms less over all 33 calls): so there it
# takes them up to _CONV1X1_MAX_ROWS_PER_THREAD. (Before its epilogue was
# vectorized per ISA it lost at 28x28 and 56x56 on AVX-512 too.) Those AVX2 figures are
# from 64-wide weight panels; in 32-wide ones (ops.brgemm_panel) conv1x1 for every
# stride-1 1x1 conv tied with this rule at batch 8 (ResNet-50 256.00 vs 255.18 ms, two
# models alternating), so the rule stays.
#
# At stride 2 (ResNet's downsample convs at the start of layer2-4) it also takes them up
# to that many output rows per thread, on either ISA, its strided rows gathered into
# contiguous memory before their products (conv1x1.cpp). Per op (measured before
# conv1x1 split layer2's rows, in the row split for small weights),
# ms, oneDNN's convolution -> conv1x1, AMD EPYC Zen 4, 2 threads: inside ResNet-50 (two
# models alternating, per-op medians) at batch 1, 256 -> 512 at 56x56 1.255 -> 1.125,
# 512 -> 1024 at 28x28 1.283 -> 1.087, 1024 -> 2048 at 14x14 1.203 -> 1.154; alone, input
# warm, at batch 8, 1024 -> 2048 at 14x14 8.0-8.2 -> 7.7-7.8 (AVX2: 8.7-9.7 -> 8.0-8.5),
# 512 -> 1024 at 28x28 (784 rows per thread) 8.0-8.4 -> 8.1-8.3 (AVX2: 9.3-10.0 -> 8.9-9.9),
# and with 3136 rows per thread (256 -> 512 at 56x56, the rows split and gathered per
# block) 8.2-8.4 -> 8.4-8.6, which it leaves to oneDNN.
_CONV1X1_MAX_ROWS_PER_THREAD = 2047


# bfloat16 (AVX-512 only) follows the same rows-per-thread rule at either stride:
# `python benchmarks/cpu_conv1x1.py --dtype bfloat16 --batch-sizes 1,8 --repeats 20` (AMD
# EPYC Zen 4 with AVX512_BF16, 2 threads, against oneDNN's bfloat16 convolution on its
# packed weight) has it faster on every ResNet-50 shape at batch 1 (at most 1568 rows per
# thread; cold 1.11-1.41x, warm 0.96-1.15x) and at batch 8 at 14x14 and 7x7 (784 and 196
# rows; cold 1.01-1.08x), slower at 56x56 (12544 rows; 0.83-0.97x) and level at 28x28
# (3136; 0.95-1.04x).
def _conv1x1_pays(x, stride):
    if stride == 1 and x.dtype == torch.float32 and _extension.cpu_isa() == "avx512":
        return True
    n, _, h, w = x.shape
    rows = n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    return rows <= _CONV1X1_MAX_ROWS_PER_THREAD * torch.get_num_threads()


# ---- im2col rules -------------------------------------------------------------------

# Small convs with a kernel larger than 1x1 (ResNets on small inputs: at 32x32 every
# conv after the stem has at most 64 output pixels) run as conv1x1's product over their
# im2col rows: that skips ATen's ~30 us around oneDNN's convolution on each call, and
# taps that read only padding (a 3x3 conv on a 1x1 input multiplies its centre tap
# only). Up to IM2COL_MAX_ROWS output pixels and IM2COL_MAX_MACS multiply-adds: beyond,
# the op takes long enough that those microseconds no longer show (layer4's stride-2
# 3x3 conv at 224x224, batch 1, 49 rows and 116 M multiply-adds: oneDNN 1.31-1.45 ms,
# im2col + conv1x1 1.33-1.39, per op inside ResNet-50), and every ResNet conv at
# 224x224 stays as it was. Whole models, with and without the rule, alternating (AMD
# EPYC Zen 4, 2 threads, medians of 90, ms): ResNet-50 batch 1 at 32x32 4.32 -> 3.56,
# 64x64 7.10 -> 6.59, 96x96 9.54 -> 8.88, 128x128 12.59 -> 12.43, batch 8 at 32x32
# 9.24 -> 8.51; ResNet-18 batch 1 at 32x32 1.04 -> 0.61, batch 8 3.34 -> 2.66.
IM2COL_MAX_ROWS = 256
IM2COL_MAX_MACS = 1 << 26


def _im2col_pays(x, c):
    # (bfloat16: an even number of input channels makes every taps' reduction even.)
    k, cin = c.weight.shape[:2]
    if (x.device.type != "cpu" or c.weight.dim() != 4 or c.groups != 1
            or tuple(c.weight.shape[2:]) == (1, 1) or not _conv1x1_computes(c.dtype, k, cin)):
        return False
    rows = x.shape[0]
    for extent in _output_extents(x, c):
        rows *= extent
    return (rows <= IM2COL_MAX_ROWS and rows * c.weight[0].numel() * k <= IM2COL_MAX_MACS
            and _taps_read(x, c) is not None)


# ---- grouped_conv3x3 rules ----------------------------------------------------------

def _grouped_fits(c):
    # Grouped 3x3 float32 convs, padding 1, stride 1 or 2, in a layout the kernel computes
    # (ops.grouped_conv_fits): ResNeXt's. Alone (benchmarks/cpu_grouped_conv.py, AMD EPYC
    # Zen 4, 2 threads) it runs ResNeXt-50's shapes at batch 1 1.0-2.3x oneDNN's speed
    # through ATen, and loses up to 10% on a few others (groups of 8 at 56x56, 16-64
    # channels per group at batch 8); it takes them all, for one rule: in ResNeXt-50 its
    # 16 convs take 3.65 vs 5.74 ms at batch 1, 4.68 vs 6.72 with AVX2, 30.7 vs 43.3 at
    # batch 8 (two models alternating, per-op medians; README).
    return (c.weight.device.type == "cpu" and c.dtype == torch.float32 and c.groups > 1
            and tuple(c.weight.shape[2:]) == (3, 3) and c.stride in ((1, 1), (2, 2))
            and c.padding == (1, 1) and c.dilation == (1, 1)
            and ops.grouped_conv_fits(c.weight, c.groups)
            and _extension.grouped_conv_kernel_available())


# ---- stem_conv rules ----------------------------------------------------------------

# Convs over at most STEM_MAX_CHANNELS input channels (ResNet's stem: 3 channels, 7x7,
# stride 2), float32, stride 1 or 2 along both axes, ungrouped and undilated, with a
# multiple of 32 output channels: stem_conv's kernel computes them.
STEM_MAX_CHANNELS = 4


def _stem_fits(c):
    return (c.weight.device.type == "cpu" and c.weight.dim() == 4 and c.dtype == torch.float32
            and c.weight.shape[1] <= STEM_MAX_CHANNELS
            and c.weight.shape[0] % ops.STEM_CONV_BLOCK == 0
            and tuple(c.weight.shape[2:]) != (1, 1) and c.stride in ((1, 1), (2, 2))
            and c.dilation == (1, 1) and c.groups == 1 and _extension.stem_conv_kernel_available())


# Where it pays (benchmarks/cpu_stem_conv.py, AMD EPYC Zen 4, 2 threads, ResNet's stem,
# ms, oneDNN / ours): with AVX2, where oneDNN's kernel for 3 input channels runs at
# 52-62% of the FMA peak, at every size (224x224 batch 1 1.66-1.97 / 1.43-1.82, batch 8
# 11.34-14.63 / 10.27-13.12, two runs); with AVX-512, where oneDNN's runs at ~93%, only
# where ATen's ~25 us around each oneDNN call shows: up to STEM_AVX512_MAX_MACS
# multiply-adds (32x32 batch 1 0.063 / 0.036, 64x64 0.130 / 0.106; at 224x224 batch 1
# 1.15 / 1.27, batch 8 9.92 / 9.99).
STEM_AVX512_MAX_MACS = 1 << 25


def _stem_pays(x, c):
    if _extension.cpu_isa() != "avx512":
        return True
    macs = x.shape[0] * c.weight[0].numel() * c.weight.shape[0]
    for extent in _output_extents(x, c):
        macs *= extent
    return macs <= STEM_AVX512_MAX_MACS


# ---- running it ------------------------------------------------------------------

# The ops, called directly on arguments PreparedConv holds ready (resnet_fused.ops'
# wrappers normalize user arguments); looked up at each call.
_OPS = torch.ops.resnet_fused


def conv(x, c, *, relu, finite, residual=None):
    """act(conv(x) + bias [+ residual]) with the kernel that suits x and c."""
    if x.dim() == 5 and not isinstance(c, PreparedConv):
        from . import conv3d
        return conv3d.conv(x, c, relu=relu, finite=finite, residual=residual)
    dt = x.dtype
    if c.dtype != dt:  # fp16 layer kept in fp32 (see fold.cast_folded)
        x = x.to(c.dtype)
        residual = None if residual is None else residual.to(c.dtype)
    kind, w = c.kernel_for(x)
    if kind == "winograd":
        y = _OPS.winograd_conv3x3(x, c.weight, w, c.bias, residual, stride=c.stride[0],
                                  relu=relu, assume_finite=finite)
    elif kind == "conv1x1":
        y = _OPS.conv1x1(x, c.weight, w, c.bias, residual, relu=relu, stride=c.stride[0])
    elif kind == "im2col":
        args, w2, panels = w
        y = _OPS.conv1x1(_OPS.im2col(x, *args), w2, panels, c.bias, residual, relu=relu)
    elif kind == "stem":
        y = _OPS.stem_conv(x, c.weight, w, c.bias, residual, stride=c.stride, padding=c.padding,
                           relu=relu)
    elif kind == "grouped":
        y = _OPS.grouped_conv3x3(x, c.weight, w, c.bias, residual, stride=c.stride[0], relu=relu)
    elif kind == "float32":  # its float32 copy, rounded once, as conv_bias_act would
        y = conv(x.float(), w, relu=relu, finite=finite, residual=_float(residual))
    elif kind == "padded":
        y = _OPS.conv_bias_act(pad_channels(x, w.shape[1]), w, c.bias, residual, c.stride,
                               c.padding, c.dilation, c.groups, relu=relu, assume_finite=finite)
    else:
        y = _OPS.conv_bias_act(x, w, c.bias, residual, c.stride, c.padding, c.dilation,
                               c.groups, relu=relu, assume_finite=finite)
    return y if y.dtype == dt else y.to(dt)


def _plain(module, cls):
    """module is exactly a `cls` (not a subclass with a forward of its own) with no
    forward hooks of its own or global ones: running the op in its place is not seen."""
    return (type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks))


def max_pool(x, pool):
    """pool(x), by ops.max_pool2d where that computes the same: a plain nn.MaxPool2d
    (no dilation, ceil mode or indices) on a float32 or bfloat16 CPU tensor, or with
    "max_pool" in CUDA_TRY a float16, bfloat16 or float32 CUDA one, that records no graph.
    ATen's kernels also compute the argmax, which doubles the memory written on a CPU
    (benchmarks/cpu_max_pool.py, the pool after ResNet's stem, AMD EPYC Zen 4, 2 threads,
    three runs: fp32 1.2-1.9x ATen's speed at batch 1, 1.1-1.5x at 8) and more on CUDA."""
    if x.is_cuda:
        ours = "max_pool" in CUDA_TRY and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    else:
        ours = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    if (not ours or not _plain(pool, torch.nn.MaxPool2d) or tracing()
            or (x.requires_grad and torch.is_grad_enabled())
            or pool.return_indices or pool.ceil_mode or _pair(pool.dilation) != (1, 1)):
        return pool(x)
    return ops.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# Up to this batch, ops.mean_linear computes the head: measured with caches cold as after
# a trunk (64 MB of other traffic before each call; AMD EPYC Zen 4, 2 threads), against the
# pool and `linear` below, ms: ResNet-50's 2048 x 1000 fc 0.31 vs 0.58 at batch 1, 0.96 vs
# 1.03 at 8; ResNet-18's 512 x 1000 0.13 vs 0.39 and 0.31 vs 0.42. Its matrix-vector
# products per image stop paying where a matrix product (ATen's) would.
MEAN_LINEAR_MAX_BATCH = 8


def head(x, pool, fc):
    """fc(flatten(pool(x), 1)) by ops.mean_linear where that computes the same, else None:
    a plain nn.AdaptiveAvgPool2d to 1x1 and a plain nn.Linear, on a float32 CPU batch of
    at most MEAN_LINEAR_MAX_BATCH that records no graph."""
    # (Tracing first: a traced size must not be compared.)
    if (tracing() or not _plain(pool, torch.nn.AdaptiveAvgPool2d)
            or _pair(pool.output_size) != (1, 1)
            or not _plain(fc, torch.nn.Linear) or x.device.type != "cpu" or x.dim() != 4
            or x.dtype != torch.float32 or fc.weight.dtype != torch.float32
            or not 1 <= x.shape[0] <= MEAN_LINEAR_MAX_BATCH or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or fc.weight.requires_grad))):
        return None
    return _OPS.mean_linear(x, fc.weight.detach(), None if fc.bias is None else fc.bias.detach())


_LINEAR_PACKING = (torch.backends.mkldnn.is_available()
                   and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                   and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def linear(x, fc, packs):
    """fc(x). For one row (batch 1) on CPU, a plain nn.Linear in x's dtype (float32 or
    bfloat16, outside autocast) runs as oneDNN's inner product with fc's weight packed
    once into `packs`, a dict that must live no longer than fc's weight is unchanged
    (the model's fold; None: no packing). ResNet-50's 2048x1000 fc took 0.30 ms that
    way against ATen's 0.47, its weight out of cache as after a forward (AMD EPYC Zen
    4, 2 threads), at 0.4x ATen's error against fp64. With more rows oneDNN's error was
    2.6-3.2x ATen's (a whole ResNet-50 at batch 8: 1.1e-6 against torchvision's 4e-7),
    so those stay with ATen."""
    if (packs is None or not _LINEAR_PACKING or not _plain(fc, torch.nn.Linear)
            or x.device.type != "cpu" or x.dim() != 2 or x.shape[0] != 1
            or x.dtype != fc.weight.dtype or x.dtype not in CPU_DTYPES
            or torch.is_autocast_enabled("cpu") or tracing()
            or (torch.is_grad_enabled() and (x.requires_grad or fc.weight.requires_grad))):
        return fc(x)
    w = packs.get("weight")
    if w is None:
        w = packs["weight"] = torch.ops.mkldnn._reorder_linear_weight(fc.weight.detach(), 1)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, fc.bias, "none", [], "")


def conv_sum_relu(x, c, x2, c2):
    """relu(conv(x, c) + conv(x2, c2)) by one ops.conv1x1_sum where conv1x1 computes both
    (a Bottleneck's last conv and its downsample), else None. Neither product is then
    stored alone: the downsample's output is not written and read back as the residual.
    ResNet-50, two models alternating (AMD EPYC Zen 4, 2 threads, ad hoc): 33.29 vs 33.64
    and 33.54 vs 33.75 ms at batch 1, 250.2 vs 258.1 at batch 8; with AVX2 36.54 vs
    36.68 at batch 1. The op takes one bias in the input's dtype: in bfloat16 the two
    are summed and rounded to bfloat16 once, here (at most 2^-9 of their sum more
    error)."""
    kind, w = c.kernel_for(x)
    kind2, w2 = c2.kernel_for(x2)
    if kind != "conv1x1" or kind2 != "conv1x1" or c.stride != (1, 1):
        return None
    if c.summed_bias is None or c.summed_bias[0] is not c2:
        b = c.bias if c2.bias is None else c2.bias if c.bias is None else c.bias + c2.bias
        c.summed_bias = (c2, b)  # once: an op on the biases would stop the forward's plan
    return _OPS.conv1x1_sum(x, c.weight, w, x2, c2.weight, w2, c.summed_bias[1],
                            stride2=c2.stride[0], relu=True)


def conv_add_relu_(identity, x, c, *, finite):
    """relu(conv(x) + bias + identity), accumulated into `identity` where a kernel can
    (identity must be dead after this call); returns the result."""
    if x.dim() == 5 and not isinstance(c, PreparedConv):
        from . import conv3d
        return conv3d.conv_add_relu_(identity, x, c, finite=finite)
    needs_grad = torch.is_grad_enabled() and (identity.requires_grad or x.requires_grad
                                              or c.weight.requires_grad)
    if c.dtype != x.dtype or needs_grad:
        return conv(x, c, relu=True, finite=finite, residual=identity)
    kind, w = c.kernel_for(x)
    if (kind in ("winograd", "grouped", "stem", "padded", "float32")
            or (kind == "conv1x1" and c.stride != (1, 1))):
        return conv(x, c, relu=True, finite=finite, residual=identity)
    if kind == "conv1x1":
        _OPS.conv1x1_add_relu_(identity, x, c.weight, w, c.bias)
        return identity
    if kind == "im2col":
        args, w2, panels = w
        _OPS.conv1x1_add_relu_(identity, _OPS.im2col(x, *args), w2, panels, c.bias)
        return identity
    _OPS.conv_bias_add_relu_(identity, x, w, c.bias, c.stride, c.padding, c.dilation, c.groups,
                             assume_finite=finite)
    return identity
