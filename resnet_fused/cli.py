"""Command line: python -m resnet_fused {verify,bench,profile,predict,info}, or resnet-fused."""

import argparse
import copy
import importlib
import json
import os
import sys

import torch
import torchvision

from . import _extension, benchmark, dispatch, info, predict
from .builders import ARCHS, VIDEO_ARCHS, torchvision_builder, torchvision_model
from .model import STAGES, fuse
from .testing import DETECTION, SEGMENTATION, realistic_, task_model

# ---------------------------------------------------------------- models


def _usage_error(message):
    """A bad argument found after parsing: its message and argparse's exit status, 2
    (1 means that some images failed)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _device(name):
    if name == "auto":
        if torch.cuda.is_available() and "cuda" not in dispatch.KERNEL_DEVICES:
            print("note: --device auto chose cpu: a CUDA GPU is present but this build of "
                  "resnet_fused has no CUDA kernels", file=sys.stderr)
            return torch.device("cpu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        _usage_error(f"argument --device: expected auto, cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            _usage_error("argument --device: expected a CUDA GPU for cuda, got none available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            _usage_error(f"argument --device: expected cuda:0 to cuda:"
                         f"{torch.cuda.device_count() - 1}, got {name!r}")
    return dev


def _fused_here(device, dtype):
    """Exits with a usage error where the fused model would run torchvision's math on
    device in dtype: its figures would be torchvision's under our name."""
    why = ((None if _extension.available() else _extension.load_error())
           or dispatch.unsupported(device, dtype))
    if why:
        _usage_error(f"resnet_fused cannot run its kernels on {device} in "
                     f"{str(dtype).replace('torch.', '')}: {why}")


def _fused_arch_here(arch, device):
    """Exits with a usage error for a video arch on a GPU: 3-D convolutions run fused on
    the CPU only, so its figures would be torchvision's under our name."""
    if arch in VIDEO_ARCHS and device.type != "cpu":
        _usage_error(f"argument --arch: the video ResNets ({', '.join(VIDEO_ARCHS)}) run fused "
                     f"on the CPU only (3-D convolutions), got {arch} on {device}; pass "
                     "--device cpu")


def _input_shape(arch, batch, args):
    """(batch, 3, H, W) for an image classifier; (batch, 3, frames, H, W), a clip, for a
    video ResNet. Each takes the input size it was trained at unless --size says."""
    if arch in VIDEO_ARCHS:
        return (batch, 3, args.frames, *(args.size or (112, 112)))
    return (batch, 3, *(args.size or (224, 224)))


def _describe_input(arch, args):
    shape = _input_shape(arch, 1, args)
    return (f"clip {shape[2]}x{shape[3]}x{shape[4]} (frames x H x W)" if len(shape) == 5
            else f"input {shape[2]}x{shape[3]}")


def _device_for(args, video):
    """--device, where auto takes the CPU for a video ResNet (its 3-D convolutions run
    fused there only)."""
    if video and args.device == "auto":
        if torch.cuda.is_available():
            print("note: --device auto chose cpu: the video ResNets run fused on the CPU only",
                  file=sys.stderr)
        return torch.device("cpu")
    return _device(args.device)


def _check_frames(args, archs):
    if args.frames is not None and not set(archs) & set(VIDEO_ARCHS):
        if args.arch == "all":
            _usage_error("argument --frames: the video ResNets are verified on the CPU only "
                         "(--device cpu), got --arch all on a GPU")
        _usage_error(f"argument --frames: expected a video arch ({', '.join(VIDEO_ARCHS)}), "
                     f"got --arch {args.arch}")
    if args.frames is None:
        args.frames = 16


def load_models(arch, weights, device):
    """(torchvision model, fused model, description of the weights), both in eval mode."""
    if weights is None:
        tv = realistic_(torchvision_builder(arch)(), seed=0)
        desc = "seeded random weights with realistic BatchNorm statistics (no checkpoint given)"
    else:
        try:
            tv = torchvision_model(arch, weights)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            _usage_error(f"--weights: {e}")
        desc = f"weights {weights}"
    tv = tv.eval().to(device)
    return tv, fuse(tv).eval(), desc


