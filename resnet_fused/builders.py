"""Builders with torchvision's signatures: resnet18(weights=..., progress=..., **kwargs).

`weights` takes a torchvision weights enum (ResNet50_Weights.IMAGENET1K_V2), its
string ("IMAGENET1K_V2" or "ResNet50_Weights.IMAGENET1K_V2"), "DEFAULT", or a path
to a state_dict file saved from the torchvision model.
"""

import os
import pickle

import torch
from torchvision import models as tvm

from .model import fuse

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
# torchvision.models.video: clips (N, 3, frames, H, W), fused on the CPU only (fuse()'s
# torch.fx path, 3-D convolutions).
VIDEO_ARCHS = ("r3d_18", "mc3_18", "r2plus1d_18")


def torchvision_builder(arch):
    """torchvision's builder of `arch` (one of ARCHS or VIDEO_ARCHS)."""
    if arch in VIDEO_ARCHS:
        return getattr(tvm.video, arch)
    if arch in ARCHS:
        return getattr(tvm, arch)
    raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS + VIDEO_ARCHS)}")


def load_state_dict_file(path):
    """The state_dict in a checkpoint file, with a clear error for anything else."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file not found: {path}") from None
    except Exception as e:  # pickle/zip errors: a corrupt or foreign file
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            # A whole pickled module (torch.save(model)), which weights_only refuses to run.
            raise ValueError(f"weights file {path} holds pickled Python objects (e.g. a whole "
                             "model saved with torch.save(model)), not a state_dict; save "
                             "model.state_dict() instead") from None
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(f"could not read weights file {path}: it is not a PyTorch checkpoint "
                         f"({type(e).__name__}: {first})") from None
    # Training checkpoints wrap the state_dict ({"model": ..., "epoch": ...}, torchvision's
    # reference scripts; {"state_dict": ...}, others).
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = f" with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, dict) else ""
        raise ValueError(f"weights file {path} does not hold a state_dict (a dict of tensors), "
                         f"got {type(obj).__name__}{keys}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _is_path(weights):
    return isinstance(weights, (os.PathLike,)) or (
        isinstance(weights, str) and (os.sep in weights or weights.endswith((".pt", ".pth"))
                                      or os.path.exists(weights)))


def torchvision_model(arch, weights=None, progress=True, **kwargs):
    """The plain torchvision `arch` (one of ARCHS or VIDEO_ARCHS) with `weights`
    resolved as in the module doc. Errors say which argument is wrong and how to fix it."""
    builder = torchvision_builder(arch)
    path = None
    if weights is not None and _is_path(weights):
        path, weights = os.fspath(weights), None
    if weights is not None:
        # Resolves enums and strings, and checks num_classes against the weights.
        enum = tvm.get_model_weights(arch)
        names = ", ".join(["DEFAULT"] + [w.name for w in enum])
        if not isinstance(weights, (str, enum)):
            hint = ("; a state_dict object goes to model.load_state_dict(state_dict)"
                    if isinstance(weights, dict) else "")
            raise TypeError(f"weights: expected None, a {enum.__name__} value, one of {names}, "
                            f"or a state_dict file path, got {type(weights).__name__} "
                            f"{weights!r:.80}{hint}")
        try:
            weights = enum.verify(weights)
        except (ValueError, KeyError) as e:
            raise ValueError(f"weights {weights!r} is neither a file nor a torchvision weights "
                             f"name for {arch} (expected one of {names}): {e}") from None
    state = None
    if path is not None:
        state = load_state_dict_file(path)
        fc = state.get("fc.weight")
        if "num_classes" not in kwargs and fc is not None and fc.dim() == 2:
            kwargs["num_classes"] = fc.shape[0]  # a fine-tuned checkpoint's own head
    try:
        model = builder(weights=weights, progress=progress, **kwargs)
    except OSError as e:  # download failed (offline, proxy, ...)
        raise RuntimeError(f"could not download {weights} for {arch}: {e}. Offline, pass a "
                           "path to a saved state_dict instead (weights='path/to/file.pth')") from None
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"weights file {path} does not fit {arch}"
                             f"{' with ' + str(kwargs) if kwargs else ''}: {e}") from None
    return model


def build(arch, weights=None, progress=True, **kwargs):
    """The fused `arch` (one of ARCHS or VIDEO_ARCHS), optionally with weights (see
    module doc)."""
    return fuse(torchvision_model(arch, weights, progress, **kwargs), inplace=True)


def _builder(arch):
    def builder(*, weights=None, progress=True, **kwargs):
        return build(arch, weights=weights, progress=progress, **kwargs)
    builder.__name__ = arch
    where = "torchvision.models.video" if arch in VIDEO_ARCHS else "torchvision.models"
    builder.__doc__ = (f"Fused {arch}; same signature as {where}.{arch}. "
                       "`weights` may also be a path to a state_dict file.")
    return builder


resnet18 = _builder("resnet18")
resnet34 = _builder("resnet34")
resnet50 = _builder("resnet50")
resnet101 = _builder("resnet101")
resnet152 = _builder("resnet152")
resnext50_32x4d = _builder("resnext50_32x4d")
resnext101_32x8d = _builder("resnext101_32x8d")
resnext101_64x4d = _builder("resnext101_64x4d")
wide_resnet50_2 = _builder("wide_resnet50_2")
wide_resnet101_2 = _builder("wide_resnet101_2")
r3d_18 = _builder("r3d_18")
mc3_18 = _builder("mc3_18")
r2plus1d_18 = _builder("r2plus1d_18")
