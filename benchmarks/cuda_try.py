"""FusedResNet on CUDA with each path of RESNET_FUSED_CUDA_TRY (dispatch.CUDA_TRY: paths
written but not yet on by default) against none of them, in one process, round-robin.

    python benchmarks/cuda_try.py [--arch resnet50] [--batch 256] [--dtype float16]
        [--repeats 20]

Prints ms per batch for each set of paths, its ratio to none, and its largest
difference from none's output (`pad_channels` changes the stem's summation order;
`max_pool` is exact). The decision to turn a path on is taken from this table.
"""

import argparse
import sys

import torch

from resnet_fused import builders, dispatch, testing
from resnet_fused.benchmark import time_interleaved

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cuda_try.py: needs a CUDA GPU")
    dtype, device = DTYPES[args.dtype], torch.device("cuda")
    model = testing.realistic_(builders.build(args.arch)).eval().to(device, dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    sets = {"none": frozenset()}
    sets.update({name: frozenset({name}) for name in dispatch.CUDA_TRY_NAMES})
    sets["all"] = frozenset(dispatch.CUDA_TRY_NAMES)

    def run(paths):
        def forward():
            dispatch.CUDA_TRY = paths
            return model(x)
        return forward

    fns = {name: run(paths) for name, paths in sets.items()}
    with torch.inference_mode():
        outputs = {name: fn().float() for name, fn in fns.items()}
        ms = time_interleaved(fns, device, warmup=3, repeats=args.repeats)
    name_gpu = torch.cuda.get_device_name(device)
    print(f"{args.arch} on {name_gpu}, batch {args.batch}, {args.dtype}, median of "
          f"{args.repeats} (round-robin blocks, CUDA events)")
    print(f"{'paths':<14}{'ms':>9}{'vs none':>9}{'max |diff|':>12}")
    for name in sets:
        diff = (outputs[name] - outputs["none"]).abs().max().item()
        print(f"{name:<14}{ms[name]:>9.3f}{ms['none'] / ms[name]:>8.2f}x{diff:>12.3g}")


if __name__ == "__main__":
    main()
