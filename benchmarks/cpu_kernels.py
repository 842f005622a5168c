"""Times the CPU Winograd kernels against what they replace, per ResNet-50 layer shape:
winograd_conv3x3 with F(2x2, 3x3) and with F(4x4, 3x3) vs conv_bias_act (oneDNN,
weight packed as the model packs it), with each one's error against fp64 and the tests'
tolerance. fp32 (or bfloat16: F(2x2) only, its error held to 2x oneDNN's), channels_last,
median of repeats after warm-up, on the threads torch uses.

    python benchmarks/cpu_kernels.py [--batch-sizes 1,8] [--repeats 30] [--dtype bfloat16]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from resnet_fused import _extension, ops

# (C = K, H = W) of ResNet-50's stride-1 3x3 convs, layer1-4.
WINOGRAD_LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]


def median_ms(fn, repeats, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def winograd_rows(batch, repeats, dtype):
    for c, h in WINOGRAD_LAYERS:
        x = torch.randn(batch, c, h, h).relu().contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, c, 3, 3) / (9 * c) ** 0.5, torch.randn(c)
        ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        packed = ops.pack_weight(w, 1, 1, 1, 1, x.shape)
        runs = [lambda: ops.conv_bias_act(x, packed, b, None, 1, 1, 1, 1, relu=True,
                                          assume_finite=True)]
        for tile in (2, 4) if dtype == torch.float32 else (2,):
            u = ops.winograd_weight(w, tile)
            runs.append(lambda u=u: ops.winograd_conv3x3(x, w, u, b, None, relu=True,
                                                         assume_finite=True))
        yield (f"3x3 {c}ch {h}x{h}", [median_ms(f, repeats) for f in runs],
               [rel_err(f(), ref) for f in runs])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if not _extension.winograd_kernel_available():
        print("the Winograd kernel does not run on this machine; both columns would time oneDNN")
        return 1
    print(f"cpu ({torch.get_num_threads()} threads), {args.dtype}, channels_last, "
          f"median of {args.repeats}")
    print(f"{'shape':18} {'batch':>5} {'oneDNN ms':>10} {'F2 ms':>7} {'F4 ms':>7} "
          f"{'F2 speedup':>10} {'F4 speedup':>10} {'err oneDNN':>10} {'err F2':>8} {'err F4':>8} "
          f"{'tol':>8}")
    eps = torch.finfo(torch.float32).eps
    with torch.inference_mode():
        for batch in (int(v) for v in args.batch_sizes.split(",")):
            for (c, _), (name, times, errs) in zip(
                    WINOGRAD_LAYERS, winograd_rows(batch, args.repeats, dtype)):
                t_ref, t2, t4 = times + [float("nan")] * (3 - len(times))
                e_ref, e2, e4 = errs + [float("nan")] * (3 - len(errs))
                # tests/common_utils.py's rule for fp32; in bfloat16, 2x oneDNN's error.
                tol = 2 * (9 * c) ** 0.5 * eps + eps if dtype == torch.float32 else 2 * e_ref
                f4 = (f"{t4:7.2f}", f"{t_ref / t4:9.2f}x", f"{e4:8.1e}") if t4 == t4 else \
                    (f"{'-':>7}", f"{'-':>10}", f"{'-':>8}")
                print(f"{name:18} {batch:5d} {t_ref:10.2f} {t2:7.2f} {f4[0]} "
                      f"{t_ref / t2:9.2f}x {f4[1]} {e_ref:10.1e} {e2:8.1e} {f4[2]} {tol:8.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
