"""torchvision's quantizable ResNets (torchvision.models.quantization) in float.

Built with quantize=False, such a model computes what the plain ResNet computes:
its blocks end in a FloatFunctional's add_relu instead of `relu(out + identity)`
(the Bottleneck's first two ReLUs are relu1 and relu2), and its QuantStub and
DeQuantStub pass the input through. Once prepared for quantization (observers,
fake quantization, QAT modules), merged by fuse_model() or converted to int8, it
computes something else, and fuse() says which of these it found.
"""

from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torchvision.models.quantization.resnet import (QuantizableBasicBlock, QuantizableBottleneck,
                                                    QuantizableResNet)

BLOCKS = (QuantizableBasicBlock, QuantizableBottleneck)

# The ReLUs after a block's first convs, and the FloatFunctional of its residual sum.
BLOCK_RELUS = {QuantizableBasicBlock: ("relu",), QuantizableBottleneck: ("relu1", "relu2")}
BLOCK_SUMS = {QuantizableBasicBlock: "add_relu", QuantizableBottleneck: "skip_add_relu"}


def float_sum_status(block, name):
    """Why the FloatFunctional of `block`'s residual sum is not a plain float add_relu,
    or ""."""
    attr = BLOCK_SUMS[type(block)]
    sum_ = getattr(block, attr, None)
    if type(sum_) is not FloatFunctional:
        return f"{name}.{attr} is {type(sum_).__name__}, not a FloatFunctional"
    if type(sum_.activation_post_process) is not nn.Identity:
        return (f"{name}.{attr} observes its sum ({type(sum_.activation_post_process).__name__}), "
                "which the fused forward would not run")
    return ""


def stubs_status(model):
    """Why a QuantizableResNet's QuantStub or DeQuantStub is not a pass-through, or ""."""
    for name, cls in (("quant", QuantStub), ("dequant", DeQuantStub)):
        stub = getattr(model, name, None)
        if type(stub) is not cls:
            return f"{name} is {type(stub).__name__}, not {cls.__name__}"
        if hasattr(stub, "activation_post_process"):
            return (f"{name} observes the input ({type(stub.activation_post_process).__name__}), "
                    "which the fused forward would not run")
    return ""


def quantization_error(model):
    """A sentence naming the first module of `model` that belongs to quantization
    rather than to a float model (int8, QAT, an observer, fuse_model()'s merged
    modules), or None."""
    for name, module in model.named_modules():
        where = name or "the model"
        origin = type(module).__module__
        if isinstance(module, (ObserverBase, FakeQuantizeBase)) or origin.startswith(
                ("torch.ao.nn.qat.", "torch.ao.nn.intrinsic.qat.")):
            return (f"{where} ({type(module).__name__}) belongs to a model prepared for "
                    "quantization; fuse the float model before prepare() or prepare_qat()")
        if (origin.startswith(("torch.ao.nn.quantized.", "torch.ao.nn.intrinsic.quantized."))
                and type(module) is not FloatFunctional):
            return (f"{where} is {type(module).__name__}, an int8-quantized module; resnet_fused "
                    "computes float models: fuse the model built with quantize=False, or "
                    "torchvision.models' own")
        if origin.startswith("torch.ao.nn.intrinsic."):
            return (f"{where} is {type(module).__name__}, a merge made by fuse_model() for "
                    "quantization; fuse the model from before fuse_model() (resnet_fused folds "
                    "the BatchNorms itself)")
    return None


def is_quantizable_class(cls):
    return cls is QuantizableResNet
