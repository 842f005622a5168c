"""StateWatch: whether a model's parameters, buffers and normalization eps changed since
a point in time, cheaply enough to ask on every forward. The folded weights of the
fused models and the captured forwards both depend on it."""

import weakref

import torch.nn.modules.module as _module

from . import _extension

# Bumped whenever any module anywhere gets a parameter, buffer or submodule assigned
# (setattr, load_state_dict(assign=True), Sequential item assignment). A watch
# re-walks its model's tree only when this moved, which keeps the per-call check
# down to reading version counters and data pointers.
assignments = [0]


def _count_assignment(*_):
    assignments[0] += 1


for _register in (_module.register_module_parameter_registration_hook,
                  _module.register_module_buffer_registration_hook,
                  _module.register_module_module_registration_hook):
    _register(_count_assignment)


def _slots(model):
    """(dict, name, tensor) for every parameter and buffer of every module of model."""
    return [(d, name, t) for m in model.modules() for d in (m._parameters, m._buffers)
            for name, t in d.items() if t is not None]


class StateWatch:
    """Whether a model's parameters, buffers, normalization eps and forward hooks are
    those it had when the watch was made: in-place writes (version counters), replaced storage
    (`.to()`, `param.data = ...`: data pointers), and parameters, buffers or submodules
    assigned, set to None or deleted (each slot's tensor by identity). Writes through
    `param.data.<op>_()` bypass the version counters and are not seen.

    The tensors are held, so their addresses cannot be reused by others while the
    watch lives: an unchanged address then means an unchanged tensor, and a graph
    that reads them by address never reads freed memory. The model itself is not held,
    neither is its __dict__ (only its hook dicts): the model holds its folds, and they
    their watch, so that would be a reference cycle, and a deleted model with its
    weights and folds would live until the garbage collector's rare full pass."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.slots = _slots(model)
        self.tensors = [t for _, _, t in self.slots]
        # BatchNorm, FrozenBatchNorm2d and any other norm layer a ResNet was built with
        # (an int eps counts: BatchNorm2d(eps=1) is valid).
        # (Not the model itself, whose own eps a fused forward does not read, and which
        # this watch must not hold.)
        self.norms = [m for m in list(model.modules())[1:]
                      if isinstance(getattr(m, "eps", None), (int, float))
                      and not isinstance(m.eps, bool)]
        # Forward hooks added or removed (a fused forward does not call the modules, so
        # the model must decide again whether it may run fused; a captured forward
        # replays the model's own hooks too). The submodules, and the model's hooks
        # through their dicts.
        self.modules = list(model.modules())[1:]
        self.root_hooks = {"_forward_hooks": model._forward_hooks,
                           "_forward_pre_hooks": model._forward_pre_hooks}
        self.hook_dicts = [self.root_hooks]
        self.hook_dicts += [vars(m) for m in self.modules]
        self.assignments = assignments[0]
        if _extension.available():
            # Reads the objects above from C (this watch keeps them alive).
            self.compiled = _extension._C.state_watch(self.tensors, self.slots, self.norms,
                                                      self.hook_dicts)
        else:
            self.compiled = None
            # An inference tensor has no version counter (so in-place writes to it cannot
            # be seen; its storage still can).
            self.versioned = [t for t in self.tensors if not t.is_inference()]
            self.state = self._state()

    def _state(self):
        return (tuple(t._version for t in self.versioned),
                tuple(t.data_ptr() for t in self.tensors),
                tuple(m.eps for m in self.norms),
                tuple(len(d["_forward_hooks"]) + len(d["_forward_pre_hooks"])
                      for d in self.hook_dicts))

    def _polled_change(self):
        """Whether a watched tensor, eps or hook count changed, or a slot holds another
        tensor (setting a parameter to None or deleting it calls no registration hook)."""
        if self.compiled is not None:
            return _extension._C.state_changed(self.compiled)
        return (self._state() != self.state
                or any(d.get(k) is not t for d, k, t in self.slots))

    def changed(self):
        if self._polled_change():
            return True
        model = self._model()
        if model is not None and any(vars(model).get(name) is not hooks
                                     for name, hooks in self.root_hooks.items()):
            return True  # the model's hook dicts replaced (`model._forward_hooks = {}`)
        if assignments[0] != self.assignments:
            now = [] if model is None else _slots(model)
            if len(now) != len(self.slots) or any(
                    d is not d0 or k != k0 or t is not t0
                    for (d, k, t), (d0, k0, t0) in zip(now, self.slots)):
                return True
            # A module without parameters replaced (model.relu = nn.GELU()).
            modules = [] if model is None else list(model.modules())[1:]
            if len(modules) != len(self.modules) or any(
                    m is not m0 for m, m0 in zip(modules, self.modules)):
                return True
            self.assignments = assignments[0]
        return False
