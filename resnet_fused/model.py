"""FusedResNet: torchvision's ResNet with a fused eval-mode forward.

It *is* a torchvision ResNet (a subclass with the same module tree, so the same
state_dict keys): train mode, and any case the fused kernels cannot serve, run
torchvision's own forward. In eval mode each conv + BatchNorm (+ residual add)
+ ReLU runs as one op on BN-folded weights, which are folded once per
(device, dtype) and refolded whenever a parameter or buffer changes.
"""

import copy
import threading
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.modules.module as _module
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from . import _extension, dispatch, heap, op_plan, ops, quantizable, state_watch
from .dispatch import tracing as _tracing
from .fold import cast_folded, fold_conv_bn
from .state_watch import StateWatch

# Refolds are rare; one lock for all models keeps them picklable and copyable.
_FOLD_LOCK = threading.Lock()
_warned = set()
# fold.plans values besides a plan: the key's first walk ran, so record the next one.
_WALKED_ONCE = "walked once"
_MAX_PLANS = 4  # input keys per fold with a plan (or the walk's None): the last used
_RECORD_TRIES = 3  # recordings of one input key before its walk is taken as unreplayable


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@dataclass
class _Fold:
    watch: StateWatch  # what the fold was made from (None for an inline fold)
    stem: dispatch.PreparedConv
    layers: list   # (name, blocks); a block: dict of PreparedConv conv1, conv2, [conv3], [downsample]
    finite: bool   # every folded weight and bias is finite
    unfusable: str = None  # why the model is not one the fused forward computes, if so
    fc_packs: dict = field(default_factory=dict)  # fc's weight packed for oneDNN (dispatch.linear)
    plans: dict = field(default_factory=dict)  # input key -> op_plan.record's plan, or None
    bns: tuple = ()  # (reason, module) of the trunk's BatchNorm2d modules (not frozen ones)
    record_failures: dict = field(default_factory=dict)  # input key -> recordings that failed
    fast_key: tuple = None  # the plans key whose plan the model's C fast path replays


class _NotFusable(Exception):
    """The model's trunk holds something the fused forward would compute differently
    (a norm or conv of another kind, a replaced ReLU, a hook): torchvision's math runs."""


def _check_conv_bn(conv, bn, name):
    if type(conv) is not nn.Conv2d:
        raise _NotFusable(f"{name} is {type(conv).__name__}, not a zero-padded Conv2d")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise _NotFusable(f"{name} is a Conv2d with padding {conv.padding!r} "
                          f"({conv.padding_mode}), not a zero-padded Conv2d")
    if type(bn) not in (nn.BatchNorm2d, FrozenBatchNorm2d):
        raise _NotFusable(f"the norm after {name} is {type(bn).__name__}, not BatchNorm2d or "
                          "FrozenBatchNorm2d")
    if getattr(bn, "running_mean", None) is None:
        raise _NotFusable(f"the BatchNorm after {name} has no running statistics "
                          "(track_running_stats=False)")
    # (Not while traced: there the size is a traced value, and fuse() checked it.)
    if not torch.jit.is_tracing() and bn.running_mean.numel() != conv.out_channels:
        raise _NotFusable(f"the BatchNorm after {name} has {bn.running_mean.numel()} channels "
                          f"where {name} has {conv.out_channels} output channels")


def _check_relu(relu, name):
    if type(relu) is not nn.ReLU:
        raise _NotFusable(f"{name} is {type(relu).__name__}, not ReLU")


# The forwards the fused forward computes in their place, as imported (a forward
# replaced on the class, as some libraries do, computes something else).
_OWN_FORWARDS = {cls: cls.forward for cls in (nn.Conv2d, nn.BatchNorm2d, FrozenBatchNorm2d,
                                              nn.ReLU, nn.MaxPool2d, nn.Sequential, BasicBlock,
                                              Bottleneck, *quantizable.BLOCKS)}


