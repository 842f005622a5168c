"""Times a FusedResNet's eager forward against its captured one (model.capture), by
default at batch 1, where launch overhead dominates on a GPU. Same process, same input,
median of repeats after warm-up, the two timed in blocks round-robin (CUDA events
on a GPU, perf_counter on the CPU). On the CPU there is no graph: the captured
forward runs the model directly, and the script says so.

    python benchmarks/capture_latency.py [--arch resnet50] [--batch 1] [--size 224]
        [--device cuda] [--dtype float16] [--repeats 200]
"""

import argparse
import warnings

import torch

import resnet_fused
from resnet_fused.benchmark import device_name, time_interleaved
from resnet_fused.testing import realistic_


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50", choices=resnet_fused.ARCHS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))

    model = realistic_(getattr(resnet_fused, args.arch)()).eval().to(device, dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        run = model.capture(x.shape)
    fused, why = model.fused_status(x)

    def eager():
        with torch.inference_mode():
            model(x)

    times = time_interleaved({"eager": eager, "captured": lambda: run(x)}, device,
                             args.warmup, args.repeats)
    print(f"{device_name(device)}, {args.arch}, batch {args.batch}, {args.size}x{args.size}, "
          f"{str(dtype).replace('torch.', '')}, median of {args.repeats}")
    print(f"forward: {'fused kernels' if fused else 'torchvision math (' + why + ')'}")
    if not run.graphed:
        print(f"no CUDA graph on {device.type}: the captured forward runs the model directly "
              "(same contract), so the two times differ only by its input/output copies and checks")
    for w in caught:
        print(f"warning: {w.message}")
    for name, ms in times.items():
        print(f"{name:>9}: {ms:8.3f} ms")
    print(f"  speedup: {times['eager'] / times['captured']:8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
