"""Times torchvision's video ResNets (r3d_18, mc3_18, r2plus1d_18) fused by
resnet_fused.fuse() against torchvision eager (NCDHW and channels_last_3d input),
torch.compile with freezing and, with --peers, ONNX Runtime and OpenVINO (f32) on the
same weights, on the CPU, in one process on the same clip: median of repeats after
warm-up, variants in blocks of 5 round-robin; each one's error against an fp64
reference (max|out - ref| / max|ref|).

    python benchmarks/video_resnets.py [--arch r3d_18,mc3_18,r2plus1d_18] [--batch 1]
        [--frames 16] [--size 112] [--repeats 10] [--no-compile] [--peers]
"""

import argparse
import copy
import time

import torch
import torchvision

import resnet_fused
from resnet_fused.benchmark import cpu_model, peer_variants, rel_err, time_interleaved
from resnet_fused.testing import realistic_

ARCHS = ("r3d_18", "mc3_18", "r2plus1d_18")
CL3D = torch.channels_last_3d


def variants(model, x, use_compile, peers):
    """(name -> callable(x) on copies of `model`, notes on the peers left out)."""
    eager_cl = copy.deepcopy(model).to(memory_format=CL3D)
    out = {"torchvision eager (NCDHW)": copy.deepcopy(model),
           "torchvision eager (channels_last_3d)": lambda x: eager_cl(x.contiguous(
               memory_format=CL3D))}
    if use_compile:
        # Inductor's freezing folds BN into the convs as fuse() does.
        frozen = torch.compile(copy.deepcopy(eager_cl), options={"freezing": True})
        out["torch.compile + freezing"] = lambda x: frozen(x.contiguous(memory_format=CL3D))
    notes = []
    if peers:
        found, notes = peer_variants(model, x, torch.float32, torch.get_num_threads())
        out.update(found)
    out["resnet_fused"] = resnet_fused.fuse(model)
    return out, notes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=",".join(ARCHS),
                   help=f"comma-separated, from {', '.join(ARCHS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--peers", action="store_true",
                   help="time ONNX Runtime and OpenVINO too (pip install .[peers])")
    args = p.parse_args()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        p.error(f"--arch: expected names from {', '.join(ARCHS)}, got {', '.join(unknown)}")
    x = torch.randn(args.batch, 3, args.frames, args.size, args.size,
                    generator=torch.Generator().manual_seed(0))
    print(f"{cpu_model()} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"float32, clip {tuple(x.shape)}, median of {args.repeats} after {args.warmup} "
          "warm-up, ms")
    for arch in archs:
        model = realistic_(getattr(torchvision.models.video, arch)(), seed=0).eval()
        t = time.perf_counter()
        fns, notes = variants(model, x, not args.no_compile, args.peers)
        fuse_ms = (time.perf_counter() - t) * 1e3
        with torch.inference_mode():
            ms = time_interleaved({n: (lambda f=f: f(x)) for n, f in fns.items()}, x.device,
                                  args.warmup, args.repeats)
            ref = copy.deepcopy(model).double()(x.double())
            errs = {n: rel_err(f(x), ref) for n, f in fns.items()}
        fastest_other = min(v for n, v in ms.items() if n != "resnet_fused")
        print(f"{arch} (fuse() and the other copies: {fuse_ms:.0f} ms; fused patterns "
              f"{fns['resnet_fused'].fused_patterns})")
        for note in notes:
            print(f"  {note}")
        for name in ms:
            print(f"  {name:38} {ms[name]:9.1f}   error vs fp64 {errs[name]:.2g}")
        print(f"  resnet_fused vs the fastest other: {fastest_other / ms['resnet_fused']:.2f}x")


if __name__ == "__main__":
    main()
