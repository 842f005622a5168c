"""The command line, end to end on small inputs."""

import importlib.util
import json
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import resnet_fused
from resnet_fused import benchmark, cli, dispatch
from resnet_fused.cli import main

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")


def test_verify_passes_and_reports(capsys):
    assert main(["verify", "--arch", "resnet18", "--size", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "all match" in out and "seeded random weights" in out


def test_verify_fails_past_twice_torchvisions_error(monkeypatch, capsys):
    # fp32 outputs off by 2e-6 relative (~10x torchvision's own error against fp64
    # here, and within the 1e-5 a fixed tolerance would allow) fail.
    forward = resnet_fused.FusedResNet.forward
    monkeypatch.setattr(resnet_fused.FusedResNet, "forward",
                        lambda self, x: forward(self, x) * (1 + 2e-6))
    assert main(["verify", "--arch", "resnet18", "--size", "64", "--device", "cpu"]) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("resnet18")]
    assert [r[1] for r in rows if r[-1] == "MISMATCH"] == ["float32"], rows


def test_bench_prints_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--arch", "resnet18", "--batch-sizes", "1,2", "--size", "64",
                 "--warmup", "1", "--repeats", "2", "--device", "cpu", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    variants = {r["variant"] for r in report["results"]}
    assert {"torchvision eager (NCHW)", "resnet_fused"} <= variants
    assert all(r["ms"] > 0 and r["batch"] in (1, 2) for r in report["results"])
    assert "vs eager NCHW" in capsys.readouterr().out


@pytest.mark.parametrize("who", ["a peer", "resnet_fused"])
def test_bench_flags_wrong_results(who, monkeypatch, capsys):
    # A variant whose output is garbage (and fast) is marked and compared with nothing;
    # if it is ours, bench fails.
    from resnet_fused import benchmark
    real = benchmark.torch_variants

    def with_garbage(*args, **kwargs):
        variants, notes = real(*args, **kwargs)
        name = "garbage" if who == "a peer" else "resnet_fused"
        variants[name] = lambda x: torch.zeros(x.shape[0], 1000)
        return variants, notes
    monkeypatch.setattr(benchmark, "torch_variants", with_garbage)
    code = main(["bench", "--arch", "resnet18", "--batch-sizes", "1", "--size", "64",
                 "--warmup", "0", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines()
               if line.startswith("garbage" if who == "a peer" else "resnet_fused "))
    assert "WRONG" in row
    if who == "a peer":
        assert code == 0
        # the fastest correct other variant is eager channels_last: the ratio is not the
        # garbage's (~0.00x)
        assert "0.00x the fastest other" not in out
    else:
        assert code == 1 and "resnet_fused computed a wrong result" in out


def test_verify_takes_a_video_resnet_on_clips(capsys):
    assert main(["verify", "--arch", "r3d_18", "--size", "16", "--frames", "2",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "clip 2x16x16 (frames x H x W)" in out and "all match" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("r3d_18")]
    assert [r[1] for r in rows] == [str(d).replace("torch.", "") for d in dispatch.CPU_DTYPES]


def test_device_auto_takes_the_cpu_for_a_video_resnet(monkeypatch, capsys):
    # Where a GPU is present too: the 3-D convolutions run fused on the CPU only.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["verify", "--arch", "r3d_18", "--size", "16", "--frames", "2"]) == 0
    captured = capsys.readouterr()
    assert "verify on cpu" in captured.out
    assert "--device auto chose cpu: the video ResNets run fused on the CPU only" in captured.err


def test_bench_times_a_video_resnet_against_eager_ncdhw(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--arch", "mc3_18", "--size", "16", "--frames", "2", "--warmup", "0",
                 "--repeats", "1", "--device", "cpu", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["input_shape"] == [3, 2, 16, 16] and report["eager"] == "torchvision eager (NCDHW)"
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"torchvision eager (NCDHW)", "torchvision eager (channels_last_3d)",
                         "resnet_fused"}
    assert all(r["batch"] == 1 and not r["wrong"] for r in rows.values())  # one clip by default
    assert all(r["clips_per_s"] == pytest.approx(1e3 / r["ms"]) and "images_per_s" not in r
               for r in rows.values())
    assert rows["torchvision eager (NCDHW)"]["speedup_vs_eager"] == 1
    out = capsys.readouterr().out
    assert "vs eager NCDHW" in out and "clips/s" in out


def test_video_options_are_refused_where_they_do_not_apply(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--arch", "resnet18", "--frames", "4", "--device", "cpu"])
    assert e.value.code == 2
    assert ("argument --frames: expected a video arch (r3d_18, mc3_18, r2plus1d_18), got "
            "--arch resnet18") in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["profile", "--arch", "resnet18", "--frames", "4", "--device", "cpu"])
    assert e.value.code == 2 and "got --arch resnet18" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "fcn_resnet50", "--frames", "4"])
    assert e.value.code == 2
    assert "argument --frames: expected a video arch, got --model" in capsys.readouterr().err
    # On a GPU the video ResNets run their own forward: their figures would be torchvision's.
    monkeypatch.setattr(cli, "_device", lambda name: torch.device("cuda"))
    for command in ("verify", "bench", "profile"):
        with pytest.raises(SystemExit) as e:
            main([command, "--arch", "r3d_18", "--device", "cuda"])
        assert e.value.code == 2
        assert ("argument --arch: the video ResNets (r3d_18, mc3_18, r2plus1d_18) run fused on "
                "the CPU only (3-D convolutions), got r3d_18 on cuda; pass --device cpu"
                in capsys.readouterr().err)


def test_bench_model_times_whole_model_and_body(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--model", "deeplabv3_resnet50", "--size", "48", "--warmup", "0",
                 "--repeats", "1", "--device", "cpu", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["part"], r["variant"]) for r in rows] == [
        (part, label) for part in ("whole model", "ResNet body")
        for label in ("unfused", "unfused channels_last", "resnet_fused")]
    assert all(r["ms"] > 0 for r in rows)
    assert 0 < rows[0]["body_share"] < 1.5  # a share, up to timing noise
    assert "body share" in capsys.readouterr().out