def _check_no_hooks(module, name):
    # The fused forward calls none of the trunk's modules, so their hooks, or a forward
    # of their own, would not run.
    for sub_name, sub in module.named_modules(prefix=name):
        if sub._forward_pre_hooks or sub._forward_hooks:
            raise _NotFusable(f"{sub_name} has a forward hook, which the fused forward "
                              "would not run")
        own = _OWN_FORWARDS.get(type(sub))
        if "forward" in vars(sub) or (own is not None and type(sub).forward is not own):
            raise _NotFusable(f"{sub_name}.forward is replaced, which the fused forward "
                              "would not run")


def _forward_ad_or_func():
    """A forward-mode AD level (torch.autograd.forward_ad) or a torch.func transform
    (vmap, grad, jvp) is active."""
    from torch.autograd import forward_ad
    return (getattr(forward_ad, "_current_level", -1) >= 0
            or torch._C._functorch.peek_interpreter_stack() is not None)


def _bn_in_train_mode(name, key):
    where = "conv1" if key == "stem" else f"{name}.{key}"
    return f"the BatchNorm after {where} is in train mode (batch statistics)"


def _train_mode_bn(modules):
    """The reason given for the first of (reason, module) whose module is in train mode
    (a BatchNorm's batch statistics, its running statistics updated), or None."""
    for reason, module in modules:
        if module.training:
            return reason
    return None


