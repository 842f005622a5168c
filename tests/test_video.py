"""torchvision's video ResNets (r3d_18, mc3_18, r2plus1d_18) through fuse(): their
Conv3d-BatchNorm3d patterns run as the fused ops (3-D on the CPU), against
torchvision's own forward."""

import re
import warnings

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from resnet_fused import fuse
from resnet_fused.testing import realistic_

from common_utils import fp32_bounds, grad_err, rel_err

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")
BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()

# The patterns fuse() finds: each block's first conv(s) with their ReLU, the last
# with the residual sum and ReLU, the downsamples alone; R(2+1)D splits each 3-D
# conv into a spatial and a temporal one, with a BN and ReLU between.
PATTERNS = {
    "r3d_18": {"conv-BN-ReLU": 9, "conv-BN": 3, "conv-BN-add-ReLU": 8, "add-ReLU": 0},
    "mc3_18": {"conv-BN-ReLU": 9, "conv-BN": 3, "conv-BN-add-ReLU": 8, "add-ReLU": 0},
    "r2plus1d_18": {"conv-BN-ReLU": 26, "conv-BN": 3, "conv-BN-add-ReLU": 8, "add-ReLU": 0},
}


def _video(arch, seed=0):
    return realistic_(getattr(torchvision.models.video, arch)(), seed=seed).eval()


