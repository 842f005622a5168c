"""fuse() for models that hold no torchvision ResNet: hand-written ResNets, CIFAR
ResNets, ResNet-D, a ResNet trunk inside a larger model.

The model is traced with torch.fx (in eval mode; a submodule that cannot be
traced is kept as one call and named in a warning) and these patterns of its
graph are rewritten into the fused ops:

    Conv2d -> BatchNorm2d | FrozenBatchNorm2d [-> ReLU]        conv_bias_act
    Conv2d -> BatchNorm2d -> add(other) -> ReLU                conv_bias_act with a residual
    add(a, b) -> ReLU                                          add_relu

and the same with Conv3d -> BatchNorm3d (torchvision's video ResNets; their fused
ops run on the CPU only).

with ReLU as nn.ReLU, F.relu, torch.relu or Tensor.relu(_), and the add in either
operand order (`out += shortcut` traces as `out + shortcut`).

The model itself is kept: its class becomes a subclass of its own class
(`Fused<Name>`), with the same modules, parameters and state_dict keys. Train mode,
and whatever the kernels cannot serve, run the original forward. In eval mode
the rewritten graph runs on BN-folded weights, folded and refolded as
FusedResNet's (model._Folding): cached per (device, dtype), refolded when a conv
or BN tensor changes, and folded inline, differentiably, when gradients are
needed (the gradients then reach the conv weights and BN affine parameters).
"""

import copy
import inspect
import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models.video.resnet import Conv3DNoTemporal, Conv3DSimple
from torchvision.ops.misc import FrozenBatchNorm2d

from . import dispatch, ops
from .fold import cast_folded, fold_conv_bn
from .model import _Folding, _NotFusable, _stage_labeller, _train_mode_bn
from .state_watch import StateWatch

# The norms each conv class folds with. torchvision's video ResNets make their 3-D
# convs as Conv3d subclasses that only set the arguments (checked in _foldable).
_CONV_NORMS = {nn.Conv2d: (nn.BatchNorm2d, FrozenBatchNorm2d), nn.Conv3d: (nn.BatchNorm3d,),
               Conv3DSimple: (nn.BatchNorm3d,), Conv3DNoTemporal: (nn.BatchNorm3d,)}
_BATCH_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.BatchNorm3d)
_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, torch.add)

# Ops that give finite outputs for finite inputs (overflow aside, as FusedResNet
# assumes): a fused op reached from the model's input through these alone gets
# NaN/Inf only from that input or the weights, both checked once per forward, and
# may skip its own per-op scan (measured on a ResNet-34 of benchmarks/
# handwritten_resnet.py: the scans cost 1.5% of a forward at batch 8, 5.5% at batch 1).
_FINITE_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                   nn.AdaptiveMaxPool2d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool3d, nn.Identity, nn.Dropout, nn.Flatten)
_FINITE_FUNCTIONS = {*_RELU_FUNCTIONS, *_ADD_FUNCTIONS, F.max_pool2d, F.avg_pool2d,
                     F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool3d, F.avg_pool3d,
                     F.adaptive_avg_pool3d, F.adaptive_max_pool3d, torch.flatten, torch.cat,
                     operator.getitem}
_FINITE_METHODS = {"relu", "relu_", "add", "add_", "view", "reshape", "flatten", "contiguous"}

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul, operator.setitem}


def _mutates(node, modules):
    """Whether node may write into one of its operands (x.add_(y), relu(x, inplace=True),
    nn.ReLU(inplace=True), x += y, x[i] = y, torch.mul(a, b, out=a), ...). A submodule
    kept as one call whose code was not traced (a leaf of the model's own, an already fused
    part) may do anything: counted as writing."""
    if "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_module":
        module = modules.get(node.target)
        if getattr(module, "inplace", False) is True:
            return True
        return not type(module).__module__.startswith(("torch.nn.", "torchvision.ops."))
    if node.op != "call_function":
        return False
    target = node.target
    if target in _INPLACE_OPERATORS or getattr(target, "__name__", "").endswith("_"):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return bound.arguments.get("inplace") is True


