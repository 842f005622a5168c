"""StateWatch: whether a model's parameters, buffers and BatchNorm eps changed since
a point in time, cheaply enough to ask on every forward. The folded weights of the
fused models and the captured forwards both depend on it."""

import itertools

import torch.nn.modules.module as _module
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

# Bumped whenever any module anywhere gets a parameter, buffer or submodule assigned
# (setattr, load_state_dict(assign=True), Sequential item assignment). A watch
# re-walks its model's tree only when this moved, which keeps the per-call check
# down to reading version counters and data pointers.
_assignments = [0]


def _count_assignment(*_):
    _assignments[0] += 1


for _register in (_module.register_module_parameter_registration_hook,
                  _module.register_module_buffer_registration_hook,
                  _module.register_module_module_registration_hook):
    _register(_count_assignment)


class StateWatch:
    """Whether a model's parameters, buffers and BatchNorm eps are those it had when
    the watch was made: in-place writes (version counters), replaced storage
    (`.to()`, `param.data = ...`: data pointers) and assigned parameters, buffers or
    submodules (the tree's tensors by identity). Writes through `param.data.<op>_()`
    bypass the version counters and are not seen (as for the model's own refolding).

    The tensors are held, so their addresses cannot be reused by others while the
    watch lives: an unchanged address then means an unchanged tensor, and a graph
    that reads them by address never reads freed memory."""

    def __init__(self, model):
        self.model = model
        self.named = self._named()
        tensors = [t for _, t in self.named]
        # An inference tensor has no version counter (so in-place writes to it cannot
        # be seen; its storage still can).
        self.versioned = [t for t in tensors if not t.is_inference()]
        self.tensors = tensors
        self.bns = [m for m in model.modules()
                    if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))]
        self.state = self._state()
        self.assignments = _assignments[0]

    def _named(self):
        return [(n, t) for n, t in itertools.chain(self.model.named_parameters(),
                                                    self.model.named_buffers())]

    def _state(self):
        return (tuple(t._version for t in self.versioned),
                tuple(t.data_ptr() for t in self.tensors), tuple(m.eps for m in self.bns))

    def changed(self):
        if self._state() != self.state:
            return True
        if _assignments[0] != self.assignments:
            now = self._named()
            if len(now) != len(self.named) or any(
                    n != n0 or t is not t0 for (n, t), (n0, t0) in zip(now, self.named)):
                return True
            self.assignments = _assignments[0]
        return False
