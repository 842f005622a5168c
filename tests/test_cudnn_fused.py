"""The cuDNN-fused benchmark peer (resnet_fused.cudnn_fused): its wiring on any
device through plain conv2d, and cuDNN's own fused ops on a GPU, both against
torchvision."""

import pytest
import torch
import torch.nn.functional as F

from resnet_fused.cudnn_fused import CudnnFusedResNet

from common_utils import rel_err, tol, tv_model


def conv_relu(x, w, b, stride, padding, dilation, groups):
    return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))


def conv_add_relu(x, w, z, b, stride, padding, dilation, groups):
    return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + z)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_wiring_matches_torchvision_in_fp64(arch):
    # fp64 on the CPU, so that any difference is a wiring error (a missed residual, a
    # wrong conv order or fold), not rounding (the fold is in fp64 for an fp64 model).
    tv = tv_model(arch).double()
    peer = CudnnFusedResNet(tv, torch.float64, conv_relu, conv_add_relu).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        assert rel_err(peer(x), tv(x)) <= 1e-12


def test_runs_in_a_dtype_other_than_the_models():
    # bench builds it from the fp32 model for an fp16/bf16 run: the fold is in fp32,
    # then every weight, the fc's included, in the run dtype.
    peer = CudnnFusedResNet(tv_model("resnet18"), torch.float64, conv_relu, conv_add_relu).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        out, ref = peer(x), tv_model("resnet18").double()(x)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) <= 1e-6  # the fp32 fold's rounding, not a wiring error


def test_rejects_other_blocks():
    tv = tv_model("resnet18")
    tv.layer2[0] = torch.nn.Identity()
    with pytest.raises(TypeError, match="expected torchvision BasicBlock or Bottleneck blocks, "
                                        "got Identity"):
        CudnnFusedResNet(tv, torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cudnn_ops_match_torchvision(dtype):
    # As `verify` judges a model: within 2x torchvision's own error in that dtype,
    # against an fp64 reference.
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = tv_model("resnet50").double()(x.double())
        tv = tv_model("resnet50").cuda().to(dtype)
        own = rel_err(tv(x.cuda().to(dtype)).double().cpu(), expected)
        peer = CudnnFusedResNet(tv, dtype).eval()
        err = rel_err(peer(x.cuda().to(dtype)).double().cpu(), expected)
    assert err <= max(2 * own, tol(dtype, 512 * 9, "cuda"))
