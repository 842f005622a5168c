"""What the tests share: one encoding of a conv case, one fp64 reference, one error
measure and its tolerance, the devices and dtypes to run on, one opcheck helper,
and realistic models.

Tolerance rule (every op test): the error, max|out - ref| / max|ref| against an
fp64 reference on the same (already rounded) operands, may be at most

    tol(dtype, n) = 2 * sqrt(n) * eps_fp32 + eps_dtype         (n = C/groups * R * S)

The first term bounds fp32 accumulation of n products in any summation order
(rounding errors of a length-n sum grow like sqrt(n) * eps; 2x covers the
spread between kernels, Winograd's transforms included); the second is the one
rounding of the result to a low-precision dtype. It holds on any CPU and for any
kernel path: AVX2 or AVX-512, oneDNN's or ours. An indexing bug errs O(1).
"""

import math
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


@dataclass(frozen=True)
class ConvCase:
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

    def __str__(self):
        return (f"N{self.N}C{self.C}K{self.K}_{self.H}x{self.W}_k{self.R}s{self.stride}"
                f"p{self.padding}d{self.dilation}g{self.groups}")

    @property
    def out_hw(self):
        span = self.dilation * (self.R - 1) + 1
        return ((self.H + 2 * self.padding - span) // self.stride + 1,
                (self.W + 2 * self.padding - span) // self.stride + 1)

    @property
    def reduction(self):
        return self.C // self.groups * self.R * self.R

    def geometry(self):
        """(stride, padding, dilation, groups) as the ops take them."""
        two = lambda v: (v, v)  # noqa: E731
        return two(self.stride), two(self.padding), two(self.dilation), self.groups

    def tensors(self, dtype=torch.float32, device="cpu", channels_last=False, seed=0):
        """(x, w, b, residual): normal values, weights scaled by 1/sqrt(fan_in) so
        outputs are O(1); drawn in fp32 on the CPU, then cast and moved."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.N, self.C, self.H, self.W, generator=g)
        w = torch.randn(self.K, self.C // self.groups, self.R, self.R, generator=g)
        w = w / math.sqrt(self.reduction)
        b = torch.randn(self.K, generator=g)
        r = torch.randn(self.N, self.K, *self.out_hw, generator=g)
        out = [t.to(device=device, dtype=dtype) for t in (x, w, b, r)]
        if channels_last:
            out[0] = out[0].contiguous(memory_format=torch.channels_last)
        return tuple(out)


def reference(x, w, b, residual, case, relu):
    """act(conv2d(x, w) + b [+ residual]) in fp64 on the CPU."""
    stride, padding, dilation, groups = case.geometry()
    d = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    y = F.conv2d(d(x), d(w), d(b), stride, padding, dilation, groups)
    if residual is not None:
        y = y + d(residual)
    return F.relu(y) if relu else y


# ---- errors ------------------------------------------------------------------------


def rel_err(out, ref):
    """max|out - ref| / max|ref|, in fp64 on the CPU."""
    out, ref = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def tol(dtype, n):
    """The tolerance of the module docstring for a reduction of length n."""
    eps32 = torch.finfo(torch.float32).eps
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else eps32
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        eps = 2.0 ** -11  # TF32 operands
    return 2 * math.sqrt(n) * eps32 + eps


def assert_matches(out, ref, dtype, n, what=""):
    err = rel_err(out, ref)
    assert err <= tol(dtype, n), f"{what}: relative error {err:.3g} > {tol(dtype, n):.3g}"


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


def put_nonfinite(where, x, w, b, res):
    """Writes NaN/Inf into the named operand of a conv (x, w, b, residual), in place."""
    if where == "input":
        x[0, 3, 5, 5], x[1, 0, 2, 2] = float("nan"), float("inf")
    elif where == "residual":
        res[0, 3, 5, 5], res[1, 0, 2, 2] = float("nan"), -float("inf")
    elif where == "weight":
        w[7, 0, 1, 1] = float("nan")
    else:
        b[9] = float("nan")
