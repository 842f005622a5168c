"""What the build produced: an extension that shares torch's C++ runtime.

A compiler that cannot find libstdc++.so links libstdc++.a into the extension; the
process then holds two C++ runtimes, and on a GPU machine whose compiler did that the
first error message that formatted a number crashed Python (setup.py now links torch's
libstdc++ in that case)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import resnet_fused

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")


def _needed(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects")
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_the_extension_links_torchs_libstdcxx():
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    if not os.path.exists(torch_lib) or not any(n.startswith("libstdc++.so")
                                                for n in _needed(torch_lib)):
        pytest.skip("this torch does not link libstdc++ dynamically from torch/lib/libc10.so")
    needed = _needed(resnet_fused._C.__file__)
    assert any(n.startswith("libstdc++.so") for n in needed), (
        f"resnet_fused._C links no libstdc++.so (it needs {needed}): a static copy of the C++ "
        "runtime beside torch's")


def test_an_error_message_with_numbers_raises():
    """The crash this guards against, as a user meets it: in a subprocess, so that a
    crash fails this test rather than ending the suite."""
    code = ("import torch, resnet_fused\n"
            "from resnet_fused import ops\n"
            "x, w = torch.randn(1, 8, 5, 5), torch.randn(16, 8, 3, 3)\n"
            "try:\n"
            "    ops.conv_bias_act(x, w, None, torch.randn(1, 16, 4, 4), 1, 1)\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr[-2000:]}"
    assert "expected residual of the output's shape [1, 16, 5, 5], got [1, 16, 4, 4]" in r.stdout
