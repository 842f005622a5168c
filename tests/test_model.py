"""FusedResNet against torchvision."""

import copy
import os
import re
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from resnet_fused import FusedResNet, _extension, dispatch, fuse

from common_utils import (assert_matches, assert_rounded_once, fp32_bound, kernel_runs,
                          num_threads, rel_err, tv_model)
from resnet_fused._extension import winograd_kernel_available

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")
BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("arch", resnet_fused.ARCHS)
def test_every_builder_matches_torchvision(arch):
    tv = tv_model(arch)
    fused = getattr(resnet_fused, arch)()
    fused.load_state_dict(tv.state_dict(), strict=True)
    fused.eval()
    assert isinstance(fused, FusedResNet)
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(1, 3, 64, 64, generator=g),
             torch.randn(3, 3, 97, 131, generator=g).contiguous(memory_format=torch.channels_last)]
    with torch.inference_mode():
        for x in cases:
            ref = tv(x)
            assert rel_err(fused(x), ref) <= fp32_bound(tv, x)
        if BF16:
            # bf16 may err at most 2x torchvision's own bf16 error against fp32.
            x = cases[1]
            ours = fuse(tv).to(torch.bfloat16)(x.bfloat16())
            theirs = tv_model(arch).to(torch.bfloat16)(x.bfloat16())
            assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref)


def test_fuse_keeps_custom_configurations():
    for kwargs in [dict(num_classes=10), dict(replace_stride_with_dilation=[False, True, True]),
                   dict(zero_init_residual=True)]:
        tv = tv_model("resnet50", **kwargs)
        fused = fuse(tv)
        x = torch.randn(2, 3, 75, 75)
        with torch.inference_mode():
            assert rel_err(fused(x), tv(x)) <= fp32_bound(tv, x), kwargs
    assert fuse(tv) is not tv and type(tv) is torchvision.models.ResNet


def test_state_dict_round_trip_and_to_torchvision():
    tv = tv_model("resnet18")
    fused = resnet_fused.resnet18()
    fused.load_state_dict(tv.state_dict(), strict=True)
    back = torchvision.models.resnet18()
    back.load_state_dict(fused.state_dict(), strict=True)
    assert list(fused.state_dict()) == list(tv.state_dict())
    plain = fused.to_torchvision()
    assert type(plain) is torchvision.models.ResNet
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert rel_err(fused.eval()(x), plain.eval()(x)) <= fp32_bound(plain, x)


