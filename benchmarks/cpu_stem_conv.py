"""Times the CPU stem_conv op against conv_bias_act (oneDNN's convolution through ATen, its
weight packed as the model packs it) on ResNet's stem: 3 -> 64 channels, 7x7, stride 2,
padding 3, bias and ReLU, channels_last input. Median of repeats after warm-up, the two
timed round-robin in blocks of 5, on the threads torch uses; each one's error against a
float64 reference.

    python benchmarks/cpu_stem_conv.py [--batch-sizes 1,8] [--size 224] [--repeats 50]
"""

import argparse

import torch
import torch.nn.functional as F

from resnet_fused import _extension, ops
from resnet_fused.benchmark import time_interleaved


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    if not _extension.stem_conv_kernel_available():
        print("stem_conv's kernel does not run here (it needs AVX2+FMA or AVX-512): "
              "it would time conv_bias_act twice")
        return 0
    torch.manual_seed(0)
    w = torch.randn(64, 3, 7, 7) * (2 / 147) ** 0.5
    b = torch.randn(64) * 0.1
    packed = ops.stem_conv_weight(w)
    print(f"cpu ({torch.get_num_threads()} threads, {_extension.cpu_isa()}), stem at "
          f"{args.size}x{args.size}, float32, median of {args.repeats}; ms")
    print(f"{'batch':>5} {'oneDNN':>8} {'ours':>8} {'speedup':>8} {'err oneDNN':>11} "
          f"{'err ours':>9}")
    with torch.inference_mode():
        for batch in (int(v) for v in args.batch_sizes.split(",")):
            x = torch.randn(batch, 3, args.size, args.size)
            x = x.contiguous(memory_format=torch.channels_last)
            onednn_w = ops.pack_weight(w, (2, 2), (3, 3), (1, 1), 1, tuple(x.shape))
            onednn = lambda: ops.conv_bias_act(x, onednn_w, b, stride=2, padding=3)  # noqa: E731
            ours = lambda: ops.stem_conv(x, w, packed, b, stride=2, padding=3)  # noqa: E731
            ref = F.conv2d(x.double(), w.double(), b.double(), 2, 3).relu()
            errs = [((f().double() - ref).abs().max() / ref.abs().max()).item()
                    for f in (onednn, ours)]
            ms = time_interleaved({"oneDNN": onednn, "ours": ours}, torch.device("cpu"),
                                  warmup=5, repeats=args.repeats)
            print(f"{batch:5d} {ms['oneDNN']:8.3f} {ms['ours']:8.3f} "
                  f"{ms['oneDNN'] / ms['ours']:7.2f}x {errs[0]:11.1e} {errs[1]:9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
