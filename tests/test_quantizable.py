"""torchvision's quantizable ResNets (torchvision.models.quantization): fused in float,
refused with a reason once prepared, merged or quantized."""

import pickle
import re
import warnings

import pytest
import torch
from torch import nn
from torchvision.models import quantization as tvq

import resnet_fused
from resnet_fused import FusedResNet, fuse
from resnet_fused.testing import realistic_

from common_utils import fp32_bound, rel_err

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")


def _float(arch, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return realistic_(getattr(tvq, arch)(weights=None, quantize=False), seed=seed).eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext101_64x4d"])
def test_a_float_quantizable_resnet_runs_fused(arch):
    model = _float(arch)
    fused = fuse(model)
    assert type(fused) is FusedResNet and type(model) is tvq.QuantizableResNet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    assert fused.fused_status(x) == (True, "")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the unfused forward
        assert rel_err(fused(x), model(x)) <= fp32_bound(model, x)
    back = pickle.loads(pickle.dumps(fused)).to_torchvision()
    assert type(back) is tvq.QuantizableResNet and hasattr(back, "fuse_model")
    with torch.inference_mode():
        assert torch.equal(back(x), model(x))


def test_train_mode_runs_the_quantizable_forward():
    model = _float("resnet18")
    fused = fuse(model).train()
    model.train()
    # The quantizable forward calls its QuantStub; the plain ResNet's would not.
    seen = []
    fused.quant.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fused(x), model(x)) and seen == [x.shape]


def _relu1_gelu(m):
    m.layer1[0].relu1 = nn.GELU()


def _sum_observed(m):
    m.layer2[1].skip_add_relu.activation_post_process = torch.ao.quantization.MinMaxObserver()


def _stub_observed(m):
    m.quant.add_module("activation_post_process", torch.ao.quantization.MinMaxObserver())


@pytest.mark.parametrize("change, why", [
    (_relu1_gelu, "layer1.0.relu1 is GELU, not ReLU"),
    (_sum_observed, "layer2.1.skip_add_relu observes its sum .MinMaxObserver."),
    (_stub_observed, "quant observes the input .MinMaxObserver."),
])
def test_a_change_to_the_quantizable_forward_runs_it_unfused(change, why):
    model = _float("resnet50")
    fused = fuse(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        fused(x)  # folded and recorded before the change
        change(fused)
        change(model)
        assert re.search(why, fused.fused_status(x)[1])
        with pytest.warns(RuntimeWarning, match=why):
            assert torch.equal(fused(x), model(x))


def test_a_refused_fuse_leaves_the_model_as_it_was():
    model = _float("resnet50")
    _relu1_gelu(model)
    with pytest.raises(TypeError, match="layer1.0.relu1 is GELU, not ReLU"):
        fuse(model, inplace=True)
    assert type(model) is tvq.QuantizableResNet and not hasattr(model, "_fold_cache")


def _merged(model):
    model.fuse_model()
    return model


def _prepared(model):
    model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    return torch.ao.quantization.prepare(model)


def _prepared_qat(model):
    model.train().fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    return torch.ao.quantization.prepare_qat(model)


def _int8(model):
    return tvq.resnet18(weights=None, quantize=True)


@pytest.mark.parametrize("stage, why", [
    (_merged, "conv1 is ConvReLU2d, a merge made by fuse_model.. for quantization"),
    (_prepared, "conv1.activation_post_process .HistogramObserver. belongs to a model prepared "
                "for quantization"),
    (_prepared_qat, "conv1 .ConvBnReLU2d. belongs to a model prepared for quantization"),
    (_int8, "conv1 is ConvReLU2d, an int8-quantized module; resnet_fused computes float models"),
])
def test_a_model_on_its_way_to_int8_is_refused_with_its_stage(stage, why):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = stage(_float("resnet18"))
    with pytest.raises(TypeError, match="fuse: this ResNet is not one the fused forward "
                                        f"computes: {why}"):
        fuse(model)
