"""GPU tests of resnet_fused's CUDA kernels: conv_bias_act, conv_bias_add_relu_,
pack_weight and add_relu. Every test is skipped without a CUDA GPU.

Conv cases, the fp64 CPU reference, the error measure and its tolerance are
tests/common_utils.py's: max|out - ref| / max|ref| <= 2 sqrt(n) eps_fp32 +
eps_dtype, n = C/groups * R * S, eps_dtype TF32's 2^-10 for fp32 with TF32
allowed. Operands are drawn as values that float16, bfloat16, TF32 and float32
all hold exactly (exact_in_every_dtype), so one fp64 reference serves every
dtype and the error left is the fp32 accumulation and the final rounding;
test_tf32_random_inputs checks TF32's own rounding of arbitrary fp32 inputs. An
indexing or pipeline bug shows as O(1) errors or NaN, far above all of these.

RESNET_FUSED_CUDA_TILE=L|M|S|X|H|SIMT forces one kernel config wherever it can
run; scripts/gpu_check.sh runs this file once per value, so every config meets
every shape (H, the Hopper wgmma kernel, takes the fp16/bf16 launches).
"""

import functools
import math
import os
import re

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

from common_utils import (NONFINITE_KINDS, ConvCase, assert_matches,  # noqa: E402
                          assert_nonfinite_matches, exact_in_every_dtype,
                          exclusive_gpu_memory, opcheck, put_nonfinite, reference, rel_err,
                          tf32_convs, tol)

ops = torch.ops.resnet_fused
DEV = "cuda"
CL = torch.channels_last
MODES = {  # name: (dtype, TF32 allowed)
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
    "tf32": (torch.float32, True),
    "fp32": (torch.float32, False),
}

# ---------------------------------------------------------------------------
# Conv cases


def torchvision_resnet_convs(block, layers, groups=1, width_per_group=64, N=2):
    """Every conv of a torchvision ResNet / ResNeXt at 224x224 input (same rules as
    torchvision.models.resnet, written out so the tests need no torchvision)."""
    out = [ConvCase(3, 64, 224, 224, R=7, stride=2, padding=3, N=N)]
    inplanes, size = 64, 56
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
        for b in range(blocks):
            stride = 2 if (i > 0 and b == 0) else 1
            out_size = size // stride
            if block == "basic":
                expansion = 1
                out.append(ConvCase(inplanes, planes, size, size, R=3, stride=stride, padding=1, N=N))
                out.append(ConvCase(planes, planes, out_size, out_size, R=3, padding=1, N=N))
            else:
                expansion = 4
                width = int(planes * (width_per_group / 64.0)) * groups
                out.append(ConvCase(inplanes, width, size, size, N=N))
                out.append(ConvCase(width, width, size, size, R=3, stride=stride, padding=1,
                                    groups=groups, N=N))
                out.append(ConvCase(width, planes * expansion, out_size, out_size, N=N))
            if stride != 1 or inplanes != planes * expansion:
                out.append(ConvCase(inplanes, planes * expansion, size, size, stride=stride, N=N))
            inplanes, size = planes * expansion, out_size
    return out


def distinct(cases):
    return list(dict.fromkeys(cases))


RESNET_SHAPES = distinct(
    torchvision_resnet_convs("basic", [2, 2, 2, 2])  # resnet18
    + torchvision_resnet_convs("bottleneck", [3, 4, 6, 3])  # resnet50
    + torchvision_resnet_convs("bottleneck", [3, 4, 6, 3], groups=32, width_per_group=4)  # resnext50_32x4d
)
RESNET50_BATCH_256 = distinct(torchvision_resnet_convs("bottleneck", [3, 4, 6, 3], N=256))

