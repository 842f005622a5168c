"""torchvision's detection and segmentation models with the ResNet backbone fused,
against the same models unfused: eval-mode outputs, and the frozen-BN training
step (losses and gradients)."""

import pytest
import torch
from torch import nn

from resnet_fused import fuse
from resnet_fused.backbone import FusedBody
from resnet_fused.testing import DETECTION, SEGMENTATION, task_model

from common_utils import fp32_bound, fp32_bounds, grad_err, rel_err, requires_extension

pytestmark = requires_extension


def detection_model(name):
    kwargs = dict(num_classes=3, min_size=96, max_size=128)
    if name.startswith("keypoint"):
        kwargs["num_keypoints"] = 5
    # Randomly initialized heads score every box below the default thresholds (0.05,
    # FCOS 0.2): with none, the detections would compare nothing.
    kwargs["score_thresh" if name.startswith(("retinanet", "fcos")) else "box_score_thresh"] = 0.0
    return task_model(name, **kwargs)


def images(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 96, 112, generator=g), torch.rand(3, 100, 90, generator=g)][:n]


@pytest.mark.parametrize("name", DETECTION)
def test_detection_eval_matches(name):
    tv = detection_model(name)
    fused = fuse(tv)
    assert type(fused) is type(tv) and isinstance(fused.backbone.body, FusedBody)
    assert fused.state_dict().keys() == tv.state_dict().keys()
    # The layers after the body take its channels_last features in their own layout.
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in fused.modules() if isinstance(m, nn.Conv2d))
    x = images()
    with torch.inference_mode():
        feats, feats_tv = fused.backbone.body(x[0][None]), tv.backbone.body(x[0][None])
        assert list(feats) == list(feats_tv)
        bounds = fp32_bounds(tv.backbone.body, x[0][None])
        for k in feats:
            assert rel_err(feats[k], feats_tv[k]) <= bounds[k], k
        ours, theirs = fused(x), tv(x)
    for o, t in zip(ours, theirs):
        assert o.keys() == t.keys()
        n = min(len(o["scores"]), 20)  # our top detections
        assert n > 0, "no detections to compare"
        # Each is one of torchvision's: the same label, score, box (mask, keypoints).
        # Matched, not compared rank by rank: random heads give unrelated boxes scores
        # ~1e-8 apart, which rounding may put in either order.
        values = [k for k in o if k != "labels" and o[k].numel()]
        for i in range(n):
            assert any(t["labels"][j] == o["labels"][i]
                       and all(rel_err(o[k][i], t[k][j]) <= 1e-4 for k in values)
                       for j in range(len(t["scores"]))), f"detection {i} has no match"


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"])
def test_detection_frozen_bn_training_step_matches(name):
    tv = detection_model(name).train()
    fused = fuse(tv).train()
    x = images()
    targets = [dict(boxes=torch.tensor([[10.0, 12.0, 60.0, 70.0]]), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[5.0, 5.0, 40.0, 50.0]]), labels=torch.tensor([2]))]
    losses = []
    for model in (fused, tv):
        torch.manual_seed(0)  # the proposal sampler draws at random
        loss = model(x, targets)
        sum(loss.values()).backward()
        losses.append({k: v.detach() for k, v in loss.items()})
    # Not the model rule: the heads rank proposals whose scores lie ~1e-8 apart, so
    # rounding-level feature differences may swap near-identical proposals in the
    # sample (a loss moved by 2.5e-6 so, the features by 1e-6). 1e-5 (~80 ulps) still
    # catches a wrong fold or layer, which moves the losses by 1e-3 and more.
    for k in losses[1]:
        assert rel_err(losses[0][k], losses[1][k]) <= 1e-5, k
    # The whole model's gradients also depend on which proposals/anchors the heads
    # select, a discrete choice that rounding-level differences in the features can
    # flip; so the backbone's gradients are compared for one fixed upstream gradient.
    batch = torch.stack([torch.nn.functional.pad(i, (0, 112 - i.shape[2], 0, 100 - i.shape[1]))
                         for i in x])

    def body_grads(body, batch):
        body.zero_grad()
        feats = body(batch)
        g = torch.Generator().manual_seed(1)
        sum((f * torch.randn(f.shape, generator=g)).sum() for f in feats.values()).backward()
        return {n: p.grad for n, p in body.named_parameters() if p.grad is not None}

    grads = [body_grads(model.backbone.body, batch) for model in (fused, tv)]
    assert grads[0].keys() == grads[1].keys() and grads[1]
    bounds = fp32_bounds(tv.backbone.body, batch, run=body_grads, measure=grad_err)
    for n, ref in grads[1].items():
        assert grad_err(grads[0][n], ref) <= bounds[n], n


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_matches(name):
    tv = task_model(name, num_classes=4, aux_loss=True)
    fused = fuse(tv)
    assert isinstance(fused.backbone, FusedBody)
    x = torch.randn(1, 3, 64, 72, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = fused(x), tv(x)
    bounds = fp32_bounds(tv, x)
    for k in theirs:
        assert rel_err(ours[k], theirs[k]) <= bounds[k], k


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(1, 1, 64, 64), ValueError, r"FusedBody: expected input of shape \(N, 3, H, W\), "
                                            r"got \(1, 1, 64, 64\)"),
    (torch.randn(3, 64, 64), ValueError, "FusedBody: expected input of shape"),
    ([1.0], TypeError, "FusedBody: expected a Tensor input, got list"),
    (torch.randn(1, 3, 64, 64, dtype=torch.bfloat16), TypeError,
     "FusedBody: input dtype torch.bfloat16 differs from the model's torch.float32"),
])
def test_body_names_a_bad_input(x, error, message):
    from torchvision.models._utils import IntermediateLayerGetter

    from common_utils import tv_model
    body = fuse(IntermediateLayerGetter(tv_model("resnet18"), {"layer2": "c3"}).eval())
    assert not body.fused_status(x)[0]
    with pytest.raises(error, match=message), torch.inference_mode():
        body(x)


