"""Every distinct conv shape of ResNet-50 and ResNet-18, timed four ways side by side:
our conv_bias_act (bias + ReLU fused), conv2d with bias then ReLU (cuDNN alone on
CUDA, oneDNN on a CPU), cuDNN's fused conv + bias + ReLU (torch.cudnn_convolution_relu, CUDA only) and the
roofline of the shape (max of its multiply-adds at the peak rate and its minimum
traffic at the peak bandwidth); each shape's count in the model weights the totals.
Prints one table and writes JSON.

    python benchmarks/conv_shapes.py [--device cuda] [--dtype float16] [--batch 256]
        [--archs resnet50,resnet18] [--peak-tflops T] [--peak-gbps G] [--json F]
        [--tiles L,H]

--tiles adds a column "ours <T>" per CUDA kernel config T (RESNET_FUSED_CUDA_TILE,
set around each call), timed in the same round-robin as the others. Where a config
does not serve a shape, the size rule runs it (CUTLASS: 1x1 stride-1 convs only).

The roofline's peaks default, for fp16/bf16 on an H100 or H200 (by the device's
name), to its dense tensor-core rate and its memory bandwidth (989 TFLOP/s; 3350 and
4800 GB/s); elsewhere pass them, or the roofline column stays empty. On a CPU
cuDNN's fused column says "skipped: no GPU".
"""

import argparse
import json
import os
from collections import Counter

import torch
import torch.nn.functional as F
import torchvision

from resnet_fused import ops
from resnet_fused.benchmark import device_name, time_interleaved


