"""The op calls of a fused forward, recorded once and replayed from C++.

The fused forward walks the model in Python and asks dispatch.py which kernel suits
each conv. For one input shape, dtype, thread count and finiteness that walk makes
the same calls every time, so after its first run (which also makes the weights its
kernels want) the next walk is recorded: every op that reaches the dispatcher, with
its arguments, which are constants (folded and packed weights, flags) or tensors that
the input or earlier ops produced. Later calls replay the record in C++
(csrc/op_plan.cpp), without the Python each op call costs.

A record is not used when the walk read a tensor's value in Python (a branch that
may go the other way on other data), when an op has an argument or result type the
C++ plan does not hold, or when its replay on the recorded input does not give the
walk's outputs bit for bit. The walk then keeps running.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _extension

# Ops that hand a tensor's value to Python, where the walk could branch on it.
_VALUE_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


class _Recorder(TorchDispatchMode):
    """Records (add_step arguments, output slot) of every op dispatched under it; a slot
    numbers a tensor the recorded inputs or ops produced, in the order the C++ plan
    numbers them."""

    def __init__(self, inputs):
        super().__init__()
        self.slot_of = {}  # id(tensor) -> slot, while the tensor lives (ids are reused)
        self.slots = 0
        self.refs = []
        self.steps = []
        self.replayable = True
        for t in inputs:
            self._add(t)

    def _add(self, t):
        key, slot = id(t), self.slots
        self.slot_of[key] = slot
        self.slots += 1
        # Forgotten when the tensor dies, before its id can name another.
        self.refs.append(weakref.ref(t, lambda _, key=key, slot=slot: (
            self.slot_of.pop(key, None) if self.slot_of.get(key) == slot else None)))
        return slot

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_READS:
            self.replayable = False
        # The tensor arguments' slots (None: a constant), looked up before the output's.
        slots = {id(a): self.slot_of.get(id(a)) for a in list(args) + list(kwargs.values())
                 if isinstance(a, torch.Tensor)}
        try:  # encoded now: the record holds the constants, not the activations
            step = _encode(func, args, kwargs, slots)
        except TypeError:
            step, self.replayable = None, False
        out = func(*args, **kwargs)
        out_slot = self._add(out) if isinstance(out, torch.Tensor) else None
        if out is not None and out_slot is None:
            self.replayable = False  # several results: a plan holds ops returning one or none
        self.steps.append((step, out_slot))
        return out


# c10::ScalarType's values of the dtypes a forward converts between (a ScalarType
# argument's schema type is int).
_SCALAR_TYPES = {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}


def _encode(func, args, kwargs, slots):
    """add_step's arguments for one recorded call (raises TypeError on a type the plan
    does not hold)."""
    schema = func._schema
    tensors, tensor_slots, ints, bools, floats = [], [], [], [], []
    for i, arg in enumerate(schema.arguments):
        if i < len(args):
            value = args[i]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        elif arg.has_default_value():
            value = arg.default_value
        else:
            raise TypeError(f"{schema.name}: no value for {arg.name}")
        kind = str(arg.type)
        if kind in ("Tensor", "Optional[Tensor]", "Tensor?"):
            slot = slots.get(id(value)) if isinstance(value, torch.Tensor) else None
            tensors.append(None if slot is not None else value)
            tensor_slots.append(-1 if slot is None else slot)
        elif kind in ("int", "Optional[int]") and isinstance(value, torch.dtype):
            if value not in _SCALAR_TYPES:  # a ScalarType argument (to.dtype, _to_copy)
                raise TypeError(f"{schema.name}: argument {arg.name} is {value}")
            ints.append(_SCALAR_TYPES[value])
        elif kind == "int":
            ints.append(int(value))
        elif kind.startswith("List[int]") or kind.startswith("int["):
            ints += [len(value)] + [int(v) for v in value]
        elif kind == "bool":
            bools.append(bool(value))
        elif kind == "float":
            floats.append(float(value))
        elif kind == "number" and type(value) is float:  # a Scalar: a float one only, so
            floats.append(value)  # that an int one is not replayed as a float
        elif kind.startswith("Optional[") and value is None:
            ints.append(-1)  # another optional argument: None (or a dtype, above)
        else:
            raise TypeError(f"{schema.name}: argument {arg.name} of type {kind}")
    return (schema.name, schema.overload_name, tensors, tensor_slots, ints, bools, floats)


def _same(a, b):
    return (a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
            and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all()))


def record(walk, x):
    """(walk(x), plan): plan, a Replay, gives walk(x)'s outputs (a dict of tensors) by
    replaying the ops walk(x) called; None where it cannot (module docstring)."""
    recorder = _Recorder([x])
    with recorder:
        outputs = walk(x)
    out_slots = [recorder.slot_of.get(id(t)) for t in outputs.values()]
    if not recorder.replayable or any(s is None or s == 0 for s in out_slots):
        return outputs, None
    plan = torch.classes.resnet_fused.OpPlan(1)
    try:
        for step, out_slot in recorder.steps:
            got = plan.add_step(*step)
            if got != (-1 if out_slot is None else out_slot):
                return outputs, None
        plan.finish(out_slots)
    except RuntimeError:  # a type or schema add_step does not hold
        return outputs, None
    replay = Replay(_extension._C.plan_handle(plan), list(outputs))
    # The kernels are deterministic for one shape and thread count: the replay must
    # give the walk's outputs bit for bit.
    again = replay(x)
    if not all(_same(again[n], outputs[n]) for n in replay.names):
        return outputs, None
    return outputs, replay


class Replay:
    """A recorded plan: replay(x) gives the walk's outputs, {name: tensor}, for an input of
    the recorded shape. `handle` (_C.plan_handle, which holds the plan) runs it from C."""

    def __init__(self, handle, names):
        self.handle, self.names = handle, names

    def __call__(self, x):
        return dict(zip(self.names, _extension._C.run_plan(self.handle, x)))
