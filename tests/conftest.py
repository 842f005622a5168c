import threading

import pytest
import torch
import torchvision

from resnet_fused.testing import realistic_

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tv_model(arch, seed=0, **kwargs):
    """A torchvision model with realistic (seeded) weights, in eval mode."""
    return realistic_(getattr(torchvision.models, arch)(**kwargs), seed=seed).eval()


def rel_err(out, ref):
    """max |out - ref| / max |ref|, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


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