def test_weights_file_and_bad_files(tmp_path):
    tv = tv_model("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    fused = resnet_fused.resnet18(weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert rel_err(fused(x), tv(x)) <= fp32_bound(tv, x)
    corrupt = tmp_path / "bad.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        resnet_fused.resnet18(weights=str(corrupt))
    with pytest.raises(ValueError, match="does not fit resnet50"):
        resnet_fused.resnet50(weights=str(path))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        resnet_fused.resnet18(weights=str(tmp_path / "missing.pth"))


def test_weights_files_as_training_leaves_them(tmp_path):
    # A fine-tuned head, a training checkpoint's wrapper, DataParallel's prefix: loaded as
    # torchvision's model would take them; a whole pickled model is named as such.
    tv = tv_model("resnet18", num_classes=10)
    state = tv.state_dict()
    x = torch.randn(1, 3, 64, 64)
    for name, obj in (("head", state), ("wrapped", {"model": state, "epoch": 3}),
                      ("ddp", {f"module.{k}": v for k, v in state.items()})):
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        fused = resnet_fused.resnet18(weights=str(path)).eval()
        with torch.inference_mode():
            assert fused(x).shape == (1, 10) and rel_err(fused(x), tv(x)) <= fp32_bound(tv, x), name
    path = tmp_path / "pickled.pth"
    torch.save(tv, path)
    with pytest.raises(ValueError, match="holds pickled Python objects .* save "
                                         "model.state_dict"):
        resnet_fused.resnet18(weights=str(path))


@pytest.mark.parametrize("weights, error, message", [
    ("IMAGENET1K_V2", ValueError, "expected one of DEFAULT, IMAGENET1K_V1"),
    (torchvision.models.ResNet50_Weights.IMAGENET1K_V2, TypeError,
     "expected None, a ResNet18_Weights value, one of DEFAULT, IMAGENET1K_V1, or a state_dict "
     "file path, got ResNet50_Weights"),
    ({}, TypeError, "a state_dict object goes to model.load_state_dict"),
])
def test_bad_weights_name_the_choices(weights, error, message):
    with pytest.raises(error, match=re.escape(message)):
        resnet_fused.resnet18(weights=weights)


def test_train_mode_is_torchvision():
    torch.manual_seed(0)
    tv = tv_model("resnet18").train()
    fused = fuse(tv).train()
    x = torch.randn(4, 3, 64, 64)
    out_tv, out_f = tv(x), fused(x)
    assert torch.equal(out_tv, out_f)
    out_tv.square().mean().backward()
    out_f.square().mean().backward()
    for (n, p), (_, q) in zip(tv.named_parameters(), fused.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    for (n, b), (_, c) in zip(tv.named_buffers(), fused.named_buffers()):
        assert torch.equal(b, c), n


def test_fold_is_refreshed_when_parameters_change():
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = fused(x)
    with torch.no_grad():
        fused.layer2[0].bn1.running_var.mul_(3.0)       # in place, a buffer
        fused.layer3[1].conv2.weight.mul_(0.5)          # in place, a parameter
        tv.layer2[0].bn1.running_var.mul_(3.0)
        tv.layer3[1].conv2.weight.mul_(0.5)
    with torch.inference_mode():
        after = fused(x)
        assert not torch.allclose(before, after)
        assert rel_err(after, tv(x)) <= fp32_bound(tv, x)
    other = tv_model("resnet18", seed=1)
    fused.load_state_dict(other.state_dict())   # copies in place
    with torch.inference_mode():
        assert rel_err(fused(x), other(x)) <= fp32_bound(other, x)
    fused.train()                                   # running stats change in train mode
    fused(torch.randn(4, 3, 64, 64))
    fused.eval()
    with torch.inference_mode():
        plain = fused.to_torchvision().eval()
        assert rel_err(fused(x), plain(x)) <= fp32_bound(plain, x)
        fused.to(torch.float64)                       # dtype change: unfused fallback, right
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert fused(x.double()).dtype == torch.float64


def test_conversion_drops_the_old_fold():
    # After .to()/.half()/.cuda() the folded weights of the old tensors are dead weight.
    fused = fuse(tv_model("resnet18"))
    with torch.inference_mode():
        fused(torch.randn(1, 3, 64, 64))
    (fold,) = fused._fold_cache.values()
    old = weakref.ref(fold.stem.weight)
    del fold
    fused.to(torch.float64)
    assert fused._fold_cache == {} and old() is None


@pytest.mark.parametrize("change", ["bn weight set to None", "bn bias deleted", "eps"])
def test_fold_is_refreshed_when_a_parameter_is_removed(change):
    # Setting a parameter to None (or deleting it) calls no module hook, and a BN's
    # eps is a plain attribute: both must still refold.
    def apply(m):
        bn = m.layer2[1].bn2
        if change == "bn weight set to None":
            bn.weight = None
        elif change == "bn bias deleted":
            del bn.bias
            bn.bias = None  # BatchNorm's forward reads the attribute
        else:
            bn.eps = 0.5
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fused(x)
    apply(tv), apply(fused)
    with torch.inference_mode():
        assert rel_err(fused(x), tv(x)) <= fp32_bound(tv, x)


def test_compile_fullgraph():
    tv = tv_model("resnet18")
    fused = fuse(tv)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(compiled(x), tv(x)) <= fp32_bound(tv, x)


def test_bad_input_and_unfoldable_bn():
    fused = fuse(tv_model("resnet18"))
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
            fused(torch.randn(2, 4, 32, 32))
        with pytest.raises(ValueError, match=r"expected input of shape"):
            fused(torch.randn(3, 32, 32))
        with pytest.raises(TypeError, match="input dtype torch.float64 differs"):
            fused(torch.randn(1, 3, 32, 32, dtype=torch.float64))
        with pytest.raises(TypeError, match="floating-point"):
            fused(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
        assert fused(torch.randn(0, 3, 64, 64)).shape == (0, 1000)
    tv = torchvision.models.resnet18(norm_layer=lambda c: torch.nn.BatchNorm2d(
        c, track_running_stats=False)).eval()
    with pytest.raises(TypeError, match="BatchNorm after conv1 has no running statistics"):
        fuse(tv)
    with pytest.raises(TypeError, match="found no torchvision ResNet"):
        fuse(torch.nn.Linear(2, 2))


def test_nan_propagates_like_torchvision():
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(2, 3, 64, 64)
    x[0, 1, 10, 10] = float("nan")
    with torch.inference_mode():
        ref, out = tv(x), fused(x)
    assert torch.equal(ref.isnan(), out.isnan())
    assert out[0].isnan().all() and not out[1].isnan().any()
    assert rel_err(out[1], ref[1]) <= fp32_bound(tv, x[1:])


def test_hub_entry_point():
    import hubconf
    model = hubconf.resnet18(num_classes=7)
    assert isinstance(model, FusedResNet) and model.fc.out_features == 7


def test_nan_in_bn_statistics_propagates_like_torchvision():
    tv = tv_model("resnet18")
    with torch.no_grad():
        tv.layer2[0].bn1.running_var[5] = float("nan")
        tv.layer3[0].bn2.running_mean[0] = float("inf")
    fused = fuse(tv)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="NaN/Inf"):
        out = fused(x)
    with torch.inference_mode():
        ref = tv(x)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()


def winograd_tile_counts(arch, threads):
    """(F(4x4) calls, F(2x2) calls, stride-2 F(2x2) calls) of a fused `arch` on a
    2x3x64x64 input with `threads` threads; its output checked against torchvision's."""
    if not winograd_kernel_available():
        pytest.skip("no AVX2 or AVX-512 on this CPU: the Winograd kernel does not run here")
    fused = fuse(tv_model(arch))
    x = torch.randn(2, 3, 64, 64)
    with num_threads(threads), torch.inference_mode(), \
            torch.profiler.profile(record_shapes=True) as prof, kernel_runs() as runs:
        out = fused(x)
    tv = tv_model(arch)
    assert rel_err(out, tv(x)) <= fp32_bound(tv, x)
    # winograd_weight: [alpha^2, K / P, C, P], or [4, 4, K / P, C, P] at stride 2
    tiles = [e.input_shapes[2][0] for e in prof.events()
             if e.name == "resnet_fused::winograd_conv3x3"]
    assert len(tiles) == tiles.count(36) + tiles.count(16) + tiles.count(4)
    assert runs["winograd_conv3x3"] == len(tiles)  # the kernel computed each call itself
    return tiles.count(36), tiles.count(16), tiles.count(4)


# Stride-1 3x3 convs of layer1 (input 2x3x64x64, one thread: 32 4x4 output tiles,
# F(4x4)) and layer2 (8 4x4 tiles, 32 2x2 tiles: F(2x2)); those of layer3 and
# layer4 have too few tiles for Winograd to pay. Of the stride-2 ones, layer2's (8x8
# outputs) takes F(2x2) at stride 2, the smaller ones not. Counted per tile size, so
# that losing a fast path (or taking Winograd where it does not pay, or for a grouped
# conv) fails.
@pytest.mark.parametrize("arch, counts", [("resnet18", (4, 3, 1)), ("resnet50", (3, 3, 1)),
                                          ("resnext50_32x4d", (0, 0, 0))])
def test_cpu_fp32_runs_winograd_where_it_pays(arch, counts):
    assert winograd_tile_counts(arch, threads=1) == counts


# ResNeXt's grouped 3x3 convs (32 groups of 4 to 32 channels, strides 1 and 2) run on
# grouped_conv3x3 wherever its kernel runs, and the model still matches torchvision.
@pytest.mark.parametrize("arch", ["resnext50_32x4d", "resnext101_64x4d"])
def test_cpu_fp32_runs_grouped_convs_on_their_kernel(arch):
    if not _extension.grouped_conv_kernel_available():
        pytest.skip("no AVX2 or AVX-512 on this CPU: the grouped kernel does not run here")
    fused = fuse(tv_model(arch))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), torch.profiler.profile() as prof, kernel_runs() as runs:
        out = fused(x)
    tv = tv_model(arch)
    assert rel_err(out, tv(x)) <= fp32_bound(tv, x)
    names = [e.name for e in prof.events()]
    blocks = sum(len(layer) for layer in (fused.layer1, fused.layer2, fused.layer3, fused.layer4))
    assert names.count("resnet_fused::grouped_conv3x3") == runs["grouped_conv3x3"] == blocks


# The stem runs on stem_conv where dispatch's rule says it pays: with AVX2 at every
# size; with AVX-512 where ATen's cost around oneDNN's call shows (64x64), not at 224x224
# (oneDNN's kernel near the FMA peak there). The model matches torchvision either way.
@pytest.mark.parametrize("isa, size, ours", [("avx512", 64, True), ("avx512", 224, False),
                                             ("avx2", 224, True)])
def test_cpu_fp32_stem_runs_on_stem_conv_where_it_pays(monkeypatch, isa, size, ours):
    if not _extension.stem_conv_kernel_available():
        pytest.skip("no AVX2 or AVX-512 on this CPU: the stem kernel does not run here")
    monkeypatch.setattr(_extension, "cpu_isa", lambda: isa)  # the rule's view of the CPU
    fused = fuse(tv_model("resnet18"))
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode(), kernel_runs() as runs:
        out = fused(x)
    tv = tv_model("resnet18")
    assert rel_err(out, tv(x)) <= fp32_bound(tv, x)
    assert runs["stem_conv"] == (1 if ours else 0)


# On 2 threads the weight-bound convs split their output channels across the threads
# and dispatch.py's cost model picks for them: layer2 (128 channels at 8x8) and
# layer3 (256 at 4x4) take F(2x2), layer4 (512 at 2x2) stays direct; layer1 (one
# 64-channel panel, no split) keeps F(4x4).
@pytest.mark.parametrize("arch, counts", [("resnet18", (4, 6, 1)), ("resnet50", (3, 8, 1))])
def test_cpu_fp32_weight_bound_winograd_on_two_threads(arch, counts):
    assert winograd_tile_counts(arch, threads=2) == counts


# ResNet's batch-1 layer4 (512 channels at 7x7, 16 tiles) and layer3 (256 at 14x14, 49
# tiles) take F(2x2) on both ISAs, and a 512-channel weight too large to split at batch 16
# F(4x4): with AVX2 in 32-wide weight panels (ops.brgemm_panel), whose products run as
# fast as AVX-512's.
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_winograd_tiles_alike_on_both_isas(monkeypatch, isa):
    monkeypatch.setattr(_extension, "cpu_isa", lambda: isa)
    with num_threads(2):
        for n, c, size, tile in [(1, 512, 7, 2), (1, 256, 14, 2), (16, 512, 14, 4)]:
            x, w = torch.empty(n, c, size, size), torch.empty(c, c, 3, 3)
            assert dispatch._winograd_tile(x, w) == tile, (isa, n, c)


# CUDA convs with fewer input channels than a 16-byte vector (the stem) may append zero
# channels to input and weight ("pad_channels" in dispatch.CUDA_TRY): the sums must not
# change.
# The arithmetic is the same on any device, so it is checked here against fp64.
@pytest.mark.parametrize("dtype, channels", [(torch.float16, 8), (torch.bfloat16, 8),
                                             (torch.float32, 4)])
def test_padded_channels_give_the_same_conv(dtype, channels):
    assert dispatch.padded_channels(3, dtype) == channels
    assert dispatch.padded_channels(channels, dtype) == channels
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 17, 19, generator=g), torch.randn(8, 3, 7, 7, generator=g)
    xp, wp = dispatch.pad_channels(x, 8), dispatch.pad_channels(w, 8)
    assert xp.shape == (2, 8, 17, 19) and xp.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xp[:, :3], x) and not xp[:, 3:].any() and not wp[:, 3:].any()
    ref = torch.nn.functional.conv2d(x.double(), w.double(), stride=2, padding=3)
    out = resnet_fused.ops.conv_bias_act(xp, wp, None, None, 2, 3, relu=False)
    assert_matches(out, ref, torch.float32, 3 * 7 * 7)


