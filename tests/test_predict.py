"""`resnet-fused predict` on image folders: results against torchvision, two ranks under
torchrun (gloo) against one process, a killed run resumed, features, bad arguments."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import resnet_fused
from resnet_fused import predict
from resnet_fused.cli import load_models, main

from common_utils import fp32_bound

pytestmark = pytest.mark.skipif(not resnet_fused.available(), reason="extension not built")

# Small crops keep the model's share of each run low; the full-size preprocessing has
# its own test against torchvision's transforms.
FAST = ["--arch", "resnet18", "--device", "cpu", "--resize", "64", "--crop", "56",
        "--no-progress"]
N_GOOD = 296  # + 2 corrupt + 2 grayscale = 300 image files
CORRUPT = ("broken.jpg", "truncated.jpg")
IMAGENET = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.dirname(resnet_fused.__file__)), os.environ.get("PYTHONPATH", "")]))


def _photo(rng, h, w):
    """A smooth random color field with grain: outputs differ from image to image."""
    low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    smooth = np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.float32)
    return np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        folder = root / ("a" if i % 3 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(_photo(rng, int(rng.integers(40, 97)), int(rng.integers(40, 97))))
        ext = ("jpg", "png", "jpeg", "bmp")[i % 4]  # BMP: torchvision cannot, PIL decodes
        img.save(folder / f"img{i:03d}.{ext}")
    gray = Image.fromarray(_photo(rng, 70, 90)[..., 0])
    gray.save(root / "gray.jpg")
    gray.save(root / "gray.png")
    (root / CORRUPT[0]).write_bytes(b"this is not an image" * 10)
    jpeg = (root / "b" / "c" / "img000.jpg").read_bytes()
    (root / CORRUPT[1]).write_bytes(jpeg[:len(jpeg) // 2])
    (root / "notes.txt").write_text("not listed: no image extension")
    return root


def _read(path):
    return [json.loads(line) for line in open(path)]


def _by_path(records):
    out = {r["path"]: r for r in records}
    assert len(out) == len(records), "a path recorded twice"
    return out


@pytest.fixture(scope="module")
def single(image_dir, tmp_path_factory):
    """One process over all images: (records by path, the --out path)."""
    out = tmp_path_factory.mktemp("single") / "results.jsonl"
    assert main(["predict", str(image_dir), "--out", str(out), "--workers", "1", *FAST]) == 1
    assert not os.path.exists(str(out) + ".parts")  # merged and cleaned up
    return _by_path(_read(out)), out


def _reference_run(image_dir):
    """torchvision's unfused model (its fc apart) and the pipeline's resized and cropped
    images normalized by torchvision, with their paths."""
    tv, _, _ = load_models("resnet18", None, torch.device("cpu"))
    paths = [p for p in predict.list_images([str(image_dir)]) if os.path.basename(p) not in CORRUPT]
    data = predict.ImageFiles(paths, 64, 56)
    images = torch.stack([data[i][1] for i in range(len(data))])
    fc, tv.fc = tv.fc, torch.nn.Identity()
    return tv, fc, IMAGENET(images.float() / 255), paths


@pytest.fixture(scope="module")
def reference(image_dir):
    """path -> (pooled embedding, class probabilities) by torchvision's model."""
    tv, fc, x, paths = _reference_run(image_dir)
    with torch.inference_mode():
        emb = torch.cat([tv(b) for b in x.split(64)])
        probs = fc(emb).softmax(1)
    return {p: (e, q) for p, e, q in zip(paths, emb, probs)}


@pytest.fixture(scope="module")
def tolerance(image_dir):
    """How far the fused pipeline may lie from `reference`: fp32_bound for the embeddings
    (relative to their largest value) and, for a probability, relatively: logits off by
    at most d move each softmax probability by a factor within exp(+-2d)."""
    tv, fc, x, _ = _reference_run(image_dir)
    features = fp32_bound(tv, x)
    head = torch.nn.Sequential(tv, fc).eval()
    with torch.inference_mode():
        d = fp32_bound(head, x) * head(x).abs().max().item()
    return {"features": features, "probabilities": math.expm1(2 * d)}


