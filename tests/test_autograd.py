"""Gradients: the ops' backward formulas against torch's (gradcheck in fp64), and
FusedResNet in eval mode with gradients enabled against torchvision's eval-mode
gradients (input, conv weights, BN affine parameters).

Model gradients are compared in the relative 2-norm, ||ours - ref|| / ||ref||:
where a pre-activation lies within rounding of 0 (or a max-pool window ties), the
fused and unfused forwards may take different sides of the ReLU/max kink, which
changes single gradient elements by O(1) while the gradient as a whole agrees to
fp32 rounding. The max-norm measure would flag those, run to run."""

import math
import warnings

import pytest
import torch

from resnet_fused import dispatch, fuse, ops

from common_utils import (ConvCase, fp32_bound, fp32_bounds, grad_err, rel_err, requires_extension, tol,
                          tv_model)

pytestmark = requires_extension


def _f64(case, seed=0):
    x, w, b, r = case.tensors(torch.float64, seed=seed)
    return [t.requires_grad_() for t in (x, w, b, r)]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("case", [ConvCase(4, 6, 5, 5, R=3, padding=1),
                                  ConvCase(4, 6, 6, 7, R=3, stride=2, padding=1, groups=2),
                                  ConvCase(3, 5, 7, 7, R=1, N=1)], ids=str)
def test_conv_bias_act_gradcheck(case, relu):
    x, w, b, r = _f64(case)
    s, p, d, g = case.geometry()
    fn = lambda x, w, b, r: ops.conv_bias_act(x, w, b, r, s, p, d, g, relu=relu)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, r))
    fn = lambda x, w: ops.conv_bias_act(x, w, None, None, s, p, d, g, relu=relu)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))


def test_add_relu_gradcheck():
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.add_relu, (a, b))


@pytest.mark.parametrize("op", ["add_relu_", "conv_bias_add_relu_", "conv1x1_add_relu_"])
def test_in_place_ops_refuse_operands_that_require_grad(op):
    # They have no backward: a gradient through them would be silently wrong.
    x = torch.randn(1, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 1, 1)
    y = (torch.randn(1, 64, 4, 4, requires_grad=True) * 2).contiguous(
        memory_format=torch.channels_last)
    call = {"add_relu_": lambda: ops.add_relu_(y, x),
            "conv_bias_add_relu_": lambda: ops.conv_bias_add_relu_(y, x, w),
            "conv1x1_add_relu_": lambda: ops.conv1x1_add_relu_(y, x, w, ops.conv1x1_weight(w))}[op]
    with pytest.raises(RuntimeError, match=f"{op}: expected no operand that requires grad .* got "
                                           f"(a|residual) requiring grad"):
        call()
    with torch.no_grad():
        call()  # no graph recorded: allowed


def _winograd(x, w, b, r, case, tile):
    u = ops.winograd_weight(w.detach(), tile, stride=case.stride)
    return ops.winograd_conv3x3(x, w, u, b, r, stride=case.stride)


def _grouped(x, w, b, r, case, tile):
    p = ops.grouped_conv_weight(w.detach(), case.groups)
    return ops.grouped_conv3x3(x, w, p, b, r, stride=case.stride)


def _stem(x, w, b, r, case, tile):
    s, p, _, _ = case.geometry()
    return ops.stem_conv(x, w, ops.stem_conv_weight(w.detach()), b, r, stride=s, padding=p)


def _conv1x1(x, w, b, r, case, tile):
    return ops.conv1x1(x, w, ops.conv1x1_weight(w.detach()), b, r, stride=case.stride)


@pytest.mark.parametrize("op, case, tile", [
    (_winograd, ConvCase(16, 24, 9, 11, R=3, padding=1), 2),
    (_winograd, ConvCase(16, 24, 9, 11, R=3, padding=1), 4),
    (_winograd, ConvCase(16, 24, 9, 11, R=3, stride=2, padding=1), 2),
    (_grouped, ConvCase(32, 32, 9, 11, R=3, padding=1, groups=8), None),
    (_grouped, ConvCase(32, 32, 9, 11, R=3, stride=2, padding=1, groups=8), None),
    (_stem, ConvCase(3, 32, 9, 11, R=7, stride=2, padding=3), None),
    (_conv1x1, ConvCase(16, 64, 9, 11), None),
    (_conv1x1, ConvCase(16, 64, 9, 11, stride=2), None)],
    ids=lambda v: v.__name__.strip("_") if callable(v) else str(v))
