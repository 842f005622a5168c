"""What the tests share: one encoding of a conv case, one fp64 reference, the error
measures and their tolerances, the devices and dtypes to run on, one opcheck helper,
and realistic models.

Tolerance rule (every op test): the error, max|out - ref| / max|ref| against an
fp64 reference on the same (already rounded) operands, may be at most

    tol(dtype, n) = 2 * sqrt(n) * eps_fp32 + eps_dtype         (n = C/groups * R * S)

The first term bounds fp32 accumulation of n products in any summation order
(rounding errors of a length-n sum grow like sqrt(n) * eps; 2x covers the
spread between kernels, Winograd's transforms included); the second is the one
rounding of the result to a low-precision dtype. It holds on any CPU and for any
kernel path: AVX2 or AVX-512, oneDNN's or ours. An indexing bug errs O(1).
fp32 on CUDA with TF32 allowed for convs (PyTorch's default) rounds every
operand to TF32 inside the kernel: eps_dtype is then TF32's, 2^-10 (10 mantissa
bits; the expected error is about 0.4x that).

Model rule (every whole-model fp32 test): each fused output may lie at most
fp32_bounds(model, x) from the model's own fp32 output, three times the model's own
fp32 error against its fp64 copy on the same input (see fp32_bounds; test_graph_fuse's
hand-written models, whose outputs come straight from Winograd F(4x4), six times),
computed afresh for each test's model and input.
"""

import contextlib
import math
import os
import tempfile
import threading
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import dispatch

# ---- devices and dtypes -------------------------------------------------------


def devices():
    """pytest params: "cpu", and "cuda" (marked `cuda`) when a GPU and our CUDA
    kernels are both here."""
    has_cuda = torch.cuda.is_available() and dispatch.CUDA_CONV_BUILT
    skip = pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU and a CUDA build")
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, skip])]


def dtypes_for(device):
    return list(dispatch.dtypes_for(device))


def skip_unless_dtype(device, dtype):
    if dtype not in dispatch.dtypes_for(device):
        pytest.skip(f"{dtype} has no kernel on {device} here")


requires_extension = pytest.mark.skipif(not resnet_fused.available(),
                                        reason="extension not built")

# ---- conv cases ------------------------------------------------------------------


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _fmt(v):
    a, b = _pair(v)
    return f"{a}" if a == b else f"{a}x{b}"


