"""Load failures: each gets one clear message, and nothing is half-loaded."""

import subprocess
import sys
import textwrap
import urllib.error

import pytest
import torch

import resnet_fused


def _run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True)


def test_missing_library_falls_back_with_one_warning():
    r = _run("""
        import sys, warnings
        sys.modules["resnet_fused._C"] = None          # as if the library failed to load
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, torchvision, resnet_fused
            assert not resnet_fused.available()
            print("ERROR:", resnet_fused.load_error())
            tv = torchvision.models.resnet18().eval()
            model = resnet_fused.fuse(tv)
            x = torch.randn(1, 3, 32, 32)
            with torch.inference_mode():
                assert torch.equal(model(x), tv(x))      # torchvision's math
                model(x)
            try:
                resnet_fused.ops.add_relu(x, x)
            except RuntimeError as e:
                print("OPS:", e)
        print("WARNINGS:", len([w for w in caught if issubclass(w.category, RuntimeWarning)]))
    """)
    assert r.returncode == 0, r.stderr
    assert "ERROR: resnet_fused._C failed to load" in r.stdout
    assert "OPS: resnet_fused._C failed to load" in r.stdout
    # One at import, one when the model first falls back.
    assert "WARNINGS: 2" in r.stdout


def test_library_built_for_another_torch_is_refused():
    r = _run("""
        import warnings, torch
        warnings.simplefilter("ignore")
        import resnet_fused._C as C
        real = torch.__version__
        torch.__version__ = "9.9.9"                      # pretend torch was upgraded
        import importlib, resnet_fused._extension as ext
        importlib.reload(ext)
        print(ext.available(), ext.load_error())
    """)
    assert r.returncode == 0, r.stderr
    assert "False" in r.stdout and "built against torch" in r.stdout and "9.9.9" in r.stdout


def test_offline_download_error_is_clear(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="could not download .*pass a path to a saved state_dict"):
        resnet_fused.resnet18(weights="IMAGENET1K_V1")


def test_state_dict_mismatches_are_named():
    model = resnet_fused.resnet18()
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "fc.bias"}
    with pytest.raises(RuntimeError, match="Missing key.*fc.bias"):
        model.load_state_dict(missing)
    with pytest.raises(RuntimeError, match="size mismatch for fc.weight"):
        resnet_fused.resnet18(num_classes=10).load_state_dict(state)
    with pytest.raises(ValueError, match="num_classes"):
        resnet_fused.resnet18(weights="IMAGENET1K_V1", num_classes=10)


@pytest.mark.parametrize("archs, capability, runs", [
    ("9.0", (9, 0), True), ("9.0", (8, 0), False), ("8.0", (8, 6), True), ("8.6", (8, 0), False),
    ("8.0;9.0", (9, 0), True), ("8.0+PTX", (9, 0), True), ("9.0a", (9, 0), True),
    ("9.0", (10, 0), False), ("7.5 8.0", (8, 9), True),
])
def test_cuda_arch_compatibility_rule(archs, capability, runs):
    from resnet_fused._extension import _runs_on
    assert _runs_on(archs, *capability) is runs


def test_gpu_of_another_arch_is_named(monkeypatch):
    from resnet_fused import _extension
    monkeypatch.setattr(_extension, "_C", type("C", (), {"cuda_archs": "9.0"}))
    monkeypatch.setattr(_extension, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    _extension.cuda_arch_error.cache_clear()
    try:
        message = _extension.cuda_arch_error("cuda:0")
    finally:
        _extension.cuda_arch_error.cache_clear()
    assert message == ("resnet_fused._C was built for CUDA archs 9.0 but NVIDIA A100 is sm_80; "
                       "rebuild with TORCH_CUDA_ARCH_LIST=8.0")


@pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")
def test_cpu_isa_cap_is_read_and_checked():
    code = "import resnet_fused._extension as e; print(e.cpu_isa(), e.winograd_kernel_available())"
    env_run = lambda value: subprocess.run(  # noqa: E731
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
        env={**__import__("os").environ, "RESNET_FUSED_CPU_ISA": value})
    r = env_run("none")
    assert r.returncode == 0 and r.stdout.split() == ["none", "False"], r.stderr
    r = env_run("sse9")
    assert r.returncode == 0, r.stderr
    assert "RESNET_FUSED_CPU_ISA: expected one of avx512, avx2, none, got 'sse9'" in r.stderr