CONV_BN_RELU, CONV_BN, CONV_BN_ADD_RELU, ADD_RELU = (
    "conv-BN-ReLU", "conv-BN", "conv-BN-add-ReLU", "add-ReLU")


# ---- tracing ---------------------------------------------------------------------


class _Stopped(Exception):
    """Tracing stopped in the submodule `path` ("" for the traced module itself)."""

    def __init__(self, path, error):
        first_line = (str(error).strip().splitlines() or [""])[0]
        self.path, self.reason = path, f"{type(error).__name__}: {first_line}"
        super().__init__(path, self.reason)


class _Tracer(fx.Tracer):
    """fx's tracer with BatchNorms, the convs of _CONV_NORMS, already fused models and
    the submodules in `leaves` kept as calls, and failures attributed to the innermost
    submodule."""

    def __init__(self, root=None, leaves=()):
        # Unpickling a rewritten graph re-traces its code with this class (no
        # arguments): the functions it calls must stay calls.
        super().__init__(autowrap_functions=_GRAPH_FUNCTIONS)
        self.traced_root, self.leaves = root, leaves

    def is_leaf_module(self, m, qualified_name):
        return (qualified_name in self.leaves or type(m) in (FrozenBatchNorm2d, *_CONV_NORMS)
                or (isinstance(m, GraphFused) and m is not self.traced_root)
                or super().is_leaf_module(m, qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except _Stopped:
            raise
        except Exception as e:
            try:
                path = self.path_of_module(m)
            except NameError:  # a module made during forward: its caller stopped
                raise e from None
            raise _Stopped(path, e) from e


def _trace(model):
    """(graph, {path: reason} of the submodules kept untraced), traced in eval mode.
    Raises _Stopped when the model's own forward cannot be traced."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()  # branches on self.training are taken as in eval mode
    untraced = {}
    try:
        while True:  # each failure makes one more submodule a leaf
            try:
                with _storing_check(model):
                    return _Tracer(model, set(untraced)).trace(model), untraced
            except _Stopped as e:
                if not e.path or e.path in untraced:  # the model itself: nothing to fuse
                    raise
                untraced[e.path] = e.reason
            except Exception as e:
                raise _Stopped("", e) from e
    finally:
        for m, training in flags:
            m.training = training


class _storing_check:
    """Around a trace: a forward that stores a traced value on a module (self.feat = y)
    does something the graph cannot (it has no node for it), and left a Proxy there. Such
    attributes are put back, and the innermost module that stored one is named (_Stopped):
    it is then kept as one call, or, if it is the model itself, nothing is fused."""

    def __init__(self, model):
        self.before = [(name, m, dict(vars(m))) for name, m in model.named_modules()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        stored = []
        for path, m, before in self.before:
            for name, value in list(vars(m).items()):
                if isinstance(value, fx.Proxy):
                    stored.append((path, name))
                    if name in before:
                        setattr(m, name, before[name])
                    else:
                        delattr(m, name)
        if stored and exc[0] is None:
            path, name = max(stored, key=lambda s: s[0].count(".") + bool(s[0]))
            raise _Stopped(path, RuntimeError(f"its forward stores a computed value on "
                                              f"self.{name}, which a traced graph cannot"))
        return False


# ---- patterns -------------------------------------------------------------------


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu_of(node, x, modules):
    """node computes relu(x) (in place or not) and nothing else."""
    if node is None or not node.args or node.args[0] is not x:
        return False
    if not all(isinstance(a, bool) for a in node.args[1:]) or set(node.kwargs) - {"inplace"}:
        return False
    if node.op == "call_module":
        return _plain_relu(modules[node.target])
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _add_operands(node):
    """(a, b, in_place) for a + b of two graph values (no alpha, no out=), else None.
    in_place: the result is written into a (Tensor.add_)."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return (*node.args, False)
    if node.op == "call_method" and node.target in ("add", "add_"):
        return (*node.args, node.target == "add_")
    return None


def _has_hooks(module):
    # A hook may change the module's input, output or weight (pruning and the old
    # weight_norm recompute the weight in a pre-hook): a fold would skip it.
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _foldable(conv, bn):
    """Whether conv then bn fold into one conv. Conv subclasses (e.g. weight
    standardization) compute something else, so only plain Conv2d and Conv3d count
    (and _CONV_NORMS' subclasses, with their class's forward)."""
    base = nn.Conv3d if isinstance(conv, nn.Conv3d) else nn.Conv2d
    return (type(bn) in _CONV_NORMS.get(type(conv), ()) and conv.padding_mode == "zeros"
            and type(conv).forward is base.forward
            and type(conv)._conv_forward is base._conv_forward
            and getattr(bn, "running_mean", None) is not None
            and not _has_hooks(conv) and not _has_hooks(bn) and not isinstance(conv.padding, str)
            and (torch.jit.is_tracing() or bn.running_mean.numel() == conv.out_channels)
            and "forward" not in vars(conv) and "forward" not in vars(bn))


def _foldable_pairs(graph, modules):
    """{BN node: conv node} for each conv whose only use is a BatchNorm with running
    statistics, the two foldable."""
    pairs = {}
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) not in _BATCH_NORMS:
            continue
        conv_node = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        conv = (modules.get(conv_node.target) if isinstance(conv_node, fx.Node)
                and conv_node.op == "call_module" else None)
        if (_foldable(conv, bn) and _only_user(conv_node) is node
                and len(conv_node.args) == 1 and not conv_node.kwargs):
            pairs[node] = conv_node
    return pairs


def _plain_relu(module):
    return type(module) is nn.ReLU and not _has_hooks(module) and "forward" not in vars(module)


@dataclass
class _Plan:
    kind: str
    bn: fx.Node = None     # the conv-BN kinds: the BN node (its conv: pairs[bn])
    operands: tuple = ()   # conv-BN-add-ReLU: (residual,); add-ReLU: (a, b)
    add: fx.Node = None
    relu: fx.Node = None


def _plans(graph, modules):
    """(pairs, plans): what to rewrite, each node in at most one plan."""
    pairs = _foldable_pairs(graph, modules)
    order = {n: i for i, n in enumerate(graph.nodes)}
    plans, taken = [], set()
    for node in graph.nodes:
        operands, relu = _add_operands(node), _only_user(node)
        if operands is None or not _is_relu_of(relu, node, modules):
            continue
        a, b, in_place = operands
        if a is b:
            continue
        # An in-place add writes into a: only a conv-BN output used nowhere else may
        # be dropped that way (anything else may be seen by other uses or the caller).
        candidates = [o for o in ((a,) if in_place else (a, b))
                      if o in pairs and _only_user(o) is node]
        if candidates:
            # The later-computed conv-BN takes the add; the other operand is ready by then.
            bn = max(candidates, key=order.get)
            plans.append(_Plan(CONV_BN_ADD_RELU, bn, (b if bn is a else a,), node, relu))
            taken.add(bn)
        elif not in_place:
            plans.append(_Plan(ADD_RELU, None, (a, b), node, relu))
    for bn in (bn for bn in pairs if bn not in taken):
        relu = _only_user(bn)
        plans.append(_Plan(CONV_BN_RELU, bn, relu=relu) if _is_relu_of(relu, bn, modules)
                     else _Plan(CONV_BN, bn))
    # The fused op runs where the pattern's last node was and reads the operands of its
    # first: a write into them in between (relu_(x) after conv(x), say) would be seen.
    # Such patterns stay as they are.
    writes = [order[n] for n in graph.nodes if _mutates(n, modules)]
    kept = []
    for plan in plans:
        first = pairs[plan.bn] if plan.bn is not None else plan.add
        own = {order[n] for n in (plan.bn, plan.add, plan.relu) if n is not None}
        last = max(own)
        if any(order[first] < w < last and w not in own for w in writes):
            if plan.bn is not None:
                del pairs[plan.bn]
            continue
        kept.append(plan)
    return pairs, kept


def _keeps_finite(node, modules):
    if node.op == "call_module":
        return type(modules[node.target]) in _FINITE_MODULES
    if node.op == "call_method":
        return node.target in _FINITE_METHODS
    if node.op != "call_function":
        return False
    if node.target is F.pad:  # finite if the fill value is
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
        return value is None or (isinstance(value, (int, float)) and math.isfinite(value))
    return node.target in _FINITE_FUNCTIONS or node.target in _FUSED_FUNCTIONS


def _finite_constants(node):
    """Whether the operands of node that are not graph values are finite (x + nan is not)."""
    consts = []
    fx.node.map_aggregate((node.args, node.kwargs),
                          lambda a: consts.append(a) if isinstance(a, float) else None)
    return all(math.isfinite(c) for c in consts)


def _mark_scan_free(graph, modules, model_input, run_node):
    """Sets scan_free on each fused conv whose operands come from `model_input`
    through finite-preserving ops only. A write that may put NaN/Inf into a value
    already counted finite (x.log_(), x.div_(0), possibly through a view; a submodule
    kept as one call) turns it off for every fused conv after it. The nodes run in
    the graph's order, so the convs before the first such write read nothing it wrote."""
    finite = {model_input, run_node}
    unsafe_write = False
    for node in graph.nodes:
        if (_keeps_finite(node, modules) and _finite_constants(node)
                and all(a in finite for a in node.all_input_nodes)):
            finite.add(node)
        elif _mutates(node, modules) and node.target not in _FUSED_FUNCTIONS:
            unsafe_write = True  # (a fused in-place op writes only a dead conv-BN output)
        if node.target in (_conv_bn, _conv_bn_add_relu):
            node.update_kwarg("scan_free", node in finite and not unsafe_write)


@dataclass
class _Rewrite:
    graph_module: fx.GraphModule  # forward(model, run, *the model's arguments)
    pairs: list                   # (key, conv name, BN name) of each folded pair
    relus: list                   # names of the ReLU modules the fused ops stand for
    counts: dict                  # pattern -> how many were rewritten
    input_name: str               # forward's first parameter: checked for NaN/Inf
    untraced: dict = field(default_factory=dict)  # submodule -> why tracing stopped there


def _rewrite(model, graph, untraced):
    """The eval-mode graph with the patterns replaced by calls of the fused ops."""
    modules = dict(model.named_modules())
    pairs, plans = _plans(graph, modules)
    with graph.inserting_before(next(iter(graph.nodes))):
        model_node, run_node = graph.placeholder("model"), graph.placeholder("run")
    relus = sorted({p.relu.target for p in plans if p.relu is not None
                    and p.relu.op == "call_module"})
    folded, counts = _replace(graph, pairs, plans, run_node)
    for node in graph.nodes:
        # The residual may be overwritten when it is a conv-BN output used only here,
        # and not as this conv's input (relu(bn(conv(y)) + y)).
        if node.target is _conv_bn_add_relu:
            res = node.args[3]
            node.update_kwarg("inplace", isinstance(res, fx.Node) and res.target is _conv_bn
                              and len(res.users) == 1 and node.args[2] is not res)
    model_input = run_node.next if run_node.next.op == "placeholder" else None
    _mark_scan_free(graph, modules, model_input, run_node)
    if model_input is not None:
        _restore_layout_where_seen(graph, model_input)
    _label_stages(graph, run_node, folded)
    _look_up_on(model_node, graph)
    graph.lint()
    return _Rewrite(fx.GraphModule(nn.Module(), graph, class_name="FusedGraph"), folded, relus,
                    counts, model_input and model_input.target, untraced)


def _replace(graph, pairs, plans, run_node):
    """Replaces each plan's nodes by one call; returns the folded pairs, as
    (key, conv name, BN name), and how many of each pattern were replaced."""
    bns_of = {}
    for bn, conv in pairs.items():
        bns_of.setdefault(conv.target, set()).add(bn.target)
    order = {n: i for i, n in enumerate(graph.nodes)}
    folded, counts = {}, dict.fromkeys((CONV_BN_RELU, CONV_BN, CONV_BN_ADD_RELU, ADD_RELU), 0)
    replaced, dead = [], []
    for plan in plans:
        last = plan.relu or plan.bn
        with graph.inserting_before(last):
            if plan.kind == ADD_RELU:
                new = graph.call_function(_add_relu, plan.operands)
            else:
                conv = pairs[plan.bn]
                # A conv shared by two BNs folds once per BN.
                key = (conv.target if len(bns_of[conv.target]) == 1
                       else f"{conv.target}+{plan.bn.target}")
                folded[key] = (key, conv.target, plan.bn.target)
                if plan.kind == CONV_BN_ADD_RELU:
                    new = graph.call_function(_conv_bn_add_relu,
                                              (run_node, key, conv.args[0], *plan.operands))
                else:
                    new = graph.call_function(_conv_bn, (run_node, key, conv.args[0]),
                                              {"relu": plan.kind == CONV_BN_RELU})
                dead.append(conv)
        replaced.append((last, new))
        dead += [n for n in (plan.relu, plan.add, plan.bn) if n is not None]
        counts[plan.kind] += 1
    # Rewired once all are made: a plan's operands may be another plan's output.
    for last, new in replaced:
        last.replace_all_uses_with(new)
    for node in sorted(dead, key=order.get, reverse=True):
        graph.erase_node(node)
    return list(folded.values()), counts


def _restore_layout_where_seen(graph, model_input):
    """The fused convs return channels_last, where eager convs follow their input's
    layout. Values computed from them are given back in the original layout where
    the layout shows: before `.view` (which needs it) and at the graph's outputs;
    inside the graph they stay channels_last, the layout the next fused op wants."""
    derived = set()
    for node in list(graph.nodes):
        if node.op == "output":
            node.args = fx.node.map_arg(node.args, lambda a: _restored(graph, a, node, model_input)
                                        if a in derived else a)
        elif node.target in (_conv_bn, _conv_bn_add_relu) or any(
                a in derived for a in node.all_input_nodes):
            derived.add(node)
            if ((node.op == "call_method" and node.target in _LAYOUT_METHODS
                 or node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS)
                    and node.args and node.args[0] in derived):
                node.update_arg(0, _restored(graph, node.args[0], node, model_input))


# Where the layout of a value shows in the result: `view` needs a layout it can
# reinterpret; `as_strided` reads the memory as laid out.
_LAYOUT_METHODS = ("view", "view_as", "as_strided")
_LAYOUT_FUNCTIONS = (torch.as_strided,)


def _restored(graph, value, user, model_input):
    with graph.inserting_before(user):
        return graph.call_function(_original_layout, (value, model_input))


def _label_stages(graph, run_node, pairs):
    """Before each run of nodes from one top-level submodule (a torchvision model's
    "stem", "layer1", ...), a call that labels them "stage:<name>" while a profiler runs,
    as FusedResNet labels its stages (`resnet-fused profile` reads the labels)."""
    conv_of = {key: conv for key, conv, _ in pairs}
    current = None
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            continue
        stack = node.meta.get("nn_module_stack")
        if node.op == "output":
            stage = None
        elif node.op == "call_module":
            stage = node.target.split(".")[0]
        elif node.target in (_conv_bn, _conv_bn_add_relu):
            stage = conv_of[node.args[1]].split(".")[0]
        elif stack:
            stage = next(iter(stack.values()))[0].split(".")[0]
        else:  # a function of the model's own forward: where the nodes before it were
            stage = current
        if stage != current:
            with graph.inserting_before(node):
                graph.call_function(_stage, (run_node, stage))
            current = stage


def _look_up_on(model_node, graph):
    """Module calls and attributes looked up on the model at each call, not copied
    as fx.GraphModule would: the graph never holds stale modules or buffers, and
    adds nothing to the model's state_dict."""
    for node in list(graph.nodes):
        if node.op in ("call_module", "get_attr"):
            fn = _call_module if node.op == "call_module" else _get_attr
            with graph.inserting_before(node):
                new = graph.call_function(fn, (model_node, node.target, *node.args),
                                          dict(node.kwargs))
            node.replace_all_uses_with(new)
            graph.erase_node(node)


# ---- what the rewritten graph calls -------------------------------------------------


@dataclass
class _Run:
    convs: dict          # key -> dispatch.PreparedConv
    finite: bool         # the model input and the folded weights are finite
    dtype: torch.dtype   # run dtype (the autocast dtype under autocast)
    stages: _stage_labeller = None  # while a profiler runs


def _stage(run, name):
    """Opens the profiler label "stage:<name>" (None: none), closing the one open."""
    if run.stages is None:
        return
    if name is None:
        run.stages.exit()
    else:
        run.stages.enter(name)


def _get_attr(model, name):
    for part in name.split("."):
        model = getattr(model, part)
    return model


def _call_module(model, name, *args, **kwargs):
    return _get_attr(model, name)(*args, **kwargs)


def _channels_last(t):
    return torch.channels_last_3d if t.dim() == 5 else torch.channels_last


def _conv_input(x, run):
    # The prepared weights are channels_last; a layout change costs once, at the
    # first conv, as later ops keep it.
    return x.to(run.dtype).contiguous(memory_format=_channels_last(x))


def _conv_bn(run, key, x, relu, scan_free=False):
    return dispatch.conv(_conv_input(x, run), run.convs[key], relu=relu,
                         finite=run.finite and scan_free)


def _conv_bn_add_relu(run, key, x, residual, inplace=False, scan_free=False):
    c, x, finite = run.convs[key], _conv_input(x, run), run.finite and scan_free
    if not (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype
            and tuple(residual.shape) == ops._conv_out_shape(x, c.weight, c.stride, c.padding,
                                                              c.dilation)):
        # Broadcasting or type promotion: the original's add.
        return torch.relu(dispatch.conv(x, c, relu=False, finite=finite) + residual)
    if inplace:
        return dispatch.conv_add_relu_(residual, x, c, finite=finite)
    return dispatch.conv(x, c, relu=True, finite=finite, residual=residual)


def _original_layout(t, like):
    """t as the unfused model would lay it out: contiguous unless the model's input is
    channels_last (eager convs return channels_last only for a channels_last input; the
    fused ones always do)."""
    if (isinstance(t, torch.Tensor) and t.dim() >= 3 and isinstance(like, torch.Tensor)
            and like.dim() in (4, 5)
            and not (like.is_contiguous(memory_format=_channels_last(like))
                     and not like.is_contiguous())):
        return t.contiguous()
    return t


def _add_relu(a, b):
    if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device and a.is_floating_point()):
        return ops.add_relu(a, b)
    return torch.relu(a + b)


