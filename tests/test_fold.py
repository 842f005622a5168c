"""BN folding: fp32 math with each BN's own eps, and fp16 range problems caught."""

import pytest
import torch
from torch import nn

from resnet_fused.fold import cast_folded, fold_conv_bn


def _conv_bn(eps=1e-5, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(4, k, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(k, eps=eps).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        bn.running_mean.copy_(torch.randn(k, generator=g))
        bn.running_var.copy_(torch.rand(k, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(k, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(k, generator=g))
    return conv, bn


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
def test_fold_matches_conv_then_bn_in_fp64(eps):
    conv, bn = _conv_bn(eps)
    w, b = fold_conv_bn(conv, bn)
    assert w.dtype == torch.float32
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    ref = bn.double()(conv.double()(x))
    out = nn.functional.conv2d(x, w.double(), b.double(), padding=1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_fold_refuses_bn_without_running_stats():
    conv, _ = _conv_bn()
    with pytest.raises(ValueError, match="layer3.1.conv2: BatchNorm has no running statistics"):
        fold_conv_bn(conv, nn.BatchNorm2d(8, track_running_stats=False), "layer3.1.conv2")


def test_fp16_overflow_is_caught_and_kept_in_fp32():
    conv, bn = _conv_bn()
    with torch.no_grad():
        bn.running_var[3] = 1e-12               # scale ~ 1e6 -> weights beyond 65504
        bn.eps = 0.0
    w, b = fold_conv_bn(conv, bn)
    with pytest.warns(RuntimeWarning, match="beyond float16's range") as first:
        w16, b16, dt = cast_folded(w, b, torch.float16, "stem")
    assert dt == torch.float32 and torch.isfinite(w16).all()
    # The same text at the next refold with other statistics (a model being fine-tuned),
    # so that Python's once-per-text filter shows it once.
    with torch.no_grad():
        bn.running_var[3] = 1e-14
    with pytest.warns(RuntimeWarning) as again:
        cast_folded(*fold_conv_bn(conv, bn), torch.float16, "stem")
    assert str(again[0].message) == str(first[0].message)


def test_fp16_underflow_is_caught():
    conv, bn = _conv_bn()
    with torch.no_grad():
        bn.weight[2] = 1e-12                    # channel 2 flushes to zero in fp16
    w, b = fold_conv_bn(conv, bn)
    with pytest.warns(RuntimeWarning, match="underflow to zero in float16") as first:
        _, _, dt = cast_folded(w, b, torch.float16, "layer1.0.conv1")
    assert dt == torch.float32
    with torch.no_grad():
        bn.weight[5] = 1e-12                    # one more channel at the next refold
    with pytest.warns(RuntimeWarning) as again:  # the same text: shown once per process
        cast_folded(*fold_conv_bn(conv, bn), torch.float16, "layer1.0.conv1")
    assert str(again[0].message) == str(first[0].message)


def test_benign_fp16_cast_is_silent(recwarn):
    conv, bn = _conv_bn()
    w, b = fold_conv_bn(conv, bn)
    w16, b16, dt = cast_folded(w, b, torch.float16)
    assert dt == torch.float16 and w16.dtype == torch.float16 and not recwarn.list
