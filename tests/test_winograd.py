"""winograd_conv3x3 (CPU, F(2x2, 3x3)) against an fp64 reference, and its contract:
same results, layouts, NaN/Inf semantics and errors as conv_bias_act."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops

from conftest import put_nonfinite

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")

# Winograd adds a few roundings per output; measured 0.5-2x the direct kernel's error.
TOL = 2e-6

# (N, C, K, H, W): ResNet's stride-1 3x3 shapes at small sizes, odd sizes (partial
# 2x2 tiles), channel counts that are not multiples of the 16-lane vector, and
# sizes smaller than one tile.
SHAPES = [
    (2, 64, 64, 14, 14),
    (3, 128, 128, 7, 7),
    (1, 512, 512, 3, 3),
    (2, 20, 37, 9, 13),
    (2, 17, 5, 2, 3),
    (1, 3, 1, 1, 1),
    (5, 32, 48, 1, 6),
]


def make(n, c, k, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5
    return x, wt, torch.randn(k, generator=g), torch.randn(n, k, h, w, generator=g)


def reference(x, w, b, residual, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    if residual is not None:
        y = y + residual.double()
    return F.relu(y) if relu else y


def rel_err(out, ref):
    return (out.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def test_winograd_kernel_runs_where_expected():
    # On x86-64 with AVX-512 (this project's CI machines) the fast path must be
    # built; elsewhere the op is still correct, through conv_bias_act.
    import platform
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    if platform.machine() == "x86_64" and " avx512f" in flags:
        assert ops.avx512_kernels_available()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64(shape, channels_last):
    x, w, b, res = make(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    u = ops.winograd_weight(w)
    assert u.shape == (16, shape[1], shape[2]) and u.dtype == torch.float32
    for bias, residual, relu in [(b, None, True), (b, None, False), (b, res, True),
                                 (None, res, False), (None, None, True)]:
        out = ops.winograd_conv3x3(x, w, u, bias, residual, relu)
        ref = reference(x, w, bias, residual, relu)
        assert out.shape == ref.shape and out.dtype == torch.float32
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)
        assert rel_err(out, ref) <= TOL, (bias is not None, residual is not None, relu)


def test_as_accurate_as_the_direct_kernel():
    x, w, b, res = make(2, 256, 256, 14, 14, seed=3)
    u = ops.winograd_weight(w)
    ref = reference(x, w, b, res, True)
    wino = rel_err(ops.winograd_conv3x3(x, w, u, b, res, True), ref)
    direct = rel_err(ops.conv_bias_act(x, w, b, res, 1, 1, 1, 1, True), ref)
    assert wino <= 2 * direct + 1e-7, (wino, direct)


def test_non_contiguous_operands():
    x, w, b, res = make(4, 24, 16, 8, 10)
    xs, rs = x[::2], res[1::2]
    expanded = res[:1, :, :1, :1].expand(2, -1, 8, 10)
    u = ops.winograd_weight(w)
    for r in (rs, expanded):
        out = ops.winograd_conv3x3(xs, w, u, b, r, True)
        assert rel_err(out, reference(xs, w, b, r, True)) <= TOL


@pytest.mark.parametrize("where", ["input", "residual", "weight", "bias"])
def test_nan_and_inf_propagate_like_torch(where):
    x, w, b, res = make(2, 32, 32, 10, 10)
    put_nonfinite(where, x, w, b, res)
    u = ops.winograd_weight(w)
    for relu in (True, False):
        out = ops.winograd_conv3x3(x, w, u, b, res, relu)
        ref = reference(x, w, b, res, relu)
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.isinf(), ref.isinf())


def test_batch_and_channels_zero():
    x, w, b, res = make(0, 8, 16, 5, 5)
    assert ops.winograd_conv3x3(x, w, ops.winograd_weight(w), b, res, True).shape == (0, 16, 5, 5)
    x, w, b, res = make(2, 8, 0, 5, 5)
    assert ops.winograd_conv3x3(x, w, ops.winograd_weight(w), None, None, True).shape == (2, 0, 5, 5)


def test_thread_counts_give_the_same_result():
    x, w, b, res = make(3, 32, 48, 11, 9)
    u = ops.winograd_weight(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.winograd_conv3x3(x, w, u, b, res, True)
        torch.set_num_threads(max(2, before))
        many = ops.winograd_conv3x3(x, w, u, b, res, True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, many, rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(w=torch.randn(16, 8, 1, 1)), "expected a 3x3 weight"),
    (dict(u=torch.randn(16, 16, 8)), r"expected winograd_weight of shape \[16, 8, 16\]"),
    (dict(u=torch.randn(16, 8, 16).double()), "expected winograd_weight float32"),
    (dict(x=torch.randn(2, 8, 5, 5).bfloat16(), w=torch.randn(16, 8, 3, 3).bfloat16(),
          b=None, r=None), "expected float32 input"),
    (dict(x=torch.randn(2, 7, 5, 5)), "expected input with 8 channels"),
    (dict(r=torch.randn(2, 16, 4, 5)), "expected residual of the output's shape"),
    (dict(b=torch.randn(15)), r"expected bias of shape \[16\]"),
])
def test_bad_input_is_named(change, message):
    args = dict(x=torch.randn(2, 8, 5, 5), w=torch.randn(16, 8, 3, 3), b=torch.randn(16),
                r=torch.randn(2, 16, 5, 5))
    args.update(change)
    u = change.get("u", ops.winograd_weight(torch.randn(16, 8, 3, 3)))
    with pytest.raises(RuntimeError, match=message):
        ops.winograd_conv3x3(args["x"], args["w"], u, args["b"], args["r"], True)


def test_winograd_weight_rejects_other_kernels():
    with pytest.raises(ValueError, match=r"expected a \[K, C, 3, 3\] weight, got \(4, 2, 5, 5\)"):
        ops.winograd_weight(torch.randn(4, 2, 5, 5))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(channels_last):
    x, w, b, res = make(2, 16, 24, 6, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    u = ops.winograd_weight(w)
    op = torch.ops.resnet_fused.winograd_conv3x3.default
    torch.library.opcheck(op, (x, w, u, b, res, True))
    torch.library.opcheck(op, (x, w, u, None, None, False))