def test_fp32_kernels_grads_match_torchs_in_fp64(op, case, tile):
    # fp32 only (the kernels' dtype): input, weight, bias and residual gradients of
    # relu(conv + b + r) against autograd through F.conv2d in fp64 on the same values;
    # the packed weight gets none. Each gradient is a sum over at most n terms.
    x, w, b, r = (t.requires_grad_() for t in case.tensors())
    out = op(x, w, b, r, case, tile)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b, r)]
    x64, w64, b64, r64 = ref_leaves
    s, p, d, groups = case.geometry()
    ref = (torch.nn.functional.conv2d(x64, w64, b64, s, p, d, groups) + r64).relu()
    ref.backward(g.double())
    n = max(case.K * case.R * case.R // groups, case.N * math.prod(case.out_hw))
    for name, ours, theirs in zip("xwbr", (x, w, b, r), ref_leaves):
        assert rel_err(ours.grad, theirs.grad) <= tol(torch.float32, n), name


@pytest.mark.parametrize("dtype", [torch.float32])
def test_opcheck_with_gradients(dtype):
    case = ConvCase(8, 16, 6, 6, R=3, padding=1)
    x, w, b, r = (t.requires_grad_() for t in case.tensors(dtype))
    s, p, d, g = (list(v) if isinstance(v, tuple) else v for v in case.geometry())
    torch.library.opcheck(torch.ops.resnet_fused.conv_bias_act.default, (x, w, b, r, s, p, d, g),
                          dict(relu=True))
    u = ops.winograd_weight(w.detach())
    torch.library.opcheck(torch.ops.resnet_fused.winograd_conv3x3.default, (x, w, u, b, r),
                          dict(relu=True))
    a = torch.randn(2, 3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.resnet_fused.add_relu.default, (a, torch.randn(2, 3, 4)))


def _grads(model, x):
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    named = {n: p.grad for n, p in model.named_parameters()
             if p.grad is not None and ("conv" in n or "bn" in n or "downsample" in n)}
    return out, x.grad, named


# fp64 runs the same fold and ops (the CPU op's portable path) with rounding far
# below any pre-activation's distance from the ReLU kink, so no element can flip:
# a strict check of the whole backward. fp32 checks the production path on a model
# small enough that flips have not been seen on AVX2 or AVX-512 CPUs; ResNet-50 in
# fp32 has flipped elements on some CPUs (relative 2-norm 5e-4). fp32 is held to
# fp32_bound (torchvision's own fp32 error against fp64, for each measure), fp64 to
# 1e-10 (~5e5 ulps: reduction order only, no kink flips).
@pytest.mark.parametrize("arch,dtype", [("resnet18", torch.float32),
                                        ("resnet18", torch.float64),
                                        ("resnet50", torch.float64)])
def test_eval_mode_with_gradients_runs_fused_and_matches_torchvision(arch, dtype, monkeypatch):
    monkeypatch.setattr(dispatch, "CPU_DTYPES", dispatch.CPU_DTYPES + (torch.float64,))
    tv = tv_model(arch).to(dtype)
    fused = fuse(tv).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert fused.fused_status(x1) == (True, "")
    # The profiler outside the filter: torch 2.11's warns about itself on entry.
    with torch.profiler.profile() as prof:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "running unfused" warning
            ours = _grads(fused, x1)
    calls = {e.key for e in prof.key_averages()}
    assert "resnet_fused::conv_bias_act" in calls
    theirs = _grads(tv, x2)
    if dtype == torch.float32:
        out_tol = fp32_bound(tv, x)
        x_tol, tols = fp32_bounds(tv, x, run=lambda m, x: _grads(m, x.requires_grad_())[1:],
                                  measure=grad_err)
    else:
        out_tol = x_tol = 1e-10
        tols = {name: 1e-10 for name in theirs[2]}
    assert rel_err(ours[0], theirs[0]) <= out_tol
    assert grad_err(ours[1], theirs[1]) <= x_tol
    assert ours[2].keys() == theirs[2].keys() and len(ours[2]) > 0
    for name in theirs[2]:
        assert grad_err(ours[2][name], theirs[2][name]) <= tols[name], name
    # Eval mode: running statistics untouched.
    for (n, b1), (_, b2) in zip(fused.named_buffers(), tv.named_buffers()):
        assert torch.equal(b1, b2), n


def test_saliency_with_frozen_parameters():
    # Gradients w.r.t. the input only (Grad-CAM, saliency, adversarial examples).
    tv = tv_model("resnet18").requires_grad_(False)
    fused = fuse(tv).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    def input_grad(model, x):
        x = x.clone().requires_grad_()
        model(x)[0, 3].backward()
        return x.grad

    bound = fp32_bound(tv, x, run=input_grad, measure=grad_err)
    assert grad_err(input_grad(fused, x), input_grad(tv, x)) <= bound


def test_no_grad_keeps_the_cached_fold():
    fused = fuse(tv_model("resnet18")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fused(x)
    cached = dict(fused._fold_cache)
    fused(x.requires_grad_())  # a gradient forward folds inline, leaves the cache alone
    assert len(cached) == 1
    assert all(fused._fold_cache[k] is v for k, v in cached.items())


def test_compiled_eval_mode_training_step():
    # A fine-tuning step with BN in eval mode: forward and loss compiled as one
    # graph (AOTAutograd traces the ops' registered backward), then backward.
    tv = tv_model("resnet18")
    fused = fuse(tv).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 7])

    def loss_of(model, inp=x):
        return torch.nn.functional.cross_entropy(model(inp), target)

    step = torch.compile(loss_of, fullgraph=True)
    step(fused)  # compiles
    with torch.profiler.profile() as prof:
        ours = step(fused)
        ours.backward()
    calls = {e.key for e in prof.key_averages()}
    assert "resnet_fused::conv_bias_act" in calls, "the compiled step did not run our op"
    theirs = loss_of(tv)
    theirs.backward()
    assert rel_err(ours, theirs) <= fp32_bound(tv, x, run=loss_of)

    def param_grads(model, x):
        for p in model.parameters():
            p.grad = None
        loss_of(model, x).backward()
        return [p.grad for p in model.parameters()]

    bounds = fp32_bounds(tv, x, run=param_grads, measure=grad_err)
    for (name, p), (_, q), bound in zip(fused.named_parameters(), tv.named_parameters(), bounds):
        assert grad_err(p.grad, q.grad) <= bound, name