@dataclass(frozen=True)
class ConvCase:
    """A conv: R x S kernel (S defaults to R); stride, padding and dilation an int
    or an (h, w) pair."""
    C: int
    K: int
    H: int
    W: int
    R: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    N: int = 2
    S: int = None

    def __str__(self):
        kernel = f"{self.R}" if self.S in (None, self.R) else f"{self.R}x{self.S}"
        return (f"N{self.N}C{self.C}K{self.K}_{self.H}x{self.W}_k{kernel}s{_fmt(self.stride)}"
                f"p{_fmt(self.padding)}d{_fmt(self.dilation)}g{self.groups}")

    @property
    def kernel_size(self):
        return self.R, self.R if self.S is None else self.S

    @property
    def out_hw(self):
        return tuple((size + 2 * p - (d * (k - 1) + 1)) // s + 1 for size, k, s, p, d in zip(
            (self.H, self.W), self.kernel_size, _pair(self.stride), _pair(self.padding),
            _pair(self.dilation)))

    @property
    def reduction(self):
        return self.C // self.groups * math.prod(self.kernel_size)

    def geometry(self):
        """(stride, padding, dilation, groups) as the ops take them."""
        return _pair(self.stride), _pair(self.padding), _pair(self.dilation), self.groups

    def tensors(self, dtype=torch.float32, device="cpu", channels_last=False, seed=0,
                draw_on="cpu"):
        """(x, w, b, residual): normal values, weights scaled by 1/sqrt(fan_in) so
        outputs are O(1); drawn in fp32 on `draw_on` (a CUDA generator is much
        faster for batch-256 tensors, with other values), then cast and moved."""
        g = torch.Generator(draw_on).manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=g, device=draw_on)  # noqa: E731
        x = randn(self.N, self.C, self.H, self.W)
        w = randn(self.K, self.C // self.groups, *self.kernel_size) / math.sqrt(self.reduction)
        b = randn(self.K)
        r = randn(self.N, self.K, *self.out_hw)
        out = [t.to(device=device, dtype=dtype) for t in (x, w, b, r)]
        if channels_last:
            out[0] = out[0].contiguous(memory_format=torch.channels_last)
        return tuple(out)


def exact_in_every_dtype(t):
    """t rounded to bfloat16 values, those below float16's normal range set to 0:
    float32, TF32, bfloat16 and float16 all hold the result exactly, so one fp64
    reference serves every dtype. Returned in float32."""
    t = t.to(torch.bfloat16).float()
    return torch.where(t.abs() < torch.finfo(torch.float16).tiny, torch.zeros_like(t), t)


@contextlib.contextmanager
def num_threads(n):
    """torch's intra-op thread count set to n inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_and_more_threads(fn):
    """(fn() on 1 thread, fn() on max(2, current) threads): the ops split their work by
    thread count, and their results must not depend on it."""
    more = max(2, torch.get_num_threads())
    with num_threads(1):
        one = fn()
    with num_threads(more):
        return one, fn()


def reference(x, w, b, residual, case, relu):
    """act(conv2d(x, w) + b [+ residual]) in fp64 on the CPU."""
    stride, padding, dilation, groups = case.geometry()
    d = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    y = F.conv2d(d(x), d(w), d(b), stride, padding, dilation, groups)
    if residual is not None:
        y = y + d(residual)
    return F.relu(y) if relu else y


# ---- errors ------------------------------------------------------------------------


def rel_err(out, ref, device="cpu"):
    """max|out - ref| / max|ref|, in fp64 on `device` (the CPU unless told)."""
    out, ref = (t.detach().to(device, torch.float64) for t in (out, ref))
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def grad_err(ours, ref):
    """||ours - ref|| / ||ref||, in fp64: the measure for whole gradients, where a
    pre-activation within rounding of a ReLU's kink may flip single elements."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).norm() / ref.norm()).item()


def fp32_bounds(model, *inputs, run=None, measure=None, within=2):
    """How far each output of a fused fp32 model may lie from `model`'s own fp32 result
    on `inputs`: a tree of bounds shaped like the run's output (None where an output is
    not a floating-point tensor).

    A fused ResNet's target is at most `within` = 2x the model's own error e against
    its fp64 self. By the triangle inequality the two fp32 results then lie within
    (within + 1) * e of each other; eps_fp32 more is a floor where e happens to be near
    0. e is the largest of the model's errors run NCHW and run channels_last (or
    channels_last_3d, for 3-D convs; a layout the model cannot run is left out): oneDNN's
    channels_last kernels, which the fused model's convs share, err up to ~3x its NCHW
    ones per conv (within the op rule), which a network's feature maps show and its
    logits mostly average out. e is computed here, on copies of the model (its state
    untouched, the same random numbers for each copy), for the inputs at hand and on
    this CPU's kernels, so the bound follows the computation, not a constant tuned on
    one machine.

    `run(model, *inputs)` returns a tensor or a tree of them (default: the forward);
    `measure(out, ref)` is the error measure the test uses (default rel_err)."""
    import copy

    from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

    measure = measure or rel_err
    grad_mode = torch.enable_grad if run else torch.no_grad
    run = run or (lambda m, *xs: m(*xs))
    layout_dims = {torch.channels_last: 4, torch.channels_last_3d: 5}

    def results(dtype, layout):
        m = copy.deepcopy(model).to(dtype)
        xs = tree_map(lambda x: x.detach().clone().to(dtype)
                      if torch.is_tensor(x) and x.is_floating_point() else x, inputs)
        if layout in layout_dims:
            m = m.to(memory_format=layout)
            xs = tree_map(lambda x: x.contiguous(memory_format=layout)
                          if torch.is_tensor(x) and x.dim() == layout_dims[layout] else x, xs)
        # Outside any inference_mode of the caller: the copies are plain tensors.
        with torch.random.fork_rng(), torch.inference_mode(False), grad_mode():
            torch.manual_seed(0)
            return tree_flatten(run(m, *xs))

    ref, spec = results(torch.float64, torch.contiguous_format)
    runs = [results(torch.float32, torch.contiguous_format)[0]]
    for layout in layout_dims:
        try:
            runs.append(results(torch.float32, layout)[0])
        except RuntimeError:  # a model that cannot run it (x.view of a conv output; 2-D convs
            pass              # channels_last_3d, 3-D ones channels_last)
    assert all(len(r) == len(ref) for r in runs), "fp32_bounds: runs differ in outputs"
    eps = torch.finfo(torch.float32).eps
    bounds = []
    for i, r in enumerate(ref):
        if not (torch.is_tensor(r) and r.is_floating_point()):
            bounds.append(None)
            continue
        e = max(measure(run_[i], r) for run_ in runs)
        assert math.isfinite(e), f"fp32_bounds: output {i} has a non-finite error {e}"
        bounds.append((within + 1) * e + eps)
    assert any(b is not None for b in bounds), "fp32_bounds: no floating-point output"
    return tree_unflatten(bounds, spec)


def fp32_bound(model, *inputs, **kwargs):
    """fp32_bounds for a run with one output, or the largest of its bounds."""
    from torch.utils._pytree import tree_leaves

    return max(b for b in tree_leaves(fp32_bounds(model, *inputs, **kwargs)) if b is not None)


def tf32_conv_enabled():
    """Whether fp32 convs on CUDA may use TF32 (the flag our CUDA kernels read)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision == "tf32"
    return torch.backends.cudnn.allow_tf32


@contextlib.contextmanager
def tf32_convs(enabled):
    """Allows or forbids TF32 in fp32 convs on CUDA, then restores the setting."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")
    old = conv.fp32_precision if new_api else torch.backends.cudnn.allow_tf32
    if new_api:
        conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        if new_api:
            conv.fp32_precision = old
        else:
            torch.backends.cudnn.allow_tf32 = old


