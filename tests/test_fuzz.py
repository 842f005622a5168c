"""Differential fuzzing of the ops against F.conv2d (+ bias + residual + relu) in fp64.

CI runs a bounded, fixed set of cases (derandomized, so CI is reproducible);
RESNET_FUSED_FUZZ_EXAMPLES=N runs N fresh random cases instead."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resnet_fused
from resnet_fused import _extension, ops

from common_utils import (ConvCase, assert_matches, assert_rounded_once, dtypes_for, num_threads,
                          reference, tol)

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")
EXAMPLES = int(os.environ.get("RESNET_FUSED_FUZZ_EXAMPLES", "150"))
FIXED = "RESNET_FUSED_FUZZ_EXAMPLES" not in os.environ
DEVICES = ["cpu"] + (["cuda"] if resnet_fused._extension.has_kernel("conv_bias_act", "cuda")
                     and torch.cuda.is_available() else [])


def _layout(t, how, draw):
    """A view of t's values with a different memory layout."""
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if how == "permuted":            # a transposed-then-back, non-contiguous view
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if how == "offset":              # storage offset into a larger buffer
        big = torch.empty(t.numel() + 7, dtype=t.dtype, device=t.device)
        return big[7:].view(t.shape).copy_(t)
    if how == "sliced":              # every other element of a larger tensor
        big = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        v = big[..., ::2]
        return v.copy_(t)
    return t


LAYOUTS = ["contiguous", "channels_last", "permuted", "offset", "sliced"]
# conv1x1's bfloat16 kernel: AVX-512 with a bfloat16 brgemm.
CONV1X1_DTYPES = [torch.float32] + (
    [torch.bfloat16] if resnet_fused._extension.conv1x1_bf16_kernel_available() else [])


def _assert_fp32_matches(out, x, wt, b, res, conv, relu, what):
    """out against the fp64 reference within the fp32 tolerance of conv's reduction. The
    error is relative to the sums of absolute products, not to max|ref|: with few
    outputs (one pixel, one channel) every one of them may cancel, and no kernel, direct
    ones included, can then meet a bound relative to the result."""
    ref = reference(x, wt, b, res, conv, relu)
    assert out.shape == ref.shape
    if out.numel() == 0:
        return
    scale = reference(x.abs(), wt.abs(), None if b is None else b.abs(),
                      None if res is None else res.abs(), conv, False).abs().max().item()
    err = (out.double() - ref).abs().max().item() / max(scale, 1e-30)
    assert err <= tol(torch.float32, conv.reduction), f"{what}: error {err:.3g}"


