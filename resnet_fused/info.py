"""What runs here: which of resnet_fused's kernels this build and this machine use, and
why not where one does not (`python -m resnet_fused info`)."""

import os

import torch

from . import _extension, dispatch, huge_pages
from .benchmark import cpu_model

# Environment variables that change what runs (README), shown when set.
SETTINGS = ("RESNET_FUSED_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
            "RESNET_FUSED_BF16_ON_AMX", "RESNET_FUSED_BF16_WINOGRAD_ON_AMX",
            "RESNET_FUSED_HUGE_PAGES", "RESNET_FUSED_KEEP_HEAP", "RESNET_FUSED_CUDA_TRY",
            "RESNET_FUSED_CUDA_TILE")


def _yes(runs, why_not):
    return "yes" if runs else f"no ({why_not})"


def rows():
    """(what, answer) pairs, in the order `info` prints them."""
    from . import __version__
    out = [("resnet_fused", __version__), ("torch", torch.__version__)]
    if not _extension.available():
        out.append(("extension", f"not built: {_extension.load_error()}"))
        return out
    out.append(("extension", "built" + (f" with CUDA archs {_extension._C.cuda_archs}"
                                        if _extension.built_with_cuda() else ", CPU only")))
    out += [(name, os.environ[name]) for name in SETTINGS if name in os.environ]
    isa = _extension.cpu_isa()
    bf16 = torch.bfloat16 in dispatch.CPU_DTYPES
    amx_off = "AMX CPU: oneDNN's AMX kernels instead, unless RESNET_FUSED_BF16_ON_AMX=1"
    mine_bf16 = not dispatch._AMX or dispatch._BF16_ON_AMX
    out += [
        ("cpu", f"{cpu_model()}, {torch.get_num_threads()} threads"),
        ("cpu vector ISA (our kernels)", isa),
        ("cpu dtypes", ", ".join(str(d).replace("torch.", "") for d in dispatch.CPU_DTYPES)),
        ("AMX", "yes" if dispatch._AMX else "no"),
        ("winograd_conv3x3 float32", _yes(_extension.winograd_kernel_available(),
                                          "needs AVX2+FMA or AVX-512 and torch's fp32 brgemm")),
        ("conv1x1 float32", _yes(_extension.conv1x1_kernel_available(),
                                 "needs torch's fp32 brgemm")),
        ("grouped_conv3x3 float32", _yes(_extension.grouped_conv_kernel_available(),
                                         "needs AVX2+FMA or AVX-512")),
        ("stem_conv float32", _yes(_extension.stem_conv_kernel_available(),
                                   "needs AVX2+FMA or AVX-512")),
    ]
    for name, runs in (("winograd_conv3x3 bfloat16", _extension.winograd_bf16_kernel_available()),
                       ("conv1x1 bfloat16", _extension.conv1x1_bf16_kernel_available())):
        why = ("no bfloat16 convolutions on this CPU" if not bf16 else
               "needs AVX-512 and a bfloat16 brgemm: AVX512_BF16 or AMX" if not runs else
               amx_off)
        out.append((name, _yes(runs and mine_bf16, why)))
    out.append(("large weights in huge pages", _yes(huge_pages.why_off() is None,
                                                    huge_pages.why_off())))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            dev = torch.device("cuda", i)
            why = dispatch.unsupported(dev, torch.float16)
            out.append((f"cuda:{i} {torch.cuda.get_device_name(i)}", _yes(why is None, why)))
    return out


def print_rows():
    table = rows()
    width = max(len(what) for what, _ in table)
    for what, answer in table:
        print(f"{what:{width}}  {answer}")
