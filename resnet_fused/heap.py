"""Keeping freed activation memory in the process between CPU forwards (glibc).

By default glibc hands large freed blocks back to the kernel: blocks above the
mmap threshold at once, and the top of the heap once more than twice that is free
(the threshold adapts to the largest block freed so far, up to 32 MiB).
The next forward then takes a page fault per 4 KiB it writes. ResNet-50 at
batch 8 frees ~51 MB per forward this way, and in a process that also runs other
work, its next forward took 11k-17k minor faults, ~12 ms of ~270 (AMD EPYC Zen 4,
2 threads). Inference engines avoid this with an arena of their own. Our
activations are allocated by ATen, so instead glibc is asked to keep blocks up to
32 MiB (its largest mmap threshold) on the heap, and up to KEEP_BYTES of free heap
top in the process.

This is process-wide, so it is done once, on the first fused CPU forward, and not
at all when RESNET_FUSED_KEEP_HEAP=0, when the user has tuned glibc's malloc
through its MALLOC_*_ variables, or when the C library is not glibc.
"""

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
KEEP_BYTES = 256 << 20      # free heap top kept in the process at most

_USER_TUNING = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                "MALLOC_MMAP_MAX_")
_state = None  # None until tried; then the reason it was not done, or "" if done


def keep_freed_memory():
    """Ask glibc to keep freed activation memory (once per process). Returns "" if
    it did, else why not."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply():
    if os.environ.get("RESNET_FUSED_KEEP_HEAP", "1") == "0":
        return "RESNET_FUSED_KEEP_HEAP=0"
    user = [v for v in _USER_TUNING if v in os.environ]
    if user:
        return f"the environment sets {user[0]}"
    if not sys.platform.startswith("linux"):
        return "the C library is not glibc"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # raises AttributeError outside glibc (musl)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "the C library is not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either value stops glibc's own adjustment of both, so both are set.
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES)):
        return "glibc refused the mallopt settings"
    return ""