def conv_shapes(arch, batch, size):
    """Counter of (C, K, R, S, stride, padding, dilation, groups, N, H, W) over `arch`'s
    convs, recorded from one forward on the meta device."""
    model = getattr(torchvision.models, arch)().to("meta")
    shapes = Counter()

    def record(conv, args, _):
        n, c, h, w = args[0].shape
        k, _, r, s = conv.weight.shape
        shapes[(c, k, r, s, conv.stride[0], conv.padding[0], conv.dilation[0], conv.groups,
                n, h, w)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(batch, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    return shapes


def out_hw(h, w, r, s, stride, padding, dilation):
    return ((h + 2 * padding - dilation * (r - 1) - 1) // stride + 1,
            (w + 2 * padding - dilation * (s - 1) - 1) // stride + 1)


def roofline_ms(shape, elem_bytes, peak_tflops, peak_gbps):
    c, k, r, s, stride, padding, dilation, groups, n, h, w = shape
    p, q = out_hw(h, w, r, s, stride, padding, dilation)
    flops = 2 * n * p * q * k * (c // groups) * r * s
    traffic = elem_bytes * (n * c * h * w + k * (c // groups) * r * s + n * k * p * q)
    return max(flops / (peak_tflops * 1e12), traffic / (peak_gbps * 1e9)) * 1e3


# Dense fp16/bf16 tensor-core TFLOP/s and memory GB/s, SXM parts.
PEAKS = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0)}


def default_peaks(device, dtype):
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None, None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAKS.items() if key in name), (None, None))


def with_tile(tile, fn):
    """fn run with RESNET_FUSED_CUDA_TILE=tile, which the CUDA op reads at each launch."""
    def run():
        saved = os.environ.get("RESNET_FUSED_CUDA_TILE")
        os.environ["RESNET_FUSED_CUDA_TILE"] = tile
        try:
            return fn()
        finally:
            if saved is None:
                del os.environ["RESNET_FUSED_CUDA_TILE"]
            else:
                os.environ["RESNET_FUSED_CUDA_TILE"] = saved
    return run


def tile_runs(tile, device, dtype):
    """Whether kernel config `tile` runs here; if not, says why (e.g. H off Hopper)."""
    x = torch.ones(1, 16, 4, 4, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    w = torch.ones(16, 16, 1, 1, device=device, dtype=dtype)
    b = torch.ones(16, device=device, dtype=dtype)  # with a bias: a conv CUTLASS serves
    if tile in ("H", "CUTLASS") and dtype not in (torch.float16, torch.bfloat16):
        print(f"ours {tile}: skipped: that kernel is fp16/bf16 only")
        return False
    try:
        with_tile(tile, lambda: ops.conv_bias_act(x, w, b, None, [1, 1], [0, 0], [1, 1], 1))()
        torch.cuda.synchronize(device)
        return True
    except RuntimeError as e:
        print(f"ours {tile}: skipped: {str(e).splitlines()[0]}")
        return False


def variants(shape, device, dtype, tiles=()):
    """name -> callable for one shape."""
    c, k, r, s, stride, padding, dilation, groups, n, h, w = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(k, c // groups, r, s, generator=g, device=device, dtype=dtype)
              / (c // groups * r * s) ** 0.5).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(k, generator=g, device=device, dtype=dtype)
    geo = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    packed = ops.pack_weight(weight, *geo[:3], groups, list(x.shape))
    fns = {
        "ours": lambda: ops.conv_bias_act(x, packed, bias, None, *geo, relu=True,
                                          assume_finite=True),
        "conv2d, ReLU": lambda: F.relu_(F.conv2d(x, weight, bias, *geo)),
    }
    if device.type == "cuda":
        fns["cuDNN fused"] = lambda: torch.cudnn_convolution_relu(x, weight, bias, *geo)
        for tile in tiles:
            fns[f"ours {tile}"] = with_tile(tile, fns["ours"])
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 8 on the CPU")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--archs", default="resnet50,resnet18")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--peak-gbps", type=float, default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--tiles", default="",
                   help="CUDA kernel configs to time as columns of their own, e.g. L,H,CUTLASS")
    args = p.parse_args(argv)
    tiles = [t for t in args.tiles.split(",") if t]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    batch = args.batch or (256 if cuda else 8)
    known_tflops, known_gbps = default_peaks(device, dtype)
    peak_tflops, peak_gbps = args.peak_tflops or known_tflops, args.peak_gbps or known_gbps
    elem = torch.empty((), dtype=dtype).element_size()

    if cuda:
        tiles = [t for t in tiles if tile_runs(t, device, dtype)]
    per_arch = {a: conv_shapes(a, batch, args.size) for a in args.archs.split(",")}
    shapes = sorted(set().union(*per_arch.values()), key=lambda sh: (sh[2], sh[8:], sh[:2]))
    columns = ["ours", "conv2d, ReLU", "cuDNN fused"] + (
        [f"ours {t}" for t in tiles] if cuda else [])
    rows = []
    with torch.inference_mode():
        for shape in shapes:
            fns = variants(shape, device, dtype, tiles)
            times = time_interleaved(fns, device, args.warmup, args.repeats)
            roof = (roofline_ms(shape, elem, peak_tflops, peak_gbps)
                    if peak_tflops and peak_gbps else None)
            rows.append(dict(shape=list(shape), ms=times, roofline_ms=roof,
                             count={a: s[shape] for a, s in per_arch.items()}))

    print(f"{device_name(device)}, {str(dtype).replace('torch.', '')}, batch {batch}, "
          f"{args.size}x{args.size}, channels_last, median of {args.repeats} (ms)")
    if not cuda:
        print("cuDNN fused: skipped: no GPU")
    head = f"{'C':>5} {'K':>5} {'RxS':>5} {'str':>3} {'HxW':>7}  " + "".join(
        f"{c:>12}" for c in columns) + f"{'roofline':>10} {'ours/best':>9}  count"
    print(head)
    totals = {a: Counter() for a in per_arch}
    for row in rows:
        c, k, r, s, stride, _, _, groups, _, h, w = row["shape"]
        t = row["ms"]
        best_peer = min(v for name, v in t.items() if not name.startswith("ours"))
        cells = "".join(f"{t[col]:12.3f}" if col in t else f"{'-':>12}" for col in columns)
        roof = f"{row['roofline_ms']:10.3f}" if row["roofline_ms"] is not None else f"{'-':>10}"
        counts = ", ".join(f"{a} x{n}" for a, n in row["count"].items() if n)
        g = f"/{groups}" if groups > 1 else ""
        print(f"{c:5d} {k:5d}{g} {r}x{s:<3} {stride:3d} {h:3d}x{w:<3}  {cells}{roof} "
              f"{t['ours'] / best_peer:8.2f}x  {counts}")
        for a, n in row["count"].items():
            for name, v in t.items():
                totals[a][name] += n * v
            if row["roofline_ms"] is not None:
                totals[a]["roofline"] += n * row["roofline_ms"]
    for a, tot in totals.items():
        print(f"{a}, all convs (ms per batch): " + ", ".join(
            f"{name} {v:.2f}" for name, v in tot.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name(device), dtype=str(dtype), batch=batch,
                           size=args.size, rows=rows,
                           totals={a: dict(t) for a, t in totals.items()}), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