class _Folding:
    """Folding and running the conv-BN pairs of a ResNet trunk (conv1/bn1, maxpool,
    layer1..4, as far as present), shared by FusedResNet and FusedBody: fold once
    per (device, dtype), refold on any change, inline when traced or differentiated."""

    def __getstate__(self):
        # Folded weights are derived data (and packed ones cannot be copied):
        # copies and pickles start without them.
        state = self.__dict__.copy()
        state["_fold_cache"] = {}
        state.pop("_fast", None)
        return state

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling. The fused
        # forward picks its kernels per input in Python, which TorchScript cannot
        # compile; without this, its error points at an f-string in _check_input.
        unfused = (" or script model.to_torchvision(), an unfused copy"
                   if hasattr(self, "to_torchvision") else "")
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__}: its forward chooses "
            f"kernels per input in Python. Use {self._TRACE_CALL}, torch.export.export or "
            f"torch.compile instead{unfused}.")

    _TRACE_CALL = "torch.jit.trace(model, example_input)"

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() and the like: the folds of the old tensors would
        # otherwise stay in memory (folded, packed and Winograd weights: ~2-3x the
        # parameters) until the next forward replaced them.
        self._drop_folds()
        return super()._apply(fn, *args, **kwargs)

    def refresh_fold(self):
        """Drops the folded weights. Needed only after writes through `.data`,
        which bypass the version counters that refolding watches."""
        self._drop_folds()

    def _drop_folds(self):
        self._fold_cache = {}
        self.__dict__.pop("_fast", None)  # FusedResNet's replay of its fold (forward)

    def _prepare_fused(self, x):
        """(x, fold, finite) for a fused forward, or None when torchvision's math must
        run (said once, in eval mode)."""
        ok, why = self._status(x)
        if not ok:
            if not self.training:
                _warn_once(why, f"{type(self).__name__}: running the unfused forward: {why}.")
            return None
        return self._fold_for(x)

    def _unfused(self, why):
        _warn_once(why, f"{type(self).__name__}: running the unfused forward: {why}.")
        return None

    def fused_status(self, x):
        """(True, "") if forward(x) would run the fused kernels, else (False, reason)."""
        try:
            self._check_input(x)
        except (TypeError, ValueError) as e:
            return False, f"forward(x) would raise: {e}"
        ok, why = self._status(x)
        return self._forward_status() if ok else (ok, why)

    def _status(self, x):
        """fused_status(x) without the input's checks and the model's structure, which
        the forward and the fold check: (True, "") or (False, reason)."""
        raise NotImplementedError

    def _structure_status(self):
        try:
            for _ in self._pairs():
                pass
        except _NotFusable as e:
            return False, str(e)
        return True, ""

    def _forward_status(self):
        """_structure_status, and no BatchNorm2d of the trunk in train mode (as after
        model.eval() and bn.train()): what a forward in eval mode needs."""
        try:
            why = _train_mode_bn([(_bn_in_train_mode(name, key), bn)
                                  for name, pairs in self._pairs() for key, _, bn in pairs
                                  if isinstance(bn, nn.BatchNorm2d)])
        except _NotFusable as e:
            return False, str(e)
        return (False, why) if why else (True, "")

    def _kernel_status(self, x):
        """(True, "") if the kernels can run x's device and dtype and no global forward
        hook wants to see the modules they replace, else (False, reason)."""
        if not _extension.available():
            return False, _extension.load_error()
        if not dispatch.compiling() and _forward_ad_or_func():
            return False, ("forward-mode AD or a torch.func transform is active; the fused ops "
                           "have no rules for them")
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return False, ("a global forward hook is registered (torch.nn.modules.module."
                           "register_module_forward_hook or _pre_hook), which the fused forward "
                           "would not run for the modules it fuses")
        why = dispatch.unsupported(x.device, self._run_dtype(x))
        return (False, why) if why else (True, "")

    def _backward_hook(self):
        """Why a backward pass through the fused forward would miss a backward hook (one
        on a module it does not call, or a global one), or ""."""
        if _module._global_backward_hooks or _module._global_backward_pre_hooks:
            return ("a global backward hook is registered (torch.nn.modules.module."
                    "register_module_full_backward_hook or _pre_hook), which the fused forward "
                    "would not run for the modules it fuses")
        for name, m in self.named_modules():
            if m is not self and (m._backward_hooks or m._backward_pre_hooks):
                return f"{name} has a backward hook, which the fused forward would not run"
        return ""

    def _fold_for(self, x):
        """(x in the run dtype, fold, finite) for a fused forward, or None when
        torchvision's math must run (non-finite folded weights)."""
        dtype = self._run_dtype(x)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in self.parameters()))
        if grad:
            why = self._backward_hook()
            if why:
                return self._unfused(why)
        if _tracing() or grad:
            # Folded inline: part of the traced graph, or of the autograd graph (then
            # gradients reach the conv weights and BN affine parameters). The ops scan
            # their operands for NaN/Inf themselves.
            try:
                fold = self._inline_fold(dtype, differentiable=grad)
            except _NotFusable as e:
                return self._unfused(str(e))
            training = _train_mode_bn(fold.bns)
            if training:
                return self._unfused(training)
            return x.to(dtype), fold, False
        fold = self._cached_fold(x.device, dtype)
        if getattr(fold, "unfusable", None):
            return self._unfused(fold.unfusable)
        training = _train_mode_bn(fold.bns)
        if training:
            return self._unfused(training)
        if not fold.finite:
            # NaN/Inf in a parameter or BN statistic: torchvision's math is exact.
            _warn_once("nonfinite", f"{type(self).__name__}: a folded weight or bias is NaN/Inf "
                                    "(from the parameters or BN statistics); running "
                                    "torchvision's math.")
            return None
        if x.device.type != "cpu":
            # The CUDA kernels propagate NaN natively (and a check there would sync).
            return x.to(dtype), fold, False
        heap.keep_freed_memory()
        # NaN/Inf can reach a ReLU only through the input or the weights. With both
        # finite, the CPU kernels may skip their per-op scan.
        x = x.to(dtype)
        return x, fold, ops.all_finite(x)

    def _run_fused(self, x, fold, finite, stage, keep=(), head=False):
        """{name: output} of "maxpool" (after the stem) and of each layer; those named
        in `keep` are returned as computed (the next block may not sum into them).
        head: also "head", the avgpool and fc's output, where dispatch.head computes it."""
        if fold.watch is None:  # an inline fold: part of a traced or autograd graph
            return self._run_layers(x, fold, finite, stage, keep, head)
        with dispatch.without_autograd():  # a cached fold: no graph to record
            cuda_plan = x.is_cuda and "plan" in dispatch.CUDA_TRY
            if stage.on or (x.device.type != "cpu" and not cuda_plan):
                return self._run_layers(x, fold, finite, stage, keep, head)  # (labels: the walk)
            x = x.contiguous(memory_format=torch.channels_last)
            # The first walk for a key makes the weights its kernels want; the second is
            # recorded, and later calls replay it (op_plan.py). On CUDA the paths tried
            # (dispatch.CUDA_TRY) change the walk, so they are part of the key.
            key = (x.shape, x.dtype, torch.get_num_threads(), finite, tuple(keep), head,
                   dispatch.CUDA_TRY if x.is_cuda else None)
            plan = fold.plans.get(key)
            if callable(plan):
                fold.plans[key] = fold.plans.pop(key, plan)  # the most recently used last
                return plan(x)
            # Recording checks the replay against the walk, which syncs: not while a
            # CUDA graph is being captured (that call walks; a later one records).
            if plan is _WALKED_ONCE and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                outputs, plan = op_plan.record(
                    lambda t: self._run_layers(t, fold, finite, stage, keep, head), x)
                failures = fold.record_failures.get(key, 0)
                if plan is None and failures + 1 < _RECORD_TRIES:
                    # Threads racing the first calls: another thread's first walk may have
                    # made a weight inside this recording. Try again at the next call.
                    fold.record_failures[key] = failures + 1
                    plan = _WALKED_ONCE
                fold.plans[key] = plan
                if (head and finite and not keep and callable(plan) and "head" in outputs
                        and fold.watch.compiled is not None):
                    # FusedResNet's forward replays it from C while nothing changes: the C
                    # call's state, and the trunk's BatchNorms (a submodule's train() is no
                    # change the watch sees), in one attribute.
                    fold.fast_key = key
                    self._fast = ((fold.watch, fold.watch.compiled, state_watch.assignments,
                                   torch.autograd.profiler, (_module._global_forward_hooks,
                                                             _module._global_forward_pre_hooks),
                                   plan.handle, tuple(x.shape), x.dtype,
                                   torch.get_num_threads(), list(outputs).index("head")),
                                  tuple(bn for _, bn in fold.bns))
                return outputs
            if key not in fold.plans:
                # The C fast path's calls never come here: count its key as just used.
                fast = fold.plans.pop(fold.fast_key, None)
                if fast is not None:
                    fold.plans[fold.fast_key] = fast
                for stale in dispatch.make_room(fold.plans, _MAX_PLANS):  # least recently used
                    fold.record_failures.pop(stale, None)
                fold.plans[key] = _WALKED_ONCE
            return self._run_layers(x, fold, finite, stage, keep, head)

    def _run_layers(self, x, fold, finite, stage, keep, head=False):
        x = x.contiguous(memory_format=torch.channels_last)  # once; stays channels_last
        with stage("stem"):
            x = dispatch.conv(x, fold.stem, relu=True, finite=finite)
        with stage("maxpool"):
            x = dispatch.max_pool(x, self.maxpool)
        outputs = {"maxpool": x}
        previous = "maxpool"
        for name, blocks in fold.layers:
            with stage(name):
                for i, convs in enumerate(blocks):
                    x = _block(x, convs, finite, input_kept=i == 0 and previous in keep)
            outputs[name], previous = x, name
        if head:
            with stage("head"):
                logits = dispatch.head(x, self.avgpool, self.fc)
            if logits is not None:
                outputs["head"] = logits
        return outputs

    def _layer_names(self):
        return [n for n in ("layer1", "layer2", "layer3", "layer4") if n in self._modules]

    def _pairs(self):
        """(name, [(key, conv, bn), ...]) per stem and block, in forward order. Raises
        _NotFusable where the trunk is not what the fused forward computes."""
        if getattr(self, "_torchvision_class", None) is quantizable.QuantizableResNet:
            why = quantizable.stubs_status(self)
            if why:
                raise _NotFusable(why)
        _check_conv_bn(self.conv1, self.bn1, "conv1")
        _check_relu(self.relu, "relu")
        for name in ("conv1", "bn1", "relu", "maxpool"):
            _check_no_hooks(getattr(self, name), name)
        dtype = self.conv1.weight.dtype
        yield "stem", [("stem", self.conv1, self.bn1)]
        for layer_name in self._layer_names():
            layer = getattr(self, layer_name)
            if not isinstance(layer, nn.Sequential):
                raise _NotFusable(f"{layer_name} is {type(layer).__name__}, not a Sequential "
                                  "of blocks")
            _check_no_hooks(layer, layer_name)
            for bi, block in enumerate(layer):
                name = f"{layer_name}.{bi}"
                if type(block) in quantizable.BLOCKS:
                    why = quantizable.float_sum_status(block, name)
                    if why:
                        raise _NotFusable(why)
                    relus = quantizable.BLOCK_RELUS[type(block)]
                elif type(block) in (BasicBlock, Bottleneck):
                    relus = ("relu",)
                else:
                    raise _NotFusable(f"{name} is {type(block).__name__}, not torchvision's "
                                      "BasicBlock or Bottleneck")
                for relu in relus:
                    _check_relu(getattr(block, relu), f"{name}.{relu}")
                n = 3 if isinstance(block, Bottleneck) else 2
                pairs = [(f"conv{i}", getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
                         for i in range(1, n + 1)]
                if block.downsample is not None:
                    ds = block.downsample
                    if not (type(ds) is nn.Sequential and len(ds) == 2):
                        raise _NotFusable(f"{name}.downsample is not Sequential(Conv2d, "
                                          "BatchNorm2d)")
                    pairs.append(("downsample", ds[0], ds[1]))
                for key, conv, bn in pairs:
                    _check_conv_bn(conv, bn, f"{name}.{key}")
                    if conv.weight.dtype != dtype:  # torchvision's forward would raise
                        raise _NotFusable(f"{name}.{key} is {conv.weight.dtype} where conv1 is "
                                          f"{dtype}")
                yield name, pairs

    def _fold(self, dtype, watch, check_range, differentiable=False):
        stem, blocks = None, {n: [] for n in self._layer_names()}
        bns = []
        for name, pairs in self._pairs():
            convs = {}
            for key, conv, bn in pairs:
                label = name if key == "stem" else f"{name}.{key}"
                if isinstance(bn, nn.BatchNorm2d):
                    bns.append((_bn_in_train_mode(name, key), bn))
                w, b = fold_conv_bn(conv, bn, label, differentiable)
                if check_range:
                    w, b, cdt = cast_folded(w, b, dtype, label)
                else:
                    w, b, cdt = w.to(dtype), b.to(dtype), dtype
                convs[key] = dispatch.prepare(w, b, conv, cdt, cached=check_range)
            if name == "stem":
                stem = convs["stem"]
            else:
                blocks[name.split(".")[0]].append(convs)
        finite = check_range and all(
            bool(torch.isfinite(c.weight).all() and torch.isfinite(c.bias).all())
            for c in [stem] + [c for b in blocks.values() for convs in b for c in convs.values()])
        return _Fold(watch, stem, list(blocks.items()), finite, bns=tuple(bns))

    def _cached_fold(self, device, dtype):
        key = (device, dtype)
        fold = self._fold_cache.get(key)
        if fold is not None and not fold.watch.changed():
            return fold
        with _FOLD_LOCK:  # one refold at a time; readers see either old or new whole
            fold = self._fold_cache.get(key)
            if fold is None or fold.watch.changed():
                # Made before folding: a write during the fold shows up next call.
                watch = StateWatch(self)
                try:
                    fold = self._fold(dtype, watch, check_range=True)
                except _NotFusable as e:  # said once per forward that meets it, until changed
                    fold = _Fold(watch, None, [], False, unfusable=str(e))
                # Stale entries for other dtypes/devices could be reused wrongly later.
                self._drop_folds()
                self._fold_cache = {key: fold}
        return fold

    def _inline_fold(self, dtype, differentiable):
        # Under torch.compile/export the fold is part of the traced graph; with
        # gradients, of the autograd graph.
        return self._fold(dtype, None, check_range=False, differentiable=differentiable)

    # ---- helpers ----------------------------------------------------------

    def _run_dtype(self, x):
        dev = x.device.type
        # Autocast lowers float32 only (a float64 model stays float64 under it).
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and x.dtype == torch.float32:
            return torch.get_autocast_dtype(dev)
        return x.dtype

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: expected a Tensor input, got "
                            f"{type(x).__name__}")
        cin = self.conv1.in_channels
        if torch.jit.is_tracing():
            # The size is a traced value there, and comparing it warns that the trace
            # may not generalize; the check is for the example input, and the trace
            # records none of it.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                bad_shape = x.dim() != 4 or bool(x.shape[1] != cin)
        else:
            bad_shape = x.dim() != 4 or x.shape[1] != cin
        me = type(self).__name__
        if bad_shape:
            raise ValueError(f"{me}: expected input of shape (N, {cin}, H, W), "
                             f"got {tuple(x.shape)}")
        w = self.conv1.weight
        if x.device != w.device:
            raise ValueError(f"{me}: input is on {x.device} but the model is on "
                             f"{w.device}; move one of them")
        if not x.is_floating_point():
            raise TypeError(f"{me}: expected a floating-point input, got {x.dtype}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{me}: input dtype {x.dtype} differs from the model's "
                            f"{w.dtype}; convert one of them (or use torch.autocast)")


