"""The timing loop and the error measure of the CPU per-op benchmarks (cpu_kernels.py,
cpu_conv1x1.py, cpu_grouped_conv.py)."""

import statistics
import time

import torch


def median_ms(fns, repeats, cold, warmup=3):
    """Median ms of each of fns, called in turn after warm-up, every other round in
    reverse (A B, B A, ...: in a fixed order the second of two equal calls measured
    faster). cold: 64 MB of other memory traffic before each call, as a layer meets its
    weight in a model."""
    junk = torch.empty(16 << 20) if cold else None
    times = [[] for _ in fns]
    for i in range(warmup + repeats):
        pairs = list(zip(fns, times))
        for fn, ts in (pairs if i % 2 == 0 else reversed(pairs)):
            if junk is not None:
                junk.fill_(1.0)
            t = time.perf_counter()
            fn()
            if i >= warmup:
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def rel_err(out, ref):
    """max|out - ref| / max|ref|, ref in float64."""
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()
