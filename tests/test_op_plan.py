"""The recorded op plans (resnet_fused/op_plan.py, csrc/op_plan.cpp): a replay gives the
walk's outputs bit for bit, follows weight changes, and is not made where it could be
wrong."""

import pytest
import torch
from torchvision.models._utils import IntermediateLayerGetter

import resnet_fused
from resnet_fused import fuse, op_plan
from resnet_fused.backbone import FusedBody

from common_utils import fp32_bound, fp32_bounds, num_threads, rel_err, tv_model

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")


def _plans(model):
    (fold,) = model._fold_cache.values()
    return fold.plans


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("shape,channels_last", [((1, 3, 64, 64), False),
                                                  ((2, 3, 97, 131), True)])
def test_replay_gives_the_walks_outputs(arch, shape, channels_last):
    tv = tv_model(arch)
    fused = fuse(tv)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        walked, recorded, replayed = fused(x), fused(x), fused(x)
        assert [callable(p) for p in _plans(fused).values()] == [True]
        assert torch.equal(recorded, walked) and torch.equal(replayed, walked)
        assert rel_err(replayed, tv(x)) <= fp32_bound(tv, x)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="no bfloat16 convolutions on this CPU")
def test_a_walk_that_converts_dtypes_is_replayed():
    # bfloat16 at 32x32: layer4's convs have one output pixel and run on a float32 copy of
    # their weight (dispatch.py), so the walk converts x and the result (aten.to.dtype,
    # whose dtype a plan holds as c10::ScalarType's value).
    fused = fuse(tv_model("resnet18")).to(torch.bfloat16)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.inference_mode():
        walked, recorded, replayed = fused(x), fused(x), fused(x)
    assert [callable(p) for p in _plans(fused).values()] == [True]
    assert torch.equal(recorded, walked) and torch.equal(replayed, walked)


def test_backbone_replay_keeps_the_returned_layers():
    # The block after a returned layer may not sum into it: the replay must not either.
    tv = tv_model("resnet18")
    getter = IntermediateLayerGetter(tv, {"layer1": "a", "layer2": "b", "layer4": "c"}).eval()
    fused = FusedBody.convert(IntermediateLayerGetter(
        tv_model("resnet18"), {"layer1": "a", "layer2": "b", "layer4": "c"})).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        ref = getter(x)
        runs = [fused(x) for _ in range(3)]
    bounds = fp32_bounds(getter, x)
    with torch.inference_mode():
        assert [callable(p) for p in _plans(fused).values()] == [True]
        for out in runs:
            assert list(out) == ["a", "b", "c"]
            for name in out:
                assert torch.equal(out[name], runs[0][name])
                assert rel_err(out[name], ref[name]) <= bounds[name]


def test_replay_follows_weight_changes():
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        for _ in range(3):
            fused(x)
    with torch.no_grad():
        for m in (fused, tv):
            m.layer3[1].conv2.weight.mul_(0.5)
            m.layer2[0].bn1.running_var.mul_(3.0)
    bound = fp32_bound(tv, x)
    with torch.inference_mode():
        for _ in range(3):
            assert rel_err(fused(x), tv(x)) <= bound


def test_each_thread_count_and_input_has_its_own_plan():
    tv = tv_model("resnet18")
    fused = fuse(tv)
    cases = [(1, torch.randn(1, 3, 64, 64)), (2, torch.randn(1, 3, 64, 64)),
             (2, torch.randn(1, 3, 80, 64)),
             (2, torch.full((1, 3, 64, 64), float("nan")))]  # NaN: the kernels scan
    with torch.inference_mode():
        for threads, x in cases * 3:
            with num_threads(threads):
                out, ref = fused(x), tv(x)
                if x.isnan().any():
                    assert out.isnan().all() and ref.isnan().all()
                else:
                    assert rel_err(out, ref) <= fp32_bound(tv, x)
    assert len(_plans(fused)) == len(cases)


