"""Times the CPU Winograd kernels against what they replace, per ResNet-50 layer shape:
winograd_conv3x3 with F(2x2, 3x3) and with F(4x4, 3x3), and F(2x2, 3x3) at stride 2 for
the stage transitions, vs conv_bias_act (oneDNN, weight packed as the model packs it), with each one's error against fp64, the tests'
tolerance and the model's pick (dispatch._winograd_tile). fp32 (or bfloat16: F(2x2) only,
its error held to 2x oneDNN's), channels_last, on the threads torch uses; the variants
alternate, median of repeats after warm-up. --cold: before each call 64 MB of other memory
traffic, as a layer meets its weight in a model.

    python benchmarks/cpu_kernels.py [--batch-sizes 1,8] [--repeats 30] [--dtype bfloat16] [--cold]
"""

import argparse

import torch
import torch.nn.functional as F

from cpu_timing import median_ms, rel_err
from resnet_fused import _extension, dispatch, ops

# (C = K, input H = W, stride) of ResNet-50's 3x3 convs: stride 1 in layer1-4, stride 2
# at the start of layer2-4.
WINOGRAD_LAYERS = [(64, 56, 1), (128, 28, 1), (256, 14, 1), (512, 7, 1), (128, 56, 2),
                   (256, 28, 2), (512, 14, 2)]


def winograd_rows(batch, repeats, dtype, cold):
    for c, h, stride in WINOGRAD_LAYERS:
        if stride == 2 and dtype != torch.float32:
            continue
        x = torch.randn(batch, c, h, h).relu().contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, c, 3, 3) / (9 * c) ** 0.5, torch.randn(c)
        ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), stride=stride, padding=1))
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        packed = ops.pack_weight(w, stride, 1, 1, 1, x.shape)
        runs = [lambda: ops.conv_bias_act(x, packed, b, None, stride, 1, 1, 1, relu=True,
                                          assume_finite=True)]
        for tile in (2, 4) if dtype == torch.float32 and stride == 1 else (2,):
            u = ops.winograd_weight(w, tile, stride=stride)
            runs.append(lambda u=u: ops.winograd_conv3x3(x, w, u, b, None, stride=stride,
                                                         relu=True, assume_finite=True))
        pick = dispatch._winograd_tile(x, w, stride)
        name = f"3x3{'/2' if stride == 2 else ''} {c}ch {h}x{h}"
        yield (c, name, median_ms(runs, repeats, cold), [rel_err(f(), ref) for f in runs],
               "oneDNN" if pick is None else f"F{pick}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--cold", action="store_true", help="evict the caches before each call")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if not _extension.winograd_kernel_available():
        print("the Winograd kernel does not run on this machine; both columns would time oneDNN")
        return 1
    print(f"cpu ({torch.get_num_threads()} threads), {args.dtype}, channels_last, "
          f"{'cold' if args.cold else 'warm'} caches, median of {args.repeats}")
    print(f"{'shape':18} {'batch':>5} {'oneDNN ms':>10} {'F2 ms':>7} {'F4 ms':>7} "
          f"{'F2 speedup':>10} {'F4 speedup':>10} {'err oneDNN':>10} {'err F2':>8} {'err F4':>8} "
          f"{'tol':>8} {'model':>6}")
    eps = torch.finfo(torch.float32).eps
    with torch.inference_mode():
        for batch in (int(v) for v in args.batch_sizes.split(",")):
            for c, name, times, errs, pick in winograd_rows(batch, args.repeats, dtype, args.cold):
                t_ref, t2, t4 = times + [float("nan")] * (3 - len(times))
                e_ref, e2, e4 = errs + [float("nan")] * (3 - len(errs))
                # tests/common_utils.py's rule for fp32; in bfloat16, 2x oneDNN's error.
                tol = 2 * (9 * c) ** 0.5 * eps + eps if dtype == torch.float32 else 2 * e_ref
                f4 = (f"{t4:7.2f}", f"{t_ref / t4:9.2f}x", f"{e4:8.1e}") if t4 == t4 else \
                    (f"{'-':>7}", f"{'-':>10}", f"{'-':>8}")
                print(f"{name:18} {batch:5d} {t_ref:10.2f} {t2:7.2f} {f4[0]} "
                      f"{t_ref / t2:9.2f}x {f4[1]} {e_ref:10.1e} {e2:8.1e} {f4[2]} {tol:8.1e} {pick:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