# ---------------------------------------------------------------- verify


def verify_arch(arch, weights, device, shape, seed=0):
    """Rows of (arch, dtype, max_abs, rel, ref_rel, top1, ok) comparing fused with
    torchvision on an input of `shape`."""
    tv, fused, desc = load_models(arch, weights, device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(device)
    rows = []
    with torch.inference_mode():
        ref64 = tv.double()(x.double())
    for dtype in dispatch.dtypes_for(device.type):
        # Copies, so that each dtype starts from the original weights; converted
        # outside inference_mode, so that params stay normal tensors.
        tv_d, fused_d = copy.deepcopy(tv).to(dtype), copy.deepcopy(fused).to(dtype)
        fused_ok, why = fused_d.fused_status(x.to(dtype))
        with torch.inference_mode():
            ours = fused_d(x.to(dtype)).float()
            theirs = tv_d(x.to(dtype)).float()
        scale = ref64.abs().max().item()
        err = (ours - ref64).abs().max().item()
        tv_err = (theirs - ref64).abs().max().item()
        top1 = (ours.argmax(1) == theirs.argmax(1)).float().mean().item()
        # In every dtype (TF32 too) at most 2x what torchvision's own path in that
        # dtype errs against the fp64 reference, plus one fp32 rounding of the output.
        ok = err <= 2 * tv_err + torch.finfo(torch.float32).eps * scale
        # Unfused, the comparison would be torchvision against itself.
        rows.append(dict(arch=arch, dtype=str(dtype).replace("torch.", ""), max_abs=err,
                         rel=err / scale, torchvision_rel=tv_err / scale, top1=top1,
                         ok=ok and fused_ok, unfused=why))
    return rows, desc


def cmd_verify(args):
    device = _device_for(args, args.arch in VIDEO_ARCHS)
    if args.arch != "all":
        archs = [args.arch]
        _fused_arch_here(args.arch, device)
    else:
        archs = ARCHS + (VIDEO_ARCHS if device.type == "cpu" else ())
    _check_frames(args, archs)
    inputs = sorted({_describe_input(a, args) for a in archs}, reverse=True)
    print(f"verify on {device}: fused vs torchvision, batch {args.batch}, {', '.join(inputs)}, "
          "errors against an fp64 torchvision reference")
    if args.arch == "all" and device.type != "cpu":
        print(f"(the video ResNets, {', '.join(VIDEO_ARCHS)}, run fused on the CPU only: "
              "verify them with --device cpu)")
    print(f"{'arch':18} {'dtype':9} {'max abs err':>12} {'rel err':>10} {'tv rel err':>10} "
          f"{'top-1 agree':>11}  result")
    bad = 0
    for arch in archs:
        rows, desc = verify_arch(arch, args.weights, device,
                                 _input_shape(arch, args.batch, args))
        if not rows:
            bad += 1
            print(f"{arch:18} no dtype: resnet_fused has no kernels on {device}")
        for r in rows:
            bad += not r["ok"]
            result = (f"UNFUSED ({r['unfused']})" if r["unfused"]
                      else "ok" if r["ok"] else "MISMATCH")
            print(f"{r['arch']:18} {r['dtype']:9} {r['max_abs']:12.3e} {r['rel']:10.2e} "
                  f"{r['torchvision_rel']:10.2e} {r['top1']:11.2%}  {result}")
    print(f"weights: {desc}")
    if not _extension.available():
        print(f"note: {_extension.load_error()}")
    print("all match" if not bad else f"{bad} failed (mismatch or unfused)")
    return 1 if bad else 0


# ---------------------------------------------------------------- bench


def cmd_bench(args):
    if args.model:
        return cmd_bench_task(args)
    video = args.arch in VIDEO_ARCHS
    device = _device_for(args, video)
    dtype = getattr(torch, args.dtype)
    _check_frames(args, [args.arch])
    _fused_arch_here(args.arch, device)
    batches = args.batch_sizes or ([1, 32, 256] if device.type == "cuda" else [1] if video
                                   else [1, 8])
    _fused_here(device, dtype)
    tv, fused, desc = load_models(args.arch, args.weights, device)
    variants, notes = benchmark.torch_variants(
        tv, fused, dtype, args.compile,
        memory_format=torch.channels_last_3d if video else torch.channels_last)
    eager = next(iter(variants))  # what the speed-ups are relative to
    if args.peers:
        if device.type != "cpu":
            notes.append("peers: ONNX Runtime and OpenVINO are timed on the CPU only")
        else:
            example = torch.randn(_input_shape(args.arch, 1, args))
            peers, peer_notes = benchmark.peer_variants(tv, example, dtype,
                                                        torch.get_num_threads())
            variants.update(peers)
            notes += peer_notes
    print(f"bench {args.arch} on {benchmark.device_name(device)}, {args.dtype}, "
          f"{_describe_input(args.arch, args)}, median of {args.repeats} runs (blocks of 5, "
          f"round-robin) after {args.warmup} warm-up runs; {desc}")
    for note in notes:
        print(f"  {note}")
    results = []
    ref_model = copy.deepcopy(tv).double()
    rate = "clips_per_s" if video else "images_per_s"
    with torch.inference_mode():
        for b in batches:
            g = torch.Generator().manual_seed(b)
            x = torch.randn(*_input_shape(args.arch, b, args), generator=g).to(
                device=device, dtype=dtype)
            ref = ref_model(x.double())
            fns = {name: (lambda f=f: f(x)) for name, f in variants.items()}
            errors = {name: benchmark.rel_err(f(x), ref) for name, f in variants.items()}
            print(f"  batch {b} ...", file=sys.stderr, flush=True)
            times = benchmark.time_interleaved(fns, device, args.warmup, args.repeats)
            # As measured, so that a run stopped early still shows its finished batches.
            print("  batch " + str(b) + ": " + ", ".join(f"{name} {med:.2f} ms"
                                                        for name, med in times.items()),
                  file=sys.stderr, flush=True)
            for name, med in times.items():
                results.append({"variant": name, "batch": b, "ms": med, rate: b / med * 1e3,
                                "rel_err": errors[name]})
    base = {r["batch"]: r for r in results if r["variant"] == eager}
    fastest_peer = {}
    for r in results:
        r["speedup_vs_eager"] = base[r["batch"]]["ms"] / r["ms"]
        # Ours: verify's rule, at most 2x torchvision's own error (+ one fp32 rounding).
        # A peer also passes up to 1e-5 in fp32, where OpenVINO measured up to ~3x
        # torchvision's error without being wrong. A wrong variant's time is shown but
        # compared with nothing.
        bound = 2 * base[r["batch"]]["rel_err"] + torch.finfo(torch.float32).eps
        if r["variant"] != "resnet_fused":
            bound = max(bound, 1e-5)
        r["wrong"] = not r["rel_err"] <= bound
        if r["variant"] not in (eager, "resnet_fused") and not r["wrong"]:
            fastest_peer[r["batch"]] = min(fastest_peer.get(r["batch"], float("inf")), r["ms"])
    layout = eager[eager.index("(") + 1:-1]  # NCHW, NCDHW
    print(f"\n{'variant':38} {'batch':>5} {'ms/batch':>10} "
          f"{'clips/s' if video else 'images/s':>10} {'vs eager ' + layout:>15} "
          f"{'rel err vs fp64':>16}")
    for r in results:
        print(f"{r['variant']:38} {r['batch']:5d} {r['ms']:10.2f} {r[rate]:10.1f} "
              f"{r['speedup_vs_eager']:14.2f}x {r['rel_err']:16.2e}"
              + ("  WRONG (over 2x torchvision's error)" if r["wrong"] else ""))
    for b, ms in sorted(fastest_peer.items()):
        ours = next(r["ms"] for r in results if r["batch"] == b and r["variant"] == "resnet_fused")
        print(f"batch {b}: resnet_fused is {ms / ours:.2f}x the fastest other variant")
    ours_wrong = any(r["wrong"] for r in results if r["variant"] == "resnet_fused")
    if ours_wrong:
        print("resnet_fused computed a wrong result: see `resnet-fused verify`")
    report = dict(arch=args.arch, device=benchmark.device_name(device), dtype=args.dtype,
                  size=list(_input_shape(args.arch, 1, args)[-2:]),
                  input_shape=list(_input_shape(args.arch, 1, args)[1:]),
                  torch=torch.__version__, weights=desc, eager=eager, notes=notes,
                  results=results)
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if ours_wrong else 0


def cmd_bench_task(args):
    """bench --model: a whole detection or segmentation model, its ResNet body fused
    against unfused, and the body's share of the model's time."""
    if args.frames is not None:
        _usage_error("argument --frames: expected a video arch, got --model (an image model)")
    ignored = [flag for flag, on in (("--weights", args.weights), ("--compile", args.compile),
                                     ("--peers", args.peers)) if on]
    if ignored:
        print(f"error: {', '.join(ignored)} cannot be combined with --model (the whole "
              "model runs with seeded random weights, fused against unfused)", file=sys.stderr)
        return 2
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    _fused_here(device, dtype)
    batches = args.batch_sizes or [1]
    size = args.size or (224, 224)
    tv = task_model(args.model).to(device=device, dtype=dtype)
    fused = fuse(tv)
    print(f"bench {args.model} on {benchmark.device_name(device)}, {args.dtype}, input "
          f"{size}, median of {args.repeats} runs (blocks of 5, round-robin) after "
          f"{args.warmup} warm-up runs; seeded random weights with realistic BatchNorm "
          "statistics in the backbone")
    if args.model in DETECTION:
        print(f"  the model resizes its input to min_size {tv.transform.min_size[0]}, "
              f"max_size {tv.transform.max_size} before the backbone")
    rows = []
    with torch.inference_mode():
        for b in batches:
            g = torch.Generator().manual_seed(b)
            x = torch.rand(b, 3, *size, generator=g).to(device=device, dtype=dtype)
            variants = benchmark.task_variants(tv, fused, x)
            print(f"  batch {b} ...", file=sys.stderr, flush=True)
            ms = benchmark.time_interleaved(variants, device, args.warmup, args.repeats)
            rows.append((b, ms))
    print(f"\n{'batch':>5} {'variant':36} {'ms':>9} {'vs unfused':>11} {'body share':>11}")
    results = []
    for b, ms in rows:
        for part in ("whole model", "ResNet body"):
            for label in benchmark.TASK_LABELS:
                t = ms[f"{part}, {label}"]
                share = ms[f"ResNet body, {label}"] / ms[f"whole model, {label}"]
                speedup = ms[f"{part}, unfused"] / t
                print(f"{b:5d} {part + ', ' + label:36} {t:9.1f} {speedup:10.2f}x "
                      f"{share if part == 'whole model' else 1:10.0%}")
                results.append(dict(batch=b, part=part, variant=label, ms=t, speedup=speedup,
                                    body_share=share))
    report = dict(model=args.model, device=benchmark.device_name(device), dtype=args.dtype,
                  size=list(size), torch=torch.__version__, results=results)
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


# ---------------------------------------------------------------- profile


def cmd_profile(args):
    from torch.profiler import ProfilerActivity, profile

    video = args.arch in VIDEO_ARCHS
    device = _device_for(args, video)
    dtype = getattr(torch, args.dtype)
    _check_frames(args, [args.arch])
    _fused_arch_here(args.arch, device)
    _fused_here(device, dtype)
    stages = benchmark.VIDEO_STAGES if video else STAGES
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        _usage_error(f"argument --out: expected a folder that can be made, got {args.out} "
                     f"({e.strerror})")
    tv, fused, desc = load_models(args.arch, args.weights, device)
    tv, fused = tv.to(dtype), fused.to(dtype)  # outside inference_mode: see verify_arch
    x = torch.randn(_input_shape(args.arch, args.batch, args), device=device, dtype=dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    per_stage = {}
    with torch.inference_mode():
        for name, model in (("unfused", tv), ("fused", fused)):
            for i in range(args.warmup):
                print(f"[{name}] warm-up {i + 1}/{args.warmup}", file=sys.stderr, flush=True)
                model(x)
            benchmark.sync(device)
            # The fused models label their stages themselves while a profiler runs.
            forward = benchmark.staged_torchvision if name == "unfused" else (lambda m, i: m(i))
            with profile(activities=acts) as prof:
                for i in range(args.repeats):
                    print(f"[{name}] profiled run {i + 1}/{args.repeats}", file=sys.stderr, flush=True)
                    forward(model, x)
                benchmark.sync(device)
            trace = os.path.join(args.out, f"trace_{name}.json")
            prof.export_chrome_trace(trace)
            events = prof.key_averages()
            per_stage[name] = {k: v / args.repeats
                               for k, v in benchmark.stage_times(events, stages).items()}
            print(f"\n{name}: top ops\n" + events.table(sort_by="self_cpu_time_total", row_limit=8))
            print(f"chrome trace: {trace}")
    where = benchmark.device_name(device)
    print(f"\nper-stage time (ms per forward), {args.arch}, batch {args.batch}, "
          f"{_describe_input(args.arch, args)}, {args.dtype}, {where}; {desc}")
    print(f"{'stage':10} {'unfused':>10} {'fused':>10} {'speedup':>8}")
    for s in stages:
        u, f = per_stage["unfused"][s], per_stage["fused"][s]
        print(f"{s:10} {u:10.2f} {f:10.2f} {u / f if f else float('nan'):7.2f}x")
    png = os.path.join(args.out, "per_stage.png")
    try:
        benchmark.bar_chart(per_stage, png, f"{args.arch} batch {args.batch} {args.dtype} on {where}",
                            stages)
        print(f"bar chart: {png}")
    except ImportError:
        print("bar chart: skipped, matplotlib is not installed (pip install resnet_fused[cli] "
              "for the chart)")
    return 0


# ---------------------------------------------------------------- predict


def cmd_predict(args):
    fail = args.parser.error  # argparse's message and exit code 2
    if args.features and args.out is None:
        fail("argument --features: expected --out too (the shards go next to it), got no --out")
    if args.features and args.topk is not None:
        fail("argument --topk: expected no --topk with --features (embeddings, not classes), "
             f"got --topk {args.topk}")
    args.topk = 5 if args.topk is None else args.topk
    if args.features == "safetensors":  # refused before any file is made
        try:
            importlib.import_module("safetensors.numpy")
        except ImportError:
            fail("argument --features: expected safetensors installed (pip install safetensors), "
                 "or --features npy, got no safetensors module")
    try:
        files = predict.list_images(args.paths)
        store = predict.Store(args.out) if args.out else None
    except predict.UsageError as e:
        fail(str(e))
    resize, crop = _eval_sizes(args)
    settings = predict.Settings(args.arch, args.weights, resize, crop, args.topk,
                                args.features, args.batch_size, args.workers, args.retry_errors)
    with predict.distributed(_device(args.device)) as ranks:
        if store is None and ranks.world > 1:
            fail(f"argument --out: expected a file for the results of {ranks.world} ranks, "
                 "got none")
        _, model, desc = load_models(args.arch, args.weights, ranks.device)
        classes = model.fc.out_features
        if args.topk > classes:
            fail(f"argument --topk: expected at most the model's {classes} classes, "
                 f"got {args.topk}")
        categories = torchvision.models.get_model_weights(args.arch).DEFAULT.meta["categories"]
        categories = categories if classes == len(categories) else ()
        if ranks.rank == 0:
            where = ranks.device if ranks.world == 1 else f"{ranks.world} ranks ({ranks.device.type})"
            print(f"{args.arch} on {where}; {desc}; {len(files)} images", flush=True)
        try:
            if store is None:
                records = _print_predictions(model, files, settings, ranks.device, categories)
                before = 0
            else:
                records, before = predict.run_to_file(model, files, store, settings, ranks,
                                                      categories, progress=not args.no_progress)
        except predict.UsageError as e:
            fail(str(e))
        except KeyboardInterrupt:
            kept = (f" are kept in {store.parts}; rerun the same command to continue"
                    if store else "")
            print(f"interrupted: the results so far{kept}", file=sys.stderr)
            return 130
    if records is None:  # a rank other than 0: rank 0 reports
        return 0
    failed = [r for r in records if "error" in r]
    if store is not None:
        for r in failed[:10]:
            print(f"failed: {r['path']}: {r['error']}")
        if len(failed) > 10:
            print(f"... and {len(failed) - 10} more error records in {store.out}")
    verb = "embedded" if args.features else "classified"
    earlier = f" ({before} of them from an earlier run)" if before else ""
    where = f"; results in {store.out}" if store else ""
    print(f"{len(records)} images{earlier}: {len(records) - len(failed)} {verb}, "
          f"{len(failed)} failed{where}")
    return 1 if failed else 0


def _eval_sizes(args):
    """(resize, crop): as given, else those torchvision evaluated the named weights at
    (IMAGENET1K_V2: 232, 224), else 256, 224."""
    resize, crop = 256, 224
    if args.weights is not None:
        try:
            meta = torchvision.models.get_model_weights(args.arch).verify(args.weights).transforms()
            resize, crop = meta.resize_size[0], meta.crop_size[0]
        except (ValueError, KeyError):
            pass  # a state_dict file: no record of its evaluation sizes
    return args.resize or resize, args.crop or crop


def _print_predictions(model, files, settings, device, categories):
    records = []
    for batch, _ in predict.batches(model, files, settings, device, categories):
        for r in batch:
            print(r["path"])
            if "error" in r:
                print(f"  {r['error']}")
            for t in r.get("topk", ()):
                print(f"  {t['prob']:7.2%}  {t['name'] or t['index']}")
        records += batch
    return records


# ---------------------------------------------------------------- main


def _size(text):
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",") if v]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}")
    return tuple(parts)