_FUSED_FUNCTIONS = (_conv_bn, _conv_bn_add_relu, _add_relu)
_GRAPH_FUNCTIONS = (_get_attr, _call_module, _original_layout, _stage, *_FUSED_FUNCTIONS)


# ---- the fused model ----------------------------------------------------------------


@dataclass
class _GraphFold:
    watch: StateWatch  # what the fold was made from (None for an inline fold)
    convs: dict    # key -> dispatch.PreparedConv
    finite: bool   # every folded weight and bias is finite
    bns: tuple     # (reason, module) of every submodule, whose train mode stops the graph


class GraphFused(_Folding):
    """Mixed into a traced model's own class by fuse_graph (as class Fused<Name>):
    eval mode runs the rewritten graph, anything else the original forward."""

    _unfused_class = None  # the model's own class

    @property
    def fused_patterns(self):
        """{pattern: how many were rewritten}: conv-BN-ReLU, conv-BN, conv-BN-add-ReLU,
        add-ReLU."""
        return dict(self._graph_rewrite.counts)

    def to_unfused(self):
        """The model with its own class and forward (a copy)."""
        model = copy.deepcopy(self)
        model.__class__ = self._unfused_class
        del model._graph_rewrite, model._fold_cache
        return model

    def fused_status(self, x):
        """(True, "") if forward(x, ...) would run the fused graph, else (False, reason)."""
        try:
            self._check_rewrite()  # first: a module gone is named here, not in _status
        except _NotFusable as e:
            return False, str(e)
        ok, why = self._status(x)
        if not ok:
            return ok, why
        return (False, why) if (why := _train_mode_bn(self._modes())) else (True, "")

    def _modes(self):
        """(reason, module) of every submodule: one in train mode takes branches that the
        graph, traced in eval mode, does not have."""
        return tuple((f"{name} ({type(m).__name__}) is in train mode; the fused graph was "
                      "traced in eval mode", m) for name, m in self.named_modules() if name)

    def _check_rewrite(self):
        """Raises _NotFusable where a module the fused ops stand for changed since fuse()
        (replaced, a hook added, a forward replaced), or a folded conv's dtype is not the
        first's: the graph would not compute what the model now does."""
        dtype = None
        for key, conv_name, bn_name in self._graph_rewrite.pairs:
            try:
                conv, bn = self.get_submodule(conv_name), self.get_submodule(bn_name)
            except AttributeError as e:  # deleted
                raise _NotFusable(f"a module the fused graph stands for is gone ({e})") from None
            if not _foldable(conv, bn):
                raise _NotFusable(f"{conv_name} and {bn_name} are no longer a conv and a "
                                  "BatchNorm that fold into one (replaced, or a hook added)")
            dtype = dtype or conv.weight.dtype
            if conv.weight.dtype != dtype:
                raise _NotFusable(f"{conv_name} is {conv.weight.dtype} where the first folded "
                                  f"conv is {dtype}")
        for name in self._graph_rewrite.relus:
            try:
                relu = self.get_submodule(name)
            except AttributeError as e:
                raise _NotFusable(f"a module the fused graph stands for is gone ({e})") from None
            if not _plain_relu(relu):
                raise _NotFusable(f"{name} is no longer a plain ReLU (replaced, or a hook "
                                  "added)")

    def _status(self, x):
        if self.training:
            return False, "train mode runs the original forward (batch statistics)"
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
            return False, "the input is not a 4-D or 5-D tensor: the original forward runs"
        ok, why = self._kernel_status(x)
        if not ok:
            return ok, why
        pairs = self._graph_rewrite.pairs
        if x.device.type != "cpu":
            for _, conv, _ in pairs:
                if self.get_submodule(conv).weight.dim() == 5:
                    return False, (f"{conv} is a 3-D convolution, which the fused ops compute "
                                   "on the CPU only")
        for _, conv, _ in pairs[:1]:  # the model's own error is clearer than the kernels'
            w = self.get_submodule(conv).weight
            if w.dim() != x.dim():
                return False, f"the input is {x.dim()}-D but {conv} takes {w.dim()}-D input"
            if w.device != x.device:
                return False, f"the input is on {x.device} but {conv} is on {w.device}"
            if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
                return False, f"the input is {x.dtype} but {conv} is {w.dtype}"
        for _, _, name in pairs:
            bn = self.get_submodule(name)
            if isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d)) and bn.training:
                return False, f"{name} is in train mode (batch statistics)"
        return True, ""

    def forward(self, *args, **kwargs):
        rewrite = self.__dict__.get("_graph_rewrite")  # absent in copies made by __init__
        x = None if rewrite is None else args[0] if args else kwargs.get(rewrite.input_name)
        prepared = None
        # Neither 4-D nor 5-D: the model's own forward, whatever it makes of it (or its own
        # error).
        if (isinstance(x, torch.Tensor) and x.dim() in (4, 5)
                and not torch.onnx.is_in_onnx_export()):
            prepared = self._prepare_fused(x)
        if prepared is None:
            return super().forward(*args, **kwargs)
        _, fold, finite = prepared
        stages = _stage_labeller() if torch.autograd.profiler._is_profiler_enabled else None
        run = _Run(fold.convs, finite, self._run_dtype(x), stages)
        try:
            return rewrite.graph_module.forward(self, run, *args, **kwargs)
        finally:  # a label left open by an error would take in what runs after it
            if stages is not None:
                stages.exit()

    def _pairs(self):
        for key, conv, bn in self._graph_rewrite.pairs:
            yield key, [(key, self.get_submodule(conv), self.get_submodule(bn))]

    def _fold(self, dtype, watch, check_range, differentiable=False):
        self._check_rewrite()
        convs = {}
        for key, [(_, conv, bn)] in self._pairs():
            w, b = fold_conv_bn(conv, bn, key, differentiable)
            w, b, cdt = (cast_folded(w, b, dtype, key) if check_range
                         else (w.to(dtype), b.to(dtype), dtype))
            convs[key] = dispatch.prepare(w, b, conv, cdt, cached=check_range)
        finite = check_range and all(bool(torch.isfinite(c.weight).all()
                                          and torch.isfinite(c.bias).all())
                                     for c in convs.values())
        return _GraphFold(watch, convs, finite, self._modes())

    def __reduce_ex__(self, protocol):
        # The fused class is made at run time: a pickle (or copy) names the model's own.
        return _restore, (self._unfused_class,), self.__getstate__()