def _clip(n=1, frames=4, size=32, seed=0):
    return torch.randn(n, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def _op_calls(model, x):
    """{op name: calls} of one forward."""
    with torch.profiler.profile() as prof:
        model(x)
    return {e.key: e.count for e in prof.key_averages()}


def _runs_fused(calls):
    """No BatchNorm ran (folded), and our ops did."""
    return (not any("batch_norm" in name for name in calls)
            and sum(n for name, n in calls.items() if name.startswith("resnet_fused::")))


@pytest.mark.parametrize("arch", list(PATTERNS))
def test_a_video_resnet_runs_fused_and_matches(arch):
    model = _video(arch)
    fused = fuse(model)
    assert fused.fused_patterns == PATTERNS[arch]
    x = _clip(n=2)
    assert fused.fused_status(x) == (True, "")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the original forward
        assert rel_err(fused(x), model(x)) <= fp32_bounds(model, x)
        # At least one of our ops per pattern.
        assert _runs_fused(_op_calls(fused, x)) >= sum(PATTERNS[arch].values())


def test_a_profiler_sees_the_fused_stages():
    # As torchvision's top-level modules, one label each per forward, none nested in
    # another, every fused op inside one but the input's NaN/Inf scan before the graph
    # (resnet-fused profile reads them).
    fused, x = fuse(_video("r2plus1d_18")), _clip()
    stages = ["stem", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    with torch.inference_mode():
        fused(x)
        with torch.profiler.profile() as prof:
            fused(x)
            fused(x)
    labels = [e for e in prof.events() if e.name.startswith("stage:")]
    assert [e.name for e in labels] == [f"stage:{s}" for s in stages] * 2
    spans = [(e.time_range.start, e.time_range.end) for e in labels]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    ours = [e for e in prof.events()
            if e.name.startswith("resnet_fused::") and e.name != "resnet_fused::all_finite"]
    assert ours and all(any(s <= e.time_range.start and e.time_range.end <= t for s, t in spans)
                        for e in ours)


def test_channels_last_3d_input_and_output_layout():
    model = _video("r3d_18")
    fused = fuse(model)
    x = _clip(frames=3, size=24, seed=1)
    with torch.inference_mode():
        for xi in (x, x.contiguous(memory_format=torch.channels_last_3d)):
            assert rel_err(fused(xi), model(xi)) <= fp32_bounds(model, xi)
    # A feature map given back where the unfused model's layout shows.
    body = fuse(nn.Sequential(model.stem, model.layer1))
    with torch.inference_mode():
        assert body(x).is_contiguous()
        assert rel_err(body(x), model.layer1(model.stem(x))) <= fp32_bounds(
            nn.Sequential(model.stem, model.layer1), x)


def test_eval_mode_gradients_match():
    model = _video("r2plus1d_18")
    fused = fuse(model)
    x = _clip(frames=2, size=16, seed=2)

    def grads_of(m, x):
        xg = x.clone().requires_grad_()
        m(xg).square().sum().backward()
        return {"input": xg.grad, **{n: p.grad for n, p in m.named_parameters()}}

    bounds = fp32_bounds(model, x, run=grads_of, measure=grad_err)
    ours, theirs = grads_of(fused, x), grads_of(model, x)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert grad_err(ours[name], theirs[name]) <= bounds[name], name
    assert _runs_fused(_op_calls(fused, x.requires_grad_()))


def test_train_mode_runs_the_original_forward():
    model = _video("mc3_18").train()
    fused = fuse(model).train()
    x = _clip(n=2, frames=2, size=16, seed=3)
    assert torch.equal(fused(x), model(x))
    assert not _runs_fused(_op_calls(fused, x))


@pytest.mark.skipif(not BF16, reason="no bfloat16 convolutions on this CPU")
def test_bfloat16_within_twice_torchvisions_error():
    model = _video("r3d_18")
    x = _clip(frames=3, size=24, seed=4)
    with torch.inference_mode():
        ref = model(x)
        ours = fuse(model).to(torch.bfloat16)(x.bfloat16())
        theirs = _video("r3d_18").to(torch.bfloat16)(x.bfloat16())
    assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref)


class _WeightStandardized(nn.Conv3d):
    """A Conv3d subclass with a forward of its own: folding it as a Conv3d would be wrong."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3, 4), keepdim=True)
        return self._conv_forward(x, w, self.bias)


def test_a_conv3d_with_its_own_forward_is_not_folded():
    torch.manual_seed(0)
    model = realistic_(nn.Sequential(_WeightStandardized(3, 8, 3, padding=1, bias=False),
                                     nn.BatchNorm3d(8), nn.ReLU(),
                                     nn.Conv3d(8, 8, 3, padding=1, bias=False),
                                     nn.BatchNorm3d(8), nn.ReLU())).eval()
    fused = fuse(model)
    assert fused.fused_patterns["conv-BN-ReLU"] == 1  # the plain Conv3d's only
    x = _clip(frames=3, size=8)
    with torch.inference_mode():
        assert rel_err(fused(x), model(x)) <= fp32_bounds(model, x)


def test_compile_and_export_trace_the_fused_graph():
    model = _video("r3d_18")
    fused = fuse(model)
    x = _clip(frames=2, size=16, seed=5)
    with torch.inference_mode():
        ref = model(x)
        bound = fp32_bounds(model, x)
        assert rel_err(torch.compile(fused, fullgraph=True)(x), ref) <= bound
    exported = torch.export.export(fused, (x,))
    with torch.inference_mode():
        assert rel_err(exported.module()(x), ref) <= bound


def test_refolds_when_a_bn_or_conv_changes():
    model = _video("r3d_18")
    fused = fuse(model)
    x = _clip(frames=3, size=16, seed=6)
    with torch.inference_mode():
        before = fused(x)
    with torch.no_grad():
        for m in (fused, model):
            m.layer1[0].conv2[1].running_var.mul_(3.0)   # a BatchNorm3d buffer, in place
            m.layer2[0].conv1[0].weight.mul_(0.5)        # a 3x3x3 conv's weight, in place
    with torch.inference_mode():
        after = fused(x)
        assert rel_err(after, model(x)) <= fp32_bounds(model, x)
        assert rel_err(after, before) > 100 * fp32_bounds(model, x)


def test_an_input_of_the_other_rank_gets_the_models_own_error():
    # A 4-D batch of images given to a video model: torchvision's own error, not the op's.
    fused = fuse(_video("r3d_18"))
    x = torch.randn(1, 3, 32, 32)
    ok, why = fused.fused_status(x)
    assert not ok and re.fullmatch(r"the input is 4-D but \S+ takes 5-D input", why), why
    with pytest.raises(RuntimeError) as ours, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused(x)
    with pytest.raises(RuntimeError) as theirs:
        _video("r3d_18")(x)
    assert str(ours.value) == str(theirs.value)


def test_the_builders_load_a_checkpoint_and_name_the_weights(tmp_path):
    model = _video("r2plus1d_18")
    path = tmp_path / "r2plus1d.pth"
    torch.save(model.state_dict(), path)
    fused = resnet_fused.r2plus1d_18(weights=str(path)).eval()
    x = _clip()
    with torch.inference_mode():
        assert rel_err(fused(x), model(x)) <= fp32_bounds(model, x)
    with pytest.raises(ValueError, match="expected one of DEFAULT, KINETICS400_V1"):
        resnet_fused.r3d_18(weights="IMAGENET1K_V1")
