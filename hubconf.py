"""torch.hub entry points: torch.hub.load(<repo>, "resnet50", weights=...) gives the
fused model, with the signatures of torchvision's own hub entry points."""

dependencies = ["torch", "torchvision"]

from resnet_fused.builders import (resnet18, resnet34, resnet50, resnet101, resnet152,  # noqa: E402,F401
                                   resnext50_32x4d, resnext101_32x8d, resnext101_64x4d,
                                   wide_resnet50_2, wide_resnet101_2)