def _batches(text):
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if min(vals) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return vals


def _positive(text):
    return _int_at_least(text, 1)


def _non_negative(text):
    return _int_at_least(text, 0)


def _int_at_least(text, low):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def build_parser():
    p = argparse.ArgumentParser(prog="resnet-fused", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, arch_choices=ARCHS):
        sp.add_argument("--arch", default="resnet50", choices=arch_choices)
        sp.add_argument("--weights", default=None,
                        help="torchvision weights name (e.g. IMAGENET1K_V2) or a state_dict file; "
                             "default: seeded random weights")
        sp.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")

    def input_size(sp, video):
        sp.add_argument("--size", type=_size, default=None,
                        help="input SIZE or HxW (default: 224; 112 for the video ResNets)"
                        if video else "input SIZE or HxW (default: 224)")
        if video:
            sp.add_argument("--frames", type=_positive, default=None,
                            help="frames per clip, for the video ResNets (default: 16)")

    v = sub.add_parser("verify", help="compare fused with torchvision in every supported dtype")
    common(v, ARCHS + VIDEO_ARCHS + ("all",))
    v.add_argument("--batch", type=_positive, default=2)
    input_size(v, video=True)
    v.set_defaults(fn=cmd_verify)

    b = sub.add_parser("bench", help="fused vs unfused throughput and latency")
    common(b, ARCHS + VIDEO_ARCHS)
    b.add_argument("--model", default=None, choices=DETECTION + SEGMENTATION,
                   help="time this whole detection or segmentation model instead, its ResNet "
                        "backbone fused against unfused (--arch, --weights, --frames, --compile "
                        "and --peers do not apply)")
    b.add_argument("--batch-sizes", type=_batches, default=None,
                   help="comma-separated (default: 1,8 on CPU; 1,32,256 on CUDA; 1 with --model "
                        "or a video arch)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    input_size(b, video=True)
    b.add_argument("--compile", action="store_true", help="also time torch.compile(torchvision), default and with freezing")
    b.add_argument("--peers", action="store_true",
                   help="also time ONNX Runtime and OpenVINO on torchvision's graph (CPU; "
                        "pip install onnx onnxruntime openvino)")
    b.add_argument("--warmup", type=_non_negative, default=3)
    b.add_argument("--repeats", type=_positive, default=10)
    b.add_argument("--json", default=None, help="also write the results to this file")
    b.set_defaults(fn=cmd_bench)

    pr = sub.add_parser("profile", help="per-stage time fused vs unfused, trace + bar chart")
    common(pr, ARCHS + VIDEO_ARCHS)
    pr.add_argument("--batch", type=_positive, default=8)
    pr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    input_size(pr, video=True)
    pr.add_argument("--warmup", type=_non_negative, default=2)
    pr.add_argument("--repeats", type=_positive, default=3)
    pr.add_argument("--out", default="profile_out", help="folder for traces and the chart")
    pr.set_defaults(fn=cmd_profile)

    pd = sub.add_parser(
        "predict", help="top-k ImageNet classes or embeddings of image files and folders",
        description="Classify (or embed, --features) image files and folders. With --out: "
                    "resumable, and sharded across ranks under torchrun. Exit code 1 if any "
                    "image failed (its error is recorded).")
    common(pd)
    pd.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders walked "
                    f"recursively for {', '.join(predict.IMAGE_EXTENSIONS)}")
    pd.add_argument("--out", default=None,
                    help="JSON-lines file of the results (default: print them); a rerun skips "
                         "the images already in it")
    pd.add_argument("--topk", type=_positive, default=None, help="classes per image (default 5)")
    pd.add_argument("--features", choices=["npy", "safetensors"], default=None,
                    help="write the pooled embedding (fc's input) instead of classes, as shards "
                         "in OUT.features/")
    pd.add_argument("--batch-size", type=_positive, default=32)
    pd.add_argument("--workers", type=_non_negative, default=None,
                    help="DataLoader worker processes that decode (default: 0 on the CPU, where "
                         "decoding costs a few %% of the model's time; on a GPU the CPU cores "
                         "divided among the machine's ranks, less one, from 1 to 8)")
    pd.add_argument("--resize", type=_positive, default=None,
                    help="shorter side before the crop (default: the size torchvision evaluated "
                         "the --weights at, e.g. 232 for IMAGENET1K_V2; else 256)")
    pd.add_argument("--crop", type=_positive, default=None,
                    help="center crop (default: as for --resize; else 224)")
    pd.add_argument("--retry-errors", action="store_true",
                    help="also redo the images recorded with an error")
    pd.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    pd.set_defaults(fn=cmd_predict, parser=pd)

    i = sub.add_parser("info", help="which of our kernels run here, and why not where one does not")
    i.set_defaults(fn=cmd_info)
    return p


def cmd_info(args):
    info.print_rows()
    return 0


def _check_paths(parser, args):
    """Output paths that cannot be written, refused before any work (exit 2)."""
    json_path = getattr(args, "json", None)
    if json_path and os.path.isdir(json_path):
        parser.error(f"argument --json: expected a file path, got the folder {json_path}")
    if json_path and not os.path.isdir(os.path.dirname(os.path.abspath(json_path))):
        parser.error(f"argument --json: expected a file in an existing folder, got {json_path}")
    if args.fn is cmd_profile:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            parser.error(f"argument --out: expected a folder, got the file {args.out}")
        # Made only once the run is known to go ahead (cmd_profile), so that a refused
        # run leaves nothing behind: here the nearest existing folder must be writable.
        existing = os.path.abspath(args.out)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            parser.error(f"argument --out: expected a folder that can be written, got "
                         f"{args.out} ({existing} is not a writable folder)")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_paths(parser, args)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
