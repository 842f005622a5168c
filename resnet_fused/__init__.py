"""resnet_fused: torchvision ResNets with fused conv+BN+ReLU and residual add+ReLU kernels.

    model = resnet_fused.fuse(torchvision_model)        # or
    model = resnet_fused.resnet50(weights="IMAGENET1K_V2")
"""

from . import ops
from ._extension import available, load_error
from .builders import (ARCHS, build, resnet18, resnet34, resnet50, resnet101, resnet152,
                       resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2,
                       wide_resnet101_2)
from .fold import fold_conv_bn
from .model import FusedResNet, fuse

__version__ = "0.1.0"

__all__ = ["ARCHS", "FusedResNet", "available", "build", "fold_conv_bn", "fuse", "load_error",
           "ops", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
           "wide_resnet101_2"]
