"""Large pre-transformed CPU weights in transparent huge pages (Linux).

At batch 1 a CPU forward reads each weight once, from DRAM: ResNet-50's Winograd
and 1x1 weights are ~100 MB, three times a 32 MiB L3. In 4 KiB pages the products
that stream them take a TLB miss, a page walk, every 4 KiB; in 2 MiB pages 512
times fewer. glibc's malloc, which holds torch's tensors, asks for no huge pages,
so each weight of at least one huge page is copied once, when the model makes it
(on the first forward that needs it), into a mapping of its own that asks for them
(torch.ops.resnet_fused.huge_page_copy).

Measured (AMD EPYC Zen 4, 2 threads, fp32, the weights cold as in a forward):
winograd_conv3x3 at 256 channels 14x14 F(4x4) 0.513 ms instead of 0.567, and at
512 channels 7x7 F(2x2) 0.814 instead of 0.897.

Nothing changes where the kernel offers no transparent huge pages of its PMD size
(THP "never", not Linux), with a build older than the op, or with
RESNET_FUSED_HUGE_PAGES=0.
"""

import functools
import os

import torch

from . import _extension

_SYSFS = "/sys/kernel/mm/transparent_hugepage"


def _setting(path):
    """The bracketed choice of a THP sysfs file ("always", "madvise", "never",
    "inherit"), or None where there is no such file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.find("[") + 1:text.find("]")] if "[" in text else None


@functools.lru_cache(maxsize=None)
def huge_page_bytes():
    """The size of a transparent huge page (the PMD size), or 0 where the kernel offers
    none. Kernels from 6.8 set it per size (hugepages-<kB>kB/enabled, "inherit" meaning
    the top-level setting)."""
    try:
        with open(os.path.join(_SYSFS, "hpage_pmd_size")) as f:
            size = int(f.read())
    except (OSError, ValueError):
        return 0
    mode = _setting(os.path.join(_SYSFS, f"hugepages-{size // 1024}kB", "enabled"))
    if mode in (None, "inherit"):
        mode = _setting(os.path.join(_SYSFS, "enabled"))
    return size if mode in ("always", "madvise") else 0


def why_off():
    """Why weights made from now on stay in small pages, or None if they go to huge pages."""
    if os.environ.get("RESNET_FUSED_HUGE_PAGES", "1") == "0":
        return "RESNET_FUSED_HUGE_PAGES=0"
    if not _extension.available():
        return f"the extension is not loaded: {_extension.load_error()}"
    if not _extension.has_kernel("huge_page_copy", "cpu"):
        return "this build of the extension has no huge_page_copy; rebuild it"
    if not huge_page_bytes():
        return ("needs Linux with transparent huge pages 'always' or 'madvise' "
                f"({_SYSFS})")
    return None


def to_huge_pages(t):
    """t, or where it spans at least one huge page, is a plain CPU tensor and huge pages
    are on (why_off() is None), a copy of it in huge pages (the same values and strides)."""
    if (not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.layout != torch.strided
            or t.requires_grad or why_off() is not None):
        return t
    size = huge_page_bytes()
    if t.numel() * t.element_size() < size:
        return t
    return torch.ops.resnet_fused.huge_page_copy(t, size)
