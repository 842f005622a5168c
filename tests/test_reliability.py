"""Concurrency, autocast, export and memory: FusedResNet never silently differs."""

import gc
import threading
import warnings
import weakref

import pytest
import torch

import resnet_fused
from resnet_fused import fuse

from common_utils import fp32_bound, rel_err, run_in_threads, tv_model

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")


def test_eight_threads_get_the_right_answers():
    tv = tv_model("resnet18")
    fused = fuse(tv)
    inputs = [torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(i))
              for i in range(8)]
    with torch.inference_mode():
        fused(inputs[0])  # a fold that the change below makes stale
    # A parameter change right before the threads start: every thread races to
    # refold; none may see a half-built or stale fold.
    with torch.no_grad():
        for model in (tv, fused):
            model.layer1[0].conv1.weight.mul_(0.5)
    with torch.inference_mode():
        refs = [tv(x) for x in inputs]
    bounds = [fp32_bound(tv, x) for x in inputs]
    errors, barrier = [None] * 8, threading.Barrier(8)

    def work(i):
        barrier.wait()
        with torch.inference_mode():
            for _ in range(3):
                errors[i] = max(errors[i] or 0.0, rel_err(fused(inputs[i]), refs[i]))

    run_in_threads(work, 8)
    assert all(e is not None and e <= b for e, b in zip(errors, bounds)), (errors, bounds)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 oneDNN")
def test_cpu_autocast_bf16_matches_an_explicit_cast():
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = tv(x)
        with torch.autocast("cpu", torch.bfloat16):
            ours, theirs = fused(x), tv(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref)


def test_cpu_autocast_leaves_a_float64_model_float64():
    # Autocast lowers float32 only; the float64 model runs torchvision's math (a warning).
    tv = tv_model("resnet18").double()
    fused = fuse(tv)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings(), torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        warnings.simplefilter("ignore", RuntimeWarning)
        ours, theirs = fused(x), tv(x)
    assert ours.dtype == theirs.dtype == torch.float64 and rel_err(ours, theirs) <= 1e-12


def test_torch_export_runs_and_matches():
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        program = torch.export.export(fused, (x,))
        assert any("resnet_fused" in str(n.target) for n in program.graph.nodes)
        assert rel_err(program.module()(x), tv(x)) <= fp32_bound(tv, x)


def test_torch_jit_trace_runs_saves_and_matches(tmp_path):
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused(x)  # a cached fold exists: the trace must not record it
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)  # nothing shape-bound
            traced = torch.jit.trace(fused, x)  # checks that two recordings agree
        assert any("resnet_fused" in n.kind() for n in traced.inlined_graph.nodes())
        torch.jit.save(traced, tmp_path / "model.pt")
        loaded = torch.jit.load(tmp_path / "model.pt")
        y = torch.randn(3, 3, 48, 80)  # another shape: nothing shape-specific was recorded
        assert rel_err(loaded(y), tv(y)) <= fp32_bound(tv, y)


def test_torch_jit_script_names_what_works_instead():
    fused = fuse(tv_model("resnet18"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 deprecates script
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile FusedResNet"
                                               r".*torch\.jit\.trace.*to_torchvision"):
            torch.jit.script(fused)
        torch.jit.script(fused.to_torchvision())  # the suggested way out works


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="reads /proc (Linux)")
def test_repeated_forwards_do_not_grow_memory():
    fused = fuse(tv_model("resnet18"))
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        for _ in range(20):           # first calls fill the fold and oneDNN caches
            fused(x)
        gc.collect()
        before = _rss_bytes()
        for _ in range(1000):
            fused(x)
        gc.collect()
        growth = _rss_bytes() - before
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 forwards"


def _deletable(kind):
    """(model, input): a fused ResNet, a fused body of a segmentation model, or a model
    fused through torch.fx."""
    if kind == "resnet":
        return fuse(tv_model("resnet18")), torch.randn(1, 3, 32, 32)
    if kind == "body":
        from resnet_fused.testing import task_model
        return fuse(task_model("fcn_resnet50")), torch.randn(1, 3, 32, 32)
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU()).eval()
    small.eps = 1e-6  # a number named eps on the model itself (its watch reads norms' eps)
    return fuse(small), torch.randn(1, 3, 8, 8)


@pytest.mark.parametrize("kind", ["resnet", "body", "fx"])
def test_a_deleted_model_is_freed_at_once(kind):
    # Its weights, folds and recorded plans go with it when the last reference does,
    # without waiting for the garbage collector's full pass, rare in a serving process
    # (a model reloaded per checkpoint kept ~300 MB per dead ResNet-50 alive).
    model, x = _deletable(kind)
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for _ in range(3):  # walked, recorded, replayed
                model(x)
        with torch.no_grad():
            model(x)
        ref = weakref.ref(model)
        del model
        assert ref() is None, "a reference cycle keeps the deleted model"
    finally:
        gc.enable()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_onnx_export_gives_torchvision_graph(tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(RuntimeWarning, match="ONNX export exports torchvision's graph"):
        torch.onnx.export(fused, (x,), str(tmp_path / "m.onnx"))
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "Conv" in ops and not any(node.domain.startswith("resnet_fused") for node in graph.node)
