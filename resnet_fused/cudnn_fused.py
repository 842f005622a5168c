"""A benchmark peer for CUDA: torchvision's ResNet with BN folded into each conv and
the fusions cuDNN itself offers, `torch.cudnn_convolution_relu` (conv + bias + ReLU)
and `torch.cudnn_convolution_add_relu` (conv + bias + residual + ReLU). That is what
a user could build without our kernels, so `bench` on CUDA times it beside ours.

The conv functions are parameters so that the wiring (folding, block structure,
residuals) can be tested on a CPU against torchvision with plain conv2d; the
default ones need a CUDA tensor.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .fold import fold_conv_bn


def _cudnn_conv_relu(x, w, b, stride, padding, dilation, groups):
    return torch.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)


def _cudnn_conv_add_relu(x, w, z, b, stride, padding, dilation, groups):
    return torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, stride, padding, dilation, groups)


def _conv(x, w, b, stride, padding, dilation, groups):
    # The downsample conv has no ReLU, which cuDNN's fused ops do not offer.
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


class _Folded(nn.Module):
    def __init__(self, conv, bn, dtype):
        super().__init__()
        w, b = fold_conv_bn(conv, bn, type(conv).__name__)
        self.register_buffer("weight", w.to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", b.to(dtype))
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)

    def run(self, fn, x, *extra):
        return fn(x, self.weight, *extra, self.bias, *self.geometry)


class CudnnFusedResNet(nn.Module):
    """Eval-mode forward of torchvision ResNet `tv` (any dtype; folded in fp32) in
    `dtype`, channels_last, through cuDNN's fused ops on folded BN (or through
    `conv_relu` / `conv_add_relu` with their signatures, for tests)."""

    def __init__(self, tv, dtype, conv_relu=_cudnn_conv_relu, conv_add_relu=_cudnn_conv_add_relu):
        super().__init__()
        self.conv_relu, self.conv_add_relu = conv_relu, conv_add_relu
        self.stem = _Folded(tv.conv1, tv.bn1, dtype)
        self.maxpool = tv.maxpool
        self.blocks = nn.ModuleList()  # per block: its convs in order, then the downsample
        self.depths = []               # convs per block before the downsample
        for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            for block in layer:
                if not isinstance(block, (BasicBlock, Bottleneck)):
                    raise TypeError(f"CudnnFusedResNet: expected torchvision BasicBlock or "
                                    f"Bottleneck blocks, got {type(block).__name__}")
                n = 3 if isinstance(block, Bottleneck) else 2
                folded = nn.ModuleList(_Folded(getattr(block, f"conv{i}"),
                                               getattr(block, f"bn{i}"), dtype)
                                       for i in range(1, n + 1))
                if block.downsample is not None:
                    folded.append(_Folded(block.downsample[0], block.downsample[1], dtype))
                self.blocks.append(folded)
                self.depths.append(n)
        self.avgpool, self.fc = tv.avgpool, copy.deepcopy(tv.fc).to(dtype)

    def forward(self, x):
        x = self.stem.run(self.conv_relu, x.contiguous(memory_format=torch.channels_last))
        x = self.maxpool(x)
        for block, n in zip(self.blocks, self.depths):
            identity = block[n].run(_conv, x) if len(block) > n else x
            out = x
            for conv in block[:n - 1]:
                out = conv.run(self.conv_relu, out)
            x = block[n - 1].run(self.conv_add_relu, out, identity)
        return self.fc(torch.flatten(self.avgpool(x), 1))
