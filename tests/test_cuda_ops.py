"""GPU tests of resnet_fused's CUDA kernels: conv_bias_act, conv_bias_add_relu_,
pack_weight and add_relu. Every test is skipped without a CUDA GPU.

References are float64 convolutions on the CPU (torch.nn.functional.conv2d).
Inputs, weights, bias and residual are drawn as bfloat16 values (no subnormals),
which float16, TF32 and float32 all represent exactly: one float64 reference then
serves every dtype, and the only errors left are the fp32 accumulation order and
the final rounding to the output dtype. Tolerances, relative to max|ref|:
  float16   2e-3   one rounding to fp16 is <= 2^-11 |y| = 4.9e-4 |y|; 4x margin
  bfloat16  1.6e-2 one rounding to bf16 is <= 2^-8 |y| = 3.9e-3 |y|; 4x margin
  TF32      5e-3   exact inputs leave only fp32 accumulation here; test_tf32_random_inputs
                   checks rounding of arbitrary fp32 inputs to TF32 (2^-11 per operand)
                   at the same tolerance
  float32   1e-5   fp32 accumulation of up to 4608 products, ~1e-6 relative
An indexing or pipeline bug shows as O(1) errors or NaN, far above all of these.
"""

import contextlib
import functools
import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


import resnet_fused  # noqa: E402  (registers the ops and their fake kernels; needs only torch)

if not resnet_fused.available():
    pytest.skip(f"resnet_fused library not available ({resnet_fused.load_error()})",
                allow_module_level=True)
if not torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::conv_bias_act", "CUDA"):
    pytest.skip("resnet_fused was built without CUDA kernels", allow_module_level=True)

from common_utils import opcheck  # noqa: E402

ops = torch.ops.resnet_fused
DEV = "cuda"
CL = torch.channels_last

# ---------------------------------------------------------------------------
# Conv shapes

Conv = namedtuple("Conv", "N C K H W R S stride padding dilation groups")


def conv(C, K, H, W=None, R=1, S=None, stride=1, padding=0, dilation=1, groups=1, N=2):
    two = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return Conv(N, C, K, H, H if W is None else W, R, R if S is None else S, two(stride),
                two(padding), two(dilation), groups)


def torchvision_resnet_convs(block, layers, groups=1, width_per_group=64):
    """Every conv of a torchvision ResNet / ResNeXt at 224x224 input (same rules as
    torchvision.models.resnet, written out so the tests need no torchvision)."""
    out = [conv(3, 64, 224, R=7, stride=2, padding=3)]
    inplanes, size = 64, 56
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
        for b in range(blocks):
            stride = 2 if (i > 0 and b == 0) else 1
            if block == "basic":
                expansion = 1
                out.append(conv(inplanes, planes, size, R=3, stride=stride, padding=1))
                out_size = size // stride
                out.append(conv(planes, planes, out_size, R=3, padding=1))
            else:
                expansion = 4
                width = int(planes * (width_per_group / 64.0)) * groups
                out.append(conv(inplanes, width, size))
                out.append(conv(width, width, size, R=3, stride=stride, padding=1, groups=groups))
                out_size = size // stride
                out.append(conv(width, planes * expansion, out_size))
            if stride != 1 or inplanes != planes * expansion:
                out.append(conv(inplanes, planes * expansion, size, stride=stride))
            inplanes, size = planes * expansion, out_size
    return out


def _distinct(shapes):
    seen, out = set(), []
    for s in shapes:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


RESNET_SHAPES = _distinct(
    torchvision_resnet_convs("basic", [2, 2, 2, 2])  # resnet18
    + torchvision_resnet_convs("bottleneck", [3, 4, 6, 3])  # resnet50
    + torchvision_resnet_convs("bottleneck", [3, 4, 6, 3], groups=32, width_per_group=4)  # resnext50_32x4d
)