def test_tf32_flag_read_as_the_cuda_kernel_reads_it():
    """dispatch._tf32_convs, which gates padding fp32 convs on CUDA, follows both of
    torch's TF32 APIs without raising when they disagree."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flag")
    saved = conv.fp32_precision, torch.backends.cudnn.allow_tf32
    try:
        for precision, expected in (("ieee", False), ("tf32", True)):
            conv.fp32_precision = precision
            assert dispatch._tf32_convs() is expected
        torch.backends.cudnn.allow_tf32 = False
        assert dispatch._tf32_convs() is False
        torch.backends.cudnn.allow_tf32 = True
        assert dispatch._tf32_convs() is True
    finally:
        torch.backends.cudnn.allow_tf32 = saved[1]
        conv.fp32_precision = saved[0]


def test_an_unknown_cuda_try_name_is_named():
    code = "import resnet_fused.dispatch"
    env = dict(os.environ, RESNET_FUSED_CUDA_TRY="pad_channels,max_pools")
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert ("RESNET_FUSED_CUDA_TRY: expected names from pad_channels, max_pool, plan, got "
            "max_pools; ignoring those") in r.stderr


# bfloat16 Winograd (F(2x2) only) runs on AVX-512 CPUs whose bfloat16 brgemm runs,
# except AMX ones (dispatch._AMX).
BF16_WINOGRAD_KERNEL = BF16 and _extension.winograd_bf16_kernel_available()
BF16_WINOGRAD = BF16_WINOGRAD_KERNEL and (not dispatch._AMX or dispatch._BF16_ON_AMX)
_FLAGS = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()


@pytest.mark.skipif(_extension.cpu_isa() != "avx512" or "ONEDNN_MAX_CPU_ISA" in os.environ,
                    reason="needs AVX-512 and oneDNN's full ISA")
def test_bf16_winograd_kernel_runs_where_the_cpu_has_bfloat16():
    # The library's own check (a brgemm product of ones) against the CPU's flags: plain
    # AVX-512 has no bfloat16 brgemm, AVX512_BF16 and AMX have.
    assert _extension.winograd_bf16_kernel_available() == bool(
        _FLAGS & {"avx512_bf16", "amx_bf16"})


@pytest.mark.skipif(not BF16_WINOGRAD, reason="bfloat16 Winograd needs AVX-512 with bfloat16, "
                                               "and is off on AMX CPUs")
@pytest.mark.parametrize("arch, f2", [("resnet18", 7), ("resnet50", 6)])
def test_cpu_bf16_runs_winograd_where_it_pays(arch, f2):
    # 64x64 input, batch 2, one thread: layer1's and layer2's stride-1 3x3 convs have
    # enough 2x2 tiles (128 and 32 >= 24), layer3's (8) and layer4's do not.
    fused = fuse(tv_model(arch)).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
            ours = fused(x.bfloat16())
    finally:
        torch.set_num_threads(threads)
    tiles = [e.input_shapes[2][0] for e in prof.events()
             if e.name == "resnet_fused::winograd_conv3x3"]
    assert (tiles.count(16), len(tiles)) == (f2, f2)
    ref = tv_model(arch).double()(x.double())
    theirs = tv_model(arch).to(torch.bfloat16)(x.bfloat16())
    assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref)


@pytest.mark.skipif(not BF16, reason="no bfloat16 convolutions on this CPU")
@pytest.mark.parametrize("dims", [2, 3])
def test_cpu_bf16_conv_with_an_output_extent_of_1_keeps_a_float32_copy(dims):
    # conv_bias_act computes such a bfloat16 conv in float32 (conv_bias_act.cpp); the
    # model's conv keeps its weight in float32 for it, made once, and rounds once.
    torch.manual_seed(0)
    if dims == 2:  # a stride-2 3x3 conv on 2 rows: one output row
        conv, x = nn.Conv2d(16, 32, 3, 2, 1), torch.randn(2, 16, 2, 5)
        f = torch.nn.functional.conv2d
    else:  # R(2+1)D's temporal conv on one frame
        conv, x = nn.Conv3d(16, 32, (3, 1, 1), 1, (1, 0, 0)), torch.randn(2, 16, 1, 4, 4)
        f = torch.nn.functional.conv3d
    x, w, b = x.bfloat16(), conv.weight.detach().bfloat16(), conv.bias.detach().bfloat16()
    c = dispatch.prepare(w, b, conv, torch.bfloat16)
    prepared = c if dims == 2 else c.direct
    geometry = conv.stride, conv.padding
    res = torch.randn(f(x.float(), w.float(), None, *geometry).shape).bfloat16()
    with torch.no_grad():
        out = dispatch.conv(x, c, relu=True, finite=False, residual=res)
        copy32 = prepared.float32
        assert copy32 is not None and copy32.weight.dtype == torch.float32
        assert torch.equal(dispatch.conv_add_relu_(res.clone(), x, c, finite=False), out)
    assert prepared.float32 is copy32
    ref = (f(x.double(), w.double(), b.double(), *geometry) + res.double()).relu()
    size = f(x.double().abs(), w.double().abs(), b.double().abs(), *geometry) + res.double().abs()
    assert_rounded_once(out, ref, size, reduction=w[0].numel())


@pytest.mark.skipif(not _extension.conv1x1_kernel_available(), reason="no conv1x1 kernel here")
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_cpu_small_convs_run_as_products_over_im2col_rows(arch):
    # At 32x32, batch 1, the stem has 256 output pixels and every later conv at most 64:
    # each conv with a kernel larger than 1x1 runs as conv1x1 over its im2col rows where
    # Winograd does not take it (with AVX2, layer1's) and stem_conv not (the stem, where
    # its kernel runs), and layer4's stride-1 3x3 convs, on a 1x1 input, over their centre
    # tap only.
    tv = tv_model(arch)
    fused = fuse(tv)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        ours = fused(x)
    spatial = [m for m in tv.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    names = [e.name for e in prof.events()]
    winograd = names.count("resnet_fused::winograd_conv3x3")
    stem = names.count("resnet_fused::stem_conv")
    assert stem == _extension.stem_conv_kernel_available() and winograd <= 6
    assert names.count("resnet_fused::im2col") == len(spatial) - winograd - stem
    assert len(spatial) == 17 and "resnet_fused::conv_bias_act" not in names
    assert rel_err(ours, tv(x)) <= fp32_bound(tv, x)
    fold = next(iter(fused._fold_cache.values()))
    last = fold.layers[-1][1][-1]
    conv = last["conv2"]
    (taps, (w, _)), = conv.im2col.items()
    assert taps == ((1, 1), (2, 2)) and w.shape == (512, conv.weight.shape[1], 1, 1)
    if BF16 and _extension.conv1x1_bf16_kernel_available() and not dispatch._AMX:
        # bfloat16 too, but for the stem: its 3 x 49 columns are odd, and conv1x1's
        # bfloat16 weight holds its rows in pairs.
        with torch.inference_mode(), torch.profiler.profile() as prof:
            ours = fuse(tv_model(arch)).to(torch.bfloat16)(x.bfloat16())
            theirs = tv_model(arch).to(torch.bfloat16)(x.bfloat16())
            ref = tv.double()(x.double())
        names = [e.name for e in prof.events()]
        winograd = names.count("resnet_fused::winograd_conv3x3")
        assert names.count("resnet_fused::im2col") == len(spatial) - 1 - winograd
        assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref)


@pytest.mark.skipif(not BF16, reason="no bfloat16 convolutions on this CPU")
@pytest.mark.parametrize("on_amx", [False, True])
def test_cpu_bf16_leaves_convs_to_onednn_on_amx(monkeypatch, on_amx):
    # Where the CPU has AMX (here pretended), our bfloat16 kernels (Winograd, conv1x1)
    # are not chosen unless asked for: they were measured against oneDNN's AVX512_BF16
    # kernels only.
    monkeypatch.setattr(dispatch, "_AMX", True)
    monkeypatch.setattr(dispatch, "_BF16_ON_AMX", on_amx)
    fused = fuse(tv_model("resnet18")).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # enough tiles per thread for layer1's F(2x2)
        with torch.inference_mode(), torch.profiler.profile() as prof:
            ours = fused(x.bfloat16())
    finally:
        torch.set_num_threads(threads)
    names = [e.name for e in prof.events()]
    assert ("resnet_fused::winograd_conv3x3" in names) == (on_amx and BF16_WINOGRAD_KERNEL)
    assert ("resnet_fused::conv1x1" in names) == (
        on_amx and _extension.conv1x1_bf16_kernel_available())
    # Every conv fused, whichever kernel.
    assert sum(names.count("resnet_fused::" + op) for op in (
        "conv_bias_act", "conv_bias_add_relu_", "winograd_conv3x3", "conv1x1",
        "conv1x1_add_relu_")) == 20
    ref = tv_model("resnet18").double()(x.double())
    theirs = tv_model("resnet18").to(torch.bfloat16)(x.bfloat16())
    assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref)


# ---- trunks the fused forward does not compute --------------------------------------


class _ClampBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with a forward of its own: folding it as a BN would be wrong."""

    def forward(self, x):
        return super().forward(x).clamp(-0.5, 0.5)


