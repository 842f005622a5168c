"""Build of the resnet_fused._C extension.

CUDA sources are compiled when a CUDA build of torch and a matching CUDA toolkit
are both present; otherwise the build is CPU-only. Overrides:
  FORCE_CUDA=1              build the CUDA sources (fails with a reason if impossible)
  RESNET_FUSED_CPU_ONLY=1   never build them
  TORCH_CUDA_ARCH_LIST      target archs (default: the visible GPU's, else 9.0; the
                            default 9.0 is 9.0a, which Hopper's wgmma kernel needs)
  RESNET_FUSED_CUTLASS_DIR  CUTLASS's source tree (include/, tools/util/include/) for the
                            Hopper kernels of csrc/cuda/cutlass_*.cu; by default ./.cutlass
                            (`make .cutlass`), else the nvidia-cutlass package's copy
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def fail(reason):
    # One line that says why; setuptools' own traceback would bury it.
    sys.exit(f"resnet_fused build failed: {reason}")


def flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


try:
    import torch
except ImportError:
    fail("torch is not installed; install torch first, then build with "
         "`pip install --no-build-isolation .`")


def find_cuda_home():
    """The toolkit root. A bare `nvcc` on PATH may be a wrapper script outside
    the toolkit, where torch's guess (dirname of dirname of nvcc) is wrong, so ask
    nvcc itself where its toolkit is."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.realpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            m = re.search(r"^#\$ TOP=(\S+)", out.stdout + out.stderr, re.M)
            if m:
                return os.path.realpath(m.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
        return os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return os.path.realpath("/usr/local/cuda")
    return None


def nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def wheel_cuda_includes(cuda_home):
    """Headers such as cusparse.h that torch's CUDA headers include may exist only
    inside the pip nvidia-* wheels torch depends on: the wheel folders that hold a
    header the toolkit lacks."""
    try:
        import nvidia
    except ImportError:
        return []
    toolkit = os.path.join(cuda_home, "include")
    dirs = []
    for root in nvidia.__path__:
        for d in sorted(glob.glob(os.path.join(root, "*", "include"))):
            headers = [h for h in os.listdir(d) if h.endswith((".h", ".hpp"))]
            if any(not os.path.exists(os.path.join(toolkit, h)) for h in headers):
                dirs.append(d)
    return dirs


def loaded_libstdcxx():
    """The libstdc++ this process has loaded (torch's), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        pass
    return None


def shared_libstdcxx_link_args():
    """A compiler that cannot find libstdc++.so links libstdc++.a into the extension
    (seen with a relocated GCC's wrapper in a CUDA image). The process then holds two
    C++ runtimes, and there the first error message that formatted a number crashed
    it, inside the static copy's ostream. So: link a probe library with CXX, and where
    it does not depend on libstdc++.so, link the one torch has loaded, by its path."""
    lib = loaded_libstdcxx()
    if lib is None or shutil.which("readelf") is None:
        return []
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write("#include <sstream>\n"
                    "std::string fmt(long v) { std::ostringstream s; s << v; return s.str(); }\n")
        try:
            linked = subprocess.run(cxx + ["-shared", "-fPIC", src, "-o", out],
                                    capture_output=True).returncode == 0
        except OSError:  # no such compiler
            linked = False
        if not linked:
            return []  # the build itself will say what is wrong with the compiler
        needed = subprocess.run(["readelf", "-d", out], capture_output=True, text=True).stdout
    if "libstdc++.so" in needed:
        return []
    print(f"resnet_fused: {' '.join(cxx)} links libstdc++ statically; linking torch's {lib}")
    return [lib]


def decide_cuda():
    """Returns (build_cuda, cuda_home, reason)."""
    if flag("RESNET_FUSED_CPU_ONLY"):
        return False, None, "RESNET_FUSED_CPU_ONLY=1"
    forced = flag("FORCE_CUDA")
    cuda_home = find_cuda_home()
    if torch.version.cuda is None:
        if forced:
            fail(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        return False, None, f"torch {torch.__version__} has no CUDA"
    if cuda_home is None:
        if forced:
            fail("FORCE_CUDA=1 but no CUDA toolkit was found (no nvcc on PATH, CUDA_HOME unset)")
        return False, None, "no CUDA toolkit (nvcc) found"
    have = nvcc_version(cuda_home)
    want = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    if have is None or have[0] != want[0]:
        msg = (f"torch {torch.__version__} was built with CUDA {torch.version.cuda} but the toolkit "
               f"at {cuda_home} is CUDA {'.'.join(map(str, have)) if have else 'unknown'}; "
               "the major versions must match")
        if forced:
            fail(msg)
        return False, None, msg
    return True, cuda_home, f"CUDA {'.'.join(map(str, have))} at {cuda_home}"


def default_arch_list(nvcc):
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
    else:
        arch = "9.0"
    # sm_90a exists from CUDA 12.0 on, and in torch's extension builder from some release on.
    if arch == "9.0" and nvcc is not None and nvcc >= (12, 0) and torch_builds_arch("9.0a"):
        return "9.0a"
    return arch


def torch_builds_arch(arch):
    """Whether this torch's extension builder takes `arch` in TORCH_CUDA_ARCH_LIST
    (older ones reject 9.0a)."""
    from torch.utils import cpp_extension
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        return any("sm_90a" in f for f in cpp_extension._get_cuda_arch_flags())
    except Exception:  # an unknown arch (ValueError), or the private helper gone
        return False
    finally:
        os.environ.pop("TORCH_CUDA_ARCH_LIST")
        if saved is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def wgmma_in_build():
    """Whether the wgmma kernel is built: TORCH_CUDA_ARCH_LIST has 9.0a and no
    other code an sm_90 GPU could load instead (plain 9.0, whose wgmma kernel is a
    trap stub, or a name torch expands to it). PTX of older archs is fine: a GPU
    prefers machine code built for it."""
    archs = [a.removesuffix("+PTX") for a in
             re.split(r"[;, ]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a]
    if "9.0a" not in archs:
        return False
    if any(a == "9.0" or not a[:1].isdigit() for a in archs):
        print("resnet_fused: TORCH_CUDA_ARCH_LIST has 9.0a and plain 9.0 (or a named arch); "
              "the wgmma kernel is left out, as an sm_90 GPU may load the plain code")
        return False
    return True


def cutlass_include_dirs():
    """CUTLASS's header folders (header-only: cutlass/ and cute/, and the util folder),
    or [] where none is found; then the CUTLASS kernels are left out of the build."""
    roots = [os.environ.get("RESNET_FUSED_CUTLASS_DIR", ""), os.path.join(HERE, ".cutlass")]
    try:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")  # nvidia-cutlass; not imported
        if spec is not None and spec.origin:
            roots.append(os.path.join(os.path.dirname(spec.origin), "source"))
    except (ImportError, ValueError):
        pass
    for root in filter(None, roots):
        dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
        if (os.path.exists(os.path.join(dirs[0], "cutlass", "cutlass.h"))
                and os.path.exists(os.path.join(dirs[1], "cutlass", "util", "packed_stride.hpp"))):
            return dirs
    return []


build_cuda, cuda_home, why = decide_cuda()
if build_cuda:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(nvcc_version(cuda_home))

if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
    fail("no C++ compiler found (install g++, or set CXX)")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# No -std flag: torch.utils.cpp_extension picks the standard this torch needs.
cxx_flags = ["-O3"]
link_flags = []
# ATen's parallel_for is header code: without OpenMP our kernels would run on one thread.
if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
include_dirs = [os.path.join(HERE, "csrc")]
link_flags += shared_libstdcxx_link_args()

if build_cuda:
    # csrc/cuda: *.cu are the kernels (nvcc, no ATen: fast and parallel), *.cpp their host
    # code (the host compiler, with ATen).
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # The toolkit's own folder first: the wheel folders fill in only what it lacks.
    include_dirs += [os.path.join(cuda_home, "include")] + wheel_cuda_includes(cuda_home)
    missing = [h for h in ("cuda_runtime.h", "cusparse.h", "cublas_v2.h")
               if not any(os.path.exists(os.path.join(d, h))
                          for d in include_dirs)]
    if missing:
        fail(f"CUDA headers not found: {', '.join(missing)} (looked in {cuda_home}/include and "
             "the nvidia-* wheels); install the CUDA toolkit's dev headers")
    sm90a = wgmma_in_build()
    cutlass = cutlass_include_dirs() if sm90a else []
    include_dirs += cutlass
    ext = CUDAExtension(
        "resnet_fused._C", sources, include_dirs=include_dirs,
        # Recorded so the package can say so when the GPU's arch is not among them.
        define_macros=[("RESNET_FUSED_WITH_CUDA", "1"),
                       ("RESNET_FUSED_CUDA_ARCHS", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"')]
                      + ([("RESNET_FUSED_SM90A", "1")] if sm90a else [])
                      + ([("RESNET_FUSED_CUTLASS", "1")] if cutlass else []),
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=link_flags,
    )
    print(f"resnet_fused: building with CUDA ({why}), archs {os.environ['TORCH_CUDA_ARCH_LIST']}"
          + (f", CUTLASS from {os.path.dirname(cutlass[0])}" if cutlass else
             ", without the CUTLASS kernels" + ("" if sm90a else " (needs 9.0a)")))
else:
    ext = CppExtension("resnet_fused._C", sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    print(f"resnet_fused: building CPU-only ({why})")

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
