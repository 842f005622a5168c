"""The ops against an independent fp64 reference (F.conv2d + bias + residual + relu)."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops

from conftest import put_nonfinite

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")

CPU_DTYPES = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                else [])
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}

# (C, K, H, W, kernel, stride, padding, dilation, groups): ResNet's conv shapes at
# small spatial sizes, plus odd ones.
SHAPES = [
    (3, 64, 29, 31, 7, 2, 3, 1, 1),       # stem
    (64, 64, 14, 14, 3, 1, 1, 1, 1),
    (64, 256, 14, 14, 1, 1, 0, 1, 1),
    (256, 128, 15, 13, 1, 2, 0, 1, 1),    # strided 1x1 downsample
    (128, 128, 9, 9, 3, 2, 1, 1, 1),
    (128, 128, 8, 8, 3, 1, 2, 2, 1),      # dilation (replace_stride_with_dilation)
    (128, 128, 7, 9, 3, 1, 1, 1, 32),     # ResNeXt 32x4d
    (256, 256, 5, 5, 3, 1, 1, 1, 64),     # ResNeXt 64x4d
    (20, 24, 5, 7, 3, 1, 1, 1, 1),        # channels not multiples of 8
    (16, 8, 1, 1, 1, 1, 0, 1, 1),         # 1x1 spatial
]


def reference(x, w, b, residual, stride, padding, dilation, groups, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding,
                 dilation, groups)
    if residual is not None:
        y = y + residual.double()
    return F.relu(y) if relu else y


def make(shape, dtype, batch=2, channels_last=False, seed=0):
    c, k, h, w, r, s, p, d, g = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, w, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(k, c // g, r, r, generator=gen) / (c // g * r * r) ** 0.5).to(dtype)
    b = torch.randn(k, generator=gen).to(dtype)
    ho = (h + 2 * p - d * (r - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (r - 1) - 1) // s + 1
    res = torch.randn(batch, k, ho, wo, generator=gen).to(dtype)
    return x, wt, b, res, (s, s), (p, p), (d, d), g


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_bias_act_matches_fp64(shape, channels_last, dtype):
    x, w, b, res, s, p, d, g = make(shape, dtype, channels_last=channels_last)
    for residual, relu in [(None, True), (None, False), (res, True), (res, False)]:
        out = ops.conv_bias_act(x, w, b, residual, s, p, d, g, relu)
        ref = reference(x, w, b, residual, s, p, d, g, relu)
        assert out.dtype == dtype and out.shape == ref.shape
        assert out.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= TOL[dtype], (residual is not None, relu, err)


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[6:7], ids=lambda s: "x".join(map(str, s)))
def test_packed_weight_and_inplace_residual(shape):
    x, w, b, res, s, p, d, g = make(shape, torch.float32, channels_last=True)
    packed = ops.pack_weight(w, s, p, d, g, x.shape)
    ref = reference(x, w, b, res, s, p, d, g, True)
    out = ops.conv_bias_act(x, packed, b, res, s, p, d, g, True)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())
    acc = res.contiguous(memory_format=torch.channels_last).clone()
    ops.conv_bias_add_relu_(acc, x, packed, b, s, p, d, g)
    torch.testing.assert_close(acc.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())


def test_output_keeps_input_memory_format():
    x, w, b, res, s, p, d, g = make(SHAPES[1], torch.float32)
    assert ops.conv_bias_act(x, w, b, res, s, p, d, g).is_contiguous()
    xc = x.contiguous(memory_format=torch.channels_last)
    assert ops.conv_bias_act(xc, w, b, res, s, p, d, g).is_contiguous(
        memory_format=torch.channels_last)


def test_non_contiguous_inputs():
    x, w, b, res, s, p, d, g = make(SHAPES[1], torch.float32, batch=4)
    xs = x[::2]                                    # batch slice with a step
    rs = res[1::2]
    out = ops.conv_bias_act(xs, w, b, rs, s, p, d, g, True)
    torch.testing.assert_close(out.double(), reference(xs, w, b, rs, s, p, d, g, True),
                               rtol=0, atol=1e-5)
    expanded = res[:1, :, :1, :1].expand(2, -1, res.shape[2], res.shape[3])  # stride-0 residual
    out = ops.conv_bias_act(x[:2], w, b, expanded, s, p, d, g, True)
    torch.testing.assert_close(out.double(), reference(x[:2], w, b, expanded, s, p, d, g, True),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["input", "residual", "weight", "bias"])
def test_nan_and_inf_propagate_like_torch(where):
    x, w, b, res, s, p, d, g = make(SHAPES[1], torch.float32, channels_last=True)
    put_nonfinite(where, x, w, b, res)
    for relu in (True, False):
        out = ops.conv_bias_act(x, w, b, res, s, p, d, g, relu)
        ref = reference(x, w, b, res, s, p, d, g, relu)
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.isinf(), ref.isinf())
        acc = res.clone()
        ops.conv_bias_add_relu_(acc, x, w, b, s, p, d, g)
        assert torch.equal(acc.isnan(), reference(x, w, b, res, s, p, d, g, True).isnan())


def test_batch_zero():
    x, w, b, res, s, p, d, g = make(SHAPES[1], torch.float32, batch=0)
    out = ops.conv_bias_act(x, w, b, res, s, p, d, g)
    assert out.shape == (0, 64, 14, 14)
    assert ops.add_relu(res, res).shape == res.shape


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_add_relu(dtype, channels_last):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, 7, 3, generator=g).to(dtype)
    b = torch.randn(2, 5, 7, 3, generator=g).to(dtype)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    a[0, 0, 0, 0] = float("nan")
    ref = torch.relu(a.float() + b.float()).to(dtype)
    out = ops.add_relu(a, b)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    a2 = a.clone()
    assert ops.add_relu_(a2, b) is a2
    torch.testing.assert_close(a2, ref, equal_nan=True)
    t = a.transpose(1, 3)                          # non-contiguous views
    torch.testing.assert_close(ops.add_relu(t, b.transpose(1, 3)),
                               torch.relu(t.float() + b.transpose(1, 3).float()).to(dtype),
                               equal_nan=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=torch.randn(2, 8, 5)), "expected input to be 4-D"),
    (dict(x=torch.randn(2, 7, 5, 5)), "expected input with 8 channels"),
    (dict(w=torch.randn(16, 8, 3, 3).double()), "expected weight dtype"),
    (dict(b=torch.randn(15)), "expected bias of shape [16]"),
    (dict(r=torch.randn(2, 16, 4, 5)), "expected residual of the output's shape"),
    (dict(r=torch.randn(2, 16, 5, 5).bfloat16()), "expected residual dtype"),
    (dict(x=torch.randn(2, 8, 5, 5).half(), w=torch.randn(16, 8, 3, 3).half(),
          b=torch.randn(16).half(), r=None), "supports float32 and bfloat16"),
    (dict(x=torch.randn(2, 8, 1, 1), r=None, pad=0), "smaller than the kernel"),
    (dict(stride=0), "expected stride > 0"),
])
def test_bad_input_is_named(kwargs, message):
    args = dict(x=torch.randn(2, 8, 5, 5), w=torch.randn(16, 8, 3, 3), b=torch.randn(16),
                r=torch.randn(2, 16, 5, 5), stride=1, pad=1)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.conv_bias_act(args["x"], args["w"], args["b"], args["r"], args["stride"], args["pad"])


def test_add_relu_bad_input():
    with pytest.raises(RuntimeError, match="expected b of a's shape"):
        ops.add_relu(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="expected b of a's dtype"):
        ops.add_relu(torch.randn(2, 3), torch.randn(2, 3).double())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(channels_last):
    x, w, b, res, s, p, d, g = make(SHAPES[6], torch.float32, channels_last=channels_last)
    torch.library.opcheck(torch.ops.resnet_fused.conv_bias_act.default,
                          (x, w, b, res, list(s), list(p), list(d), g, True))
    torch.library.opcheck(torch.ops.resnet_fused.conv_bias_act.default,
                          (x, w, None, None, list(s), list(p), list(d), g, False))
    torch.library.opcheck(torch.ops.resnet_fused.conv_bias_add_relu_.default,
                          (res.contiguous(memory_format=torch.channels_last).clone(), x, w, b,
                           list(s), list(p), list(d), g))
    torch.library.opcheck(torch.ops.resnet_fused.add_relu.default, (res, res.flip(0)))
    torch.library.opcheck(torch.ops.resnet_fused.add_relu_.default, (res.clone(), res.flip(0)))


# Found by tests/test_fuzz.py: torch 2.14's oneDNN gets these wrong (bf16 with an
# output column of size 1) or crashes on them (padding wider than half the dilated
# kernel, bf16, or fp32 with a residual), F.conv2d included for bf16.
ONEDNN_REGRESSIONS = [
    # (dtype, N, C, K, H, W, kernel, stride, padding, dilation, groups)
    (torch.bfloat16, 2, 24, 14, 13, 5, 3, 2, 0, 2, 2),
    (torch.bfloat16, 2, 8, 16, 3, 1, 3, 2, 1, 1, 1),
    (torch.bfloat16, 2, 256, 256, 5, 3, 3, 2, 0, 1, 1),
    (torch.bfloat16, 2, 16, 16, 1, 3, 3, 2, 3, 2, 1),
    (torch.float32, 3, 10, 10, 7, 1, 1, 2, 1, 2, 1),
    (torch.bfloat16, 1, 28, 12, 6, 1, 1, 2, 1, 2, 4),
    (torch.float32, 2, 2, 1, 7, 7, 7, 1, 0, 1, 1),     # one output channel, 1x1 output
    (torch.float32, 3, 64, 1, 7, 7, 7, 1, 0, 1, 1),
    (torch.float32, 2, 8, 40, 9, 1, 1, 2, 1, 2, 4),    # crashed F.conv2d on channels_last
]


@pytest.mark.parametrize("case", ONEDNN_REGRESSIONS, ids=lambda c: "x".join(map(str, c[1:])))
def test_shapes_onednn_gets_wrong(case):
    dt, n, c, k, h, w, r, s, p, d, g = case
    if dt not in CPU_DTYPES:
        pytest.skip("no bf16 oneDNN")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).to(dt)
    wt = (torch.randn(k, c // g, r, r, generator=gen) / (c // g * r * r) ** 0.5).to(dt)
    out_shape = F.conv2d(torch.empty(0, c, h, w), torch.empty(k, c // g, r, r), None, s, p, d,
                         g).shape
    res = torch.randn(n, *out_shape[1:], generator=gen).to(dt)
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        for residual, relu in [(None, False), (res, True), (res, False)]:
            out = ops.conv_bias_act(xi, wt, None, residual, s, p, d, g, relu)
            ref = reference(x, wt, None, residual, (s, s), (p, p), (d, d), g, relu)
            assert (out.double() - ref).abs().max().item() <= TOL[dt] * ref.abs().max().item()
    acc = res.contiguous(memory_format=torch.channels_last).clone()
    ops.conv_bias_add_relu_(acc, x, wt, None, s, p, d, g)
    ref = reference(x, wt, None, res, (s, s), (p, p), (d, d), g, True)
    assert (acc.double() - ref).abs().max().item() <= TOL[dt] * ref.abs().max().item()
