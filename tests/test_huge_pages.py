"""resnet_fused.huge_pages and ops' huge_page_copy: large CPU weights in huge pages."""

import gc
import os
import sys
import warnings

import pytest
import torch

from resnet_fused import _extension, dispatch, huge_pages
from resnet_fused.model import fuse
from common_utils import tv_model

pytestmark = pytest.mark.skipif(not _extension.available(), reason=str(_extension.load_error()))

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
offered = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not 0 < huge_pages.huge_page_bytes() <= 64 * MiB,
    reason="the kernel offers no transparent huge pages (or only ones too large to test)")


@pytest.fixture(autouse=True)
def _default_setting(monkeypatch):
    monkeypatch.delenv("RESNET_FUSED_HUGE_PAGES", raising=False)


def _copy(t, size=2 * MiB):
    return torch.ops.resnet_fused.huge_page_copy(t, size)


def _mapping(address):
    """(start, end, VmFlags) of the mapping of this process that holds address, or None."""
    with open("/proc/self/smaps") as f:
        found = None
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                if found:
                    return found
                start, end = (int(v, 16) for v in head.split("-"))
                found = (start, end, "") if start <= address < end else None
            elif found and line.startswith("VmFlags:"):
                found = (found[0], found[1], line.split()[1:])
        return found


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3 * MiB // 4 + 5),                                   # not a page multiple
    lambda: torch.randn(8, 64, 56, 56).contiguous(memory_format=torch.channels_last),
    lambda: torch.randn(1024, 1536)[:, ::2],                                 # not dense
    lambda: torch.randn(600, 3000).to(torch.bfloat16).t(),                   # dense, permuted
    lambda: torch.empty(0, 7),
], ids=["1d", "channels_last", "strided", "bf16-transposed", "empty"])
def test_copy_keeps_values_and_layout(make):
    t = make()
    out = _copy(t)
    assert out.dtype == t.dtype and out.shape == t.shape and torch.equal(out, t)
    assert out.data_ptr() != t.data_ptr() or t.numel() == 0
    # empty_like's strides: a dense tensor's own, else dense in the same order.
    assert out.stride() == torch.empty_like(t).stride()
    torch.library.opcheck(torch.ops.resnet_fused.huge_page_copy.default, (t, 2 * MiB))


