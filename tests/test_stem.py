"""resnet_stem (CPU: 7x7/2 conv + bias + ReLU + 3x3/2 max-pool in one pass) against
an fp64 reference built from torch's own conv2d and max_pool2d."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")

# (N, C, K, H, W): ImageNet-like, odd sizes (partial pooling windows at the
# edges), a 1x1 image, channel counts that are not multiples of 16, and an image
# wide enough to shrink the band of rows each thread holds.
SHAPES = [
    (2, 3, 64, 64, 64),
    (3, 3, 64, 97, 131),
    (1, 3, 5, 1, 1),
    (2, 4, 17, 9, 2),
    (1, 3, 24, 20, 2500),
]


def make(n, c, k, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    return x, torch.randn(k, c, 7, 7, generator=g) / (49 * c) ** 0.5, torch.randn(k, generator=g)


def reference(x, w, b):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride=2, padding=3)
    return F.max_pool2d(F.relu(y), 3, stride=2, padding=1)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64(shape, channels_last):
    x, w, b = make(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for bias in (b, None):
        out = ops.resnet_stem(x, w, bias)
        ref = reference(x, w, bias)
        assert out.shape == ref.shape and out.dtype == torch.float32
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)
        err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 2e-6


def test_non_contiguous_input():
    x, w, b = make(4, 3, 16, 30, 30)
    xs = x[::2, :, 1:, :-1]
    out = ops.resnet_stem(xs, w, b)
    torch.testing.assert_close(out.double(), reference(xs, w, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["input", "weight", "bias"])
def test_nan_and_inf_propagate_like_torch(where):
    x, w, b = make(2, 3, 16, 40, 40)
    if where == "input":
        x[0, 1, 5, 5], x[1, 0, 20, 20] = float("nan"), float("inf")
    elif where == "weight":
        w[3, 0, 2, 2] = float("nan")
    else:
        b[5] = float("inf")
    out, ref = ops.resnet_stem(x, w, b), reference(x, w, b)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())


def test_batch_zero():
    x, w, b = make(0, 3, 8, 32, 32)
    assert ops.resnet_stem(x, w, b).shape == (0, 8, 8, 8)


@pytest.mark.parametrize("change, message", [
    (dict(w=torch.randn(8, 3, 3, 3)), r"expected a 7x7 weight \(K, C, 7, 7\)"),
    (dict(x=torch.randn(2, 4, 32, 32)), "expected input with 3 channels"),
    (dict(x=torch.randn(2, 3, 32, 32).bfloat16(), w=torch.randn(8, 3, 7, 7).bfloat16(), b=None),
     "expected float32 input"),
    (dict(b=torch.randn(7)), r"expected bias of shape \[8\]"),
])
def test_bad_input_is_named(change, message):
    args = dict(x=torch.randn(2, 3, 32, 32), w=torch.randn(8, 3, 7, 7), b=torch.randn(8))
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        ops.resnet_stem(args["x"], args["w"], args["b"])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(channels_last):
    x, w, b = make(2, 3, 16, 23, 18)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.resnet_fused.resnet_stem.default, (x, w, b))
    torch.library.opcheck(torch.ops.resnet_fused.resnet_stem.default, (x, w, None, True))