def test_a_walk_it_cannot_replay_is_not_recorded():
    x = torch.randn(2, 8, 5, 5)

    def reads_a_value(t):  # a branch on data could go the other way next time
        y = t.relu() if t.sum().item() > 0 else t.neg()
        return {"y": y}

    def layout_argument(t):  # a MemoryFormat argument: not a type the plan holds
        return {"y": torch.ops.aten.clone.default(t, memory_format=torch.channels_last)}

    def two_results(t):
        return {"y": t.max(dim=1).values}

    def returns_its_input(t):
        return {"y": t}

    def int_scalar(t):  # held as a float, it would change the op's overload of an int
        return {"y": torch.ops.aten.constant_pad_nd.default(t, [0, 0, 0, 0, 0, 3], 0)}

    with torch.inference_mode():
        for walk in (reads_a_value, layout_argument, two_results, returns_its_input, int_scalar):
            out, plan = op_plan.record(walk, x)
            assert plan is None, walk.__name__
            assert torch.equal(out["y"], walk(x)["y"])
        out, plan = op_plan.record(lambda t: {"y": t.relu().neg()}, x)
        assert plan is not None and torch.equal(plan(x)["y"], out["y"])
        other = torch.randn(2, 8, 5, 5)
        assert torch.equal(plan(other)["y"], other.relu().neg())
        # A float Scalar is held (the padded stem's zero channels, dispatch.pad_channels).
        pad = lambda t: {"y": torch.constant_pad_nd(t, (0, 0, 0, 0, 0, 3), 0.5)}  # noqa: E731
        out, plan = op_plan.record(pad, x)
        assert plan is not None and torch.equal(plan(other)["y"], pad(other)["y"])


def test_plan_errors_name_the_problem():
    plan = torch.classes.resnet_fused.OpPlan(1)
    with pytest.raises(RuntimeError, match="as many tensor_slots as tensors"):
        plan.add_step("aten::relu", "", [None], [], [], [], [])
    with pytest.raises(RuntimeError, match="slot 3 is not produced before this step"):
        plan.add_step("aten::relu", "", [None], [3], [], [], [])
    with pytest.raises(RuntimeError, match="more arguments given than aten::relu takes"):
        plan.add_step("aten::relu", "", [None], [0], [1], [], [])
    with pytest.raises(RuntimeError, match="aten::dropout needs more float arguments"):
        plan.add_step("aten::dropout", "", [None], [0], [], [], [])
    with pytest.raises(RuntimeError, match="argument approximate has type str, which a plan "
                                           "does not hold"):
        plan.add_step("aten::gelu", "", [None], [0], [], [], [])
    with pytest.raises(RuntimeError, match="aten::clone needs more int arguments"):
        plan.add_step("aten::clone", "", [None], [0], [], [], [])  # memory_format: -1 for None
    with pytest.raises(RuntimeError, match="argument memory_format of type MemoryFormat\\? "
                                           "holds only None here, got 2"):
        plan.add_step("aten::clone", "", [None], [0], [2], [], [])
    for inputs in ([torch.ones(1), torch.ones(1)], []):
        with pytest.raises(RuntimeError, match=rf"expected 1 inputs \(as the plan was made for\), "
                                               rf"got {len(inputs)}"):
            plan.run(inputs)


def test_the_c_entry_runs_the_plan_and_names_bad_arguments():
    # The forward calls run_plan; OpPlan.run is its TorchScript twin.
    plan = torch.classes.resnet_fused.OpPlan(1)
    slot = plan.add_step("aten::relu", "", [None], [0], [], [], [])
    plan.finish([slot])
    handle = resnet_fused._extension._C.plan_handle(plan)
    del plan  # the handle holds it
    x = torch.randn(5, 3)
    (y,) = resnet_fused._extension._C.run_plan(handle, x)
    assert torch.equal(y, x.relu())
    with pytest.raises(TypeError, match="run_plan: expected a tensor input, got list"):
        resnet_fused._extension._C.run_plan(handle, [x])
    with pytest.raises(ValueError):
        resnet_fused._extension._C.run_plan(object(), x)
    with pytest.raises(TypeError, match="plan_handle: expected a torch.classes.resnet_fused."
                                        "OpPlan, got object"):
        resnet_fused._extension._C.plan_handle(object())


def _recorded(arch="resnet18"):
    """A fused model that has recorded its forward for x, and x."""
    fused = fuse(tv_model(arch))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for _ in range(3):
            fused(x)
    assert fused.__dict__.get("_fast") is not None
    return fused, x


class _Subclass(torch.Tensor):
    pass


def _fast_forward(fused, x):
    return resnet_fused._extension._C.fast_forward(fused._fast[0], x)


def test_the_c_forward_gives_the_replays_output():
    fused, x = _recorded()
    with torch.inference_mode():
        assert torch.equal(_fast_forward(fused, x), _plans(fused)[next(iter(_plans(fused)))](
            x.contiguous(memory_format=torch.channels_last))["head"])
        assert torch.equal(fused(x), _fast_forward(fused, x))
    with torch.no_grad():  # no autograd graph either way
        assert _fast_forward(fused, x) is not None