@st.composite
def conv_cases(draw):
    device = draw(st.sampled_from(DEVICES))
    dtype = draw(st.sampled_from(dtypes_for(device)))
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    r = draw(st.sampled_from([1, 3, 5, 7]))
    # Now and then the channel counts of our kernels' weight layouts (whole panels, blocks
    # and vectors), whose dispatch route then makes those weights.
    per_group = (st.sampled_from([16, 32, 64]) if r <= 3 and draw(st.integers(0, 4)) == 0
                 else st.integers(1, 12))
    c = groups * draw(per_group)
    k = groups * draw(per_group)
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, r // 2 * dilation + 1))
    span = dilation * (r - 1) + 1
    h = draw(st.integers(max(1, span - 2 * padding), span + 9))
    w = draw(st.integers(max(1, span - 2 * padding), span + 9))
    n = draw(st.integers(0, 3))
    return dict(device=device, dtype=dtype, n=n, c=c, k=k, h=h, w=w, r=r, stride=stride,
                padding=padding, dilation=dilation, groups=groups,
                x_layout=draw(st.sampled_from(LAYOUTS)), res_kind=draw(
                    st.sampled_from(["none", "dense", "channels_last", "expanded", "sliced"])),
                relu=draw(st.booleans()), bias=draw(st.booleans()),
                packed=device == "cpu" and draw(st.booleans()),
                dispatch=device == "cpu" and draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(case=conv_cases())
def test_conv_bias_act_fuzz(case):
    g = torch.Generator().manual_seed(case["seed"])
    conv = ConvCase(case["c"], case["k"], case["h"], case["w"], R=case["r"],
                    stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                    groups=case["groups"], N=case["n"])
    n, c, k, (ho, wo) = conv.N, conv.C, conv.K, conv.out_hw
    dev, dt = case["device"], case["dtype"]
    # Operands rounded to dt first: the reference sees exactly what the kernel sees.
    x = torch.randn(n, c, conv.H, conv.W, generator=g).to(dt)
    wt = (torch.randn(k, c // conv.groups, conv.R, conv.R, generator=g)
          / conv.reduction ** 0.5).to(dt)
    b = torch.randn(k, generator=g).to(dt) if case["bias"] else None
    res = None
    if case["res_kind"] == "expanded":
        res = torch.randn(1, k, 1, wo, generator=g).to(dt).expand(n, k, ho, wo)
    elif case["res_kind"] != "none":
        res = torch.randn(n, k, ho, wo, generator=g).to(dt)
    ref = reference(x, wt, b, res, conv, case["relu"])

    xd = _layout(x.to(dev), case["x_layout"], None)
    rd = None
    if res is not None:
        rd = res.to(dev)
        if case["res_kind"] == "channels_last":
            rd = rd.contiguous(memory_format=torch.channels_last)
        elif case["res_kind"] == "sliced":
            rd = _layout(rd, "sliced", None)
        elif case["res_kind"] == "expanded":
            rd = res[:1, :, :1].to(dev).expand(n, k, ho, wo)
    # The weight as the models pass it: packed for oneDNN for this input's shape.
    wd = ops.pack_weight(wt, *conv.geometry(), x.shape) if case["packed"] else wt.to(dev)
    out = None
    if case["dispatch"]:  # as a model runs it, where its route is conv_bias_act's,
        #                   bfloat16's float32 copy, conv1x1 over im2col rows or stem_conv
        #                   (the other kernels have fuzz tests of their own)
        from torch import nn

        from resnet_fused import dispatch
        p = dispatch.prepare(wt, b, nn.Conv2d(c, k, conv.R, *conv.geometry()), dt)
        if p.kernel_for(xd)[0] in ("conv_bias_act", "float32", "im2col", "stem"):
            out = dispatch.conv(xd, p, relu=case["relu"], finite=False, residual=rd)
    if out is None:
        out = ops.conv_bias_act(xd, wd, None if b is None else b.to(dev), rd,
                                *conv.geometry(), relu=case["relu"])
    assert out.shape == ref.shape and out.dtype == dt
    if dt == torch.float32:  # relative to the products' magnitude (one output may cancel)
        _assert_fp32_matches(out.cpu(), x, wt, b, res, conv, case["relu"], str(case))
    elif out.numel() and ref.abs().max() > 0:
        assert_matches(out, ref, dt, conv.reduction, what=str(case))
    elif out.numel():  # every output cut by the ReLU: ours must be (near) zero too
        assert out.abs().max().item() <= 1e-6 * tol(dt, conv.reduction), case


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(dtype=st.sampled_from(CONV1X1_DTYPES), n=st.integers(0, 3), c=st.integers(1, 40),
       k=st.sampled_from([64, 128]), r=st.integers(2, 7), stride=st.integers(1, 3),
       dilation=st.integers(1, 2), data=st.data(), in_place=st.booleans(),
       residual=st.booleans(), relu=st.booleans(), bias=st.booleans(),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1))
def test_small_conv_route_fuzz(dtype, n, c, k, r, stride, dilation, data, in_place, residual,
                               relu, bias, layout, seed):
    """dispatch.conv and conv_add_relu_ on small convs, as a model runs them: conv1x1
    over their im2col rows (over the taps that read the input), or whichever route
    dispatch takes where that does not fit (bfloat16 with odd channels, no tap reading
    the input, too many output pixels)."""
    from torch import nn

    from resnet_fused import dispatch

    padding = data.draw(st.integers(0, r // 2 * dilation + 1))
    span = dilation * (r - 1) + 1
    h, w = (data.draw(st.integers(max(1, span - 2 * padding), span + 6)) for _ in range(2))
    conv = ConvCase(c, k, h, w, R=r, stride=stride, padding=padding, dilation=dilation, N=n)
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(n, c, h, w, generator=g).to(dtype), layout, None)
    wt = (torch.randn(k, c, r, r, generator=g) / conv.reduction ** 0.5).to(dtype)
    b = torch.randn(k, generator=g).to(dtype) if bias else None
    res = torch.randn(n, k, *conv.out_hw, generator=g).to(dtype)
    p = dispatch.prepare(wt, b, nn.Conv2d(c, k, r, *conv.geometry()), dtype)
    with torch.no_grad():
        if in_place:
            out = dispatch.conv_add_relu_(res.clone(memory_format=torch.channels_last),
                                          x, p, finite=False)
        else:
            out = dispatch.conv(x, p, relu=relu, finite=False, residual=res if residual else None)
    residual, relu = residual or in_place, relu or in_place
    what = f"{conv} {dtype} route {p.kernel_for(x)[0]}"
    if dtype == torch.float32:
        _assert_fp32_matches(out, x, wt, b, res if residual else None, conv, relu, what)
        return
    ref = reference(x, wt, b, res if residual else None, conv, relu)
    if out.numel() and ref.abs().max() > 0:
        assert_matches(out, ref, dtype, conv.reduction, what=what)


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(n=st.integers(0, 2), c=st.integers(1, 4), k=st.sampled_from([32, 64, 96, 48]),
       r=st.integers(1, 7), s=st.integers(1, 7), stride=st.sampled_from([1, 2]), data=st.data(),
       x_layout=st.sampled_from(LAYOUTS), residual=st.booleans(), relu=st.booleans(),
       bias=st.booleans(), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1))
def test_stem_conv_fuzz(n, c, k, r, s, stride, data, x_layout, residual, relu, bias, threads,
                        seed):
    # Kernels 1x1 to 7x7, uneven ones and uneven padding (up to past the kernel's half),
    # widths across both ISAs' runs of 5 and 7 pixels, one to four input channels, K a
    # multiple of 32 (and 48, which goes to conv_bias_act), thread counts that split the
    # rows unevenly.
    padding = (data.draw(st.integers(0, r)), data.draw(st.integers(0, s)))
    h = data.draw(st.integers(max(1, r - 2 * padding[0]), r + 12))
    w = data.draw(st.integers(max(1, s - 2 * padding[1]), s + 20))
    conv = ConvCase(c, k, h, w, R=r, S=s, stride=stride, padding=padding, N=n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(k, c, r, s, generator=g) / conv.reduction ** 0.5
    b = torch.randn(k, generator=g) if bias else None
    res = torch.randn(n, k, *conv.out_hw, generator=g) if residual else None
    with num_threads(threads):
        out = ops.stem_conv(_layout(x, x_layout, None), wt, ops.stem_conv_weight(wt), b, res,
                            stride=stride, padding=padding, relu=relu)
    _assert_fp32_matches(out, x, wt, b, res, conv, relu, f"stem_conv {conv}")


@st.composite
def conv3d_cases(draw):
    route = draw(st.sampled_from(["op", "op in place", "conv3d", "direct", "winograd_conv3d"]))
    if route == "winograd_conv3d":  # its geometry: (kt, 3, 3), kt odd, 'same' at stride 1
        groups, kt = 1, draw(st.sampled_from([1, 3, 3, 5]))
        kernel, stride, dilation, padding = (kt, 3, 3), (1, 1, 1), (1, 1, 1), (kt // 2, 1, 1)
        size = (draw(st.integers(1, 6)), draw(st.integers(1, 11)), draw(st.integers(1, 11)))
        c, k = (draw(st.one_of(st.integers(1, 40), st.sampled_from([64, 96])))
                for _ in range(2))
    else:
        groups = draw(st.sampled_from([1, 1, 2]))
        kernel = draw(st.sampled_from([(1, 1, 1), (3, 3, 3), (1, 3, 3), (3, 1, 1), (3, 7, 7)]))
        stride = tuple(draw(st.integers(1, 2)) for _ in range(3))
        dilation = tuple(draw(st.integers(1, 2)) for _ in range(3))
        padding = tuple(draw(st.integers(0, r // 2 * d + 1)) for r, d in zip(kernel, dilation))
        size = tuple(draw(st.integers(max(1, d * (r - 1) + 1 - 2 * p), d * (r - 1) + 7))
                     for r, d, p in zip(kernel, dilation, padding))
        c, k = groups * draw(st.integers(1, 8)), groups * draw(st.integers(1, 8))
    return dict(dtype=draw(st.sampled_from(dtypes_for("cpu"))), n=draw(st.integers(0, 2)),
                c=c, k=k, groups=groups, kernel=kernel, stride=stride, padding=padding,
                dilation=dilation, size=size, channels_last=draw(st.booleans()),
                residual=draw(st.booleans()), relu=draw(st.booleans()),
                bias=draw(st.booleans()), packed=draw(st.booleans()), route=route,
                tile=draw(st.sampled_from([2, 4])), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(case=conv3d_cases())
def test_conv3d_fuzz(case):
    """conv_bias_act and conv_bias_add_relu_ on 5-D operands; resnet_fused.conv3d as it
    chooses and on the direct path (in bfloat16, where an output extent is 1, on a float32
    copy of the weight); winograd_conv3d (F(2x2), and F(4x4) in float32; the
    cases it hands to conv_bias_act too: sub-tile images, few channels for F(4x4), bfloat16
    channels not in whole vectors)."""
    import torch.nn.functional as F
    from torch import nn

    from resnet_fused import dispatch

    g = torch.Generator().manual_seed(case["seed"])
    dt, n, c, k, groups = case["dtype"], case["n"], case["c"], case["k"], case["groups"]
    geometry = (case["stride"], case["padding"], case["dilation"], groups)
    x = torch.randn(n, c, *case["size"], generator=g).to(dt)
    reduction = c // groups * (case["kernel"][0] * case["kernel"][1] * case["kernel"][2])
    wt = (torch.randn(k, c // groups, *case["kernel"], generator=g) / reduction ** 0.5).to(dt)
    b = torch.randn(k, generator=g).to(dt) if case["bias"] else None
    conv = F.conv3d(x.double(), wt.double(), None if b is None else b.double(), *geometry)
    res = torch.randn(conv.shape, generator=g).to(dt)
    relu = case["relu"] or case["route"] == "op in place"
    ref = conv + res.double() if case["residual"] or case["route"] == "op in place" else conv
    ref = ref.relu() if relu else ref
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    residual = res if case["residual"] else None
    w_op = ops.pack_weight(wt, *geometry[:3], groups, x.shape) if case["packed"] else wt
    tile = case["tile"] if dt == torch.float32 else 2  # bfloat16: F(2x2), with an even C
    if dt == torch.bfloat16 and c % 2:
        tile = None
    if case["route"] == "winograd_conv3d" and tile is not None:
        out = ops.winograd_conv3d(x, wt, ops.winograd_weight(wt, tile), b, residual, relu=relu)
    elif case["route"] == "op":
        out = ops.conv_bias_act(x, w_op, b, residual, *geometry, relu=relu)
    elif case["route"] == "op in place":
        out = res.contiguous(memory_format=torch.channels_last_3d)
        ops.conv_bias_add_relu_(out, x, w_op, b, *geometry)
    else:  # bfloat16 too: dispatch's own bfloat16 route (a float32 copy of the weight)
        module = nn.Conv3d(c, k, case["kernel"], case["stride"], case["padding"],
                           case["dilation"], groups)
        p = dispatch.prepare(wt, b, module, dt)
        if case["route"] == "direct":
            out = dispatch.conv(x, p.direct, relu=relu, finite=True, residual=residual)
        else:
            out = dispatch.conv(x, p, relu=relu, finite=True, residual=residual)
    assert out.shape == ref.shape and out.dtype == dt
    if dt == torch.float32 and out.numel():
        # As the 2-D fuzz's: relative to the sums of absolute products, where a few
        # outputs may all cancel (one pixel, two channels, a residual and a bias).
        scale = F.conv3d(x.double().abs(), wt.double().abs(),
                         None if b is None else b.double().abs(), *geometry)
        scale = (scale + res.double().abs() if case["residual"]
                 or case["route"] == "op in place" else scale).max().item()
        err = (out.double() - ref).abs().max().item() / max(scale, 1e-30)
        assert err <= tol(torch.float32, reduction), f"{case}: error {err:.3g}"
    elif out.numel() and ref.abs().max() > 0:
        assert_matches(out, ref, dt, reduction, what=str(case))


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=4),
       layout=st.sampled_from(["contiguous", "offset", "transposed"]),
       device=st.sampled_from(DEVICES), inplace=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_add_relu_fuzz(shape, layout, device, inplace, seed):
    g = torch.Generator().manual_seed(seed)
    for dt in dtypes_for(device):
        a = torch.randn(*shape, generator=g).to(device, dt)
        b = torch.randn(*shape, generator=g).to(device, dt)
        if layout == "offset":
            a = torch.cat([a.flatten(), a.flatten()])[a.numel():].view(a.shape)
        elif layout == "transposed" and a.dim() > 1:
            a, b = a.transpose(0, -1), b.transpose(0, -1)
        ref = torch.relu(a.double() + b.double()).to(dt)
        out = ops.add_relu_(a.clone(), b) if inplace else ops.add_relu(a, b)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.skipif(not resnet_fused._extension.winograd_kernel_available(),
                    reason="no AVX2 or AVX-512: winograd_conv3x3 computes through conv_bias_act")
@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(variant=st.sampled_from([(2, 1), (4, 1), (2, 2)]), n=st.integers(1, 3),
       c=st.integers(1, 40), k=st.one_of(st.integers(1, 40), st.sampled_from([64, 128, 192])),
       h=st.integers(1, 19), w=st.integers(1, 19),
       x_layout=st.sampled_from(LAYOUTS), residual=st.booleans(), relu=st.booleans(),
       bias=st.booleans(), threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**31 - 1))
def test_winograd_conv3x3_fuzz(variant, n, c, k, h, w, x_layout, residual, relu, bias, threads,
                               seed):
    # Partial output tiles at every edge, channel counts off the vector width, weights
    # in several panels (split across threads when the tiles are few), any input
    # layout, and blocks of tiles split over other thread counts; stride 1 and 2.
    tile, stride = variant
    g = torch.Generator().manual_seed(seed)
    conv = ConvCase(c, k, h, w, R=3, stride=stride, padding=1, N=n)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(k, c, 3, 3, generator=g) / conv.reduction ** 0.5
    b = torch.randn(k, generator=g) if bias else None
    res = torch.randn(n, k, *conv.out_hw, generator=g) if residual else None
    with num_threads(threads):
        out = ops.winograd_conv3x3(_layout(x, x_layout, None), wt,
                                   ops.winograd_weight(wt, tile, stride=stride), b, res,
                                   stride=stride, relu=relu)
    _assert_fp32_matches(out, x, wt, b, res, conv, relu, f"F({tile}x{tile}), stride {stride}")


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="no bfloat16 convolution on this CPU")
@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 3), c=st.sampled_from([16, 32, 48, 24]), k=st.sampled_from([16, 32, 64, 8, 128]),
       h=st.integers(1, 19), w=st.integers(1, 19), x_layout=st.sampled_from(LAYOUTS),
       residual=st.booleans(), relu=st.booleans(), bias=st.booleans(),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1))
def test_winograd_conv3x3_bf16_fuzz(n, c, k, h, w, x_layout, residual, relu, bias, threads, seed):
    # bfloat16 F(2x2) (whole 16-channel vectors; 24 and 8 channels take the direct
    # path) against the direct bfloat16 kernel on the same operands: at most twice its
    # error, plus one bfloat16 rounding of the scale for cases the direct kernel
    # happens to get exactly. Errors as in the fp32 fuzz test.
    g = torch.Generator().manual_seed(seed)
    conv = ConvCase(c, k, h, w, R=3, padding=1, N=n)
    x = torch.randn(n, c, h, w, generator=g).relu().bfloat16()
    wt = (torch.randn(k, c, 3, 3, generator=g) / conv.reduction ** 0.5).bfloat16()
    b = torch.randn(k, generator=g).bfloat16() if bias else None
    res = torch.randn(n, k, h, w, generator=g).bfloat16() if residual else None
    ref = reference(x, wt, b, res, conv, relu)
    xl = _layout(x, x_layout, None)
    with num_threads(threads):
        out = ops.winograd_conv3x3(xl, wt, ops.winograd_weight(wt), b, res, relu=relu)
        direct = ops.conv_bias_act(xl, wt, b, res, 1, 1, relu=relu)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    if not (_extension.winograd_bf16_kernel_available() and c % 16 == 0 and k % 16 == 0
            and min(h, w) >= 2):
        assert torch.equal(out, direct)  # the op's direct path: the same call
        return
    scale = reference(x.abs(), wt.abs(), None if b is None else b.abs(),
                      None if res is None else res.abs(), conv, False).abs().max().item()
    err = (out.double() - ref).abs().max().item() / scale
    direct_err = (direct.double() - ref).abs().max().item() / scale
    assert err <= 2 * direct_err + 2 ** -8, f"bf16 F(2x2): error {err:.3g}, direct {direct_err:.3g}"


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(n=st.integers(0, 3), c=st.integers(1, 300), panels=st.integers(1, 3),
       h=st.integers(1, 17), w=st.integers(1, 17), x_layout=st.sampled_from(LAYOUTS),
       residual=st.sampled_from([None, "out_of_place", "in_place"]), relu=st.booleans(),
       bias=st.booleans(), threads=st.sampled_from([1, 2, 3]), stride=st.sampled_from([1, 2, 3]),
       dtype=st.sampled_from(CONV1X1_DTYPES), seed=st.integers(0, 2**31 - 1))
def test_conv1x1_fuzz(n, c, panels, h, w, x_layout, residual, relu, bias, threads, stride, dtype,
                      seed):
    # Row counts across the 128-row product blocks, any channel count (even for
    # bfloat16), 1-3 weight panels split over other thread counts, strides that leave a
    # remainder; errors as in the Winograd fuzz test, bfloat16 rounded once. The in-place
    # op has stride 1 only.
    g = torch.Generator().manual_seed(seed)
    k = 64 * panels
    c += c % 2 if dtype == torch.bfloat16 else 0
    stride = 1 if residual == "in_place" else stride
    conv = ConvCase(c, k, h, w, N=n, stride=stride)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    wt = (torch.randn(k, c, 1, 1, generator=g) / c ** 0.5).to(dtype)
    b = torch.randn(k, generator=g).to(dtype) if bias else None
    res = torch.randn(n, k, *conv.out_hw, generator=g).to(dtype) if residual else None
    relu = relu or residual == "in_place"
    p = ops.conv1x1_weight(wt)
    with num_threads(threads):
        if residual == "in_place":
            out = ops.conv1x1_add_relu_(res.clone(memory_format=torch.channels_last),
                                        _layout(x, x_layout, None), wt, p, b)
        else:
            out = ops.conv1x1(_layout(x, x_layout, None), wt, p, b, res, relu=relu, stride=stride)
    if dtype == torch.float32:
        _assert_fp32_matches(out, x, wt, b, res, conv, relu, "conv1x1")
        return
    size = reference(x.abs(), wt.abs(), None if b is None else b.abs(),
                     None if res is None else res.abs(), conv, False)
    assert_rounded_once(out, reference(x, wt, b, res, conv, relu), size, conv.reduction)


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(n=st.integers(0, 3), c=st.integers(1, 200), c2=st.integers(1, 200),
       panels=st.integers(1, 3), h=st.integers(1, 13), w=st.integers(1, 13),
       x_layout=st.sampled_from(LAYOUTS), relu=st.booleans(), bias=st.booleans(),
       threads=st.sampled_from([1, 2, 3]), stride2=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**31 - 1))
def test_conv1x1_sum_fuzz(n, c, c2, panels, h, w, x_layout, relu, bias, threads, stride2, seed):
    # The sum of two 1x1 convs is one 1x1 conv of the channels of both inputs (the second
    # subsampled at its stride) by both weights side by side: the reference and its
    # tolerance are that conv's.
    g = torch.Generator().manual_seed(seed)
    k = 64 * panels
    y = torch.randn(n, c, h, w, generator=g)
    x = torch.randn(n, c2, (h - 1) * stride2 + 1 + seed % stride2, (w - 1) * stride2 + 1,
                    generator=g)
    wt, wt2 = (torch.randn(k, m, 1, 1, generator=g) / (c + c2) ** 0.5 for m in (c, c2))
    b = torch.randn(k, generator=g) if bias else None
    with num_threads(threads):
        out = ops.conv1x1_sum(_layout(y, x_layout, None), wt, ops.conv1x1_weight(wt),
                              _layout(x, x_layout, None), wt2, ops.conv1x1_weight(wt2), b,
                              stride2=stride2, relu=relu)
    both = torch.cat([y, x[:, :, ::stride2, ::stride2]], 1)
    _assert_fp32_matches(out, both, torch.cat([wt, wt2], 1), b, None,
                         ConvCase(c + c2, k, h, w, N=n), relu, "conv1x1_sum")


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(n=st.integers(0, 3), layout=st.sampled_from([(4, 4), (8, 8), (16, 16), (3, 16), (40, 32),
                                                    (8, 48), (4, 64), (4, 8)]),
       groups=st.integers(1, 6), h=st.integers(1, 17), w=st.integers(1, 17),
       x_layout=st.sampled_from(LAYOUTS), residual=st.booleans(), relu=st.booleans(),
       bias=st.booleans(), threads=st.sampled_from([1, 2, 3]), stride=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31 - 1))
def test_grouped_conv3x3_fuzz(n, layout, groups, h, w, x_layout, residual, relu, bias, threads,
                              stride, seed):
    # Each of the kernel's layouts (Cg, Kg): groups of 4 and 8 sharing vectors, 16-64 output
    # channels per group with any input count, and one it leaves to conv_bias_act (Kg = 8,
    # Cg = 4); rows across the 7-pixel runs, strides, thread counts that split the rows
    # unevenly.
    cg, kg = layout
    g = torch.Generator().manual_seed(seed)
    c, k = cg * groups, kg * groups
    if k % ops.grouped_conv_block(kg):
        groups, c, k = 4 * groups, 4 * c, 4 * k  # whole 16-channel blocks
    conv = ConvCase(c, k, h, w, R=3, padding=1, stride=stride, groups=groups, N=n)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(k, cg, 3, 3, generator=g) / (9 * cg) ** 0.5
    b = torch.randn(k, generator=g) if bias else None
    res = torch.randn(n, k, *conv.out_hw, generator=g) if residual else None
    with num_threads(threads):
        out = ops.grouped_conv3x3(_layout(x, x_layout, None), wt,
                                  ops.grouped_conv_weight(wt, groups), b, res, stride=stride,
                                  relu=relu)
    _assert_fp32_matches(out, x, wt, b, res, conv, relu, "grouped_conv3x3")


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=FIXED,
          suppress_health_check=list(HealthCheck))
@given(n=st.integers(0, 2), c=st.integers(1, 70), h=st.integers(1, 13), w=st.integers(1, 13),
       kh=st.integers(1, 4), kw=st.integers(1, 4), stride=st.integers(1, 3),
       x_layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_max_pool2d_fuzz(n, c, h, w, kh, kw, stride, x_layout, dtype, threads, seed, data):
    # A maximum is one of its inputs: equal to torch's, NaN in place, for any geometry
    # torch accepts.
    ph, pw = data.draw(st.integers(0, kh // 2)), data.draw(st.integers(0, kw // 2))
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    if x.numel():
        x.view(-1)[seed % x.numel()] = float("nan")
    x = _layout(x, x_layout, None)
    ref = torch.nn.functional.max_pool2d(x, (kh, kw), stride, (ph, pw))
    with num_threads(threads):
        out = ops.max_pool2d(x, (kh, kw), stride, (ph, pw))
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)