# The parts of a ResNet forward that `resnet-fused profile` reports, in order.
STAGES = ("stem", "maxpool", "layer1", "layer2", "layer3", "layer4", "head")


class FusedResNet(_Folding, ResNet):
    """A torchvision ResNet whose eval-mode forward runs fused kernels.

    Constructed like torchvision.models.ResNet, or from an existing model with
    resnet_fused.fuse(model). `to_torchvision()` gives the unfused model back.
    """

    # The class the model had before fuse(): its forward is the unfused one.
    _torchvision_class = ResNet

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fold_cache = {}

    # ---- public API -------------------------------------------------------

    def to_torchvision(self):
        """The torchvision model it was made from (ResNet, or QuantizableResNet),
        with the same parameters (a copy)."""
        model = copy.deepcopy(self)
        model.__class__ = self._torchvision_class
        del model._fold_cache
        model.__dict__.pop("_torchvision_class", None)
        return model

    def _unfused_forward(self, x):
        return self._torchvision_class.forward(self, x)

    def _status(self, x):
        if self.training:
            return False, "train mode runs torchvision's math (batch statistics)"
        return self._kernel_status(x)

    def capture(self, batch_shape, dtype=None, device=None, warmup=3):
        """A callable running the eval-mode forward on inputs of exactly batch_shape
        (N, C, H, W), replayed from a CUDA graph on a GPU and run directly elsewhere,
        with static input and output buffers: see resnet_fused.capture.CapturedForward.
        dtype and device default to the model's (and must be the model's)."""
        from .capture import CapturedForward
        return CapturedForward(self, batch_shape, dtype, device, warmup)

    # ---- forward ----------------------------------------------------------

    def forward(self, x):
        # The recorded forward, replayed in one C call where nothing changed since
        # (csrc/fast_forward.cpp says what it checks; where it cannot, None). Dynamo
        # traces the Python forward instead.
        fast = self.__dict__.get("_fast")
        if (fast is not None and not self.training and not dispatch.compiling()
                and not any(bn.training for bn in fast[1])):
            out = _extension._C.fast_forward(fast[0], x)
            if out is not None:
                return out
        self._check_input(x)
        if torch.onnx.is_in_onnx_export():
            # ONNX has no fused op of ours; its runtimes fold BN themselves.
            _warn_once("onnx", "FusedResNet: ONNX export exports torchvision's graph "
                               "(same as exporting model.to_torchvision()).")
            return self._unfused_forward(x)
        prepared = self._prepare_fused(x)
        if prepared is None:
            return self._unfused_forward(x)
        x, fold, finite = prepared
        stage = _stage_labeller()
        outputs = self._run_fused(x, fold, finite, stage, head=True)
        if "head" in outputs:  # computed with the trunk (dispatch.head)
            return outputs["head"]
        with stage("head"):
            x = torch.flatten(self.avgpool(outputs["layer4"]), 1)
            # A cached fold lives only while the parameters (fc's too) are unchanged.
            return dispatch.linear(x, self.fc, fold.fc_packs if fold.watch is not None else None)