def test_bench_model_refuses_options_that_do_not_apply(capsys):
    assert main(["bench", "--model", "fcn_resnet50", "--peers"]) == 2
    assert "--peers cannot be combined with --model" in capsys.readouterr().err


def test_bench_timing_alternates_the_order_of_its_rounds():
    # Blocks of 2 timed runs per variant after an untimed one, the rounds in turn
    # forward and reversed.
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    benchmark.time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=4, block=2,
                               settle_ms=0)
    assert "".join(calls) == "ABC" + "AAABBBCCC" + "CCCBBBAAA"


def test_bench_timing_settles_each_block_for_settle_ms():
    # Each block's untimed runs last at least settle_ms (a fast variant runs several),
    # so that the previous variant's spinning threads have gone quiet.
    calls = []

    def variant(name):
        calls.append((name, time.perf_counter()))
        time.sleep(0.002)

    fns = {name: (lambda name=name: variant(name)) for name in "AB"}
    benchmark.time_interleaved(fns, torch.device("cpu"), warmup=0, repeats=1, block=1,
                               settle_ms=20)
    names = "".join(n for n, _ in calls)
    a, b = names.count("A"), names.count("B")
    assert names == "A" * a + "B" * b and a >= 3 and b >= 3  # untimed runs, then the timed one
    first_b = next(t for n, t in calls if n == "B")
    assert calls[a - 1][1] - calls[0][1] >= 0.018  # A's untimed runs took >= 20 ms
    assert first_b > calls[a - 1][1]


