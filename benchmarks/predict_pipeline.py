"""Throughput of `resnet-fused predict`'s pipeline, in images/s: the fused model alone,
decoding alone, the DataLoader alone, and the whole run (decode, preprocess, model,
top-k, JSON lines fsync'd per batch) at several worker counts. Medians of repeats after
warm-up, the variants timed round-robin (the whole-run passes one at a time), so that
drift in machine load hits them alike.

    python benchmarks/predict_pipeline.py [--images DIR] [--count 128] [--workers 0,1,2]

Without --images it writes --count JPEGs of ImageNet's typical size (500x375, quality
90, photo-like: smooth color fields with texture and grain) to a temporary folder.
"""

import argparse
import itertools
import os
import tempfile

import numpy as np
import torch
from PIL import Image

from resnet_fused import benchmark, predict
from resnet_fused.cli import load_models


def photo(rng, h, w):
    out = np.zeros((h, w, 3), np.float32)
    for cells, amplitude in ((4, 90), (16, 40), (64, 20)):
        low = rng.integers(0, 256, (cells * h // w + 1, cells, 3), dtype=np.uint8)
        smooth = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        out += (np.asarray(smooth, np.float32) - 128) * amplitude / 128
    out += rng.normal(0, 14, (h, w, 3))
    return np.clip(out + 128, 0, 255).astype(np.uint8)


def write_images(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (375, 500) if i % 4 else (500, 375)  # a quarter portrait
        Image.fromarray(photo(rng, h, w)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def per_second(count, fns, repeats, warmup=1, block=5):
    """Median images/s of each fn (each handles `count` images) after warm-up, timed in
    blocks round-robin."""
    ms = benchmark.time_interleaved(fns, torch.device("cpu"), warmup, repeats, block)
    return {name: count / t * 1e3 for name, t in ms.items()}


def drain(loader):
    for _ in loader:
        pass


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=None, help="a folder of images (default: synthetic JPEGs)")
    p.add_argument("--count", type=int, default=128, help="synthetic images to write")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="0,1,2", help="worker counts for the whole run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cpu")
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.images
        if folder is None:
            folder = os.path.join(tmp, "images")
            os.makedirs(folder)
            write_images(folder, args.count)
        paths = predict.list_images([folder])
        n = len(paths)
        size = sum(os.path.getsize(q) for q in paths) / n / 1e3
        print(f"{n} images in {folder if args.images else 'synthetic JPEGs, 500x375'} "
              f"({size:.0f} kB on average); {args.arch}, batch {args.batch_size}, "
              f"{benchmark.device_name(device)}, torch {torch.__version__}")

        # Decoding alone (read + decode), and with resize + crop, in this process.
        data = predict.ImageFiles(paths)
        alone = per_second(n, {"decode": lambda: [predict.decode(q) for q in paths],
                               "prep": lambda: [data[i] for i in range(n)]}, args.repeats)
        print(f"decode only (1 process):                    {alone['decode']:8.1f} images/s")
        print(f"decode + resize + crop (1 process):         {alone['prep']:8.1f} images/s")

        _, model, desc = load_models(args.arch, None, device)
        batch = min(args.batch_size, n)
        x = predict.normalize(torch.stack([data[i][1] for i in range(batch)]), device)
        with torch.inference_mode():
            model_only = per_second(batch, {"model": lambda: model(x)}, max(args.repeats, 5),
                                    warmup=2)["model"]
        print(f"model only, batch {batch}:                      {model_only:8.1f} images/s")

        loaders = {w: torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=w)
                   for w in workers if w}
        fed = per_second(n, {w: lambda w=w: drain(loaders[w]) for w in loaders}, args.repeats)
        for w, rate in fed.items():  # what the workers deliver with no model to feed
            print(f"DataLoader only, {w} worker(s):               {rate:8.1f} images/s")

        ranks = predict.Ranks(0, 1, device)
        runs = itertools.count()

        def whole_run(w):
            store = predict.Store(os.path.join(tmp, f"out-{next(runs)}.jsonl"))
            settings = predict.Settings(args.arch, None, batch_size=args.batch_size, workers=w)
            predict.run_to_file(model, paths, store, settings, ranks, progress=False)

        e2e = per_second(n, {w: lambda w=w: whole_run(w) for w in workers}, args.repeats, block=1)
        for w, rate in e2e.items():
            print(f"whole run, {w} worker(s):                     {rate:8.1f} images/s "
                  f"({rate / model_only:.0%} of model only)")
        print(f"weights: {desc}")


if __name__ == "__main__":
    main()