def tol(dtype, n, device="cpu"):
    """The tolerance of the module docstring for a reduction of length n, for a
    result computed on `device` with the current TF32 setting."""
    eps32 = torch.finfo(torch.float32).eps
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32 and torch.device(device).type == "cuda" and tf32_conv_enabled():
        eps = 2.0 ** -10  # TF32 operands
    return 2 * math.sqrt(n) * eps32 + eps


def assert_matches(out, ref, dtype, n, what=""):
    err, bound = rel_err(out, ref), tol(dtype, n, out.device)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g}"


def assert_nonfinite_matches(out, ref, dtype, n, what=""):
    """`out` against an fp64 `ref` holding NaN/Inf: the same NaN and Inf positions, the
    same Inf signs, and the finite values within tol, since a NaN or Inf operand sends
    the kernels down other paths whose finite results must be right too."""
    bound = tol(dtype, n, out.device)
    out = out.detach().cpu().double()
    assert ref.isnan().any() or ref.isinf().any(), f"{what}: the reference is all finite"
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(out.isinf(), ref.isinf()), f"{what}: Inf positions differ"
    assert torch.equal(out[ref.isinf()], ref[ref.isinf()]), f"{what}: Inf signs differ"
    finite = ref.isfinite()
    assert finite.any(), f"{what}: no finite value left to compare"
    err = rel_err(out[finite], ref[finite])
    assert err <= bound, f"{what}: relative error of the finite values {err:.3g} > {bound:.3g}"


