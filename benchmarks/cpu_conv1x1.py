"""Times the CPU conv1x1 kernel against oneDNN's convolution (weight packed as the model
packs it) on ResNet-50's 1x1 shapes (stride 1, and its stride-2 downsample convs), with warm caches and with cold ones (after
64 MB of other memory traffic, as a layer meets its weight in a model), with each one's
error against fp64 and whether the model picks conv1x1 there (dispatch._conv1x1_pays).
Then conv1x1_sum against the two calls it replaces (the downsample by conv1x1, the last
conv summed into it in place by conv1x1_add_relu_) on ResNet-50's four first-bottleneck
pairs, cold. fp32 or bf16 (errors against fp64 of the same bf16 operands), channels_last,
the variants alternating, median of repeats after warm-up, on the threads torch uses.

    python benchmarks/cpu_conv1x1.py [--batch-sizes 1,8] [--repeats 30] [--dtype bfloat16]
"""

import argparse

import torch
import torch.nn.functional as F

from cpu_timing import median_ms, rel_err
from resnet_fused import _extension, dispatch, heap, ops

# (C, K, H = W of the input, stride) of ResNet-50's 1x1 convs.
SHAPES = [(64, 256, 56, 1), (256, 64, 56, 1), (256, 128, 56, 1), (512, 128, 28, 1),
          (128, 512, 28, 1), (512, 256, 28, 1), (1024, 256, 14, 1), (256, 1024, 14, 1),
          (1024, 512, 14, 1), (2048, 512, 7, 1), (512, 2048, 7, 1),
          (256, 512, 56, 2), (512, 1024, 28, 2), (1024, 2048, 14, 2)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if not _extension.conv1x1_kernel_available():
        print("conv1x1's kernel does not run here (no fp32 brgemm); both would time oneDNN")
        return 1
    if dtype == torch.bfloat16 and not _extension.conv1x1_bf16_kernel_available():
        print("conv1x1's bfloat16 kernel does not run here (it needs AVX-512 and a bfloat16 "
              "brgemm: AVX512_BF16 or AMX); both would time oneDNN")
        return 1
    print(f"cpu ({torch.get_num_threads()} threads), {args.dtype}, channels_last, "
          f"median of {args.repeats}; ms")
    print(f"{'shape':24} {'batch':>5} {'oneDNN':>7} {'conv1x1':>7} {'warm':>6} "
          f"{'oneDNN':>7} {'conv1x1':>7} {'cold':>6} {'err oneDNN':>10} {'err 1x1':>8} "
          f"{'model':>7}")
    heap.keep_freed_memory()  # as the model does: outputs reuse memory, not fresh pages
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in (int(v) for v in args.batch_sizes.split(",")):
            for c, k, h, s in SHAPES:
                x = torch.randn(batch, c, h, h, generator=g).relu().to(dtype)
                x = x.contiguous(memory_format=torch.channels_last)
                w = (torch.randn(k, c, 1, 1, generator=g) / c ** 0.5).to(dtype)
                b = torch.randn(k, generator=g).to(dtype)
                ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), stride=s))
                packed, panels = ops.pack_weight(w, s, 0, 1, 1, x.shape), ops.conv1x1_weight(w)
                runs = [lambda: ops.conv_bias_act(x, packed, b, None, s, relu=True,
                                                  assume_finite=True),
                        lambda: ops.conv1x1(x, w, panels, b, None, relu=True, stride=s)]
                warm = median_ms(runs, args.repeats, cold=False)
                cold = median_ms(runs, args.repeats, cold=True)
                errs = [rel_err(f(), ref) for f in runs]
                picked = "conv1x1" if dispatch._conv1x1_pays(x, s) else "oneDNN"
                name = f"1x1 {c}->{k} {h}x{h}" + (f" /{s}" if s > 1 else "")
                print(f"{name:24} {batch:5d} {warm[0]:7.3f} {warm[1]:7.3f} "
                      f"{warm[0] / warm[1]:5.2f}x {cold[0]:7.3f} {cold[1]:7.3f} "
                      f"{cold[0] / cold[1]:5.2f}x {errs[0]:10.1e} {errs[1]:8.1e} {picked:>7}")
        print_sums(batch_sizes=[int(v) for v in args.batch_sizes.split(",")],
                   repeats=args.repeats, g=g, dtype=dtype)
    return 0


# (C of the last conv, K, output side, C of the downsample, its stride): ResNet-50's
# first bottleneck of each stage.
SUM_PAIRS = [(64, 256, 56, 64, 1), (128, 512, 28, 256, 2), (256, 1024, 14, 512, 2),
             (512, 2048, 7, 1024, 2)]


def print_sums(batch_sizes, repeats, g, dtype):
    print(f"\n{'last conv + downsample':34} {'batch':>5} {'two ops':>7} {'sum':>7} {'cold':>6} "
          f"{'err two':>8} {'err sum':>8}")
    cl = torch.channels_last
    for batch in batch_sizes:
        for c, k, h, c2, s in SUM_PAIRS:
            y = torch.randn(batch, c, h, h, generator=g).relu().to(dtype)
            x = torch.randn(batch, c2, h * s, h * s, generator=g).relu().to(dtype)
            y, x = (t.contiguous(memory_format=cl) for t in (y, x))
            w, w2 = ((torch.randn(k, n, 1, 1, generator=g) / n ** 0.5).to(dtype) for n in (c, c2))
            b, b2 = (torch.randn(k, generator=g).to(dtype) for _ in range(2))
            p, p2 = ops.conv1x1_weight(w), ops.conv1x1_weight(w2)
            both = (b.double() + b2.double()).to(dtype)
            ref = F.relu(F.conv2d(y.double(), w.double(), b.double())
                         + F.conv2d(x.double(), w2.double(), b2.double(), stride=s))

            def two_ops():
                identity = ops.conv1x1(x, w2, p2, b2, None, relu=False, stride=s)
                return ops.conv1x1_add_relu_(identity, y, w, p, b)

            runs = [two_ops, lambda: ops.conv1x1_sum(y, w, p, x, w2, p2, both, stride2=s)]
            cold = median_ms(runs, repeats, cold=True)
            errs = [rel_err(f(), ref) for f in runs]
            name = f"{c}->{k} {h}x{h} + {c2}->{k}" + (f" /{s}" if s > 1 else "")
            print(f"{name:34} {batch:5d} {cold[0]:7.3f} {cold[1]:7.3f} {cold[0] / cold[1]:5.2f}x "
                  f"{errs[0]:8.1e} {errs[1]:8.1e}")


if __name__ == "__main__":
    raise SystemExit(main())