@offered
def test_copy_is_one_huge_page_mapping_no_larger_than_the_tensor():
    # The mapping starts on a huge-page boundary, asks for huge pages ("hg"), and ends at
    # the tensor's last small page: the head and tail of the over-sized mmap went back.
    size = huge_pages.huge_page_bytes()
    t = torch.randn(5 * size // 4 // 4 + 3)
    out = _copy(t, size)
    start, end, flags = _mapping(out.data_ptr())
    assert out.data_ptr() % size == 0 and "hg" in flags, flags
    assert (start, end) == (out.data_ptr(), out.data_ptr() + -(-t.numel() * 4 // PAGE) * PAGE)


@offered
def test_a_view_outlives_the_copy_and_then_the_memory_goes_back():
    out = _copy(torch.arange(MiB, dtype=torch.float32), huge_pages.huge_page_bytes())
    address = out.data_ptr()
    tail = out[-3:]
    del out
    gc.collect()
    assert tail.tolist() == [MiB - 3, MiB - 2, MiB - 1]
    assert _mapping(address) is not None
    del tail
    gc.collect()
    gone = _mapping(address)
    assert gone is None or "hg" not in gone[2], gone


def test_bad_input():
    for bad in (3, 0, 1 << 31):
        with pytest.raises(RuntimeError, match=f"huge_page_bytes a power of two up to 2\\^30, "
                                               f"got {bad}"):
            _copy(torch.randn(4), bad)


@offered
def test_to_huge_pages_moves_only_large_tensors(monkeypatch):
    size = huge_pages.huge_page_bytes()
    small = torch.randn(size // 4 - 1)
    assert huge_pages.to_huge_pages(small) is small
    large = torch.randn(size // 4)
    moved = huge_pages.to_huge_pages(large)
    assert moved.data_ptr() % size == 0 and torch.equal(moved, large)
    needs_grad = large.clone().requires_grad_()
    assert huge_pages.to_huge_pages(needs_grad) is needs_grad
    if torch.backends.mkldnn.is_available():  # oneDNN's opaque layout stays where it is
        opaque = large.view(-1, 64).to_mkldnn()
        assert huge_pages.to_huge_pages(opaque) is opaque
    monkeypatch.setenv("RESNET_FUSED_HUGE_PAGES", "0")
    assert huge_pages.to_huge_pages(large) is large
    assert huge_pages.why_off() == "RESNET_FUSED_HUGE_PAGES=0"


def test_a_build_without_the_op_keeps_weights_where_they_are(monkeypatch):
    assert _extension.has_kernel("no_such_op", "cpu") is False   # an older build's view
    monkeypatch.setattr(_extension, "has_kernel", lambda op, device: False)
    assert "rebuild" in huge_pages.why_off()
    large = torch.randn(16 * MiB)
    assert huge_pages.to_huge_pages(large) is large


@pytest.mark.parametrize("top,per_size,expected", [
    ("always [madvise] never", "always inherit madvise [never]", 0),
    ("always madvise [never]", "always inherit [madvise] never", 2 * MiB),
    ("always madvise [never]", "always [inherit] madvise never", 0),
    ("[always] madvise never", "always [inherit] madvise never", 2 * MiB),
    ("always [madvise] never", None, 2 * MiB),                       # kernels before 6.8
    ("always madvise [never]", None, 0),
])
def test_huge_page_size_follows_the_kernel_settings(tmp_path, monkeypatch, top, per_size,
                                                    expected):
    (tmp_path / "enabled").write_text(top + "\n")
    (tmp_path / "hpage_pmd_size").write_text(f"{2 * MiB}\n")
    if per_size is not None:
        (tmp_path / "hugepages-2048kB").mkdir()
        (tmp_path / "hugepages-2048kB" / "enabled").write_text(per_size + "\n")
    monkeypatch.setattr(huge_pages, "_SYSFS", str(tmp_path))
    huge_pages.huge_page_bytes.cache_clear()
    try:
        assert huge_pages.huge_page_bytes() == expected
    finally:
        monkeypatch.undo()
        huge_pages.huge_page_bytes.cache_clear()


@offered
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_weights_in_huge_pages(monkeypatch, dtype):
    # ResNet-18's layer4 takes its 3x3 convs to Winograd at batch 1 (their weights,
    # 16.8 MB in float32, are the largest): each large weight the model made is aligned,
    # and the output is the same bits as with RESNET_FUSED_HUGE_PAGES=0.
    monkeypatch.setattr(dispatch, "_BF16_ON_AMX", True)  # (bf16 kernels are off by default on AMX)
    size = huge_pages.huge_page_bytes()
    x = torch.randn(1, 3, 224, 224, dtype=dtype)
    outs, large = [], []
    for setting in ("1", "0"):
        monkeypatch.setenv("RESNET_FUSED_HUGE_PAGES", setting)
        fused = fuse(tv_model("resnet18")).to(dtype).eval()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unfused fallback's, where bf16 has no kernel
            outs.append(fused(x))
        convs = [c for fold in fused._fold_cache.values()  # (none where the model runs unfused)
                 for _, blocks in fold.layers for block in blocks for c in block.values()]
        weights = [w for c in convs for w in (*c.winograd.values(), c.conv1x1_panels)
                   if w is not None and w.numel() * w.element_size() >= size]
        large.append([w.data_ptr() % size == 0 for w in weights])
    if not large[1]:
        pytest.skip(f"no {dtype} Winograd or 1x1 weight of a huge page or more is made here")
    assert torch.equal(outs[0], outs[1])
    assert len(large[0]) == len(large[1]) and all(large[0]), large[0]
    assert not all(large[1]), large[1]


@offered
def test_grouped_weight_in_huge_pages():
    # ResNeXt-101 64x4d's layer4: 2048 channels in 64 groups, a 2.25 MiB weight in blocks.
    if not _extension.grouped_conv_kernel_available():
        pytest.skip("no grouped_conv3x3 kernel here")
    conv = torch.nn.Conv2d(2048, 2048, 3, padding=1, groups=64, bias=False)
    c = dispatch.prepare(conv.weight.detach(), torch.zeros(2048), conv, torch.float32)
    x = torch.randn(1, 2048, 7, 7).contiguous(memory_format=torch.channels_last)
    kind, w = c.kernel_for(x)
    assert kind == "grouped"
    if w.numel() * w.element_size() < huge_pages.huge_page_bytes():
        pytest.skip("the blocked weight is smaller than one huge page here")
    assert w.data_ptr() % huge_pages.huge_page_bytes() == 0