@pytest.mark.parametrize("case", ["grad", "autocast", "profiler", "threads", "nan", "shape",
                                  "dtype", "subclass", "weight", "hook", "global_hook", "eps"])
def test_the_c_forward_leaves_what_it_cannot_replay_to_python(case, monkeypatch):
    # The "once" of the model's warnings (the hook's) is kept to this test.
    monkeypatch.setattr(resnet_fused.model, "_warned", set())
    fused, x = _recorded()
    plain = fused.to_torchvision()
    bound = fp32_bound(plain, x)
    with torch.inference_mode():
        ref = plain(x)
    if case == "grad":  # the forward records a graph: the Python forward folds inline
        assert _fast_forward(fused, x) is None
        return
    with torch.inference_mode():
        if case == "autocast":
            with torch.autocast("cpu", torch.bfloat16):
                assert _fast_forward(fused, x) is None
        elif case == "profiler":
            with torch.autograd.profiler.profile():
                assert _fast_forward(fused, x) is None
        elif case == "threads":
            with num_threads(1 if torch.get_num_threads() > 1 else 2):
                assert _fast_forward(fused, x) is None
        elif case == "nan":
            y = x.clone()
            y[0, 1, 2, 3] = float("nan")
            assert _fast_forward(fused, y) is None
            assert torch.isnan(fused(y)).all()
        elif case == "shape":
            assert _fast_forward(fused, torch.randn(2, 3, 64, 64)) is None
        elif case == "dtype":
            assert _fast_forward(fused, x.double()) is None
        elif case == "subclass":  # its __torch_function__ may want to see the ops
            assert _fast_forward(fused, x.as_subclass(_Subclass)) is None
        elif case == "weight":
            fused.fc.bias.add_(1.0)
            assert _fast_forward(fused, x) is None
            plain = fused.to_torchvision()
            assert rel_err(fused(x), plain(x)) <= fp32_bound(plain, x)
            assert rel_err(ref + 1.0, plain(x)) <= bound  # the change is the one made
        elif case == "hook":
            seen = []
            fused.layer2.register_forward_hook(lambda *a: seen.append(1))
            assert _fast_forward(fused, x) is None
            fused(x)
            assert seen == [1]
        elif case == "global_hook":  # every module's call seen, as torchvision's forward
            seen = []
            handle = torch.nn.modules.module.register_module_forward_hook(
                lambda mod, inp, out: seen.append(type(mod).__name__))
            try:
                assert _fast_forward(fused, x) is None
                assert "global forward hook" in fused.fused_status(x)[1]
                out = fused(x)
            finally:
                handle.remove()
            assert rel_err(out, ref) <= bound
            assert seen.count("Conv2d") == 20 and seen[-1] == "FusedResNet"
        elif case == "eps":
            fused.bn1.eps = 0.5
            assert _fast_forward(fused, x) is None
            plain = fused.to_torchvision()
            assert rel_err(fused(x), plain(x)) <= fp32_bound(plain, x)
    if case not in ("weight", "hook", "eps"):  # unchanged: it replays again
        with torch.inference_mode():
            assert torch.equal(_fast_forward(fused, x), fused(x))
            assert rel_err(fused(x), ref) <= bound


def test_the_c_forward_survives_unrelated_assignments_and_stops_at_refresh():
    fused, x = _recorded()
    torch.nn.Linear(2, 2)  # moves the process's assignment counter
    with torch.inference_mode():
        assert _fast_forward(fused, x) is None  # the Python forward checks the tree
        out = fused(x)
        assert torch.equal(_fast_forward(fused, x), out)  # and the watch is current again
        fused.fc.weight.data.mul_(2.0)  # not seen by version counters
        fused.refresh_fold()
        assert fused.__dict__.get("_fast") is None
        plain = fused.to_torchvision()
        assert rel_err(fused(x), plain(x)) <= fp32_bound(plain, x)


def test_the_c_forward_is_not_traced():
    fused, x = _recorded()
    traced = torch.jit.trace(fused, x, check_trace=False)
    x2 = torch.randn(1, 3, 64, 64)
    plain = fused.to_torchvision()
    with torch.inference_mode():
        assert rel_err(traced(x2), plain(x2)) <= fp32_bound(plain, x2)