@pytest.mark.parametrize("where", ["module", "global"])
def test_a_backward_hook_runs_torchvision(where, monkeypatch):
    # The fused forward does not call the trunk's modules, so their backward hooks would
    # never run: with one registered, a forward that records a graph runs torchvision's.
    monkeypatch.setattr("resnet_fused.model._warned", set())
    tv = tv_model("resnet18")
    fused = fuse(tv)
    x = torch.randn(1, 3, 64, 64)
    counts = {}

    def run(model, key):
        calls = []
        hook = lambda mod, gin, gout: calls.append(  # noqa: E731
            "ResNet" if mod is model else type(mod).__name__)
        if where == "module":
            handle = model.layer1[0].conv1.register_full_backward_hook(hook)
        else:  # a full one on every module would meet the blocks' in-place sums
            handle = torch.nn.modules.module.register_module_backward_hook(hook)
        try:
            xg = x.clone().requires_grad_()
            model(xg).square().sum().backward()
        finally:
            handle.remove()
        counts[key] = calls
        return xg.grad

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad = run(fused, "fused")
    ref = run(tv, "torchvision")
    assert counts["fused"] == counts["torchvision"] and counts["fused"]

    def input_grad(model, x):
        x.requires_grad_()
        model(x).square().sum().backward()
        return x.grad

    assert rel_err(grad, ref) <= fp32_bound(tv, x, run=input_grad)
    assert any("backward hook" in str(w.message) for w in caught)
