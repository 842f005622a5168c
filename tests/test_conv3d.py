"""resnet_fused.conv3d: 3-D convs on the 2-D kernels (frames, temporal taps) and on
conv_bias_act's direct 3-D path, against F.conv3d in fp64. Tolerances as
tests/test_ops.py's: 2 * sqrt(C/groups * T * R * S) * eps_fp32 + eps, relative to
max|ref|."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_fused import _extension, conv3d, dispatch

from common_utils import assert_matches, kernel_runs, num_threads, requires_extension

pytestmark = requires_extension
CL3D = torch.channels_last_3d

# (C, K, (T, H, W), kernel, stride, padding, dilation, N)
CASES = [
    (16, 16, (5, 10, 10), 3, 1, 1, 1, 1),                           # Conv3DSimple
    (16, 24, (3, 7, 9), 3, 1, 1, 1, 2),                              # batch 2, 3 frames
    (16, 24, (5, 9, 9), 3, (1, 1, 1), (2, 1, 1), (2, 1, 1), 2),     # dilated in time, batch 2
    (16, 16, (6, 9, 8), 3, 2, 1, 1, 1),                              # r3d's stride-2 blocks
    (16, 16, (4, 16, 16), 3, (1, 2, 2), 1, 1, 1),                   # stride 2 in space only
    (16, 32, (4, 9, 8), (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, 2),     # Conv3DNoTemporal
    (24, 16, (5, 6, 6), (3, 1, 1), (2, 1, 1), (1, 0, 0), 1, 1),     # R(2+1)D's temporal half
    (16, 32, (4, 9, 9), 1, 2, 0, 1, 2),                              # downsample
]


def _triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def _prepared(case, seed=0):
    c, k, size, kernel, stride, padding, dilation, n = case
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv3d(c, k, kernel, stride, padding, dilation)
    kernel = _triple(kernel)
    w = torch.randn(k, c, *kernel, generator=g) / math.sqrt(c * math.prod(kernel))
    b = torch.randn(k, generator=g)
    x = torch.randn(n, c, *size, generator=g)
    conv_ref = F.conv3d(x.double(), w.double(), b.double(), conv.stride, conv.padding,
                        conv.dilation)
    res = torch.randn(conv_ref.shape, generator=g)
    return dispatch.prepare(w, b, conv, torch.float32), x, res, conv_ref, c * math.prod(kernel)


@pytest.mark.parametrize("route", ["the rule's", "winograd F(2x2)", "winograd F(4x4)"])
@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_3d"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_fp64(monkeypatch, case, layout, route):
    # Each conv as the rule runs it here, and the multi-tap ones that winograd_conv3d
    # takes through it with either tile.
    c, x, res, conv_ref, n = _prepared(case)
    assert isinstance(c, conv3d.Prepared3d)
    if route != "the rule's":
        if c.t_kernel == 1 or not _takes_winograd(c):
            pytest.skip("winograd_conv3d takes (kt, 3, 3) convs, stride 1, 'same' padding")
        tile = 4 if "4" in route else 2
        monkeypatch.setattr(c.frames, "winograd_tile_for", lambda frames: tile)
        assert conv3d._route(c, x) == "winograd"
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=CL3D)
    for residual, relu in [(None, True), (None, False), (res, True), (res, False)]:
        for finite in (True, False):
            out = dispatch.conv(x, c, relu=relu, finite=finite, residual=residual)
            ref = conv_ref + (0 if residual is None else residual.double())
            ref = ref.relu() if relu else ref
            assert out.shape == ref.shape and out.is_contiguous(memory_format=CL3D)
            assert_matches(out, ref, torch.float32, n, f"residual={residual is not None} "
                                                       f"relu={relu} finite={finite}")
    for identity in (res.clone(), res.clone().contiguous(memory_format=CL3D)):
        out = dispatch.conv_add_relu_(identity, x, c, finite=True)
        assert_matches(out, (conv_ref + res.double()).relu(), torch.float32, n, "in place")


def _takes_winograd(c):
    return (c.t_kernel % 2 == 1 and c.t_stride == 1 and c.t_dilation == 1
            and c.t_padding == c.t_kernel // 2 and c.frames.winograd_fits
            and c.frames.stride == (1, 1))


def test_nan_propagates_where_winograd_would_run(monkeypatch):
    # winograd_conv3d hands a NaN input to conv_bias_act's direct path.
    c, x, res, _, _ = _prepared(CASES[0], seed=1)
    monkeypatch.setattr(c.frames, "winograd_tile_for", lambda frames: 2)
    x[0, 3, 2, 5, 5] = float("nan")
    x[0, 5, 4, 2, 7] = float("nan")  # in the last frame, which one tap does not reach
    out = dispatch.conv(x, c, relu=True, finite=False, residual=res)
    ref = torch.relu(F.conv3d(x.double(), c.weight.double(), c.bias.double(), 1, 1)
                     + res.double())
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()


@pytest.mark.skipif(not _extension.winograd_kernel_available(),
                    reason="no Winograd kernel on this CPU")
@num_threads(2)  # the 2-D Winograd rules, and these measurements, depend on the threads
def test_winograd_is_taken_where_the_same_2d_conv_takes_it():
    def route(c, k, t, hw, stride=1, dtype=torch.float32, grad=False):
        conv = nn.Conv3d(c, k, 3, stride, 1)
        p = dispatch.prepare(torch.randn(k, c, 3, 3, 3), torch.randn(k), conv, dtype)
        x = torch.randn(1, c, t, hw, hw, dtype=dtype, requires_grad=grad)
        return conv3d._route(p, x)

    # r3d_18's 3x3x3 convs at 16 frames of 112x112, with gradients too (the op has a
    # backward); stride 2: direct.
    for shape in [(64, 64, 16, 56), (128, 128, 8, 28), (256, 256, 4, 14), (512, 512, 2, 7)]:
        assert route(*shape) == "winograd", shape
    assert route(64, 64, 16, 56, grad=True) == "winograd"
    assert route(64, 128, 16, 56, stride=2) == "direct"
    assert route(64, 64, 16, 56, stride=(1, 2, 2)) == "direct"  # the op has no stride
    # bfloat16: where the same 2-D conv takes the Winograd kernel.
    conv2d = dispatch.prepare(torch.randn(64, 64, 3, 3), torch.randn(64),
                              nn.Conv2d(64, 64, 3, 1, 1), torch.bfloat16)
    frames = torch.randn(16, 64, 56, 56, dtype=torch.bfloat16)
    winograd = conv2d.kernel_for(frames)[0] == "winograd"
    assert route(64, 64, 16, 56, dtype=torch.bfloat16) == ("winograd" if winograd else "direct")


@pytest.mark.skipif(not _extension.winograd_kernel_available(),
                    reason="no Winograd kernel on this CPU")
@num_threads(2)
@pytest.mark.parametrize("kt", [3, 1])  # r3d_18's 3x3x3 convs; mc3_18's and R(2+1)D's 1x3x3
def test_the_convs_over_frames_take_f2x2_where_2d_takes_f4x4(kt):
    # F(4x4)'s error, summed over a video model's convs, passed 2x torchvision's: the
    # frames take F(2x2) only (conv3d._TILES), also where a ResNet's 2-D conv takes F(4x4).
    conv2d = dispatch.prepare(torch.randn(64, 64, 3, 3), torch.randn(64),
                              nn.Conv2d(64, 64, 3, 1, 1), torch.float32)
    conv = nn.Conv3d(64, 64, (kt, 3, 3), 1, (kt // 2, 1, 1))
    c = dispatch.prepare(torch.randn(64, 64, kt, 3, 3), torch.randn(64), conv, torch.float32)
    frames = torch.randn(16, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    kind, u = conv2d.kernel_for(frames)
    assert kind == "winograd" and u.shape[0] == 36  # F(4x4): 6x6 points
    assert c.frames.winograd_tile_for(frames) == 2
    x = torch.randn(1, 64, 16, 56, 56)
    with kernel_runs() as runs, torch.no_grad():
        dispatch.conv(x, c, relu=True, finite=True)
    assert runs["winograd_conv3d" if kt == 3 else "winograd_conv3x3"] == 1
    if kt == 3:
        assert c.winograd.keys() == {2} and c.winograd[2].shape[1] == 16  # F(2x2): 4x4 points


@pytest.mark.skipif(not _extension.winograd_kernel_available(),
                    reason="no Winograd kernel on this CPU")
@num_threads(2)
def test_r2plus1d_layer3_takes_f2x2_with_its_large_weight():
    # F(2x2) only, a weight past L3 in one piece: from 48 tiles per thread (R(2+1)D's
    # layer3 at 4 frames of 14x14: 98), twice a weight from L3's 24 (dispatch.py's
    # measurements). 921 output channels make one panel, which the threads never split.
    def tile(n, c, k, hw):
        return dispatch._winograd_tile(torch.empty(n, c, hw, hw), torch.empty(k, c, 3, 3),
                                       1, conv3d._TILES)

    assert tile(4, 256, 576, 14) == tile(4, 256, 460, 14) == 2
    assert tile(4, 512, 921, 7) is None and tile(6, 512, 921, 7) == 2  # 32 and 48 per thread
    assert tile(1, 128, 128, 16) == 2  # a small weight at 32 tiles per thread
    # Where F(4x4) is allowed (a ResNet's 2-D convs), a large weight is left to it.
    assert dispatch._winograd_tile(torch.empty(6, 512, 7, 7), torch.empty(921, 512, 3, 3)) is None
