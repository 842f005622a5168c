"""FusedResNet on a GPU: threads with their own streams, autocast, memory, graphs.

These run the CUDA conv kernels through the model."""

import pytest
import torch

import resnet_fused
from resnet_fused import dispatch, fuse

from common_utils import fp32_bound, rel_err, run_in_threads, tf32_convs, tv_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not resnet_fused.available(), reason="extension not built"),
    pytest.mark.skipif("cuda" not in dispatch.KERNEL_DEVICES,
                       reason="this build has no CUDA conv kernels"),
]


@pytest.fixture(autouse=True)
def exact_fp32():
    with tf32_convs(False):
        yield


def test_threads_with_their_own_streams():
    tv = tv_model("resnet18").cuda()
    fused = fuse(tv)
    inputs = [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(8)]
    with torch.inference_mode():
        refs = [tv(x) for x in inputs]
    bounds = [fp32_bound(tv, x) for x in inputs]
    errors = [None] * 8

    def work(i):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.inference_mode():
            out = fused(inputs[i])
        stream.synchronize()
        errors[i] = rel_err(out, refs[i])

    run_in_threads(work, 8)
    assert all(e is not None and e <= b for e, b in zip(errors, bounds)), (errors, bounds)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_matches_an_explicit_cast(dtype):
    tv = tv_model("resnet50").cuda()
    fused = fuse(tv)
    x = torch.randn(4, 3, 96, 96, device="cuda")
    with torch.inference_mode():
        ref = tv.double()(x.double())
        tv.float()
        with torch.autocast("cuda", dtype):
            ours, theirs = fused(x), tv(x)
    assert ours.dtype == dtype
    assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref) + 1e-4


def test_memory_does_not_grow_and_graph_replays():
    tv = tv_model("resnet18").cuda()
    fused = fuse(tv)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        for _ in range(5):
            fused(x)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(1000):
            fused(x)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fused(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_out, tv(x)) <= fp32_bound(tv, x)


# Unit roundoff of each dtype's products (fp32 convs run as TF32 on the tensor cores,
# the path the padding is for).
_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -11}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_padded_stem_matches_the_unpadded_one(monkeypatch, dtype):
    """"pad_channels" in dispatch.CUDA_TRY: the stem's 3 input channels padded to a whole
    vector take the vector kernel and give the scalar-load kernel's result. Only the
    stem's summation order differs: a few units of roundoff there, carried through."""
    tv = tv_model("resnet50").cuda()
    fused = fuse(tv).to(dtype)
    x = torch.randn(4, 3, 96, 96, device="cuda", dtype=dtype)
    padded_shapes = []
    real = dispatch.pad_channels
    monkeypatch.setattr(dispatch, "pad_channels",
                        lambda t, c: padded_shapes.append(tuple(t.shape)) or real(t, c))
    with tf32_convs(True), torch.inference_mode():
        plain = fused(x)
        monkeypatch.setattr(dispatch, "CUDA_TRY", frozenset({"pad_channels"}))
        fused.refresh_fold()
        padded = fused(x)
    assert tuple(x.shape) in padded_shapes  # the input took the padded route
    assert rel_err(padded, plain) < 8 * _UNIT[dtype]


def test_the_recorded_plan_replays_the_walk(monkeypatch):
    """"plan" in dispatch.CUDA_TRY: the walk is recorded and replayed from C++, as on the
    CPU; the replay gives the walk's bits, for the recorded input and a new one."""
    tv = tv_model("resnet18").cuda()
    fused = fuse(tv).to(torch.float16)
    x = torch.randn(1, 3, 64, 64, device="cuda", dtype=torch.float16)
    y = torch.randn_like(x)
    with torch.inference_mode():
        walked = fused(x), fused(y)
        monkeypatch.setattr(dispatch, "CUDA_TRY", frozenset({"plan"}))
        outputs = [fused(x) for _ in range(4)]  # walk, record, replay, replay
        replayed = fused(y)
    assert any(callable(p) for f in fused._fold_cache.values() for p in f.plans.values())
    assert all(torch.equal(o, walked[0]) for o in outputs)
    assert torch.equal(replayed, walked[1])


def test_every_path_together_is_recorded_and_replayed(monkeypatch):
    """All of dispatch.CUDA_TRY_NAMES at once: the padded stem and our max-pool are
    recorded into the plan too (its replay gives the walk's bits), so that the paths
    are measured together as they would run."""
    tv = tv_model("resnet18").cuda()
    fused = fuse(tv).to(torch.float16)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        monkeypatch.setattr(dispatch, "CUDA_TRY", frozenset(dispatch.CUDA_TRY_NAMES) - {"plan"})
        walked = fused(x)
        monkeypatch.setattr(dispatch, "CUDA_TRY", frozenset(dispatch.CUDA_TRY_NAMES))
        outputs = [fused(x) for _ in range(3)]  # walk, record, replay
    assert any(callable(p) for f in fused._fold_cache.values() for p in f.plans.values())
    assert all(torch.equal(o, walked) for o in outputs)


def test_capture_after_one_warmup_with_the_plan(monkeypatch):
    """With "plan" on, the second call for an input records (and checks, with a sync):
    captured as that call, the capture walks instead, and later calls record."""
    tv = tv_model("resnet18").cuda()
    fused = fuse(tv).to(torch.float16)
    monkeypatch.setattr(dispatch, "CUDA_TRY", frozenset({"plan"}))
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        ref = fused(x)
        fused.refresh_fold()
        captured = fused.capture(tuple(x.shape), warmup=1)
        out = captured(x).clone()
        assert torch.equal(fused(x), ref) and torch.equal(fused(x), ref)
    assert torch.equal(out, ref)
    assert any(callable(p) for f in fused._fold_cache.values() for p in f.plans.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_our_max_pool_gives_the_same_model(monkeypatch, dtype):
    """"max_pool" in dispatch.CUDA_TRY: ops.max_pool2d in place of ATen's; a max is exact,
    so the outputs are the same bits."""
    tv = tv_model("resnet18").cuda()
    fused = fuse(tv).to(dtype)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=dtype)
    calls = []
    with torch.inference_mode():
        plain = fused(x)
        monkeypatch.setattr(dispatch, "CUDA_TRY", frozenset({"max_pool"}))
        real = dispatch.ops.max_pool2d
        monkeypatch.setattr(dispatch.ops, "max_pool2d",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
        ours = fused(x)
    assert calls and torch.equal(ours, plain)