def test_profile_writes_traces_and_chart(tmp_path):
    assert main(["profile", "--arch", "resnet18", "--batch", "1", "--size", "64", "--warmup", "1",
                 "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    for name in ("trace_fused.json", "trace_unfused.json", "per_stage.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_profile_times_a_video_resnets_stages(tmp_path, capsys):
    assert main(["profile", "--arch", "r2plus1d_18", "--batch", "1", "--size", "16", "--frames",
                 "2", "--warmup", "1", "--repeats", "1", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out.split("per-stage time")[1].splitlines()
    assert "clip 2x16x16 (frames x H x W)" in table[0]
    rows = {line.split()[0]: line.split()[1:3] for line in table[2:2 + len(benchmark.VIDEO_STAGES)]}
    assert list(rows) == list(benchmark.VIDEO_STAGES)
    # The layers take measurable time; the pool and fc on one pixel may print 0.00.
    assert all(float(rows[s][0]) > 0 and float(rows[s][1]) > 0
               for s in ("stem", "layer1", "layer2", "layer3", "layer4"))


def test_predict_prints_top5(tmp_path, capsys):
    from PIL import Image
    img = tmp_path / "img.png"
    Image.fromarray((torch.rand(300, 260, 3) * 255).byte().numpy()).save(img)
    assert main(["predict", "--arch", "resnet18", "--device", "cpu", str(img)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == str(img) and len([l for l in lines if l.startswith("  ")]) == 5


def test_predict_interrupted_without_out_exits_130(tmp_path, capsys, monkeypatch):
    from PIL import Image
    img = tmp_path / "img.png"
    Image.fromarray((torch.rand(40, 30, 3) * 255).byte().numpy()).save(img)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_print_predictions", interrupted)
    assert main(["predict", "--arch", "resnet18", "--device", "cpu", str(img)]) == 130
    assert "interrupted: the results so far" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["verify", "--arch", "resnet9"], ["bench", "--batch-sizes", "x"],
                                  ["bench", "--size", "0"], ["nosuchcommand"], [],
                                  ["verify", "--batch", "0"], ["bench", "--repeats", "0"],
                                  ["profile", "--warmup", "-1"],
                                  ["bench", "--json", "/nonexistent-folder/x.json"],
                                  ["bench", "--json", "/tmp"], ["bench", "--size", "abc"],
                                  ["profile", "--out", __file__ + "/sub"],
                                  ["profile", "--out", __file__],
                                  ["profile", "--frames", "0"], ["bench", "--frames", "0"]])
def test_bad_arguments_exit_2(argv):
    r = subprocess.run([sys.executable, "-m", "resnet_fused", *argv], capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_bad_weights_or_device_is_clear(capsys):
    for argv, message in ((["--weights", "NOPE", "--device", "cpu"],
                           "neither a file nor a torchvision weights name"),
                          (["--device", "nodevice"], "argument --device: expected auto, cpu or "
                                                     "cuda[:N], got 'nodevice'"),
                          (["--device", "meta"], "argument --device: expected auto, cpu or "
                                                 "cuda[:N], got 'meta'")):
        with pytest.raises(SystemExit) as e:
            main(["verify", "--arch", "resnet18", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err  # 1: images failed


def _imports(module):
    try:
        importlib.import_module(module)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("dtype", [str(d).replace("torch.", "") for d in dispatch.CPU_DTYPES])
def test_bench_peers_rows_or_install_hint(dtype, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["bench", "--arch", "resnet18", "--batch-sizes", "1", "--size", "64", "--warmup",
                 "1", "--repeats", "1", "--device", "cpu", "--peers", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    # Errors against fp64: torchvision's own of its dtype's order (8-bit mantissas over
    # the net's depth: ~1e-2 in bf16), ours at most 2x it plus one fp32 rounding (the
    # target verify checks), and no peer on the same weights and input marked WRONG.
    report = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    errors = {r["variant"]: r["rel_err"] for r in report["results"]}
    tv_err = errors["torchvision eager (NCHW)"]
    assert 0 < tv_err < (1e-5 if dtype == "float32" else 0.1), errors
    assert errors["resnet_fused"] <= 2 * tv_err + torch.finfo(torch.float32).eps, errors
    assert "WRONG" not in out and not any(r["wrong"] for r in report["results"])
    peers = [("onnxruntime", "onnxruntime")] if dtype == "float32" else []
    if dtype != "float32":
        assert "onnxruntime: fp32 only (its CPU provider has no bfloat16 convolutions)" in out
    peers.append((f"openvino {'f32' if dtype == 'float32' else 'bf16'}", "openvino"))
    for peer, module in peers:
        missing = [m for m in (module, "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            for m in missing:
                assert f"{m}: not installed (pip install onnx onnxruntime openvino)" in out
        elif _imports(module):
            assert peer in errors, out  # timed, with its error against fp64
        else:  # installed but broken here: said, and the bench went on
            assert f"{module}: cannot be used" in out
    # The exported ONNX file does not outlive the bench (one per run would fill a disk).
    assert list(tmp_path.iterdir()) == []


def test_profile_without_matplotlib_says_how_to_get_the_chart(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["profile", "--arch", "resnet18", "--batch", "1", "--size", "64", "--warmup", "1",
                 "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "pip install resnet_fused[cli] for the chart" in capsys.readouterr().out
    assert (tmp_path / "trace_fused.json").stat().st_size > 0


def _info_rows(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line[:line.index("  ")]: line[line.index("  "):].strip() for line in lines}


def test_info_says_which_kernels_run(monkeypatch, capsys):
    from resnet_fused import _extension
    rows = _info_rows(capsys)
    assert rows["torch"] == torch.__version__
    assert rows["cpu vector ISA (our kernels)"] == _extension.cpu_isa()
    assert rows["conv1x1 float32"].startswith(
        "yes" if _extension.conv1x1_kernel_available() else "no (")
    # A kernel that does not run says so and why; on an AMX CPU our bfloat16 kernels give
    # way to oneDNN's unless asked for.
    monkeypatch.setattr(_extension, "winograd_kernel_available", lambda: False)
    monkeypatch.setattr(_extension, "conv1x1_bf16_kernel_available", lambda: True)
    monkeypatch.setattr(dispatch, "_AMX", True)
    monkeypatch.setattr(dispatch, "_BF16_ON_AMX", False)
    monkeypatch.setenv("RESNET_FUSED_CPU_ISA", "avx2")
    rows = _info_rows(capsys)
    assert rows["winograd_conv3x3 float32"].startswith("no (needs AVX2+FMA or AVX-512")
    assert rows["AMX"] == "yes" and rows["RESNET_FUSED_CPU_ISA"] == "avx2"
    if torch.bfloat16 in dispatch.CPU_DTYPES:
        assert "unless RESNET_FUSED_BF16_ON_AMX=1" in rows["conv1x1 bfloat16"]
        monkeypatch.setattr(dispatch, "_BF16_ON_AMX", True)
        assert _info_rows(capsys)["conv1x1 bfloat16"] == "yes"
    monkeypatch.setenv("RESNET_FUSED_HUGE_PAGES", "0")
    rows = _info_rows(capsys)
    assert rows["large weights in huge pages"] == "no (RESNET_FUSED_HUGE_PAGES=0)"
    assert rows["RESNET_FUSED_HUGE_PAGES"] == "0"


def test_info_without_the_extension_says_why(monkeypatch, capsys):
    from resnet_fused import _extension
    monkeypatch.setattr(_extension, "available", lambda: False)
    monkeypatch.setattr(_extension, "load_error", lambda: "ImportError: no _C here")
    rows = _info_rows(capsys)
    assert rows["extension"] == "not built: ImportError: no _C here"
    assert "conv1x1 float32" not in rows


def test_verify_fails_where_the_kernels_did_not_run(monkeypatch, capsys):
    # Unfused, verify would compare torchvision with itself: each row says so and fails.
    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", frozenset())
    assert main(["verify", "--arch", "resnet18", "--size", "32", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "UNFUSED (resnet_fused has no cpu kernels in this build)" in out
    assert "all match" not in out


@pytest.mark.parametrize("argv", [["bench", "--arch", "resnet18"], ["profile", "--arch", "resnet18"],
                                  ["bench", "--model", "fcn_resnet50"]])
def test_bench_and_profile_refuse_a_dtype_without_kernels(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--size", "32", "--device", "cpu", "--dtype", "float16"])
    assert e.value.code == 2
    assert ("resnet_fused cannot run its kernels on cpu in float16: the cpu kernels support "
            in capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # profile's folder is made only for a run that goes ahead


def test_profile_names_an_out_folder_that_cannot_be_made(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--out", "/proc/no-such-folder", "--device", "cpu"])
    assert e.value.code == 2
    # (Refused before any work where the user may not write there; as root, when made.)
    assert "argument --out: expected a folder that can be" in capsys.readouterr().err
