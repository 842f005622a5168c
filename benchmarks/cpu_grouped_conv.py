"""Times the CPU grouped_conv3x3 kernel against oneDNN's grouped convolution (weight
packed as the model packs it) on the grouped 3x3 shapes of ResNeXt-50 (32x4d) and
ResNeXt-101 (32x8d, 64x4d), with warm caches and with cold ones (after 64 MB of other
memory traffic, as a layer meets its weight in a model), with each one's error against
fp64. fp32, channels_last, the two alternating, median of repeats after warm-up, on the
threads torch uses.

    python benchmarks/cpu_grouped_conv.py [--batch-sizes 1,8] [--repeats 30]
"""

import argparse

import torch
import torch.nn.functional as F

from cpu_timing import median_ms, rel_err
from resnet_fused import _extension, heap, ops

# (channels, groups, H = W of the input, stride) of the grouped 3x3 convs: each stage's
# first (stride 2 from layer2 on) and the rest; 32x4d and 64x4d share their widths.
SHAPES = [(128, 32, 56, 1), (256, 32, 56, 2), (256, 32, 28, 1), (512, 32, 28, 2),
          (512, 32, 14, 1), (1024, 32, 14, 2), (1024, 32, 7, 1),  # ResNeXt-50 32x4d
          (256, 32, 56, 1), (2048, 32, 7, 1),                     # ResNeXt-101 32x8d
          (256, 64, 56, 1), (2048, 64, 7, 1)]                     # ResNeXt-101 64x4d


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    if not _extension.grouped_conv_kernel_available():
        print("grouped_conv3x3's kernel does not run here (no AVX2 or AVX-512); both would "
              "time oneDNN")
        return 1
    print(f"cpu ({torch.get_num_threads()} threads, {_extension.cpu_isa()}), float32, "
          f"channels_last, median of {args.repeats}; ms")
    print(f"{'shape':28} {'batch':>5} {'oneDNN':>7} {'ours':>7} {'warm':>6} "
          f"{'oneDNN':>7} {'ours':>7} {'cold':>6} {'err oneDNN':>10} {'err ours':>8}")
    heap.keep_freed_memory()  # as the model does: outputs reuse memory, not fresh pages
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in (int(v) for v in args.batch_sizes.split(",")):
            for c, groups, h, s in SHAPES:
                x = torch.randn(batch, c, h, h, generator=g).relu()
                x = x.contiguous(memory_format=torch.channels_last)
                w = torch.randn(c, c // groups, 3, 3, generator=g) / (9 * c // groups) ** 0.5
                b = torch.randn(c, generator=g)
                ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), s, 1, 1, groups))
                packed = ops.pack_weight(w, s, 1, 1, groups, x.shape)
                blocks = ops.grouped_conv_weight(w, groups)
                runs = [lambda: ops.conv_bias_act(x, packed, b, None, s, 1, 1, groups, relu=True,
                                                  assume_finite=True),
                        lambda: ops.grouped_conv3x3(x, w, blocks, b, None, stride=s, relu=True)]
                warm = median_ms(runs, args.repeats, cold=False)
                cold = median_ms(runs, args.repeats, cold=True)
                errs = [rel_err(f(), ref) for f in runs]
                name = f"3x3 {c} ch /{groups} {h}x{h}" + (f" /{s}" if s > 1 else "")
                print(f"{name:28} {batch:5d} {warm[0]:7.3f} {warm[1]:7.3f} "
                      f"{warm[0] / warm[1]:5.2f}x {cold[0]:7.3f} {cold[1]:7.3f} "
                      f"{cold[0] / cold[1]:5.2f}x {errs[0]:10.1e} {errs[1]:8.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
