"""The timing loop of the CPU per-op benchmarks (cpu_kernels.py, cpu_conv1x1.py)."""

import statistics
import time

import torch


def median_ms(fns, repeats, cold, warmup=3):
    """Median ms of each of fns, called in turn (round-robin) after warm-up. cold: 64 MB
    of other memory traffic before each call, as a layer meets its weight in a model."""
    junk = torch.empty(16 << 20) if cold else None
    times = [[] for _ in fns]
    for i in range(warmup + repeats):
        for fn, ts in zip(fns, times):
            if junk is not None:
                junk.fill_(1.0)
            t = time.perf_counter()
            fn()
            if i >= warmup:
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]