_FUSED_CLASSES = {}


def _fused_class(cls):
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (GraphFused, cls),
                                   {"_unfused_class": cls, "__module__": cls.__module__})
    return _FUSED_CLASSES[cls]


def _restore(cls):
    fused = _fused_class(cls)
    return fused.__new__(fused)


def fuse_graph(model):
    """Rewrites `model` in place (see the module docstring). Returns how many
    patterns were rewritten (or were by an earlier fuse() of a submodule): 0 when
    there are none, None when its forward cannot be traced (said in a warning); in
    both cases the model is left as it was. Submodules that cannot be traced run
    unfused, said in a warning."""
    if isinstance(model, GraphFused):
        return sum(model.fused_patterns.values())
    name = type(model).__name__
    try:
        graph, untraced = _trace(model)
    except _Stopped as e:
        warnings.warn(f"fuse: torch.fx cannot trace {name}: tracing stopped in {name}.forward "
                      f"itself ({e.reason}); the model is returned unchanged. Its traceable "
                      f"submodules can be fused one by one: "
                      f"model.<child> = resnet_fused.fuse(model.<child>)",
                      RuntimeWarning, stacklevel=4)
        return None
    for path, reason in untraced.items():
        warnings.warn(f"fuse: torch.fx cannot trace {name}.{path} "
                      f"({type(model.get_submodule(path)).__name__}): {reason}; it is kept as one "
                      f"call and runs unfused", RuntimeWarning, stacklevel=4)
    rewrite = _rewrite(model, graph, untraced)
    found = sum(rewrite.counts.values())
    if found:
        model.__class__ = _fused_class(type(model))
        model._fold_cache = {}
        model._graph_rewrite = rewrite
        return found
    # Nothing around them, but parts fused before (traced as calls) still count.
    return sum(sum(m.fused_patterns.values()) for m in model.modules()
               if isinstance(m, GraphFused))
