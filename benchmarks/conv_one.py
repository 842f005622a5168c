"""One conv shape through our CUDA conv_bias_act, launched a fixed number of times with
nothing else on the GPU: the process a profiler (ncu, compute-sanitizer) attaches to.

    python benchmarks/conv_one.py C K R HW [--stride S] [--batch N] [--dtype float16]
        [--launches 8] [--tile L] [--pad-channels]

The shape is ResNet's: a square HW x HW input, an R x R kernel with padding R // 2. --tile
sets RESNET_FUSED_CUDA_TILE (else the size rule chooses). --pad-channels appends zero
input channels up to a whole 16-byte vector, as RESNET_FUSED_CUDA_TRY=pad_channels does for
the stem; each launch then includes the input's pad copy. Each launch is followed by a
synchronize, so `ncu --launch-skip 5 --launch-count 1` profiles a warmed-up one. Prints
the median time of the launches after the first (CUDA events), which is not a benchmark:
conv_shapes.py is.
"""

import argparse
import os
import statistics
import sys

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("C", "K", "R", "HW"):
        p.add_argument(name, type=int)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--launches", type=int, default=8)
    p.add_argument("--tile", default=None, help="RESNET_FUSED_CUDA_TILE for these launches")
    p.add_argument("--pad-channels", action="store_true",
                   help="zero input channels up to a whole vector (dispatch.pad_channels)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("conv_one.py: needs a CUDA GPU")
    if args.tile:
        os.environ["RESNET_FUSED_CUDA_TILE"] = args.tile
    from resnet_fused import dispatch, ops

    dtype, cl = DTYPES[args.dtype], torch.channels_last
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.batch, args.C, args.HW, args.HW, generator=g, device="cuda",
                    dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(args.K, args.C, args.R, args.R, generator=g, device="cuda", dtype=dtype)
         / (args.C * args.R * args.R) ** 0.5).contiguous(memory_format=cl)
    b = torch.randn(args.K, generator=g, device="cuda", dtype=dtype)
    geo = ([args.stride] * 2, [args.R // 2] * 2, [1, 1], 1)
    channels = dispatch.padded_channels(args.C, dtype) if args.pad_channels else args.C
    if channels != args.C:
        w = dispatch.pad_channels(w, channels)
    prepare = (lambda t: dispatch.pad_channels(t, channels)) if channels != args.C else (lambda t: t)
    times = []
    for _ in range(args.launches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ops.conv_bias_act(prepare(x), w, b, None, *geo, relu=True, assume_finite=True)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    tile = args.tile or "auto"
    padded = f" (padded to {channels} channels)" if channels != args.C else ""
    print(f"conv {args.C}->{args.K} {args.R}x{args.R}/{args.stride} at {args.HW}x{args.HW}{padded}, "
          f"batch {args.batch}, {args.dtype}, tile {tile}: "
          f"{statistics.median(times[1:] or times):.3f} ms (median of {max(1, len(times) - 1)})")


if __name__ == "__main__":
    main()