ODD_SHAPES = [
    ConvCase(3, 64, 13, 17, R=3, padding=1),  # C=3: scalar loads
    ConvCase(3, 64, 64, 64, R=7, stride=2, padding=3, N=1),  # small stem
    ConvCase(20, 24, 13, 17, R=3, padding=1),  # C=20, K=24
    ConvCase(16, 17, 15, 15, R=3, stride=2, padding=1),  # odd K: no paired stores
    ConvCase(64, 24, 1, 1, N=3),  # H=W=1
    ConvCase(32, 32, 13, 17, R=3, padding=2, dilation=2),  # dilation 2
    ConvCase(16, 32, 12, 11, R=3, S=1, stride=(1, 2), padding=(0, 1), dilation=(2, 1)),  # asymmetric
    ConvCase(16, 32, 9, 10, R=1, S=3, padding=(0, 1), N=1),
    ConvCase(32, 64, 14, 14, R=3, padding=1, groups=2),  # grouped, tensor cores
    ConvCase(48, 48, 10, 10, R=3, padding=1, groups=3),  # 16 channels per group
    ConvCase(24, 40, 9, 9, R=3, padding=1, groups=2),  # 12 in / 20 out per group
    ConvCase(64, 66, 8, 8, R=3, padding=1, groups=2),  # 33 out per group (odd)
    ConvCase(12, 36, 9, 9, R=3, padding=1, groups=3),  # 4 in / 12 out per group: direct kernel
    ConvCase(64, 64, 10, 10, R=3, padding=1, groups=64),  # depthwise
    ConvCase(65600, 65600, 2, 3, R=3, padding=1, groups=65600, N=1),  # groups > grid y limit
    ConvCase(2048, 64, 4, 4, N=3),  # long GEMM-K
    ConvCase(64, 128, 5, 5, R=3, padding=1, N=0),  # batch 0
    ConvCase(64, 64, 7, 7, R=3, padding=1, N=1),  # batch 1
    ConvCase(64, 128, 56, 56, N=7),  # enough tiles for the 128x128 config
    ConvCase(64, 64, 56, 56, R=3, padding=1, N=7),  # enough tiles for the 128x64 config
]

# ---------------------------------------------------------------------------
# Data and reference


@functools.lru_cache(maxsize=4)
def operands(case):
    """(x, w, b, res) as float32 on the CPU, exact in every dtype, and the fp64
    reference conv (no bias) of x and w."""
    x, w, b, res = (exact_in_every_dtype(t) for t in case.tensors())
    return x, w, b, res, reference(x, w, None, None, case, relu=False)