def _reflect_padding(m):
    m.layer2[0].conv2.padding_mode = "reflect"


@pytest.mark.parametrize("build, change, why", [
    (dict(norm_layer=lambda c: nn.GroupNorm(4, c)), None, "GroupNorm, not BatchNorm2d"),
    (dict(norm_layer=_ClampBN), None, "_ClampBN, not BatchNorm2d"),
    ({}, _reflect_padding, "not a zero-padded Conv2d"),
])
def test_fuse_names_what_it_does_not_compute(build, change, why):
    tv = tv_model("resnet18", **build)
    if change is not None:
        change(tv)
    with pytest.raises(TypeError, match=f"fuse: this ResNet is not one the fused forward "
                                        f"computes: .*{why}"):
        fuse(tv)


def test_fuse_names_a_bn_of_the_wrong_width():
    tv = tv_model("resnet18")
    tv.layer2[0].bn1 = nn.BatchNorm2d(64)
    with pytest.raises(TypeError, match="the BatchNorm after layer2.0.conv1 has 64 channels "
                                        "where layer2.0.conv1 has 128 output channels"):
        fuse(tv)


@pytest.mark.parametrize("model, hint", [
    (torchvision.models.resnet18, "call it first: fuse(resnet18())"),
    ("resnet18", "build one first, e.g. resnet_fused.build('resnet18')"),
    (None, "got NoneType"),
])
def test_fuse_of_no_module_says_what_it_expected(model, hint):
    with pytest.raises(TypeError, match="fuse: expected model to be an nn.Module") as e:
        fuse(model)
    assert hint in str(e.value)


