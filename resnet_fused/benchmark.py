"""Timing and profiling, for `resnet-fused bench` / `profile` and benchmarks/.

Timing: every variant runs in the same process on the same input, in blocks of
runs round-robin, after warm-up; the median is reported (CUDA events on a GPU,
perf_counter on the CPU). Peers (ONNX Runtime, OpenVINO) are optional: without
them their rows are skipped with a sentence saying how to install them.
"""

import copy
import importlib.util
import os
import statistics
import tempfile
import time

import torch

from .cudnn_fused import CudnnFusedResNet
from .model import STAGES

# ---- timing ------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_model():
    """The CPU's model name, as lscpu shows it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def time_once(fn, device):
    """Milliseconds of one call of fn."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns, device, warmup, repeats, block=5, settle_ms=50.0):
    """Median ms of each fn after warm-up. Runs go in blocks of `block` per variant,
    round-robin, every other round in reverse (A A B B C C, C C B B A A, ...): drift in
    clock speed or machine load hits every variant alike, each block still runs with
    that model's caches warm, and no variant always follows the same one (in a fixed
    order, the same model timed twice as A B A B measured the second up to 7% faster on
    an AMD EPYC Zen 4; as A B B A, 0.2-1.9%). Each block starts with untimed runs, one
    at least and as many as fit in settle_ms, which take the previous variant's
    leftovers: its data in the caches and its idle threads (ONNX Runtime's spin for
    10-50 ms after a run and, there, doubled the time of ResNet-50's next forward at
    batch 1; one untimed run of a model that takes a few milliseconds, at small inputs,
    left the next variant's timed runs inside that spin)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    order = list(fns.items())
    while any(len(t) < repeats for t in times.values()):
        for name, fn in order:
            runs = min(block, repeats - len(times[name]))
            if runs:
                settled = 0.0
                while True:
                    settled += time_once(fn, device)
                    if settled >= settle_ms:
                        break
            for _ in range(runs):
                times[name].append(time_once(fn, device))
        order.reverse()
    return {name: statistics.median(t) for name, t in times.items()}


# ---- variants ------------------------------------------------------------------------

CUDNN_FUSED = "cuDNN fused ops (folded BN)"


def torch_variants(tv, fused, dtype, use_compile, memory_format=torch.channels_last):
    """(name -> callable(x), notes) for torchvision eager (first: on the input as given,
    then on `memory_format`, channels_last_3d for the video ResNets), torch.compile,
    cuDNN's fused ops (on CUDA, 2-D) and resnet_fused, on copies of the models in `dtype`
    (the given ones are left as they are); notes say why a variant is missing."""
    tv_d = copy.deepcopy(tv).to(dtype)
    cl = memory_format
    tv_cl = copy.deepcopy(tv_d).to(memory_format=cl)
    video = cl == torch.channels_last_3d
    variants = {f"torchvision eager ({'NCDHW' if video else 'NCHW'})": tv_d,
                f"torchvision eager ({str(cl).replace('torch.', '')})":
                    lambda x: tv_cl(x.contiguous(memory_format=cl))}
    if use_compile:
        compiled = torch.compile(tv_cl)
        # Inductor's freezing folds BN into the convs as we do: the strongest compiled peer.
        frozen = torch.compile(copy.deepcopy(tv_cl), options={"freezing": True})
        variants["torch.compile"] = lambda x: compiled(x.contiguous(memory_format=cl))
        variants["torch.compile + freezing"] = lambda x: frozen(x.contiguous(memory_format=cl))
    notes = []
    device = next(tv.parameters()).device
    if device.type == "cuda" and not video:
        # Folded from the fp32 model, as ours is. cuDNN may refuse a shape or dtype
        # (CUDNN_STATUS_NOT_SUPPORTED): one small forward finds out here, so that the
        # other rows are still measured.
        peer = CudnnFusedResNet(tv, dtype).eval()
        try:
            with torch.inference_mode():
                peer(torch.zeros(1, 3, 64, 64, device=device, dtype=dtype))
            variants[CUDNN_FUSED] = peer
        except RuntimeError as e:
            notes.append(f"{CUDNN_FUSED}: skipped, {str(e).splitlines()[0]}")
    variants["resnet_fused"] = copy.deepcopy(fused).to(dtype)
    return variants, notes


TASK_LABELS = ("unfused", "unfused channels_last", "resnet_fused")


def task_variants(tv, fused, x):
    """name -> callable() for a whole detection/segmentation model and its ResNet body
    alone, each unfused (NCHW and channels_last) and fused, on the batch `x` (images in
    [0, 1] for detection). The body runs on what the model would feed it (after a
    detection model's resize and normalisation), so the body's share of the whole is
    measured, not guessed. The fused body returns channels_last feature maps, which
    speed up the convs after it too: the channels_last rows show how much of that a
    user gets without fusing."""
    from .testing import backbone_body

    detection = hasattr(tv, "transform")
    inputs = list(x) if detection else x
    body_x = tv.transform(inputs)[0].tensors if detection else x
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    variants = {}
    for label, model in zip(TASK_LABELS, (tv, tv_cl, fused)):
        body = backbone_body(model)
        variants[f"whole model, {label}"] = lambda m=model: m(inputs)
        variants[f"ResNet body, {label}"] = lambda b=body: b(body_x)
    return variants


def peer_variants(tv, example, dtype, threads):
    """name -> callable(x) for ONNX Runtime and OpenVINO on torchvision's graph, and
    the reasons for the peers that cannot run here."""
    variants = {}
    if dtype not in (torch.float32, torch.bfloat16):
        return variants, [f"peers: none for {dtype}"]
    # Both run torchvision's graph exported by torch.onnx, which needs the onnx package.
    wanted = (["onnxruntime"] if dtype == torch.float32 else []) + ["openvino", "onnx"]
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    skipped = [f"{m}: not installed (pip install onnx onnxruntime openvino)" for m in missing]
    if dtype != torch.float32:
        skipped.append("onnxruntime: fp32 only (its CPU provider has no bfloat16 convolutions)")
    if "onnx" in missing or set(wanted) - set(missing) == {"onnx"}:
        return variants, skipped
    # The file is needed only while the peers load it: both keep their own copy.
    with tempfile.TemporaryDirectory(prefix="resnet_fused_") as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        try:
            export_onnx(copy.deepcopy(tv).float(), example.float(), onnx_path)
        except Exception as e:  # exporter missing or failing: a peer row, not the bench, is lost
            return variants, skipped + [f"peers: torch.onnx.export failed ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''})"]
        precision = "f32" if dtype == torch.float32 else "bf16"
        runners = [("onnxruntime", "onnxruntime", lambda: onnxruntime_runner(onnx_path, threads)),
                   ("openvino", f"openvino {precision}",
                    lambda: openvino_runner(onnx_path, threads, precision))]
        for module, name, make in runners:
            if module in wanted and module not in missing:
                try:
                    variants[name] = make()
                except Exception as e:  # installed but broken (a missing shared library, a
                    # plugin that fails to load): its row, not the bench, is lost
                    first = str(e).splitlines()[0] if str(e) else ""
                    skipped.append(f"{module}: cannot be used ({type(e).__name__}: {first})")
    return variants, skipped


def export_onnx(model, example, path):
    """torchvision's graph as ONNX (opset 17, dynamic batch) in the file `path`."""
    with torch.no_grad():
        torch.onnx.export(model.eval(), (example,), path, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)


def onnxruntime_runner(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Its threads spin between ops (its default): 1-2% faster at batch 1 than without.
    # They go on spinning after a run; time_interleaved's untimed run per block takes that.
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def run(x):
        return torch.from_numpy(session.run(None, {"x": x.float().numpy()})[0])
    return run


def openvino_runner(path, threads, precision):
    """OpenVINO on the CPU at the given inference precision (it would pick bf16 by
    itself on AMX CPUs: the fp32 row must ask for f32)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1})
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x.float().numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ---- profiling -------------------------------------------------------------------------


# The stages of a video ResNet: torchvision's VideoResNet's top-level modules, as the
# fused graph labels them (graph_fuse._label_stages).
VIDEO_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")


def stage_times(events, stages=STAGES):
    """ms per stage label ("stage:layer1", ...) in torch.profiler's key_averages()."""
    return {s: sum(e.cpu_time_total if e.device_time_total == 0 else e.device_time_total
                   for e in events if e.key == f"stage:{s}") / 1e3 for s in stages}


def staged_torchvision(m, x):
    """torchvision's ResNet or VideoResNet forward, with the profiler labels of the fused
    models' stages (STAGES, VIDEO_STAGES)."""
    rf = torch.profiler.record_function
    video = hasattr(m, "stem")
    with rf("stage:stem"):
        x = m.stem(x) if video else m.relu(m.bn1(m.conv1(x)))
    if not video:
        with rf("stage:maxpool"):
            x = m.maxpool(x)
    for s in ("layer1", "layer2", "layer3", "layer4"):
        with rf(f"stage:{s}"):
            x = getattr(m, s)(x)
    if not video:
        with rf("stage:head"):
            return m.fc(torch.flatten(m.avgpool(x), 1))
    with rf("stage:avgpool"):
        x = m.avgpool(x).flatten(1)
    with rf("stage:fc"):
        return m.fc(x)


def bar_chart(per_stage, path, title, stages=STAGES):
    """A PNG of per-stage ms, fused vs unfused. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.4
    xs = range(len(stages))
    ax.bar([i - width / 2 for i in xs], [per_stage["unfused"][s] for s in stages], width,
           label="unfused (torchvision)")
    ax.bar([i + width / 2 for i in xs], [per_stage["fused"][s] for s in stages], width,
           label="fused (resnet_fused)")
    ax.set_xticks(list(xs), stages)
    ax.set_ylabel("ms per forward")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