def poison_allocator(*nbytes):
    """Leaves NaN-filled blocks of these sizes in the caching allocator, so an op's
    outputs land on NaN memory and any element it fails to write stays NaN."""
    bufs = [torch.full((max(n, 4) // 4,), float("nan"), device=DEV) for n in nbytes]
    del bufs


def misaligned_copy(t):
    """A channels_last copy of t on the GPU whose data starts one element past an
    aligned address: the vector loads and the paired (two-channel) stores of the
    kernels are off for it."""
    n, c, h, w = t.shape
    flat = torch.empty(t.numel() + 1, device=DEV, dtype=t.dtype)
    out = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    out.copy_(t)
    return out


def run_conv(case, x, w, b, res, relu):
    return ops.conv_bias_act(x, w, b, res, *case.geometry(), relu=relu)


def check_case_mode(case, mode):
    dtype, tf32 = MODES[mode]
    x32, w32, b32, r32, conv_ref = operands(case)
    s, p, d, g = case.geometry()
    w_dev = w32.to(DEV, dtype)
    packed = ops.pack_weight(w_dev, s, p, d, g, list(x32.shape))
    # (residual, relu, layout of input and residual, bias, packed weight)
    variants = [
        (True, True, CL, True, True),
        (True, False, torch.contiguous_format, True, False),
        (False, True, torch.contiguous_format, True, True),
        (False, False, CL, False, False),
    ]
    with tf32_convs(tf32):
        for use_res, relu, fmt, use_bias, use_packed in variants:
            x = x32.to(DEV, dtype).contiguous(memory_format=fmt)
            r = r32.to(DEV, dtype).contiguous(memory_format=fmt) if use_res else None
            b = b32.to(DEV, dtype) if use_bias else None
            # reference()'s epilogue, on the shared fp64 conv
            ref = conv_ref + b32.double().view(1, -1, 1, 1) if use_bias else conv_ref
            ref = ref + r32.double() if use_res else ref
            ref = torch.relu(ref) if relu else ref
            nbytes = ref.numel() * x.element_size()
            poison_allocator(nbytes, nbytes, x.numel() * x.element_size())
            out = run_conv(case, x, packed if use_packed else w_dev, b, r, relu)
            what = f"{case} {mode} residual={use_res} relu={relu} {fmt} bias={use_bias}"
            assert out.dtype == dtype and out.device.type == DEV, what
            if case.N > 0 and fmt == CL and min(ref.shape[1:]) > 1:
                assert out.is_contiguous(memory_format=CL), f"{what}: expected channels_last output"
            if fmt == torch.contiguous_format:
                assert out.is_contiguous(), f"{what}: expected NCHW-contiguous output"
            assert_matches(out, ref, dtype, case.reduction, what)


def mode_params(cases):
    return [pytest.param(c, m, id=f"{c}-{m}") for c in cases for m in MODES]


@pytest.mark.parametrize("case,mode", mode_params(RESNET_SHAPES))
def test_conv_resnet_shapes(case, mode):
    check_case_mode(case, mode)


@pytest.mark.parametrize("case,mode", mode_params(ODD_SHAPES))
def test_conv_odd_shapes(case, mode):
    check_case_mode(case, mode)


# Images of the batch checked against the reference at batch 256: the first
# and last two, and four between. The kernel computes all 256 (its tiles and
# grid are batch 256's); an fp64 CPU reference of every image would take minutes.
BATCH_256_IMAGES = [0, 1, 51, 102, 153, 204, 254, 255]


@pytest.mark.parametrize("case", RESNET50_BATCH_256, ids=str)
def test_resnet50_layers_at_batch_256(case):
    """Every distinct conv of ResNet-50 at batch 256, where the size rule picks the
    128x128 tile (config L) for nearly every layer with more than 64 output
    channels, over many k-tiles. Identity activation, so no error hides under a
    ReLU."""
    x, w, b, res = (exact_in_every_dtype(t) for t in case.tensors(device=DEV, draw_on=DEV))
    x = x.contiguous(memory_format=CL)
    imgs = torch.tensor(BATCH_256_IMAGES, device=DEV)
    ref = reference(x[imgs], w, b, res[imgs], case, relu=False).to(DEV)  # fp64 on the CPU
    for mode, (dtype, tf32) in MODES.items():
        with tf32_convs(tf32):
            out = run_conv(case, x.to(dtype), w.to(dtype), b.to(dtype), res.to(dtype), False)
            bound = tol(dtype, case.reduction, DEV)
        err = rel_err(out[imgs], ref, device=DEV)
        assert err <= bound, f"{case} {mode}: relative error {err:.3g} > {bound:.3g}"
        del out


@pytest.mark.parametrize("case", [ConvCase(64, 64, 14, 14, R=3, padding=1, N=4),
                                  ConvCase(3, 64, 32, 32, R=7, stride=2, padding=3),
                                  ConvCase(256, 512, 7, 7, N=3), ConvCase(20, 32, 9, 9, R=3, padding=1)],
                         ids=str)
def test_tf32_random_inputs(case):
    """Arbitrary fp32 inputs, so TF32 rounding itself is exercised."""
    x, w, b, _ = case.tensors(device=DEV, channels_last=True, seed=7)
    with tf32_convs(True):
        out = run_conv(case, x, w, b, None, True)
        assert_matches(out, reference(x, w, b, None, case, True), torch.float32, case.reduction)


# ---------------------------------------------------------------------------
# conv_bias_add_relu_


@pytest.mark.parametrize("mode", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided", "misaligned"])
@pytest.mark.parametrize("case", [ConvCase(64, 256, 14, 14), ConvCase(64, 64, 9, 9, R=3, padding=1, N=3),
                                  ConvCase(12, 36, 7, 7, R=3, padding=1, groups=3),
                                  ConvCase(16, 17, 9, 9, R=3, padding=1)], ids=str)
def test_conv_bias_add_relu_inplace(case, layout, mode):
    """channels_last and misaligned residuals are updated in place by the kernel
    (the misaligned one, like odd K, with the paired two-channel stores off:
    every element is read and written on its own, after its own read); the
    others go through a copy."""
    dtype, _ = MODES[mode]
    x64, w64, b64, r64, conv_ref = operands(case)
    ref = torch.relu(conv_ref + b64.double().view(1, -1, 1, 1) + r64.double())
    x = x64.to(DEV, dtype).contiguous(memory_format=CL)
    if layout == "channels_last":
        res = r64.to(DEV, dtype).contiguous(memory_format=CL)
    elif layout == "nchw":
        res = r64.to(DEV, dtype).contiguous()
    elif layout == "misaligned":
        res = misaligned_copy(r64.to(DEV, dtype))
    else:  # a non-dense view: written back through copy_
        big = torch.full((case.N, case.K, r64.shape[2], 2 * r64.shape[3]), 7.0, device=DEV, dtype=dtype)
        res = big[:, :, :, ::2]
        res.copy_(r64.to(DEV, dtype))
    ptr = res.data_ptr()
    with tf32_convs(False):
        ops.conv_bias_add_relu_(res, x, w64.to(DEV, dtype), b64.to(DEV, dtype), *case.geometry())
        assert res.data_ptr() == ptr
        assert_matches(res, ref, dtype, case.reduction, f"conv_bias_add_relu_ {case} {layout} {mode}")
    if layout == "strided":
        assert torch.all(big[:, :, :, 1::2] == 7.0), "wrote outside the residual view"


def test_conv_bias_add_relu_residual_aliases_input():
    """residual is the input itself: must not overwrite pixels other CTAs still read."""
    case = ConvCase(64, 64, 12, 12, R=3, padding=1, N=2)
    x64, w64, b64, _, _ = operands(case)
    x = x64.to(DEV, torch.float16).contiguous(memory_format=CL)
    w, b = w64.to(DEV, torch.float16), b64.to(DEV, torch.float16)
    ref = reference(x, w, b, x, case, relu=True)
    ops.conv_bias_add_relu_(x, x, w, b, *case.geometry())
    assert_matches(x, ref, torch.float16, case.reduction, "aliased residual")


# ---------------------------------------------------------------------------
# NaN, Inf, streams, graphs


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("where", NONFINITE_KINDS)
@pytest.mark.parametrize("case", [ConvCase(64, 64, 9, 9, R=3, padding=1),
                                  ConvCase(5, 64, 11, 11, R=3, padding=1),  # scalar loads
                                  ConvCase(12, 36, 7, 7, R=3, padding=1, groups=3)],  # direct kernel
                         ids=str)
def test_nan_and_inf_propagate_like_torch(case, where, mode):
    """NaN and +-Inf in the input, residual, weight or bias give NaN and Inf where
    the fp64 reference has them (ReLU passes NaN, as torch.relu does); the finite
    outputs stay within tolerance."""
    dtype, tf32 = MODES[mode]
    x, w, b, res = (exact_in_every_dtype(t) for t in case.tensors())
    put_nonfinite(where, x, w, b, res)
    x, w, b, res = (t.to(DEV, dtype) for t in (x, w, b, res))
    x = x.contiguous(memory_format=CL)
    for relu in (True, False):
        ref = reference(x, w, b, res, case, relu)
        with tf32_convs(tf32):  # the bound follows the TF32 setting the kernel ran with
            out = run_conv(case, x, w, b, res, relu)
            assert_nonfinite_matches(out, ref, dtype, case.reduction, f"{where} relu={relu}")


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
    opcheck(ops.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1]))


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


def test_unknown_tile_override_is_named(monkeypatch):
    """An unknown RESNET_FUSED_CUDA_TILE fails the conv with a message naming the
    variable, the values it takes and the one it got (read at each launch)."""
    monkeypatch.setenv("RESNET_FUSED_CUDA_TILE", "XL")
    x = torch.randn(1, 16, 4, 4, device=DEV)
    w = torch.randn(32, 16, 1, 1, device=DEV)
    with pytest.raises(RuntimeError, match=re.escape(
            "RESNET_FUSED_CUDA_TILE: expected one of auto, L, M, S, X, H, L2, CUTLASS, SIMT (or "
            "unset), got 'XL'")):
        ops.conv_bias_act(x, w, None, None, [1, 1], [0, 0], [1, 1], 1)


# Only in the H run of gpu_check.sh, which does not decide its exit status: a
# fault in the (not yet verified) wgmma kernel would end this process's CUDA context.
@pytest.mark.skipif(os.environ.get("RESNET_FUSED_CUDA_TILE") != "H",
                    reason="runs with RESNET_FUSED_CUDA_TILE=H (gpu_check.sh's H row)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgmma_override_runs_or_says_why(monkeypatch, dtype):
    """RESNET_FUSED_CUDA_TILE=H runs the wgmma kernel where it can (an sm_90 GPU, a
    build for 9.0a), checked here against fp64 on a conv of several k-tiles and
    partial M and N tiles; anywhere else the conv fails naming the GPU and the
    build's archs, rather than running another kernel. Operands are exact in fp16
    and bf16 and their products sum exactly in fp32, so only the output's rounding is
    left: half an ulp, 2^-11 (fp16) or 2^-8 (bf16) of max|ref| at most."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (3, 96, 9, 11), generator=g) / 4
    w = torch.randint(-4, 5, (200, 96, 3, 3), generator=g) / 8
    b = torch.randint(-4, 5, (200,), generator=g) / 4
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
    args = (x.to(DEV, dtype).contiguous(memory_format=torch.channels_last), w.to(DEV, dtype),
            b.to(DEV, dtype), None, [1, 1], [1, 1], [1, 1], 1)
    from resnet_fused import _extension
    monkeypatch.setenv("RESNET_FUSED_CUDA_TILE", "H")
    if torch.cuda.get_device_capability() == (9, 0) and _extension._C.cuda_wgmma:
        y = ops.conv_bias_act(*args)
        err = ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert err <= (2.0 ** -11 if dtype == torch.float16 else 2.0 ** -8), err
    else:
        with pytest.raises(RuntimeError, match="RESNET_FUSED_CUDA_TILE=H: the wgmma kernel "
                                               "needs an sm_90 GPU"):
            ops.conv_bias_act(*args)


# Like the H test: only in gpu_check.sh's CUTLASS row, which does not decide its exit
# status, until CUTLASS's kernels have run on a GPU.
@pytest.mark.skipif(os.environ.get("RESNET_FUSED_CUDA_TILE") != "CUTLASS",
                    reason="runs with RESNET_FUSED_CUDA_TILE=CUTLASS (gpu_check.sh's CUTLASS row)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", ["none", "tensor", "in place"])
@pytest.mark.parametrize("C, R, stride, padding, dilation", [
    (320, 1, 1, 0, 1),   # the GEMM: 5 k-tiles of 64
    (128, 3, 1, 1, 1),   # the implicit-GEMM conv: 9 taps x 2 k-tiles
    (128, 3, 2, 1, 1),
    (64, 3, 1, 2, 2),
    (128, 1, 2, 0, 1),   # a strided 1x1 (a downsample with the ReLU)
], ids=["1x1", "3x3", "3x3_stride2", "3x3_dilated", "1x1_stride2"])
def test_cutlass_override_runs_or_says_why(monkeypatch, dtype, residual, C, R, stride, padding,
                                           dilation):
    """RESNET_FUSED_CUDA_TILE=CUTLASS runs CUTLASS's kernels where they can (an sm_90
    GPU, a build with them), checked against fp64 with M and N not multiples of their
    128x128 tiles, with and without a residual and with the residual summed in place
    (conv_bias_add_relu_); anywhere else the conv fails naming the GPU and the build.
    Operands exact in fp16/bf16, products summed exactly in fp32: only the output's
    rounding is left (the residual is exact too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (3, C, 9, 11), generator=g) / 4
    w = torch.randint(-4, 5, (200, C, R, R), generator=g) / 8
    b = torch.randint(-4, 5, (200,), generator=g) / 4
    args = ([stride, stride], [padding, padding], [dilation, dilation], 1)
    ref = F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation)
    r = torch.randint(-8, 9, tuple(ref.shape), generator=g) / 4
    ref = torch.relu(ref + (0 if residual == "none" else r.double()))
    cl = torch.channels_last
    xd, wd, bd = (x.to(DEV, dtype).contiguous(memory_format=cl), w.to(DEV, dtype),
                  b.to(DEV, dtype))
    rd = r.to(DEV, dtype).contiguous(memory_format=cl)
    from resnet_fused import _extension
    monkeypatch.setenv("RESNET_FUSED_CUDA_TILE", "CUTLASS")

    def run():
        if residual == "in place":
            ops.conv_bias_add_relu_(rd, xd, wd, bd, *args)
            return rd
        return ops.conv_bias_act(xd, wd, bd, rd if residual == "tensor" else None, *args,
                                 relu=True)

    if torch.cuda.get_device_capability() == (9, 0) and _extension._C.cuda_cutlass:
        y = run()
        err = ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert err <= (2.0 ** -11 if dtype == torch.float16 else 2.0 ** -8), err
        assert y.is_contiguous(memory_format=cl)
    else:
        with pytest.raises(RuntimeError, match="RESNET_FUSED_CUDA_TILE=CUTLASS: the CUTLASS "
                                               "kernels need an sm_90 GPU"):
            run()


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
    case = ConvCase(16, 32, 8, 8, R=3, padding=1)
    x64, w64, b64, r64, _ = operands(case)
    x, r = misaligned_copy(x64.half()), misaligned_copy(r64.half())
    w, b = w64.to(DEV, torch.float16), b64.to(DEV, torch.float16)
    out = run_conv(case, x, w, b, r, True)
    assert_matches(out, reference(x, w, b, r, case, True), torch.float16, case.reduction,
                   "misaligned views")


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs ~16 GB of free GPU memory")
def test_more_than_2_31_elements():
    """Input and output over 2^31 elements: offsets must be 64-bit. Checked on the
    last rows (a 1x1 conv of those rows alone) against cuDNN in fp32."""
    N, C, K, H, W = 1, 64, 128, 5800, 5800  # input 2.15e9, output 4.3e9 elements
    with exclusive_gpu_memory():
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
    with exclusive_gpu_memory():
        a = torch.empty(numel, device=DEV, dtype=torch.float16).normal_()
        b = torch.empty(numel, device=DEV, dtype=torch.float16).normal_()
        out = ops.add_relu(a, b)
        for sl in (slice(0, 4096), slice(numel - 4099, numel)):   # head and tail, with the tail's odd end
            torch.testing.assert_close(out[sl], torch.relu(a[sl].float() + b[sl].float()).half())
        ops.add_relu_(a, b)
        assert torch.equal(a[-3:], out[-3:])
        del a, b, out


# ---------------------------------------------------------------------------
# max_pool2d (the maxima only): exact against ATen's, NaN and -Inf included


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 64, 112, 112), 3, 2, 1),   # ResNet's, vector loads
    ((3, 3, 17, 19), 3, 2, 1),      # 3 channels: per element
    ((1, 24, 9, 8), 2, 1, 0),
    ((2, 8, 7, 7), (3, 2), (1, 2), (1, 1)),
    ((0, 16, 5, 5), 3, 2, 1),       # empty batch
])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "offset"])
def test_max_pool2d(dtype, shape, kernel, stride, padding, layout):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(shape, generator=g, device=DEV).to(dtype)
    if x.numel():
        x.view(-1)[::7] = float("-inf")
        x.view(-1)[3::11] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "offset":  # channels_last, 2 elements into its storage: no 16-byte loads
        n, c, h, w = shape
        base = torch.empty(x.numel() + 2, device=DEV, dtype=dtype)
        x = base[2:].view(n, h, w, c).permute(0, 3, 1, 2).copy_(x)
        assert x.is_contiguous(memory_format=CL) and x.data_ptr() % 16 != 0
    out = ops.max_pool2d(x, _pair2(kernel), _pair2(stride), _pair2(padding))
    ref = F.max_pool2d(x, kernel, stride, padding)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    # The input's memory format, as ATen's (an empty batch's too).
    assert out.is_contiguous(memory_format=CL) == ref.is_contiguous(memory_format=CL)
    assert out.numel() or out.stride() == ref.stride()


def _pair2(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def test_max_pool2d_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="expected float16, bfloat16 or float32 input, got Double"):
        ops.max_pool2d(torch.randn(1, 8, 5, 5, device=DEV, dtype=torch.float64), [3, 3], [2, 2],
                       [1, 1])
    with pytest.raises(RuntimeError, match="padding <= kernel_size / 2"):
        ops.max_pool2d(torch.randn(1, 8, 5, 5, device=DEV), [3, 3], [2, 2], [2, 2])


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