def assert_rounded_once(out, ref, size, reduction):
    """bfloat16 `out` against `ref`, the fp64 result of the same bfloat16 operands: their
    products are exact in float32, so out is ref summed in float32 (error at most
    (reduction + 2) * 2^-24 * size, size the sum of the terms' magnitudes, in any order)
    and rounded once to bfloat16 (at most 2^-8 relative). Rounding twice, the product
    and then its sum with the residual, can exceed that."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    acc = (reduction + 2) * 2.0 ** -24 * size
    err, bound = (out.double() - ref).abs(), acc + 2.0 ** -8 * (ref.abs() + acc)
    worst = (err - bound).flatten().argmax() if err.numel() else None
    assert worst is None or err.flatten()[worst] <= bound.flatten()[worst], (
        f"error {err.flatten()[worst]:.3g} > {bound.flatten()[worst]:.3g}, the bound of one "
        f"rounding (out {out.flatten()[worst]}, ref {ref.flatten()[worst]})")


# ---- opcheck -------------------------------------------------------------------------


def opcheck(op, args, kwargs=None):
    """torch.library.opcheck with every test utility: schema, fake kernel (and
    dynamic shapes), autograd registration, AOT dispatch."""
    torch.library.opcheck(op, args, kwargs or {})


# ---- models and threads ----------------------------------------------------------


def tv_model(arch, seed=0, **kwargs):
    """A torchvision model with realistic (seeded) weights, in eval mode."""
    import torchvision

    from resnet_fused.testing import realistic_
    return realistic_(getattr(torchvision.models, arch)(**kwargs), seed=seed).eval()


def run_in_threads(work, n):
    """Runs work(i) for i in range(n), each in its own thread, and waits for all."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# Where put_nonfinite can write. Weights are poisoned at the centre tap of a 3x3
# 'same' conv, which every output reads in bounds: kernels that skip taps on the
# padding and kernels that multiply them by its zeros then agree.
NONFINITE_KINDS = ("input", "input_inf", "residual", "weight", "weight_inf", "bias", "bias_inf")


def put_nonfinite(where, x, w, b, res):
    """Writes NaN/Inf into the named operand of a conv (x, w, b, residual), in place:
    "input" NaN and +Inf, "input_inf" +Inf and -Inf, "residual" NaN and -Inf,
    "weight" and "bias" NaN, "weight_inf" and "bias_inf" +Inf and -Inf."""
    nan, inf = float("nan"), float("inf")
    if where == "input":
        x[0, 3, 5, 5], x[1, 0, 2, 2] = nan, inf
    elif where == "input_inf":
        x[0, 3, 5, 5], x[1, 0, 2, 2] = inf, -inf
    elif where == "residual":
        res[0, 3, 5, 5], res[1, 0, 2, 2] = nan, -inf
    elif where == "weight":
        w[7, 0, 1, 1] = nan
    elif where == "weight_inf":
        w[7, 0, 1, 1], w[9, 2, 1, 1] = inf, -inf
    elif where == "bias":
        b[9] = nan
    elif where == "bias_inf":
        b[9], b[3] = inf, -inf
    else:
        raise ValueError(f"put_nonfinite: expected where in {NONFINITE_KINDS}, got {where!r}")


@contextlib.contextmanager
def kernel_runs():
    """{op name: calls its CPU kernel computed itself} within the block, filled in on
    exit; calls its conv_bias_act path took (same results) are not counted."""
    from resnet_fused import _C

    before, runs = _C.kernel_runs(), {}
    yield runs
    runs.update({op: n - before[op] for op, n in _C.kernel_runs().items()})


@contextlib.contextmanager
def exclusive_gpu_memory():
    """Runs a test that takes a large share of GPU memory alone among this
    machine's test processes (scripts/gpu_check.sh runs one per tile config side
    by side), and hands its memory back afterwards."""
    import fcntl

    with open(os.path.join(tempfile.gettempdir(), "resnet_fused_gpu_memory.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            torch.cuda.empty_cache()