ODD_SHAPES = [
    conv(3, 64, 13, 17, R=3, padding=1),  # C=3: scalar loads
    conv(3, 64, 64, R=7, stride=2, padding=3, N=1),  # small stem
    conv(20, 24, 13, 17, R=3, padding=1),  # C=20, K=24
    conv(16, 17, 15, R=3, stride=2, padding=1),  # odd K: no paired stores
    conv(64, 24, 1, N=3),  # H=W=1
    conv(32, 32, 13, 17, R=3, padding=2, dilation=2),  # dilation 2
    conv(16, 32, 12, 11, R=3, S=1, stride=(1, 2), padding=(0, 1), dilation=(2, 1)),  # asymmetric
    conv(16, 32, 9, 10, R=1, S=3, padding=(0, 1), N=1),
    conv(32, 64, 14, R=3, padding=1, groups=2),  # grouped, tensor cores
    conv(48, 48, 10, R=3, padding=1, groups=3),  # 16 channels per group
    conv(24, 40, 9, R=3, padding=1, groups=2),  # 12 in / 20 out per group
    conv(64, 66, 8, R=3, padding=1, groups=2),  # 33 out per group (odd)
    conv(12, 36, 9, R=3, padding=1, groups=3),  # 4 in / 12 out per group: direct kernel
    conv(64, 64, 10, R=3, padding=1, groups=64),  # depthwise
    conv(2048, 64, 4, N=3),  # long GEMM-K
    conv(64, 128, 5, R=3, padding=1, N=0),  # batch 0
    conv(64, 64, 7, R=3, padding=1, N=1),  # batch 1
    conv(64, 128, 56, N=7),  # enough tiles for the 128x128 config
    conv(64, 64, 56, R=3, padding=1, N=7),  # enough tiles for the 128x64 config
]


def shape_id(s):
    parts = [f"n{s.N}c{s.C}k{s.K}", f"{s.H}x{s.W}", f"r{s.R}x{s.S}"]
    if s.stride != (1, 1):
        parts.append(f"s{s.stride[0]}" + ("" if s.stride[0] == s.stride[1] else f"{s.stride[1]}"))
    if s.padding != (0, 0):
        parts.append(f"p{s.padding[0]}{s.padding[1]}")
    if s.dilation != (1, 1):
        parts.append(f"d{s.dilation[0]}{s.dilation[1]}")
    if s.groups != 1:
        parts.append(f"g{s.groups}")
    return "-".join(parts)


# ---------------------------------------------------------------------------
# Data and reference


def bf16_exact(t):
    """Rounds to bfloat16 values with no fp16 subnormals: exact in every tested dtype."""
    t = t.to(torch.bfloat16).double()
    return torch.where(t.abs() < 2.0**-12, torch.zeros_like(t), t)


