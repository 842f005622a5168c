"""FusedResNet.capture: the CapturedForward contract (static buffers, checks, refusal
after parameter changes) on every device, against the model's own eager output and
torchvision's; on CUDA also the graph itself (replay, held folds, latency)."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused import fuse
from resnet_fused.capture import CapturedForward

from common_utils import devices, fp32_bound, rel_err, tf32_convs, tv_model

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")

SHAPE = (2, 3, 64, 64)


@pytest.fixture(autouse=True)
def exact_fp32():
    # fp32 on CUDA compares against torchvision without TF32 rounding.
    with tf32_convs(False), warnings.catch_warnings():
        # On a GPU whose kernels are not enabled the model warns that it runs
        # torchvision's math; the contract is the same either way.
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def models(device, seed=0):
    """(torchvision reference, FusedResNet) with the same realistic weights."""
    tv = tv_model("resnet18", seed=seed).to(device)
    return tv, fuse(tv)


def inputs(device, n=3, shape=SHAPE):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=g).to(device) for _ in range(n)]


def captured(device):
    """(torchvision reference, FusedResNet, its capture at SHAPE, an input)."""
    tv, fused = models(device)
    return tv, fused, fused.capture(SHAPE), inputs(device, 1)[0]


def eager(model, x):
    with torch.inference_mode():
        return model(x)


# ---- results and buffers -------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_matches_the_model_and_torchvision(device):
    tv, fused = models(device)
    run = fused.capture(SHAPE)
    assert run.graphed == (device == "cuda")
    x, y, _ = inputs(device)
    cases = [x, x.contiguous(memory_format=torch.channels_last),
             torch.cat([y, y], 3)[..., ::2]]  # non-contiguous
    for case in cases:
        out = run(case)
        assert rel_err(out, eager(tv, case)) <= fp32_bound(tv, case)
        assert torch.equal(out, eager(fused, case))  # the same ops on the same input
        assert out.shape == (2, 1000) and out.dtype == torch.float32


@pytest.mark.parametrize("device", devices())
def test_static_output_is_overwritten_and_clone_is_not(device):
    tv, fused = models(device)
    run = fused.capture(SHAPE)
    x, y, z = inputs(device)
    kept = run(x, clone=True)
    first = run(x)
    assert first is run.output and kept is not run.output
    second = run(y)
    assert second is first  # the same buffer, now holding y's result
    assert rel_err(first, eager(tv, y)) <= fp32_bound(tv, y)
    assert rel_err(kept, eager(tv, x)) <= fp32_bound(tv, x)  # untouched by later calls
    assert torch.equal(run.input, y.contiguous())
    y.add_(1)  # the input was copied: changing it after the call changes nothing
    assert rel_err(run.output, eager(tv, y - 1)) <= fp32_bound(tv, y - 1)
    assert rel_err(run(z), eager(tv, z)) <= fp32_bound(tv, z)


@pytest.mark.parametrize("device", devices())
def test_no_gradients_no_inference_tensors_no_autocast(device):
    tv, fused = models(device)
    run = fused.capture(SHAPE)
    x = inputs(device, 1)[0].requires_grad_()
    out = run(x)
    # Usable outside inference mode; no graph back to x or the weights.
    assert not out.requires_grad and not out.is_inference() and not run.input.requires_grad
    low = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(torch.device(device).type, dtype=low):
        out = run(x.detach())
    assert out.dtype == torch.float32  # computes in the captured dtype
    assert rel_err(out, eager(tv, x.detach())) <= fp32_bound(tv, x)


def test_batch_one_and_other_shapes():
    tv, fused = models("cpu")
    for shape in [(1, 3, 64, 64), (3, 3, 97, 131)]:
        run = fused.capture(shape)
        x = inputs("cpu", 1, shape)[0]
        assert run(x).shape == (shape[0], 1000)
        assert rel_err(run(x), eager(tv, x)) <= fp32_bound(tv, x)


# ---- refusals --------------------------------------------------------------------


def test_capture_refuses_bad_arguments():
    _, fused = models("cpu")
    bad_shapes = [(2, 3, 64), (2, 4, 64, 64), (0, 3, 64, 64), (2, 3, 64, 64, 1), "2x3x64x64",
                  (2, 3, 64.5, 64)]
    for shape in bad_shapes:
        with pytest.raises(ValueError, match=r"batch_shape \(N, 3, H, W\) of positive ints, got"):
            fused.capture(shape)
    with pytest.raises(TypeError, match=r"expected dtype torch.float32 \(the model's.*got "
                                        r"torch.float16"):
        fused.capture(SHAPE, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"expected device cpu \(the model's.*got meta"):
        fused.capture(SHAPE, device="meta")
    with pytest.raises(ValueError, match=r"got a tensor of shape \(2, 3, 64, 64\) \(pass its "
                                         r"\.shape\)"):
        fused.capture(torch.zeros(SHAPE))
    with pytest.raises(TypeError, match="expected dtype a torch.dtype .*got str 'float32'"):
        fused.capture(SHAPE, dtype="float32")
    with pytest.raises(ValueError, match="expected device a torch.device or a name .*got 'bogus'"):
        fused.capture(SHAPE, device="bogus")
    with pytest.raises(TypeError, match="capture: expected a ResNet .*got Linear"):
        CapturedForward(torch.nn.Linear(2, 2), SHAPE)
    for warmup in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"expected warmup an int >= 1, got"):
            fused.capture(SHAPE, warmup=warmup)
    fused.train()
    with pytest.raises(RuntimeError, match="expected the model in eval mode.*got train mode"):
        fused.capture(SHAPE)
    fused.eval()
    assert fused.capture(torch.Size(SHAPE), dtype=torch.float32, device="cpu", warmup=1)


def test_call_refuses_other_inputs():
    _, fused, run, x = captured("cpu")
    with pytest.raises(ValueError, match=r"captured shape \(2, 3, 64, 64\), got \(1, 3, 64, 64\)"):
        run(x[:1])
    with pytest.raises(ValueError, match=r"captured shape .*got \(2, 3, 64, 63\)"):
        run(x[..., :63])
    with pytest.raises(TypeError, match=r"captured dtype torch.float32, got torch.float64"):
        run(x.double())
    with pytest.raises(ValueError, match=r"captured device cpu, got meta"):
        run(x.to("meta"))
    with pytest.raises(TypeError, match=r"expected x a Tensor, got ndarray"):
        run(x.numpy())
    fused.train()
    with pytest.raises(RuntimeError, match="eval mode.*got train mode"):
        run(x)


# ---- parameter changes -------------------------------------------------------------


def _scale_conv(model):
    with torch.no_grad():
        model.layer2[0].conv1.weight.mul_(1.5)


def _scale_fc(model):
    with torch.no_grad():
        model.fc.weight.mul_(0.5)


def _shift_running_mean(model):
    model.layer3[1].bn2.running_mean.add_(0.25)


def _load_other_weights(model):
    model.load_state_dict(tv_model("resnet18", seed=1).state_dict())


def _assign_fc(model):
    model.fc = nn.Linear(512, 1000).to(model.fc.weight.device)


def _assign_parameter(model):
    bn = model.layer1[0].bn1
    bn.weight = nn.Parameter(bn.weight.detach() * 2)


def _replace_storage(model):
    conv = model.layer4[1].conv2
    conv.weight.data = conv.weight.detach() * 0.75


def _change_eps(model):
    model.bn1.eps = 0.1


def _train_step_statistics(model):
    # A train-mode forward updates the BN running statistics.
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32, device=model.fc.weight.device))
    model.eval()


CHANGES = [_scale_conv, _scale_fc, _shift_running_mean, _load_other_weights, _assign_fc,
           _assign_parameter, _replace_storage, _change_eps, _train_step_statistics]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_parameter_change_refuses_until_recapture(device, change):
    _, fused, run, x = captured(device)
    before = run(x, clone=True)
    output = run.output
    change(fused)
    with pytest.raises(RuntimeError, match="changed after capture.*recapture"):
        run(x)
    run.recapture()
    # The independent reference: torchvision with the changed model's parameters.
    plain = fused.to_torchvision().eval()
    ref = eager(plain, x)
    assert rel_err(ref, before) > 1e-4  # the change matters
    assert run(x) is output  # the same buffer across recaptures
    assert rel_err(output, ref) <= fp32_bound(plain, x)


def test_unrelated_assignments_are_not_changes():
    tv, fused = models("cpu")
    run = fused.capture(SHAPE)
    other = nn.Linear(3, 3)
    other.weight = nn.Parameter(torch.zeros(3, 3))  # another module: the tree is re-read
    fused.fc.weight = fused.fc.weight                # the same parameter, assigned again
    fused.to(torch.float32)                          # a no-op conversion
    x = inputs("cpu", 1)[0]
    assert rel_err(run(x), eager(tv, x)) <= fp32_bound(tv, x)


def test_recapture_refuses_a_moved_or_converted_model():
    _, fused = models("cpu")
    run = fused.capture(SHAPE)
    fused.double()
    with pytest.raises(RuntimeError, match=r"expected the model in torch.float32 on cpu as "
                                           r"captured, got torch.float64 on cpu"):
        run.recapture()


# ---- the benchmark script, and the CUDA graph itself ------------------------------------


def run_benchmark(device, *args):
    """benchmarks/capture_latency.py's output (it must exit 0)."""
    root = Path(__file__).resolve().parents[1]
    # The package may be built in place rather than installed: import it from the root.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "capture_latency.py"),
                           "--device", device, *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_benchmark_runs_on_the_cpu_and_says_no_graph():
    out = run_benchmark("cpu", "--arch", "resnet18", "--size", "32", "--repeats", "3",
                        "--warmup", "1")
    assert "no CUDA graph on cpu" in out and "captured:" in out and "eager:" in out


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_replay_equals_eager(dtype):
    tv, fused = models("cuda")
    fused.to(dtype)
    run = fused.capture(SHAPE)
    assert run.graphed and run.device.type == "cuda" and run.dtype == dtype
    exact = tv.double()
    same_dtype = tv_model("resnet18").cuda().to(dtype)
    for x in inputs("cuda"):
        x = x.to(dtype)
        out = run(x)
        assert torch.equal(out, eager(fused, x))  # the same kernels on the same input
        ref = eager(exact, x.double())
        # fp16: at most 2x torchvision's own fp16 error, as in test_model.
        bound = 2 * rel_err(eager(same_dtype, x), ref) + torch.finfo(torch.float32).eps
        assert rel_err(out, ref) <= bound


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_keeps_its_folded_weights():
    tv, fused, run, x = captured("cuda")
    with torch.inference_mode(), torch.autocast("cuda", torch.float16):
        fused(x)  # with the CUDA kernels, the model refolds in fp16 and drops its fp32 fold
    torch.cuda.empty_cache()
    # Freed memory, if any, now holds NaN; the graph must not read it.
    junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]
    assert rel_err(run(x), eager(tv, x)) <= fp32_bound(tv, x)
    del junk


@pytest.mark.cuda
@needs_cuda
def test_cuda_replay_on_a_side_stream():
    tv, fused, run, x = captured("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = run(x, clone=True)
    torch.cuda.current_stream().wait_stream(side)
    assert rel_err(out, eager(tv, x)) <= fp32_bound(tv, x)


@pytest.mark.cuda
@needs_cuda
def test_cuda_batch_one_latency_is_printed(capsys):
    # A measurement, not an assertion: a shared GPU's timings vary.
    out = run_benchmark("cuda", "--repeats", "100")
    with capsys.disabled():
        print("\n" + out)
    assert "no CUDA graph" not in out and "captured:" in out