def test_nothing_to_fuse_is_an_error():
    with pytest.raises(TypeError, match="found no torchvision ResNet.*in Sequential"):
        fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_body_returning_the_stem_keeps_it(arch):
    # A body may return the max-pool's output next to the layers'. ResNet-18's first
    # block has no downsample, so its residual is that very tensor: the fused block
    # must not sum into it in place. (32x32: too few tiles for Winograd, whose output
    # is a new tensor anyway.)
    from torchvision.models._utils import IntermediateLayerGetter

    from common_utils import tv_model
    layers = {"maxpool": "stem", "layer1": "c2", "layer3": "c4"}
    tv = IntermediateLayerGetter(tv_model(arch), return_layers=dict(layers)).eval()
    fused = fuse(nn.Sequential(IntermediateLayerGetter(tv_model(arch),
                                                       return_layers=dict(layers)))).eval()
    assert isinstance(fused[0], FusedBody)
    assert fused[0].fused_status(torch.randn(2, 3, 32, 32)) == (True, "")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out, ref = fused(x), tv(x)
    assert list(out) == list(ref) == list(layers.values())
    bounds = fp32_bounds(tv, x)
    for key in ref:
        assert rel_err(out[key], ref[key]) <= bounds[key], key


def test_body_refolds_when_a_frozen_bn_changes():
    # FrozenBatchNorm2d is not a torch BatchNorm: its eps and statistics must still
    # be watched for the fold to follow them.
    from torchvision.models._utils import IntermediateLayerGetter

    from common_utils import tv_model
    from resnet_fused.testing import freeze_bn_

    def body():
        return IntermediateLayerGetter(freeze_bn_(tv_model("resnet18")), {"layer4": "out"}).eval()

    tv, fused = body(), fuse(nn.Sequential(body()))[0]
    x = torch.randn(1, 3, 64, 64)
    for change in (lambda m: setattr(m.layer2[0].bn1, "eps", 0.5),
                   lambda m: m.layer3[1].bn2.running_var.mul_(4)):
        with torch.inference_mode():
            fused(x)  # folded before the change
        change(tv), change(fused)
        with torch.inference_mode():
            assert rel_err(fused(x)["out"], tv(x)["out"]) <= fp32_bound(tv, x)


def test_body_returning_inside_the_stem_runs_unfused():
    # conv1's, bn1's or relu's own output does not exist in the fused stem: such a
    # body runs torchvision's forward, and says why.
    from torchvision.models._utils import IntermediateLayerGetter

    from common_utils import tv_model
    layers = {"relu": "stem", "layer2": "c3"}
    tv = IntermediateLayerGetter(tv_model("resnet18"), return_layers=dict(layers)).eval()
    fused = fuse(nn.Sequential(IntermediateLayerGetter(tv_model("resnet18"),
                                                       return_layers=dict(layers)))).eval()
    x = torch.randn(2, 3, 32, 32)
    ok, why = fused[0].fused_status(x)
    assert not ok and "return_layers names relu" in why
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="return_layers names relu"):
        out = fused(x)
    ref = tv(x)
    assert list(out) == list(ref)
    bounds = fp32_bounds(tv, x)
    for key in ref:  # fuse() made the weights channels_last: oneDNN's order differs
        assert rel_err(out[key], ref[key]) <= bounds[key], key