def _block(x, convs, finite, input_kept=False):
    """One BasicBlock or Bottleneck, fused. input_kept: x is returned to the caller,
    so the residual sum must not overwrite it."""
    out = dispatch.conv(x, convs["conv1"], relu=True, finite=finite)
    if "conv3" in convs:
        out = dispatch.conv(out, convs["conv2"], relu=True, finite=finite)
        last = convs["conv3"]
    else:
        last = convs["conv2"]
    if "downsample" in convs:  # the last conv and the downsample in one op, where it can
        y = dispatch.conv_sum_relu(out, last, x, convs["downsample"])
        if y is not None:
            return y
    identity = (dispatch.conv(x, convs["downsample"], relu=False, finite=finite)
                if "downsample" in convs else x)
    if identity is x and input_kept:
        return dispatch.conv(out, last, relu=True, finite=finite, residual=identity)
    # identity is an intermediate of this forward and dead after this op, so the
    # residual sum can accumulate into it in place.
    return dispatch.conv_add_relu_(identity, out, last, finite=finite)


class _stage_labeller:
    """Profiler labels ("stage:layer1", ...) around the parts of the fused forward,
    matching those `resnet-fused profile` puts around torchvision's; no-ops
    unless a profiler is running."""

    def __init__(self):
        self.on = not _tracing() and torch.autograd.profiler._is_profiler_enabled
        self.open = None

    def __call__(self, name):
        self.enter(name)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.exit()

    def enter(self, name):
        self.exit()
        if self.on:
            self.open = torch.profiler.record_function(f"stage:{name}")
            self.open.__enter__()

    def exit(self):
        if self.open is not None:
            self.open.__exit__(None, None, None)
            self.open = None


