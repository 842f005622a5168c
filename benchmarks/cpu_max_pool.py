"""Times the CPU max_pool2d op against ATen's max-pool (which also computes the argmax)
on the pool after ResNet's stem (3x3, stride 2, padding 1, 64 channels at 112x112),
channels_last, median of repeats after warm-up, the two timed round-robin in blocks of 5, on
the threads torch uses.

    python benchmarks/cpu_max_pool.py [--batch-sizes 1,8] [--repeats 50]
"""

import argparse

import torch
import torch.nn.functional as F

from resnet_fused import ops
from resnet_fused.benchmark import time_interleaved


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    print(f"cpu ({torch.get_num_threads()} threads), channels_last, median of {args.repeats}; ms")
    print(f"{'dtype':9} {'batch':>5} {'ATen':>7} {'ours':>7} {'speedup':>8}")
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for batch in (int(v) for v in args.batch_sizes.split(",")):
                x = torch.randn(batch, 64, 112, 112).relu().to(dtype)
                x = x.contiguous(memory_format=torch.channels_last)
                assert torch.equal(ops.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
                ms = time_interleaved({"ATen": lambda: F.max_pool2d(x, 3, 2, 1),
                                       "ours": lambda: ops.max_pool2d(x, 3, 2, 1)},
                                      torch.device("cpu"), warmup=5, repeats=args.repeats)
                aten, ours = ms["ATen"], ms["ours"]
                name = str(dtype).replace("torch.", "")
                print(f"{name:9} {batch:5d} {aten:7.3f} {ours:7.3f} {aten / ours:7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
