"""FusedResNet on CUDA with each path of RESNET_FUSED_CUDA_TRY (dispatch.CUDA_TRY: paths
written but not yet on by default) against none of them, in one process, round-robin.

    python benchmarks/cuda_try.py [--arch resnet50] [--batch 256] [--dtype float16]
        [--repeats 20]

Also timed in the same round-robin: all paths with each forced tile config of
--tiles (RESNET_FUSED_CUDA_TILE, read at each launch; CUTLASS serves the 1x1
stride-1 convs and leaves the rest to the size rule), and torchvision eager on a
channels_last input with the same weights, the reference of the model's speed goal.
Prints ms per batch for each, its ratio to none, and its largest difference from
none's output (`pad_channels` changes the stem's summation order, a tile config the
products'; `max_pool` is exact). The decision to turn a path on is taken from this table.
"""

import argparse
import copy
import os
import sys

import torch
import torchvision

from resnet_fused import dispatch, fuse, testing
from resnet_fused.benchmark import time_interleaved

EAGER_CL = "torchvision eager, channels_last input"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tiles", default="L2,H,CUTLASS",
                   help="tile configs to force with all paths on, comma-separated ('' for none)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cuda_try.py: needs a CUDA GPU")
    dtype, device = DTYPES[args.dtype], torch.device("cuda")
    tv = testing.realistic_(getattr(torchvision.models, args.arch)()).eval()
    model = fuse(copy.deepcopy(tv)).eval().to(device, dtype)
    tv_cl = tv.to(device, dtype, memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    every = frozenset(dispatch.CUDA_TRY_NAMES)
    sets = {"none": (frozenset(), None)}
    sets.update({name: (frozenset({name}), None) for name in dispatch.CUDA_TRY_NAMES})
    sets["all"] = (every, None)
    sets.update({f"all, tile {t}": (every, t) for t in args.tiles.split(",") if t})

    def run(paths, tile):
        def forward():
            dispatch.CUDA_TRY = paths
            if tile:
                os.environ["RESNET_FUSED_CUDA_TILE"] = tile
            else:
                os.environ.pop("RESNET_FUSED_CUDA_TILE", None)
            return model(x)
        return forward

    fns = {name: run(*spec) for name, spec in sets.items()}
    fns[EAGER_CL] = lambda: tv_cl(x_cl)
    with torch.inference_mode():
        outputs = {}
        for name, fn in list(fns.items()):
            try:
                outputs[name] = fn().float()
            except RuntimeError as e:  # a forced config this GPU or build lacks
                print(f"{name}: skipped: {str(e).splitlines()[0]}")
                del fns[name]
        ms = time_interleaved(fns, device, warmup=3, repeats=args.repeats)
    name_gpu = torch.cuda.get_device_name(device)
    print(f"{args.arch} on {name_gpu}, batch {args.batch}, {args.dtype}, median of "
          f"{args.repeats} (round-robin blocks, CUDA events)")
    print(f"{'paths':<40}{'ms':>9}{'vs none':>9}{'max |diff|':>12}")
    for name in fns:
        diff = (outputs[name] - outputs["none"]).abs().max().item()
        print(f"{name:<40}{ms[name]:>9.3f}{ms['none'] / ms[name]:>8.2f}x{diff:>12.3g}")


if __name__ == "__main__":
    main()