def assert_same_topk(got, expected, rel):
    """Same classes in the same order and the same probabilities to `rel`, except that
    classes whose probabilities tie within `rel` may swap places."""
    assert len(got) == len(expected)
    probs = [e["prob"] for e in expected]
    for g, e in zip(got, expected):
        assert g["prob"] == pytest.approx(e["prob"], rel=rel)
        if g["index"] != e["index"]:
            near = [p for p in probs if abs(p - e["prob"]) <= rel * e["prob"]]
            assert len(near) > 1 or e is expected[-1], (got, expected)


def _topk_of(probs, k=5):
    top = probs.topk(k)
    return [dict(index=i, prob=p) for i, p in zip(top.indices.tolist(), top.values.tolist())]


# ---------------------------------------------------------------- preprocessing


def test_preprocessing_matches_torchvision_transforms(image_dir):
    paths = predict.list_images([str(image_dir)])
    assert len(paths) == N_GOOD + 4 and not any(p.endswith(".txt") for p in paths)
    sample = [p for p in paths if "gray" in p or p.endswith((".bmp", ".png"))][:12] + paths[:8]
    data = predict.ImageFiles(sample)
    pil = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                              transforms.PILToTensor()])
    for i, path in enumerate(sample):
        if os.path.basename(path) in CORRUPT:
            continue
        _, ours, err = data[i]
        assert err == "" and ours.shape == (3, 224, 224) and ours.dtype == torch.uint8
        theirs = pil(Image.open(path).convert("RGB"))
        # Tensor and PIL resizing round differently by at most one level.
        assert (ours.int() - theirs.int()).abs().max() <= 1, path
        # Normalization is torchvision's ToTensor + Normalize, bit for bit.
        assert torch.equal(predict.normalize(theirs[None], torch.device("cpu"))[0],
                           IMAGENET(theirs.float() / 255))


def test_extreme_aspect_ratio_is_refused_not_resized(tmp_path):
    # 3000x1 resized to a shorter side of 256 would be 768000x256 pixels (590 MB).
    Image.new("RGB", (3000, 1)).save(tmp_path / "line.png")
    Image.new("RGB", (900, 4)).save(tmp_path / "wide.png")  # 57600x256: under the limit
    data = predict.ImageFiles([str(tmp_path / "line.png"), str(tmp_path / "wide.png")])
    _, img, err = data[0]
    assert "3000x1 pixels to a shorter side of 256 would give 196608000 pixels" in err
    assert img.shape == (3, 224, 224)
    _, img, err = data[1]
    assert err == "" and img.shape == (3, 224, 224)