def fuse(model, inplace=False):
    """Converts a torchvision ResNet (any depth/width/groups, custom num_classes,
    dilation, zero_init_residual; the quantizable ones in float) into a FusedResNet
    sharing its parameters' values; in any other model (detection, segmentation),
    every ResNet and every IntermediateLayerGetter body over one
    (resnet_fused.backbone.FusedBody); a model holding neither (hand-written ResNets,
    torchvision's video ResNets) is rewritten by torch.fx (resnet_fused.graph_fuse).
    With inplace=False (default) the given model is left untouched."""
    if not isinstance(model, nn.Module):
        hint = (f"; call it first: fuse({model.__name__}())" if callable(model)
                and not isinstance(model, type) else
                f"; build one first, e.g. resnet_fused.build({model!r})" if isinstance(model, str)
                else "")
        raise TypeError(f"fuse: expected model to be an nn.Module (e.g. "
                        f"torchvision.models.resnet50()), got {type(model).__name__}{hint}")
    if not isinstance(inplace, bool):
        raise TypeError(f"fuse: expected inplace to be True or False, got {inplace!r}")
    if isinstance(model, FusedResNet):
        return model if inplace else copy.deepcopy(model)
    if not isinstance(model, ResNet):
        # A model holding ResNets or backbone bodies over one (detection, segmentation).
        from .backbone import fuse_any
        return fuse_any(model, inplace)
    why = quantizable.quantization_error(model)
    if why:
        raise TypeError(f"fuse: this ResNet is not one the fused forward computes: {why}")
    if not inplace:
        model = copy.deepcopy(model)
    original = type(model)
    model.__class__ = FusedResNet
    model._fold_cache = {}
    if quantizable.is_quantizable_class(original):
        model._torchvision_class = original
    ok, why = model._structure_status()  # now rather than at the first forward
    if not ok:
        model.__class__ = original  # inplace=True leaves the model as it was
        del model._fold_cache
        model.__dict__.pop("_torchvision_class", None)
        raise TypeError(f"fuse: this ResNet is not one the fused forward computes: {why}")
    return model
