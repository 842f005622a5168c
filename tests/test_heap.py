"""resnet_fused.heap: freed activation memory stays in the process (glibc)."""

import json
import os
import subprocess
import sys

import pytest

# In a fresh interpreter: optionally keep_freed_memory(), then three rounds of
# three 24 MB blocks written and freed, the last first, so that 72 MB come free at
# the heap top (over glibc's own trim threshold once its mmap threshold has risen
# to 24 MB); the minor page faults of the last round, and keep_freed_memory()'s
# answer. Plain malloc keeps the pattern deterministic.
_PROBE = r"""
import ctypes, json, resource, sys
from resnet_fused import heap
state = heap.keep_freed_memory() if sys.argv[1] == "keep" else "not asked"
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = 0
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(24 << 20) for _ in range(3)]
    for b in blocks:
        libc.memset(b, 1, 24 << 20)
    for b in reversed(blocks):
        libc.free(b)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"state": state, "faults": faults}))
"""

needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None
    or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
    reason="glibc only")


def _probe(mode, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_keeps_freed_memory():
    default = _probe("default")
    pages = 3 * (24 << 20) // 4096
    if default["faults"] < pages // 2:
        pytest.skip(f"this allocator keeps the memory by itself ({default['faults']} faults)")
    kept = _probe("keep")
    assert kept["state"] == ""
    # Each round rewrites 72 MB: 18k pages when the memory went back to the kernel.
    assert kept["faults"] < pages // 20, kept


@needs_glibc
def test_user_choice_wins():
    assert _probe("keep", RESNET_FUSED_KEEP_HEAP="0")["state"] == "RESNET_FUSED_KEEP_HEAP=0"
    state = _probe("keep", MALLOC_TRIM_THRESHOLD_="1000000")["state"]
    assert state == "the environment sets MALLOC_TRIM_THRESHOLD_"