def test_fuse_inplace_must_be_a_bool():
    with pytest.raises(TypeError, match="fuse: expected inplace to be True or False, got 'no'"):
        fuse(tv_model("resnet18"), inplace="no")


def test_a_partly_converted_model_runs_torchvisions_math():
    # layer4 in fp16 inside an fp32 model: torchvision's forward raises, and so must ours
    # rather than fold the rounded weights back to fp32.
    fused = fuse(tv_model("resnet18"))
    fused.layer4.half()
    assert "layer4.0.conv1 is torch.float16 where conv1 is torch.float32" in \
        fused.fused_status(torch.randn(1, 3, 32, 32))[1]
    with pytest.raises(RuntimeError), torch.inference_mode():
        fused(torch.randn(1, 3, 32, 32))


def _relu_to_gelu(m):
    m.relu = nn.GELU()


def _block_relu_to_leaky(m):
    m.layer1[0].relu = nn.LeakyReLU(0.1)


def _layer4_identity(m):
    torch.manual_seed(0)
    m.layer4, m.fc = nn.Identity(), nn.Linear(256, 10)


def _hook_on_layer2(m):
    m.layer2.register_forward_hook(lambda mod, inp, out: out * 0.5)


@pytest.mark.parametrize("change, why", [
    (_relu_to_gelu, "relu is GELU, not ReLU"),
    (_block_relu_to_leaky, "layer1.0.relu is LeakyReLU"),
    (_layer4_identity, "layer4 is Identity"),
    (_hook_on_layer2, "layer2 has a forward hook"),
])
def test_a_change_it_does_not_compute_runs_torchvision(change, why):
    # Made after a fused forward, whose fold must then not be reused.
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        fused(x)
        change(tv), change(fused)
        ours = fused(x)
        assert torch.equal(ours, tv(x))  # torchvision's own forward
    assert any("running the unfused forward" in str(w.message) and why in str(w.message)
               for w in caught)
    ok, reason = fused.fused_status(x)
    assert not ok and why in reason


