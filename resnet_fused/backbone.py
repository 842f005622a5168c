"""A ResNet used as a backbone: torchvision's detection and segmentation models
wrap the ResNet's children in an IntermediateLayerGetter (the "body") that returns
the outputs of some layers. FusedBody is that body with the fused forward.

It keeps the module tree and state_dict keys, returns the same OrderedDict of
feature maps, folds FrozenBatchNorm2d with its own eps, and, since a frozen BN
computes the same in train and eval mode, runs fused in train mode too when all
its BNs are frozen (fine-tuning as torchvision's detection references do).
"""

import copy
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from .model import _Folding, _stage_labeller

_TRUNK = ("conv1", "bn1", "relu", "maxpool")


class FusedBody(_Folding, IntermediateLayerGetter):
    """An IntermediateLayerGetter over a torchvision ResNet whose forward runs fused."""

    _TRACE_CALL = "torch.jit.trace(model, example_input, strict=False) (its output is a dict)"

    @classmethod
    def convert(cls, body):
        """`body` (an IntermediateLayerGetter over a ResNet's children) turned into a
        FusedBody in place, or None if it is not one."""
        names = list(body.keys())
        if names[:4] != list(_TRUNK) or not all(
                n.startswith("layer") for n in names[4:]) or len(names) < 5:
            return None
        body.__class__ = cls
        body._fold_cache = {}
        list(body._pairs())  # validates the blocks now rather than at first forward
        return body

    def _frozen(self):
        return all(not isinstance(m, nn.BatchNorm2d) for m in self.modules())

    def _status(self, x):
        if self.training and not self._frozen():
            return False, "train mode with BatchNorm2d runs torchvision's math (batch statistics)"
        inside_stem = [n for n in _TRUNK[:3] if n in self.return_layers]
        if inside_stem:
            return False, (f"return_layers names {', '.join(inside_stem)}, inside the stem that "
                           "the fused forward computes in one op (conv, BN and ReLU)")
        return self._kernel_status(x)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return super().forward(x)
        self._check_input(x)
        prepared = self._prepare_fused(x)
        if prepared is None:
            return super().forward(x)
        x, fold, finite = prepared
        outputs = self._run_fused(x, fold, finite, _stage_labeller(), keep=self.return_layers)
        return OrderedDict((self.return_layers[name], outputs[name])
                           for name in self.keys() if name in self.return_layers)


def fuse_any(model, inplace=False):
    """Replaces every torchvision ResNet and every IntermediateLayerGetter body over
    one inside `model` by its fused equivalent, and makes the model's conv weights
    channels_last; returns the model (same type). A model
    with neither is rewritten by resnet_fused.graph_fuse (its class becomes a subclass
    of its own)."""
    from torchvision.models.resnet import ResNet

    from .model import FusedResNet, fuse
    if not inplace:
        model = copy.deepcopy(model)
    found = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (FusedResNet, FusedBody)):
            found += 1
        elif isinstance(module, ResNet):
            fuse(module, inplace=True)
            found += 1
        elif type(module) is IntermediateLayerGetter and FusedBody.convert(module) is not None:
            found += 1
    if found:
        # The fused trunk hands channels_last feature maps to the layers after it (FPN,
        # heads), whose convs then run without layout conversions (DeepLabV3-ResNet-50
        # on the CPU: 229 ms against 264 with those weights left NCHW).
        model.to(memory_format=torch.channels_last)
    else:
        # No torchvision ResNet: the conv-BN-ReLU and residual patterns of its fx graph.
        from .graph_fuse import fuse_graph
        if fuse_graph(model) == 0:
            raise TypeError(f"fuse: found no torchvision ResNet, nor an IntermediateLayerGetter "
                            f"body over one, in {type(model).__name__}, and no conv-BatchNorm or "
                            f"add-ReLU pattern in its torch.fx graph; nothing to fuse")
    return model