@functools.lru_cache(maxsize=4)
def case(s):
    """Inputs (float64, CPU) and the float64 conv + bias reference for one shape."""
    g = torch.Generator().manual_seed(hash(s) % (2**31))
    x = bf16_exact(torch.randn(s.N, s.C, s.H, s.W, generator=g, dtype=torch.float64))
    fan_in = s.C // s.groups * s.R * s.S
    w = bf16_exact(torch.randn(s.K, s.C // s.groups, s.R, s.S, generator=g, dtype=torch.float64)
                   / math.sqrt(max(fan_in, 1)))
    b = bf16_exact(0.5 * torch.randn(s.K, generator=g, dtype=torch.float64))
    ref = F.conv2d(x, w, b, s.stride, s.padding, s.dilation, s.groups)
    res = bf16_exact(torch.randn(ref.shape, generator=g, dtype=torch.float64))
    return x, w, b, res, ref


MODES = {  # name: (dtype, TF32 allowed, tolerance relative to max|ref|)
    "fp16": (torch.float16, False, 2e-3),
    "bf16": (torch.bfloat16, False, 1.6e-2),
    "tf32": (torch.float32, True, 5e-3),
    "fp32": (torch.float32, False, 1e-5),
}


@contextlib.contextmanager
def tf32_convs(enabled):
    """Sets what the kernels read through allowTF32CuDNN (conv), then restores it."""
    new_api = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision")
    if new_api:
        old = torch.backends.cudnn.conv.fp32_precision
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        if new_api:
            torch.backends.cudnn.conv.fp32_precision = old
        else:
            torch.backends.cudnn.allow_tf32 = old


def poison_allocator(*nbytes):
    """Leaves NaN-filled blocks of these sizes in the caching allocator, so an op's
    outputs land on NaN memory and any element it fails to write stays NaN."""
    bufs = [torch.full((max(n, 4) // 4,), float("nan"), device=DEV) for n in nbytes]
    del bufs


def assert_close_ref(out, ref, tol, what=""):
    out = out.detach().double().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_out, nan_ref), (
        f"{what}: NaN mismatch ({int(nan_out.sum())} NaN in output, {int(nan_ref.sum())} in reference)")
    if ref.numel() == 0:
        return
    ok = ~nan_ref
    scale = max(ref[ok].abs().max().item() if ok.any() else 0.0, 1e-3)
    err = (out[ok] - ref[ok]).abs().max().item() if ok.any() else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * max|ref| ({scale:.3g})"


def run_conv(s, x, w, b, res, relu):
    return ops.conv_bias_act(x, w, b, res, list(s.stride), list(s.padding), list(s.dilation),
                             s.groups, relu=relu)


def check_shape_mode(s, mode):
    dtype, tf32, tol = MODES[mode]
    x64, w64, b64, r64, conv_ref = case(s)
    w_dev = w64.to(DEV, dtype)
    packed = ops.pack_weight(w_dev, list(s.stride), list(s.padding), list(s.dilation), s.groups,
                             list(x64.shape))
    # (residual, relu, layout of input and residual, bias, packed weight)
    variants = [
        (True, True, CL, True, True),
        (True, False, torch.contiguous_format, True, False),
        (False, True, torch.contiguous_format, True, True),
        (False, False, CL, False, False),
    ]
    with tf32_convs(tf32):
        for use_res, relu, fmt, use_bias, use_packed in variants:
            x = x64.to(DEV, dtype).contiguous(memory_format=fmt)
            r = r64.to(DEV, dtype).contiguous(memory_format=fmt) if use_res else None
            b = b64.to(DEV, dtype) if use_bias else None
            ref = conv_ref if use_bias else conv_ref - b64.view(1, -1, 1, 1)
            if use_res:
                ref = ref + r64
            if relu:
                ref = torch.relu(ref)
            nbytes = ref.numel() * x.element_size()
            poison_allocator(nbytes, nbytes, x.numel() * x.element_size())
            out = run_conv(s, x, packed if use_packed else w_dev, b, r, relu)
            what = f"{shape_id(s)} {mode} residual={use_res} relu={relu} {fmt} bias={use_bias}"
            assert out.dtype == dtype and out.device.type == "cuda", what
            if s.N > 0 and fmt == CL and min(ref.shape[1:]) > 1:
                assert out.is_contiguous(memory_format=CL), f"{what}: expected channels_last output"
            if fmt == torch.contiguous_format:
                assert out.is_contiguous(), f"{what}: expected NCHW-contiguous output"
            assert_close_ref(out, ref, tol, what)


@pytest.mark.parametrize(
    "s,mode", [(s, m) for s in RESNET_SHAPES for m in MODES],
    ids=[f"{shape_id(s)}-{m}" for s in RESNET_SHAPES for m in MODES])
def test_conv_resnet_shapes(s, mode):
    check_shape_mode(s, mode)


@pytest.mark.parametrize(
    "s,mode", [(s, m) for s in ODD_SHAPES for m in MODES],
    ids=[f"{shape_id(s)}-{m}" for s in ODD_SHAPES for m in MODES])
def test_conv_odd_shapes(s, mode):
    check_shape_mode(s, mode)


@pytest.mark.parametrize("s", [conv(64, 64, 14, R=3, padding=1, N=4), conv(3, 64, 32, R=7, stride=2, padding=3),
                               conv(256, 512, 7, N=3), conv(20, 32, 9, R=3, padding=1)], ids=shape_id)
def test_tf32_random_inputs(s):
    """Arbitrary fp32 inputs, so TF32 rounding itself is exercised."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(s.N, s.C, s.H, s.W, generator=g)
    w = torch.randn(s.K, s.C // s.groups, s.R, s.S, generator=g) / math.sqrt(s.C * s.R * s.S)
    b = torch.randn(s.K, generator=g)
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), s.stride, s.padding, s.dilation, s.groups))
    with tf32_convs(True):
        out = run_conv(s, x.to(DEV).contiguous(memory_format=CL), w.to(DEV), b.to(DEV), None, True)
    assert_close_ref(out, ref, 5e-3, f"tf32 {shape_id(s)}")


# ---------------------------------------------------------------------------
# conv_bias_add_relu_


@pytest.mark.parametrize("mode", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided"])
@pytest.mark.parametrize("s", [conv(64, 256, 14, N=2), conv(64, 64, 9, R=3, padding=1, N=3),
                               conv(12, 36, 7, R=3, padding=1, groups=3)], ids=shape_id)
def test_conv_bias_add_relu_inplace(s, layout, mode):
    dtype, _, tol = MODES[mode]
    x64, w64, b64, r64, conv_ref = case(s)
    ref = torch.relu(conv_ref + r64)
    x = x64.to(DEV, dtype).contiguous(memory_format=CL)
    if layout == "channels_last":
        res = r64.to(DEV, dtype).contiguous(memory_format=CL)
    elif layout == "nchw":
        res = r64.to(DEV, dtype).contiguous()
    else:  # a non-dense view: written back through copy_
        big = torch.full((s.N, s.K, r64.shape[2], 2 * r64.shape[3]), 7.0, device=DEV, dtype=dtype)
        res = big[:, :, :, ::2]
        res.copy_(r64.to(DEV, dtype))
    ptr = res.data_ptr()
    with tf32_convs(False):
        ops.conv_bias_add_relu_(res, x, w64.to(DEV, dtype), b64.to(DEV, dtype), list(s.stride),
                                list(s.padding), list(s.dilation), s.groups)
    assert res.data_ptr() == ptr
    assert_close_ref(res, ref, tol, f"conv_bias_add_relu_ {shape_id(s)} {layout} {mode}")
    if layout == "strided":
        assert torch.all(big[:, :, :, 1::2] == 7.0), "wrote outside the residual view"


def test_conv_bias_add_relu_residual_aliases_input():
    """residual is the input itself: must not overwrite pixels other CTAs still read."""
    s = conv(64, 64, 12, R=3, padding=1, N=2)
    x64, w64, b64, _, _ = case(s)
    x = x64.to(DEV, torch.float16).contiguous(memory_format=CL)
    ref = torch.relu(F.conv2d(x.double().cpu(), w64, b64, 1, 1) + x.double().cpu())
    ops.conv_bias_add_relu_(x, x, w64.to(DEV, torch.float16), b64.to(DEV, torch.float16), [1, 1], [1, 1],
                            [1, 1], 1)
    assert_close_ref(x, ref, 2e-3, "aliased residual")


# ---------------------------------------------------------------------------
# NaN, streams, graphs


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("s", [conv(64, 64, 9, R=3, padding=1), conv(3, 64, 11, R=3, padding=1),
                               conv(12, 36, 7, R=3, padding=1, groups=3)], ids=shape_id)
def test_nan_propagates_through_relu(s, mode):
    dtype, tf32, _ = MODES[mode]
    x64, w64, b64, r64, _ = case(s)
    x64 = x64.clone()
    x64[0, 1, 2, 3] = float("nan")
    x64[-1, -1, -1, -1] = float("nan")
    r64 = r64.clone()
    r64[0, 0, 0, 0] = float("nan")
    # float64 CPU conv, then relu: torch's positions of NaN
    ref = torch.relu(F.conv2d(x64, w64, b64, s.stride, s.padding, s.dilation, s.groups) + r64)
    assert torch.isnan(ref).any()
    with tf32_convs(tf32):
        out = run_conv(s, x64.to(DEV, dtype).contiguous(memory_format=CL), w64.to(DEV, dtype),
                       b64.to(DEV, dtype), r64.to(DEV, dtype), True)
    torch.testing.assert_close(torch.isnan(out).cpu(), torch.isnan(ref))


def _graph_workload(dtype):
    """A few launches covering the 128x128 tile config (dynamic shared memory over
    48 KB), the scalar-load stem path, the in-place residual op and add_relu."""
    g = torch.Generator().manual_seed(3)
    t = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)  # noqa: E731
    x = t(8, 256, 28, 28).contiguous(memory_format=CL)
    w = ops.pack_weight(t(512, 256, 1, 1, scale=1 / 16), [1, 1], [0, 0], [1, 1], 1, [8, 256, 28, 28])
    stem_x = t(2, 3, 32, 32).contiguous(memory_format=CL)
    stem_w = t(64, 3, 7, 7, scale=0.1)
    bias = t(512, scale=0.1)
    res = t(8, 512, 28, 28).contiguous(memory_format=CL)
    acc = torch.empty_like(res)

    def run():
        y1 = ops.conv_bias_act(x, w, bias, res, [1, 1], [0, 0], [1, 1], 1, relu=True)
        y2 = ops.conv_bias_act(stem_x, stem_w, bias[:64], None, [2, 2], [3, 3], [1, 1], 1, relu=True)
        acc.copy_(res)
        ops.conv_bias_add_relu_(acc, x, w, bias, [1, 1], [0, 0], [1, 1], 1)
        y3 = ops.add_relu(y1, acc)
        return y1, y2, acc.clone(), y3

    return (x, stem_x, res), run


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_non_default_stream(dtype):
    _, run = _graph_workload(dtype)
    expected = run()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for e, o in zip(expected, got):
        assert torch.equal(e, o)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_graph_capture_and_replay(dtype):
    (x, stem_x, res), run = _graph_workload(dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graphs recommends
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    # new inputs in the captured buffers, then replay
    g = torch.Generator(device=DEV).manual_seed(11)
    for t in (x, stem_x, res):
        t.copy_(torch.randn(t.shape, generator=g, device=DEV).to(dtype))
    graph.replay()
    torch.cuda.synchronize()
    expected = run()
    torch.cuda.synchronize()
    for e, o in zip(expected, static_out):
        assert torch.equal(e, o)


# ---------------------------------------------------------------------------
# opcheck, errors, packing


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def testopcheck(dtype):
    x = torch.randn(2, 16, 9, 9, device=DEV, dtype=dtype).contiguous(memory_format=CL)
    w = torch.randn(32, 16, 3, 3, device=DEV, dtype=dtype) * 0.1
    b = torch.randn(32, device=DEV, dtype=dtype)
    r = torch.randn(2, 32, 9, 9, device=DEV, dtype=dtype).contiguous(memory_format=CL)
    opcheck(ops.conv_bias_act.default, (x, w, b, r, [1, 1], [1, 1], [1, 1], 1), dict(relu=True))
    opcheck(ops.conv_bias_act.default, (x, w, None, None, [2, 2], [0, 0], [1, 1], 1), dict(relu=False))
    opcheck(ops.conv_bias_add_relu_.default, (r.clone(), x, w, b, [1, 1], [1, 1], [1, 1], 1))
    a = torch.randn(3, 5, 7, device=DEV, dtype=dtype)
    opcheck(ops.add_relu.default, (a, torch.randn_like(a)))
    opcheck(ops.add_relu_.default, (a.clone(), torch.randn_like(a)))


def test_errors_name_the_argument():
    x = torch.randn(1, 8, 5, 5, device=DEV)
    w = torch.randn(16, 8, 3, 3, device=DEV)
    args = ([1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ops.conv_bias_act(x.double(), w.double(), None, None, *args)
    with pytest.raises(RuntimeError, match="weight"):
        ops.conv_bias_act(x, w.cpu(), None, None, *args)
    with pytest.raises(RuntimeError, match="bias"):
        ops.conv_bias_act(x, w, torch.randn(16, device=DEV, dtype=torch.float16), None, *args)
    with pytest.raises(RuntimeError, match="residual"):
        ops.conv_bias_act(x, w, None, torch.randn(1, 16, 4, 4, device=DEV), *args)


def test_pack_weight_layout_and_equivalence():
    w = torch.randn(64, 32, 3, 3, device=DEV, dtype=torch.float16)
    p = ops.pack_weight(w, [1, 1], [1, 1], [1, 1], 1, [2, 32, 10, 10])
    assert p.shape == w.shape and p.is_contiguous(memory_format=CL) and torch.equal(p, w)
    x = torch.randn(2, 32, 10, 10, device=DEV, dtype=torch.float16).contiguous(memory_format=CL)
    a = ops.conv_bias_act(x, w, None, None, [1, 1], [1, 1], [1, 1], 1, relu=True)
    b = ops.conv_bias_act(x, p, None, None, [1, 1], [1, 1], [1, 1], 1, relu=True)
    assert torch.equal(a, b)


def test_misaligned_views():
    """Views whose data pointer is not 16-byte aligned take the scalar paths."""
    s = conv(16, 32, 8, R=3, padding=1)
    x64, w64, b64, r64, conv_ref = case(s)
    flat = torch.empty(x64.numel() + 1, device=DEV, dtype=torch.float16)
    x = flat[1:].view(s.N, s.H, s.W, s.C).permute(0, 3, 1, 2)  # channels_last, offset by 2 bytes
    x.copy_(x64.to(DEV, torch.float16))
    rflat = torch.empty(r64.numel() + 1, device=DEV, dtype=torch.float16)
    r = rflat[1:].view(s.N, r64.shape[2], r64.shape[3], s.K).permute(0, 3, 1, 2)
    r.copy_(r64.to(DEV, torch.float16))
    out = run_conv(s, x, w64.to(DEV, torch.float16), b64.to(DEV, torch.float16), r, True)
    assert_close_ref(out, torch.relu(conv_ref + r64), 2e-3, "misaligned views")


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs ~16 GB of free GPU memory")
def test_more_than_2_31_elements():
    """Input and output over 2^31 elements: offsets must be 64-bit. Checked on the
    last rows (a 1x1 conv of those rows alone) against cuDNN in fp32."""
    N, C, K, H, W = 1, 64, 128, 5800, 5800  # input 2.15e9, output 4.3e9 elements
    x = torch.empty(N, C, H, W, device=DEV, dtype=torch.float16, memory_format=CL).normal_()
    w = (torch.randn(K, C, 1, 1, device=DEV) / 8).half()
    b = torch.randn(K, device=DEV).half()
    out = ops.conv_bias_act(x, w, b, None, [1, 1], [0, 0], [1, 1], 1, relu=False)
    tail = out[:, :, -2:, :].float()
    ref = F.conv2d(x[:, :, -2:, :].float(), w.float(), b.float())
    del out, x
    torch.testing.assert_close(tail, ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs ~13 GB of free GPU memory")
@pytest.mark.parametrize("numel", [2**31 - 24, 2**31 + 24], ids=["below_2^31", "above_2^31"])
def test_add_relu_around_2_31_elements(numel):
    """The vector loop and the scalar tail both past the 32-bit boundary."""
    a = torch.empty(numel, device=DEV, dtype=torch.float16).normal_()
    b = torch.empty(numel, device=DEV, dtype=torch.float16).normal_()
    out = ops.add_relu(a, b)
    for sl in (slice(0, 4096), slice(numel - 4099, numel)):   # head and tail, with the tail's odd end
        torch.testing.assert_close(out[sl], torch.relu(a[sl].float() + b[sl].float()).half())
    ops.add_relu_(a, b)
    assert torch.equal(a[-3:], out[-3:])


# ---------------------------------------------------------------------------
# add_relu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (4097,), (2, 3, 5, 7), (2, 16, 9, 9)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "offset"])
@pytest.mark.parametrize("inplace", [False, True])
def test_add_relu(dtype, shape, layout, inplace):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs 4-D")
    n = math.prod(shape)

    def make():
        if layout == "offset":  # storage offset of one element: misaligned for 16-byte access
            return torch.randn(n + 1, device=DEV).to(dtype)[1:].view(shape)
        t = torch.randn(shape, device=DEV).to(dtype)
        return t.contiguous(memory_format=CL) if layout == "channels_last" else t

    a, b = make(), make()
    a[(0,) * a.dim()] = float("nan")
    ref = torch.relu(a + b)
    if inplace:
        ptr = a.data_ptr()
        ops.add_relu_(a, b)
        assert a.data_ptr() == ptr
        got = a
    else:
        got = ops.add_relu(a, b)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