@pytest.mark.parametrize("which", ["bn1", "layer3"])
def test_a_batchnorm_in_train_mode_runs_torchvisions_math(which):
    # model.eval() then one BatchNorm (or a layer) back in train mode, as test-time BN
    # adaptation does: batch statistics, and running statistics updated.
    fused, x = _recorded()
    tv = fused.to_torchvision()
    for model in (fused, tv):
        getattr(model, which).train()
    assert "train mode" in fused.fused_status(x)[1]
    bound = fp32_bound(tv, x)
    with torch.inference_mode():
        for _ in range(2):
            assert rel_err(fused(x), tv(x)) <= bound
    assert torch.equal(fused.state_dict()["layer3.0.bn1.running_mean"] if which == "layer3"
                       else fused.bn1.running_mean,
                       tv.state_dict()["layer3.0.bn1.running_mean"] if which == "layer3"
                       else tv.bn1.running_mean)
    getattr(fused, which).eval()
    with torch.inference_mode():
        fused(x), fused(x)
        assert fused.__dict__.get("_fast") is not None  # fused again


@pytest.mark.parametrize("how", ["jvp", "forward_ad"])
def test_forward_mode_ad_gets_torchvisions_tangent(how):
    fused, x = _recorded()
    tv = fused.to_torchvision()
    t = torch.randn_like(x)
    if how == "jvp":
        with torch.no_grad():
            (_, ours), (_, theirs) = (torch.func.jvp(m, (x,), (t,)) for m in (fused, tv))
    else:
        import torch.autograd.forward_ad as fwAD
        with torch.no_grad(), fwAD.dual_level():
            ours, theirs = (fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent for m in (fused, tv))
    assert theirs.abs().max() > 0
    bound = fp32_bound(tv, x, run=lambda m, x: torch.func.jvp(m, (x,), (t.to(x.dtype),))[1])
    assert rel_err(ours, theirs) <= bound
    with torch.inference_mode():
        assert _fast_forward(fused, x) is not None  # outside the transforms, fused as before


def test_a_hook_on_the_max_pool_runs_every_call():
    fused, x = _recorded()
    fused.maxpool = torch.nn.Identity()  # as CIFAR-style ResNets have it
    tv = fused.to_torchvision()
    seen = []  # a hook that calls no op (one that did would keep the forward from a plan)
    fused.maxpool.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.inference_mode():
        ours = [fused(x) for _ in range(4)]  # walked, recorded, then the replays
        ref = tv(x)
    bound = fp32_bound(tv, x)
    assert all(rel_err(out, ref) <= bound for out in ours)
    assert len(seen) == 4


@pytest.mark.parametrize("where", ["instance", "class"])
def test_a_replaced_forward_is_not_fused_over(where, monkeypatch):
    from torchvision.models.resnet import BasicBlock
    fused, x = _recorded()
    fused.refresh_fold()  # a replaced forward is no change the fold's watch sees

    def doubled(self, t, forward=BasicBlock.forward):
        return 2 * forward(self, t)

    if where == "instance":
        block = fused.layer3[1]
        block.forward = doubled.__get__(block)
    else:
        monkeypatch.setattr(BasicBlock, "forward", doubled)
    tv = fused.to_torchvision()
    assert "forward is replaced" in fused.fused_status(x)[1]
    with torch.inference_mode():
        assert rel_err(fused(x), tv(x)) <= fp32_bound(tv, x)


def test_a_failed_recording_is_tried_again_a_few_times(monkeypatch):
    # Threads racing the first calls can make a weight inside another thread's recording,
    # which then fails once; a walk that never replays stops being recorded.
    record, calls = op_plan.record, []

    def fails_first(walk, x):
        calls.append(1)
        outputs, plan = record(walk, x)
        return outputs, (None if len(calls) == 1 else plan)

    fused = fuse(tv_model("resnet18"))
    x = torch.randn(1, 3, 64, 64)
    monkeypatch.setattr(op_plan, "record", fails_first)
    with torch.inference_mode():
        for _ in range(4):  # walk, recording (fails), recording, replay
            fused(x)
    assert len(calls) == 2 and [callable(p) for p in _plans(fused).values()] == [True]
    monkeypatch.setattr(op_plan, "record", lambda walk, x: (calls.append(1), (walk(x), None))[1])
    fused.refresh_fold()
    calls.clear()
    with torch.inference_mode():
        for _ in range(8):
            fused(x)
    assert len(calls) == resnet_fused.model._RECORD_TRIES
    assert list(_plans(fused).values()) == [None]
