"""The recorded op plans (resnet_fused/op_plan.py, csrc/op_plan.cpp): a replay gives the
walk's outputs bit for bit, follows weight changes, and is not made where it could be
wrong."""

import pytest
import torch
from torchvision.models._utils import IntermediateLayerGetter

import resnet_fused
from resnet_fused import fuse, op_plan
from resnet_fused.backbone import FusedBody

from common_utils import num_threads, rel_err, tv_model

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
        assert rel_err(replayed, tv(x)) <= 1e-5


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
        assert [callable(p) for p in _plans(fused).values()] == [True]
        for out in runs:
            assert list(out) == ["a", "b", "c"]
            for name in out:
                assert torch.equal(out[name], runs[0][name])
                assert rel_err(out[name], ref[name]) <= 1e-5


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
    with torch.inference_mode():
        for _ in range(3):
            assert rel_err(fused(x), tv(x)) <= 1e-5


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
                    assert rel_err(out, ref) <= 1e-5
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

    with torch.inference_mode():
        for walk in (reads_a_value, layout_argument, two_results, returns_its_input):
            out, plan = op_plan.record(walk, x)
            assert plan is None, walk.__name__
            assert torch.equal(out["y"], walk(x)["y"])
        out, plan = op_plan.record(lambda t: {"y": t.relu().neg()}, x)
        assert plan is not None and torch.equal(plan(x)["y"], out["y"])
        other = torch.randn(2, 8, 5, 5)
        assert torch.equal(plan(other)["y"], other.relu().neg())


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
    with pytest.raises(RuntimeError, match="argument alpha has type Scalar, which a plan does"):
        plan.add_step("aten::add", "Tensor", [None, None], [0, 0], [], [], [])
    for inputs in ([torch.ones(1), torch.ones(1)], []):
        with pytest.raises(RuntimeError, match=rf"expected 1 inputs \(as the plan was made for\), "
                                               rf"got {len(inputs)}"):
            plan.run(inputs)