def _maxpool_ceil(m):
    m.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)


def _maxpool_identity(m):
    m.maxpool = nn.Identity()


def _maxpool_hook(m):
    m.maxpool.register_forward_hook(lambda mod, inp, out: out * 0.5)


@pytest.mark.parametrize("change", [None, _maxpool_ceil, _maxpool_identity, _maxpool_hook],
                         ids=["plain", "ceil_mode", "identity", "hook"])
def test_the_max_pool_is_the_models(change):
    # The plain 3x3/2 pool runs as ops.max_pool2d on CPU; any other module in its place,
    # or a hook on it, runs as the module, as in torchvision.
    tv = tv_model("resnet18")
    fused = fuse(tv)
    if change is not None:
        change(tv), change(fused)
    x = torch.randn(2, 3, 64, 64)  # 32x32 after the stem: ceil_mode pools to 17x17, not 16x16
    with torch.inference_mode(), torch.profiler.profile() as prof:
        ours = fused(x)
    assert rel_err(ours, tv(x)) <= fp32_bound(tv, x)
    ran = any(e.name == "resnet_fused::max_pool2d" for e in prof.events())
    assert ran == (change is None)


def _fc_hook(m):
    m.fc.register_forward_hook(lambda mod, inp, out: out * 0.5)


def _fc_sequential(m):
    torch.manual_seed(0)
    m.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 10)).eval()


