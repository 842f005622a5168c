"""resnet_fused: torchvision ResNets with fused conv+BN+ReLU and residual add+ReLU kernels.

    model = resnet_fused.fuse(torchvision_model)        # or
    model = resnet_fused.resnet50(weights="IMAGENET1K_V2")

The ops (`resnet_fused.ops`, `import resnet_fused._C`) need only torch; the model
parts, which need torchvision, are imported on first use.
"""

import importlib

from . import ops
from ._extension import available, load_error

__version__ = "0.1.0"

_LAZY = {
    "FusedResNet": "model", "fuse": "model", "fold_conv_bn": "fold", "ARCHS": "builders",
    "build": "builders", "resnet18": "builders", "resnet34": "builders", "resnet50": "builders",
    "resnet101": "builders", "resnet152": "builders", "resnext50_32x4d": "builders",
    "resnext101_32x8d": "builders", "resnext101_64x4d": "builders",
    "wide_resnet50_2": "builders", "wide_resnet101_2": "builders", "VIDEO_ARCHS": "builders",
    "r3d_18": "builders", "mc3_18": "builders", "r2plus1d_18": "builders",
}

__all__ = ["available", "load_error", "ops"]
__all__ += sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resnet_fused' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