def test_decoding_errors_and_no_deprecation_spam(image_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision 0.29's deprecation warning included
        img = predict.decode(str(image_dir / "gray.jpg"))
    assert img.shape == (3, 70, 90) and torch.equal(img[0], img[1])
    for name, why in zip(CORRUPT, ("cannot identify image file", "truncated")):
        with pytest.raises(predict.DecodeError, match=why):
            predict.decode(str(image_dir / name))
    with pytest.raises(predict.DecodeError, match="cannot read: No such file"):
        predict.decode(str(image_dir / "missing.jpg"))


# ---------------------------------------------------------------- one process


def test_results_match_torchvision(single, reference, tolerance, image_dir):
    records, out = single
    paths = predict.list_images([str(image_dir)])
    assert sorted(records) == paths and [r["path"] for r in _read(out)] == paths
    for name in CORRUPT:
        assert "cannot decode" in records[str(image_dir / name)]["error"]
    good = sorted(reference)
    # The check has power: images' top-1 probabilities differ far more than the tolerance.
    rel = tolerance["probabilities"]
    top1 = torch.stack([reference[p][1].max() for p in good])
    assert (top1.max() - top1.min()) / top1.mean() > 100 * rel
    for p in good:
        rec = records[p]
        assert rec["config"] == dict(arch="resnet18", weights="seeded random (seed 0)", resize=64,
                                     crop=56, output="top5")
        assert all(isinstance(t["name"], str) for t in rec["topk"])
        assert_same_topk(rec["topk"], _topk_of(reference[p][1]), rel)


def test_rerun_skips_recorded_images(single, image_dir, tmp_path, capsys):
    _, out = single
    copy = tmp_path / "results.jsonl"
    shutil.copy(out, copy)
    before = copy.read_bytes()
    assert main(["predict", str(image_dir), "--out", str(copy), "--workers", "0", *FAST]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (f"300 images (300 of them from an earlier run): 298 classified, 2 failed; "
                    f"results in {copy}")
    assert copy.read_bytes() == before
    # --retry-errors decodes the two corrupt files again; each is still recorded once.
    assert main(["predict", str(image_dir), "--out", str(copy), "--retry-errors", *FAST]) == 1
    assert "(298 of them from an earlier run): 298 classified, 2 failed" in capsys.readouterr().out
    assert copy.read_bytes() == before


def test_resume_with_other_settings_is_refused(single, image_dir, tmp_path, capsys):
    _, out = single
    copy = tmp_path / "results.jsonl"
    shutil.copy(out, copy)
    with pytest.raises(SystemExit) as e:
        main(["predict", str(image_dir), "--out", str(copy), "--topk", "3", *FAST])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "argument --out: expected results of the same settings" in err
    assert "output top3" in err and "output top5" in err


# ---------------------------------------------------------------- torchrun


def test_torchrun_two_ranks_give_the_same_results(single, tolerance, image_dir, tmp_path):
    out = tmp_path / "results.jsonl"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "resnet_fused", "predict", str(image_dir),
                        "--out", str(out), "--workers", "0", *FAST[:-1]],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1, r.stderr  # two corrupt images
    assert "on 2 ranks (cpu)" in r.stdout and "rank 0 of 2: [" in r.stderr
    assert "150/150 images" in r.stderr  # rank 0's half, no padding duplicates
    assert "300 images: 298 classified, 2 failed" in r.stdout
    two, one = _by_path(_read(out)), single[0]
    assert two.keys() == one.keys()
    for p in one:
        assert one[p].get("error") == two[p].get("error")
        if "topk" in one[p]:
            assert_same_topk(two[p]["topk"], one[p]["topk"], 2 * tolerance["probabilities"])
    assert not os.path.exists(str(out) + ".parts")


# ---------------------------------------------------------------- killed and resumed

# The CLI with a model slowed down, so that it can be killed after a few batches.
SLOW_CLI = """
import sys, time
import resnet_fused.cli as cli
load = cli.load_models
def slow(*args):
    tv, fused, desc = load(*args)
    forward = fused.forward
    fused.forward = lambda x: (time.sleep(0.4), forward(x))[1]
    return tv, fused, desc
cli.load_models = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_killed_run_resumes_with_every_image_once(single, tolerance, image_dir, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    part = tmp_path / "results.jsonl.parts" / "rank00000.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "predict", str(image_dir), "--out",
                             str(out), "--batch-size", "8", "--workers", "1", *FAST],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (part.exists() and part.read_bytes().count(b"\n") >= 24):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended or stalled"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # As if killed in the middle of a write: a torn last line.
    with open(part, "ab") as f:
        f.write(b'{"path": "' + str(image_dir).encode() + b'/a/img0')
    kept = len(predict.read_records(part))
    assert 24 <= kept < 300 and not out.exists()

    assert main(["predict", str(image_dir), "--out", str(out), *FAST]) == 1
    assert f"300 images ({kept} of them from an earlier run)" in capsys.readouterr().out
    records = _read(out)
    assert sorted(r["path"] for r in records) == sorted(single[0])  # each image once
    resumed, one = _by_path(records), single[0]
    for p in one:
        assert one[p].get("error") == resumed[p].get("error")
        if "topk" in one[p]:
            assert_same_topk(resumed[p]["topk"], one[p]["topk"], 2 * tolerance["probabilities"])


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_features_round_trip(fmt, reference, tolerance, image_dir, tmp_path, monkeypatch):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    monkeypatch.setattr(predict, "FEATURE_SHARD_ROWS", 16)  # several shards
    folder = image_dir / "b"  # a third of the images, and no corrupt one
    out = tmp_path / "features.jsonl"
    assert main(["predict", str(folder), "--out", str(out), "--features", fmt, "--batch-size",
                 "5", *FAST]) == 0
    records = _read(out)
    shards = sorted(os.listdir(tmp_path / "features.jsonl.features"))
    assert len(shards) > 2 and all(s.endswith("." + fmt) for s in shards)
    assert all(r["config"]["output"] == "features" and "topk" not in r for r in records)
    got = predict.load_features(out, records)
    want = torch.stack([reference[r["path"]][0] for r in records]).numpy()
    assert got.shape == (len(records), 512) and got.dtype == np.float32
    assert np.abs(got - want).max() <= tolerance["features"] * np.abs(want).max()
    # Rows differ per image, so a shuffled row or shard would not pass.
    assert np.abs(want[1:] - want[:-1]).max() > 1e-2 * np.abs(want).max()


def test_safetensors_missing_says_how_to_install(image_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(SystemExit) as e:
        main(["predict", str(image_dir / "b"), "--out", str(tmp_path / "f.jsonl"), "--features",
              "safetensors", *FAST])
    assert e.value.code == 2
    assert "pip install safetensors" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before any file was made


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "argument PATH: expected an existing image file or folder, got '{missing}', "
                    "which does not exist"),
    (["{empty}"], "argument PATH: expected image files (.jpg"),
    (["{images}", "--topk", "0"], "argument --topk: expected an integer >= 1, got '0'"),
    (["{images}", "--topk", "1001"], "argument --topk: expected at most the model's 1000 classes, "
                                     "got 1001"),
    (["{images}", "--out", "{missing}/r.jsonl"], "argument --out: expected a file in an existing "
                                                 "folder, got '{missing}/r.jsonl'"),
    (["{images}", "--out", "{empty}"], "argument --out: expected a file path, got '{empty}', "
                                       "which is a folder"),
    (["{images}", "--features", "npy"], "argument --features: expected --out too"),
    (["{images}", "--features", "npy", "--out", "{missing}.jsonl", "--topk", "3"],
     "argument --topk: expected no --topk with --features"),
])
def test_bad_arguments_name_the_argument(args, message, image_dir, tmp_path, capsys):
    names = dict(missing=str(tmp_path / "missing"), empty=str(tmp_path / "empty"),
                 images=str(image_dir / "b"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["predict", *[a.format(**names) for a in args], *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message.format(**names) in err and len(err.strip().splitlines()[-1]) < 300


@pytest.mark.parametrize("content", [b"notes\nmore notes\n", b"\xff\xd8\xff\xe0 a jpeg",
                                     b'{"path": "/a.jpg"}\n'])
def test_out_holding_other_data_is_refused_and_kept(content, image_dir, tmp_path, capsys):
    # The merge rewrites --out: a file that is not a results file would be lost.
    out = tmp_path / "important.txt"
    out.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["predict", str(image_dir / "b"), "--out", str(out), *FAST])
    assert e.value.code == 2
    assert "argument --out: expected a new file or one of resnet-fused's results" in \
        capsys.readouterr().err
    assert out.read_bytes() == content


def test_load_features_names_a_record_without_features(tmp_path):
    with pytest.raises(ValueError, match="its image failed: cannot decode"):
        predict.load_features(str(tmp_path / "r.jsonl"),
                              [{"path": "/a.jpg", "error": "cannot decode: bad"}])
    with pytest.raises(ValueError, match="expected at least one record"):
        predict.load_features(str(tmp_path / "r.jsonl"), [])


def test_eval_sizes_follow_the_weights():
    import argparse

    from resnet_fused.cli import _eval_sizes

    def sizes(weights, resize=None, crop=None):
        return _eval_sizes(argparse.Namespace(arch="resnet50", weights=weights, resize=resize,
                                              crop=crop))
    # torchvision's own record of how each weights were evaluated.
    assert sizes("IMAGENET1K_V2") == (232, 224)
    assert sizes("IMAGENET1K_V1") == (256, 224)
    assert sizes(None) == (256, 224)
    assert sizes("IMAGENET1K_V2", resize=300, crop=256) == (300, 256)
