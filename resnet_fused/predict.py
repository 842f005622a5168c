"""Bulk prediction over image folders (`resnet-fused predict`): listing, decoding and
preprocessing in DataLoader workers, sharding across torch.distributed ranks, resumable
JSON-lines output with feature shards, and the final merge."""

import contextlib
import datetime
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

try:
    import fcntl
except ImportError:  # not on Windows: runs there without the lock against a second run
    fcntl = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp",
                    ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Feature rows are written in shards of this many rows (or whatever is buffered after
# FEATURE_FLUSH_S), and their records only after the shard is on disk.
FEATURE_SHARD_ROWS = 1024
FEATURE_FLUSH_S = 30.0


class UsageError(ValueError):
    """A bad argument: the CLI reports it like argparse (exit code 2)."""

    def __init__(self, argument, expected, got):
        super().__init__(f"argument {argument}: expected {expected}, got {got}")


# ---------------------------------------------------------------- listing


def list_images(paths):
    """Sorted absolute paths of the image files in `paths` (files, or folders walked
    recursively for IMAGE_EXTENSIONS). A file named explicitly is taken whatever its name."""
    found = set()
    for p in paths:
        if os.path.isfile(p):
            found.add(os.path.abspath(p))
        elif os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                found.update(os.path.abspath(os.path.join(root, n)) for n in names
                             if n.lower().endswith(IMAGE_EXTENSIONS))
        else:
            raise UsageError("PATH", "an existing image file or folder",
                             f"{p!r}, which does not exist")
    if not found:
        raise UsageError("PATH", f"image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                         f"{', '.join(map(repr, paths))}", "none")
    return sorted(found)


def _digest(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fsencode(p) + b"\0")
    return len(paths), h.hexdigest()


# ---------------------------------------------------------------- decoding


class DecodeError(Exception):
    pass


try:
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # a torchvision after their removal: PIL decodes everything
    decode_image = None


def _decode_torchvision(data):
    # torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns on
    # every call. They are libjpeg-turbo/libpng, as fast as any, and PIL is the fallback, so
    # we keep them and silence that one warning here, where we call them, not globally.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities "
                                "of TorchVision are deprecated", category=DeprecationWarning)
        img = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    if img.ndim == 4:  # animated GIF: the first frame, as PIL gives
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG: scaled to 8 bits (PIL would clip it)
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img


def _decode_pil(path):
    from PIL import Image
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def decode(path):
    """The image at `path` as a uint8 RGB tensor (3, H, W); DecodeError says why not.
    No EXIF rotation, like torchvision's ImageFolder loader."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError as e:
        raise DecodeError(f"cannot read: {e.strerror or e}") from None
    if decode_image is not None and data:
        try:
            return _decode_torchvision(data)
        except Exception:  # a format torchvision lacks (BMP, TIFF, ...), a broken file, or
            pass  # no image library in this torchvision build: PIL decides
    try:
        return _decode_pil(path)
    except Exception as e:  # any decoder failure of one file must not stop the run
        raise DecodeError(f"cannot decode: {type(e).__name__}: {e}") from None


# Resized images larger than this are refused (per image, with the reason): a 10000x1
# image resized to a shorter side of 256 would take 2 GB before the crop.
MAX_RESIZED_PIXELS = 1 << 26


def preprocess(img, resize, crop):
    """torchvision's resize (shorter side, bilinear, antialiased) and center crop, on uint8."""
    h, w = img.shape[-2:]
    short, long = min(h, w), max(h, w)
    resized = resize * int(resize * long / short)  # torchvision's rounding
    if resized > MAX_RESIZED_PIXELS:
        raise ValueError(f"resizing {w}x{h} pixels to a shorter side of {resize} would give "
                         f"{resized} pixels, over the limit of {MAX_RESIZED_PIXELS} (aspect "
                         f"ratio {long / short:.0f}:1)")
    return F.center_crop(F.resize(img, [resize], antialias=True), [crop])


def normalize(batch, device):
    """uint8 (N, 3, H, W) -> float normalized with ImageNet's mean and std on `device`, the
    same ops as torchvision's ToTensor + Normalize."""
    x = batch.to(device, non_blocking=True).float().div(255)
    mean = torch.tensor(MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(STD, device=device).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class ImageFiles(Dataset):
    """(index, uint8 image (3, crop, crop), error text or "") per path."""

    def __init__(self, paths, resize=256, crop=224):
        # The paths as one byte buffer, not a list of str: forked workers touching a list
        # refcount its objects and so copy its pages, per worker (pytorch issue 13246).
        encoded = [os.fsencode(p) for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.resize, self.crop = resize, crop

    def __len__(self):
        return len(self._ends)

    def path(self, i):
        start = self._ends[i - 1] if i else 0
        return os.fsdecode(self._blob[start:self._ends[i]].tobytes())

    def __getitem__(self, i):
        try:
            return i, preprocess(decode(self.path(i)), self.resize, self.crop), ""
        except DecodeError as e:
            error = str(e)
        except Exception as e:  # e.g. out of memory resizing an extreme aspect ratio
            error = f"cannot preprocess: {type(e).__name__}: {e}"
        return i, torch.zeros(3, self.crop, self.crop, dtype=torch.uint8), error


# ---------------------------------------------------------------- inference


class Settings:
    """What a run computes; `config` is recorded with every result, so that a resume
    with other settings is refused instead of mixing results."""

    def __init__(self, arch, weights, resize=256, crop=224, topk=5, features=None,
                 batch_size=32, workers=None, retry_errors=False):
        self.resize, self.crop, self.topk, self.features = resize, crop, topk, features
        self.batch_size, self.workers, self.retry_errors = batch_size, workers, retry_errors
        self.config = dict(arch=arch, weights=weights or "seeded random (seed 0)", resize=resize,
                           crop=crop, output="features" if features else f"top{topk}")


def default_workers(device):
    """DataLoader workers when --workers is not given. 0 on the CPU: there decoding and
    resizing cost a few percent of the model's time, and 1 or 2 workers measured no faster
    (benchmarks/predict_pipeline.py, README). On a GPU the CPU must keep up: the cores divided
    among this machine's ranks, less one for the rank itself, from 1 to 8."""
    if device.type != "cuda":
        return 0
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 2) // local_ranks - 1))


def embedding_model(model):
    """`model` returning its pooled embedding (the fc layer's input) instead of logits."""
    model.fc = torch.nn.Identity()
    return model


def batches(model, paths, settings, device, categories=()):
    """Yields (records, features) per batch: records in the order of `paths`; features an
    array (rows, D) of the successful records' embeddings (features mode) or None."""
    data = ImageFiles(paths, settings.resize, settings.crop)
    workers = default_workers(device) if settings.workers is None else settings.workers
    loader = DataLoader(data, batch_size=settings.batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    config = settings.config
    with torch.inference_mode():
        for index, images, errors in loader:
            ok = [j for j, e in enumerate(errors) if not e]
            x = normalize(images, device)  # all rows: indexing first would unpin the batch
            out = model(x if len(ok) == len(x) else x[ok]) if ok else None
            records, rows = [], None
            if settings.features:
                rows = out.float().cpu().numpy() if ok else np.zeros((0, 0), np.float32)
            else:
                top = out.float().softmax(1).topk(settings.topk) if ok else None
            k = 0
            for j, i in enumerate(index.tolist()):
                rec = dict(path=data.path(i), config=config)
                if errors[j]:
                    rec["error"] = errors[j]
                elif not settings.features:
                    classes = zip(top.indices[k].tolist(), top.values[k].tolist())
                    rec["topk"] = [dict(index=c, name=categories[c] if c < len(categories) else None,
                                        prob=float(f"{p:.7g}")) for c, p in classes]
                    k += 1
                records.append(rec)
            yield records, rows


# ---------------------------------------------------------------- output files


def read_records(path):
    """The records of the complete lines of a JSON-lines file. A torn last line (a run
    killed mid-write) is not a record; neither is a line that is not a JSON object with a
    path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    records = []
    for line in data[:_complete_lines(data)].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "path" in rec:
            records.append(rec)
    return records


def _foreign_line(path):
    """Where the file at path holds a complete line that is not a result record (e.g.
    "line 1"), or "" (no such file, or only records and maybe a torn last line)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return ""
    for number, line in enumerate(data[:_complete_lines(data)].splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not (isinstance(rec, dict) and "path" in rec and "config" in rec):
            return f"line {number}"
    if data and not _complete_lines(data) and not data.lstrip().startswith(b"{"):
        return "line 1"  # one unterminated line that is no record's beginning
    return ""


def _complete_lines(data):
    """The length of `data` up to and including its last newline."""
    return data.rfind(b"\n") + 1


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(config):
    return ", ".join(f"{k} {v}" for k, v in config.items())


class Store:
    """The files of one --out: OUT itself (merged, sorted by path), OUT.parts/rank*.jsonl
    (one per rank, appended per batch) and OUT.features/ (feature shards)."""

    def __init__(self, out):
        self.out = os.path.abspath(out)
        self.parts = self.out + ".parts"
        self.features = self.out + ".features"
        folder = os.path.dirname(self.out)
        if os.path.isdir(self.out):
            raise UsageError("--out", "a file path", f"{out!r}, which is a folder")
        if not os.path.isdir(folder):
            raise UsageError("--out", "a file in an existing folder",
                             f"{out!r} (no folder {folder})")
        for p in (self.out, folder):
            if os.path.exists(p) and not os.access(p, os.W_OK):
                raise UsageError("--out", "a writable file", f"{out!r} ({p} is not writable)")
        other = _foreign_line(self.out)
        if other:
            # The merge rewrites OUT: anything else in it would be lost.
            raise UsageError("--out", "a new file or one of resnet-fused's results (JSON lines "
                             'with "path" and "config")',
                             f"{out!r}, which holds other data ({other}); choose another --out")

    def part(self, rank):
        return os.path.join(self.parts, f"rank{rank:05d}.jsonl")

    def _sources(self):
        names = sorted(os.listdir(self.parts)) if os.path.isdir(self.parts) else []
        return [self.out] + [os.path.join(self.parts, n) for n in names if n.endswith(".jsonl")]

    def recorded(self, settings):
        """Paths that need no new run: those with a result (and with an error record too
        unless retry_errors). Refuses results of other settings."""
        done = set()
        for src in self._sources():
            for rec in read_records(src):
                if rec.get("config") != settings.config:
                    raise UsageError(
                        "--out", f"results of the same settings ({_describe(settings.config)})",
                        f"{self.out} with results of {_describe(rec.get('config') or {})}; "
                        "pass the same --arch/--weights/--resize/--crop/--topk/--features, "
                        "or another --out")
                if "error" not in rec or not settings.retry_errors:
                    done.add(rec["path"])
        return done

    def merge(self):
        """Writes OUT from OUT and the parts: one record per path (a result over an error
        record, else the first), sorted by path; then removes the parts. Returns the records."""
        best = {}
        for src in self._sources():
            for rec in read_records(src):
                old = best.get(rec["path"])
                if old is None or ("error" in old and "error" not in rec):
                    best[rec["path"]] = rec
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            for path in sorted(best):
                f.write(json.dumps(best[path]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out)
        _fsync_dir(os.path.dirname(self.out))
        for src in self._sources()[1:]:
            os.remove(src)
        with contextlib.suppress(OSError):
            os.rmdir(self.parts)
        return best


class PartWriter:
    """Appends records to one rank's part file: each batch in one write, flushed and
    fsync'd. Holds a lock, so that a second run on the same --out stops at once."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self._f = open(path, "a+b")
        _fsync_dir(os.path.dirname(path))
        if fcntl is not None:
            # A POSIX lock, not flock(): forked DataLoader workers do not inherit it, so a
            # killed run's orphaned workers do not block the rerun. It is released when this
            # process closes any descriptor of the file, so the file is read through this one.
            try:
                fcntl.lockf(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._f.close()
                raise UsageError("--out", "an output no other run is writing to",
                                 f"{path}, locked by another run") from None
        # Drop a torn last line of a killed run before appending after it.
        self._f.seek(0)
        self._f.truncate(_complete_lines(self._f.read()))

    def write(self, records):
        if records:
            self._f.write("".join(json.dumps(r) + "\n" for r in records).encode())
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self):
        self._f.close()


class FeatureWriter:
    """Buffers embeddings and writes them as .npy or .safetensors shards (float32, one row
    per image) under OUT.features/; the records, each naming its shard file and row, go to
    the part file only once their shard is on disk."""

    def __init__(self, store, rank, fmt, part):
        if fmt == "safetensors":
            try:
                from safetensors.numpy import save
            except ImportError:
                raise UsageError("--features", "safetensors installed (pip install safetensors), "
                                 "or --features npy", "no safetensors module") from None
            self._save = lambda f, arr: f.write(save({"features": arr}))
        else:
            self._save = np.save
        self.fmt, self.part, self.folder = fmt, part, store.features
        os.makedirs(self.folder, exist_ok=True)
        prefix = f"rank{rank:05d}-"
        taken = [int(n[len(prefix):].split(".")[0]) for n in os.listdir(self.folder)
                 if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit()]
        self._prefix, self._next = prefix, max(taken, default=-1) + 1
        self._pending, self._rows, self._since = [], [], time.monotonic()

    def write(self, records, rows):
        self._pending += records
        if len(rows):
            self._rows.append(rows)
        if (sum(len(r) for r in self._rows) >= FEATURE_SHARD_ROWS
                or time.monotonic() - self._since >= FEATURE_FLUSH_S):
            self.flush()

    def flush(self):
        self._since = time.monotonic()
        if self._rows:
            name = f"{self._prefix}{self._next:06d}.{self.fmt}"
            self._next += 1
            path = os.path.join(self.folder, name)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                self._save(f, np.concatenate(self._rows))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.folder)
            row = 0
            rel = os.path.relpath(path, os.path.dirname(self.folder))
            for rec in self._pending:
                if "error" not in rec:
                    rec["features"] = dict(file=rel, row=row)
                    row += 1
        self.part.write(self._pending)
        self._pending, self._rows = [], []

    def close(self):
        self.flush()


def load_features(out, records):
    """The embeddings of `records` (from --out, features mode) as one (N, D) array, in
    their order; a convenience for reading the shards back."""
    folder = os.path.dirname(os.path.abspath(out))
    cache, rows = {}, []
    if not records:
        raise ValueError("load_features: expected at least one record, got none")
    for rec in records:
        if "features" not in rec:
            why = (f"its image failed: {rec['error']}" if "error" in rec
                   else "not a --features run's record")
            raise ValueError(f"load_features: expected records with features, got one for "
                             f"{rec.get('path')!r} without ({why}); pass only the records "
                             f"without \"error\"")
        file = rec["features"]["file"]
        if file not in cache:
            path = os.path.join(folder, file)
            if file.endswith(".safetensors"):
                try:
                    from safetensors.numpy import load_file
                except ImportError:
                    raise ImportError("load_features: reading .safetensors shards needs the "
                                      "safetensors package: pip install safetensors") from None
                cache[file] = load_file(path)["features"]
            else:
                cache[file] = np.load(path)
        rows.append(cache[file][rec["features"]["row"]])
    return np.stack(rows)


# ---------------------------------------------------------------- ranks


class Ranks:
    """This process's place among torch.distributed ranks (rank 0 of 1 without torchrun)."""

    def __init__(self, rank, world, device):
        self.rank, self.world, self.device = rank, world, device

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def check_same(self, value, what):
        """Stops with an error unless every rank computed the same `value`."""
        if self.world == 1:
            return
        values = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise UsageError("PATH/--out", f"the same {what} on every rank (the same paths, on "
                             "a filesystem all ranks share)", f"(count, sha256) per rank {values}")


@contextlib.contextmanager
def distributed(device):
    """Joins the torchrun group when WORLD_SIZE > 1 (nccl for CUDA, one GPU per local
    rank; gloo on the CPU); yields a Ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Ranks(0, 1, device)
        return
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # Ranks wait for each other only at the start and the end; the end may wait for the
    # slowest rank's last batches, so allow more than the default 30 minutes.
    cuda = device.type == "cuda"
    torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                         device_id=device if cuda else None,
                                         timeout=datetime.timedelta(hours=2))
    try:
        yield Ranks(rank, world, device)
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- progress


class Progress:
    """One line on stderr: done/total, images/s, ETA, failures. Redrawn in place on a
    terminal; otherwise a line every `log_every` seconds, for log files."""

    def __init__(self, total, label="", stream=sys.stderr, log_every=30.0):
        self.total, self.label, self.stream = total, label, stream
        self.tty = stream.isatty()
        self.every = 0.2 if self.tty else log_every
        self.done = self.failed = 0
        self.start = self._last = time.monotonic()

    def update(self, done, failed):
        self.done += done
        self.failed += failed
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._draw(end="\r" if self.tty else "\n")

    def rate(self):
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def _draw(self, end):
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else 0
        pct = self.done / self.total if self.total else 1.0
        bar = "#" * int(pct * 20)
        self.stream.write(f"{self.label}[{bar:20}] {self.done}/{self.total} images, "
                          f"{rate:.1f} images/s, ETA {int(eta) // 60}:{int(eta) % 60:02d}"
                          f"{f', {self.failed} failed' if self.failed else ''}   {end}")
        self.stream.flush()

    def close(self):
        self._draw(end="\n")


# ---------------------------------------------------------------- runs


def _writers(store, rank, settings):
    part = PartWriter(store.part(rank))
    if settings.features:
        try:
            return part, FeatureWriter(store, rank, settings.features, part)
        except BaseException:
            part.close()
            raise
    return part, part


def run_to_file(model, files, store, settings, ranks, categories=(), progress=True):
    """Predicts the files of `files` not yet in `store`, this rank's share of them, and
    on rank 0 merges all results into --out. Returns (merged records of `files` or None
    on other ranks, number done before this run)."""
    done = store.recorded(settings)
    remaining = [p for p in files if p not in done]
    # Also a barrier: no rank appends before every rank has read what is recorded.
    ranks.check_same((_digest(files), _digest(remaining)), "files to do")
    mine = remaining[ranks.rank::ranks.world]
    if settings.features:
        model = embedding_model(model)
    bar = Progress(len(mine), f"rank {ranks.rank} of {ranks.world}: " if ranks.world > 1 else "")
    part, writer = _writers(store, ranks.rank, settings)
    try:
        for records, rows in batches(model, mine, settings, ranks.device, categories):
            if settings.features:
                writer.write(records, rows)
            else:
                part.write(records)
            if progress and ranks.rank == 0:
                bar.update(len(records), sum("error" in r for r in records))
    finally:
        writer.close()
        part.close()
        if progress and ranks.rank == 0:
            bar.close()
    ranks.barrier()
    if ranks.rank != 0:
        return None, len(files) - len(remaining)
    merged = store.merge()
    return [merged[p] for p in files if p in merged], len(files) - len(remaining)
