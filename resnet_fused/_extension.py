"""Loads the compiled library resnet_fused._C, guarded.

If it cannot be loaded (not built, built against another torch, a missing shared
library), the package still imports: `available()` is False, `load_error()` says
why in one line, and the model runs torchvision's math after one warning.
"""

import functools
import os
import warnings

import torch

_error = None
_C = None


def _release(version):
    """'2.11.0+cu128' -> '2.11.0': local build tags do not change the ABI."""
    return version.split("+")[0]


try:
    from . import _C  # noqa: F811  (registers torch.ops.resnet_fused.*)
except ImportError as e:  # also OSError subclasses raised through ImportError
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "undefined symbol" in msg:
        _error = (f"resnet_fused._C was built against a different torch than the installed "
                  f"torch {torch.__version__} ({msg}); rebuild it: pip install --no-build-isolation .")
    elif "No module named" in msg:
        _error = ("resnet_fused._C is not built; build it with `pip install --no-build-isolation .` "
                  "or `python setup.py build_ext --inplace`")
    else:
        _error = f"resnet_fused._C failed to load: {msg}"
except OSError as e:
    _error = f"resnet_fused._C failed to load: {e}"
else:
    built, running = _release(_C.torch_version), _release(torch.__version__)
    if built != running:
        # The library loaded, but its ABI may not match: do not trust it.
        _error = (f"resnet_fused._C was built against torch {built} but torch {running} is "
                  "installed; rebuild it: pip install --no-build-isolation .")

_ISA_CAPS = ("avx512", "avx2", "none")
if os.environ.get("RESNET_FUSED_CPU_ISA", "") not in _ISA_CAPS + ("",):
    warnings.warn(f"RESNET_FUSED_CPU_ISA: expected one of {', '.join(_ISA_CAPS)}, got "
                  f"{os.environ['RESNET_FUSED_CPU_ISA']!r}; ignoring it", RuntimeWarning, stacklevel=2)

if _error is not None:
    warnings.warn(f"{_error}. Falling back to torchvision's (unfused) math.", RuntimeWarning,
                  stacklevel=2)


def available():
    """True when the compiled ops are loaded and usable."""
    return _error is None


def load_error():
    """Why the compiled ops are unavailable, or None."""
    return _error


def has_kernel(op_name, device_type):
    """Whether torch.ops.resnet_fused.<op_name> has a kernel for this device type."""
    if not available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op_name}", key)
    except RuntimeError:  # a build older than the op: "operator ... does not exist"
        return False


def cpu_isa():
    """The vector ISA our CPU kernels use here: "avx512", "avx2" or "none" (the CPU's
    best, capped by RESNET_FUSED_CPU_ISA)."""
    return _C.cpu_isa if available() else "none"


def winograd_kernel_available():
    """Whether winograd_conv3x3 runs its own kernel here (AVX2+FMA or AVX-512);
    else it computes through conv_bias_act, correct but not faster."""
    return available() and bool(_C.winograd_kernel)


def conv1x1_kernel_available():
    """Whether conv1x1 runs its own kernel here (this torch's fp32 brgemm runs on this
    CPU); else it computes through conv_bias_act."""
    return available() and bool(getattr(_C, "conv1x1_kernel", 0))


def conv1x1_bf16_kernel_available():
    """Whether conv1x1 runs its own kernel for bfloat16 too (AVX-512 with a bfloat16
    brgemm that runs: AVX512_BF16 or AMX)."""
    return available() and bool(getattr(_C, "conv1x1_bf16_kernel", 0))


def grouped_conv_kernel_available():
    """Whether grouped_conv3x3 runs its own kernel here (AVX2+FMA or AVX-512); else it
    computes through conv_bias_act."""
    return available() and bool(getattr(_C, "grouped_conv_kernel", 0))


def stem_conv_kernel_available():
    """Whether stem_conv runs its own kernel here (AVX2+FMA or AVX-512); else it computes
    through conv_bias_act."""
    return available() and bool(getattr(_C, "stem_conv_kernel", 0))


def winograd_bf16_kernel_available():
    """Whether it also runs its bfloat16 kernel here (AVX-512 with a bfloat16 brgemm
    that runs: AVX512_BF16 or AMX)."""
    return available() and bool(getattr(_C, "winograd_bf16_kernel", 0))


def built_with_cuda():
    return available() and bool(_C.with_cuda)


def _runs_on(archs, major, minor):
    """Whether code built for TORCH_CUDA_ARCH_LIST-style `archs` ("8.0;9.0+PTX")
    runs on a GPU of compute capability major.minor: a cubin runs on its own
    major version at an equal or higher minor; PTX compiles for any later GPU."""
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX").rstrip("a")
        try:
            a_major, a_minor = (int(v) for v in arch.split("."))
        except ValueError:
            continue
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= (major, minor)):
            return True
    return False


@functools.lru_cache(maxsize=None)
def cuda_arch_error(device):
    """A one-line reason why the CUDA kernels cannot run on `device`, or None."""
    archs = getattr(_C, "cuda_archs", "") if available() else ""
    if not archs:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if _runs_on(archs, major, minor):
        return None
    return (f"resnet_fused._C was built for CUDA archs {archs} but {torch.cuda.get_device_name(device)} "
            f"is sm_{major}{minor}; rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
