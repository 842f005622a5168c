"""Realistic random weights, for tests and for the CLI when no checkpoint is given.

A freshly initialised torchvision ResNet has BN running_mean=0, running_var=1,
gamma=1, beta=0: folding it is nearly the identity and tests nothing. Trained nets
have spread statistics; and the last BN of each residual branch must be small, or
deep nets overflow fp16 (a random-init ResNet-101 does, in torchvision itself).
"""

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d


@torch.no_grad()
def realistic_(model, seed=0):
    """Fills `model`'s BN statistics and affine parameters in place like a trained
    net's, deterministically from `seed`. Returns the model."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    last_bns = set()
    for m in model.modules():
        if isinstance(m, Bottleneck):
            last_bns.add(m.bn3)
        elif isinstance(m, BasicBlock):
            last_bns.add(m.bn2)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # Kaiming-normal (fan_out) like torchvision's init, but from our generator.
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
        elif isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            uniform(m.running_var, 0.5, 2.0)
            sign = torch.randint(0, 2, m.running_mean.shape, generator=g) * 2 - 1
            uniform(m.running_mean, 0.1, 0.5)
            m.running_mean.mul_(sign)
            if m in last_bns:
                uniform(m.weight, 0.1, 0.3)
            else:
                uniform(m.weight, 0.5, 1.5)
            uniform(m.bias, -0.2, 0.2)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / m.in_features ** 0.5
            uniform(m.weight, -bound, bound)
            uniform(m.bias, -bound, bound)
    return model


def freeze_bn_(module):
    """Every BatchNorm2d in `module` replaced, in place, by a FrozenBatchNorm2d with the
    same statistics and eps, as torchvision's builders do for pretrained backbones."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_bn_(child)
    return module


DETECTION = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn",
             "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
             "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn")
SEGMENTATION = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101")


def task_model(name, seed=0, **kwargs):
    """torchvision's detection or segmentation model `name` (one of DETECTION or
    SEGMENTATION) with seeded weights, realistic BN statistics in its ResNet
    backbone, and that backbone's BNs frozen as in a pretrained one; in eval mode.
    kwargs go to torchvision's builder (num_classes, min_size, ...)."""
    import torchvision

    if name in DETECTION:
        builder = getattr(torchvision.models.detection, name)
    elif name in SEGMENTATION:
        builder = getattr(torchvision.models.segmentation, name)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of "
                         f"{', '.join(DETECTION + SEGMENTATION)}")
    torch.manual_seed(seed)
    model = builder(weights=None, weights_backbone=None, **kwargs)
    body = backbone_body(model)
    realistic_(body, seed=seed)
    if name in DETECTION:
        freeze_bn_(body)
    return model.eval()


def backbone_body(model):
    """The ResNet body of a torchvision detection model (model.backbone.body, under
    the FPN) or segmentation model (model.backbone)."""
    backbone = model.backbone
    return getattr(backbone, "body", backbone)
