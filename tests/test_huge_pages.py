"""resnet_fused.huge_pages and ops' huge_page_copy: large CPU weights in huge pages."""

import gc
import sys
import warnings

import pytest
import torch

from resnet_fused import _extension, dispatch, huge_pages
from resnet_fused.model import fuse
from common_utils import tv_model

pytestmark = pytest.mark.skipif(not _extension.available(), reason=str(_extension.load_error()))

MiB = 1 << 20
offered = pytest.mark.skipif(not sys.platform.startswith("linux") or not huge_pages.huge_page_bytes(),
                             reason="the kernel offers no transparent huge pages")


def _copy(t, size=2 * MiB):
    return torch.ops.resnet_fused.huge_page_copy(t, size)


def _mapping(address):
    """(start, end) of the mapping of this process that holds address."""
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            if start <= address < end:
                return start, end
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("make,dense", [
    (lambda: torch.randn(3 * MiB // 4 + 5), True),                          # not a page multiple
    (lambda: torch.randn(8, 64, 56, 56).contiguous(memory_format=torch.channels_last), True),
    (lambda: torch.randn(1024, 1536)[:, ::2], False),
    (lambda: torch.randn(600, 3000).to(torch.bfloat16).t(), True),          # permuted
    (lambda: torch.empty(0, 7), True),
], ids=["1d", "channels_last", "strided", "bf16-transposed", "empty"])
def test_copy_keeps_values_and_layout(make, dense):
    t = make()
    out = _copy(t)
    assert out.dtype == t.dtype and out.shape == t.shape and torch.equal(out, t)
    assert out.data_ptr() != t.data_ptr() or t.numel() == 0
    # A dense tensor keeps its strides; any other comes back contiguous.
    assert out.stride() == (t.stride() if dense else torch.empty(t.shape).stride())


@offered
def test_copy_is_aligned_and_no_larger_than_the_tensor():
    # The mapping starts on a huge-page boundary and ends at the tensor's last small
    # page: the head and tail of the over-sized mmap went back.
    size = huge_pages.huge_page_bytes()
    t = torch.randn(5 * size // 4 // 4 + 3)
    out = _copy(t, size)
    page = 4096
    assert out.data_ptr() % size == 0
    assert _mapping(out.data_ptr()) == (out.data_ptr(),
                                        out.data_ptr() + -(-t.numel() * 4 // page) * page)


def test_a_view_outlives_the_copy():
    out = _copy(torch.arange(MiB, dtype=torch.float32))
    tail = out[-3:]
    del out
    gc.collect()
    assert tail.tolist() == [MiB - 3, MiB - 2, MiB - 1]


def test_bad_input():
    with pytest.raises(RuntimeError, match="huge_page_bytes a power of two, got 3"):
        _copy(torch.randn(4), 3)


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


@offered
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_weights_in_huge_pages(monkeypatch, dtype):
    # ResNet-18's layer4 takes its 3x3 convs to Winograd at batch 1 (their weights,
    # 16.8 MB in float32, are the largest): each large weight the fold made is aligned,
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