def _fc_weight_scaled(m):
    with torch.no_grad():
        m.fc.weight.mul_(2)


@pytest.mark.parametrize("change", [None, _fc_weight_scaled, _fc_hook, _fc_sequential],
                         ids=["plain", "weight_scaled", "hook", "sequential"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_fc_is_the_models(change, dtype):
    # At batch 1 a plain nn.Linear and the average pool before it run as one op of ours in
    # fp32 (ops.mean_linear); in bf16 the fc runs through oneDNN with its weight packed,
    # repacked when it changes. Any other head, or a hook on it, runs as the module.
    if dtype == torch.bfloat16 and not BF16:
        pytest.skip("no bfloat16 convolutions on this CPU")
    tv = tv_model("resnet18").to(dtype)
    fused = fuse(tv)
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    with torch.inference_mode():
        fused(x)
    if change is not None:
        change(tv), change(fused)
        fused.to(dtype), tv.to(dtype)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        ours = fused(x)
        ref = tv(x)
    if dtype == torch.float32:
        assert rel_err(ours, ref) <= fp32_bound(tv, x)
    else:  # within twice torchvision's own bf16 error against fp32
        exact = tv_model("resnet18")
        if change is not None:
            change(exact)
        ref32 = exact(x.float())
        assert rel_err(ours, ref32) <= 2 * rel_err(ref, ref32)
    names = {e.name for e in prof.events()}
    plain = change in (None, _fc_weight_scaled)
    assert ("resnet_fused::mean_linear" in names) == (plain and dtype == torch.float32)
    assert ("mkldnn::_linear_pointwise" in names) == (
        plain and dtype == torch.bfloat16 and dispatch._LINEAR_PACKING)


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_a_bottleneck_downsample_sums_with_the_last_conv(arch):
    # Where conv1x1 computes both a Bottleneck's last conv and its downsample, one
    # conv1x1_sum computes their sum: once per stage in ResNet-50, never in ResNet-18
    # (its blocks' last conv is a 3x3).
    tv = tv_model(arch)
    fused = fuse(tv)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode(), torch.profiler.profile() as prof, kernel_runs() as runs:
        ours = fused(x)
    with torch.inference_mode():
        ref = tv(x)
    assert rel_err(ours, ref) <= fp32_bound(tv, x)
    names = [e.name for e in prof.events()]
    expected = 4 if arch == "resnet50" and _extension.conv1x1_kernel_available() else 0
    assert names.count("resnet_fused::conv1x1_sum") == runs["conv1x1_sum"] == expected
    # Every conv1x1 call the model makes, the kernel computes.
    assert runs["conv1x1"] == names.count("resnet_fused::conv1x1")


@pytest.mark.skipif(not BF16, reason="no bfloat16 convolutions on this CPU")
def test_cpu_bf16_runs_every_1x1_conv_on_conv1x1():
    # ResNet-50's 36 1x1 convs in bfloat16: on conv1x1's kernel where it runs (AVX-512
    # with a bfloat16 brgemm, not AMX unless asked for), each stage's first downsample
    # summed with its block's last conv; else on oneDNN's, each a conv_bias_act call.
    fused = fuse(tv_model("resnet50")).to(torch.bfloat16)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode(), torch.profiler.profile() as prof, kernel_runs() as counted:
        ours = fused(x.bfloat16())
    names = [e.name for e in prof.events()]
    ones = (names.count("resnet_fused::conv1x1") + names.count("resnet_fused::conv1x1_add_relu_")
            + 2 * names.count("resnet_fused::conv1x1_sum"))
    assert ones == (counted["conv1x1"] + counted["conv1x1_add_relu_"]
                    + 2 * counted["conv1x1_sum"])  # each computed by the kernel itself
    runs = _extension.conv1x1_bf16_kernel_available() and (
        not dispatch._AMX or dispatch._BF16_ON_AMX)
    # (and one more for each 3x3 conv run over its im2col rows: layer3-4's at 64x64)
    assert ones == (36 + names.count("resnet_fused::im2col") if runs else 0)
    assert names.count("resnet_fused::conv1x1_sum") == (4 if runs else 0)
    ref = tv_model("resnet50").double()(x.double())
    theirs = tv_model("resnet50").to(torch.bfloat16)(x.bfloat16())
    assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref)


@pytest.mark.parametrize("batch", [1, 8])
def test_fp32_error_within_twice_torchvisions(batch):
    # The fp32 target: against an fp64 reference, at most 2x torchvision's own error
    # (this CPU's, whatever its vector ISA). A head through oneDNN's inner product at
    # batch 8 once measured 2.9x.
    tv = tv_model("resnet50")
    fused = fuse(tv)
    x = torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = copy.deepcopy(tv).double()(x.double())
        assert rel_err(fused(x), ref) <= 2 * rel_err(tv(x), ref)


def test_refresh_fold_repacks_the_fc():
    # Writes through .data are not seen by the watch; refresh_fold() drops the packed fc
    # weight with the folded convs.
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        fused(x)
    for m in (tv, fused):
        m.fc.weight.data.mul_(-1.0)
    fused.refresh_fold()
    with torch.inference_mode():
        assert rel_err(fused(x), tv(x)) <= fp32_bound(tv, x)


def test_more_input_shapes_than_the_caches_keep(monkeypatch):
    # oneDNN-packed weights and kernel routes are kept for the few input shapes used
    # last per conv (dispatch.PreparedConv.MAX_PACKED_SHAPES), recorded plans for the
    # few used last per fold (model._MAX_PLANS): every shape, early or late, first seen
    # or replayed, gets torchvision's answer, and the last shapes used have their packs
    # and, once seen twice in a row, their plan. The stem, kept on oneDNN's conv, shows
    # the packs.
    monkeypatch.setattr(dispatch, "_stem_pays", lambda x, c: False)
    tv = tv_model("resnet50")
    fused = fuse(tv)
    sizes = [(1, 48), (2, 48), (1, 56), (2, 64), (1, 72), (3, 40), (1, 80), (2, 56), (1, 96),
             (2, 40)]
    xs = [torch.randn(n, 3, s, s + 8, generator=torch.Generator().manual_seed(i))
          for i, (n, s) in enumerate(sizes)]
    with torch.inference_mode():
        refs = [tv(x) for x in xs]
    bounds = [fp32_bound(tv, x) for x in xs]
    with torch.inference_mode():
        for _ in range(3):  # ten shapes in turn through four plan slots: walks only
            for x, ref, bound in zip(xs, refs, bounds):
                assert rel_err(fused(x), ref) <= bound, tuple(x.shape)
    (fold,) = fused._fold_cache.values()
    stem = fold.stem  # oneDNN's conv (conv_bias_act) at every size: packed per input shape
    assert list(stem.packed) == [tuple(x.shape) for x in xs[-stem.MAX_PACKED_SHAPES:]]
    assert len(stem.routes) <= 2 * stem.MAX_PACKED_SHAPES
    assert {tuple(k[0]) for k in stem.routes} <= set(stem.packed)  # no pack outlives its slot
    assert len(fold.plans) <= 4
    with torch.inference_mode():
        for _ in range(3):  # a late shape, now the traffic: walked, recorded, replayed
            assert rel_err(fused(xs[5]), refs[5]) <= bounds[5]
    assert any(key[0] == xs[5].shape and callable(plan) for key, plan in fold.plans.items())
    # A shape in use keeps its pack when a new one comes: packs now of xs[7], 8, 9 and 5;
    # xs[7] used again, then xs[0] new: xs[8]'s goes, the least recently used.
    with torch.inference_mode():
        fused(xs[7])
        fused(xs[0])
    assert list(stem.packed) == [tuple(x.shape) for x in (xs[9], xs[5], xs[7], xs[0])]
