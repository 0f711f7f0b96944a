"""Training data pipeline throughput on CPU: samples per second from webdataset tar shards to a
collated batch (read tar → decode JPEG → augment → tokenise → collate), openalign against
open_clip's own webdataset pipeline, on the same synthetic shards.

The shards are written as img2dataset writes them (``KEY.jpg``, ``KEY.txt``, ``KEY.json``):
512×512 JPEGs (quality 90-95) of smooth random gradients and blobs plus mild noise, so files
are 40-120 KB like photos, with English-like captions of 5-20 words; seeded, in a temporary
directory unless ``--shards-dir`` names one to reuse.

openalign: ``WebDatasetSourceConfig(urls=...).build(...)`` with its defaults (resampled
shards; when written, a resumable ``ShardStream`` shuffling rounds of 2000 raw samples from 8
open shards), the model config's training transform (``align-b7-base``: squash-resize 346,
random crop 289, flip) and its tokenizer (BERT, max length 64, batched in ``Collate``), in a
``DataLoader`` (prefetch 4) as training builds it. open_clip: ``open_clip_train.data.get_wds_dataset`` itself (resampled shards,
shuffle 5000/1000, ``pilrgb`` decode, ``image_transform(size, is_train=True)``: random resized
crop, bicubic; CLIP BPE tokenizer of ``ViT-B-32``, per sample; ``wds.batched``; its
``WebLoader``). Two shims, no change to what it computes: ``open_clip_train.data`` imports
pandas for its CSV dataset only, so a placeholder module stands in during that import when
pandas is missing; and webdataset ≥ 0.2.96 (1.0.2 here; open_clip's training extra pins
≤ 0.2.86) ends each shard with an empty sample that open_clip's ``group_by_keys_nothrow`` fails
on (``KeyError: 'fname'``, open_clip#935, webdataset#384), so its tar reader is given
``eof_value=None``, the fix suggested there.

Both streams are endless: each measurement times ``--batches`` batches per reader (the main
process with ``workers`` 0, else each worker) after ``--warmup`` per reader. Both shuffle, so
reading is uneven: openalign reads a round of 2000 raw samples per reader, then decodes them
(about 0.6 s of reading per 2000 samples: 30 batches of 64 hold one refill per reader);
open_clip's shuffle buffer (5000, yielding from 1000) reads two raw samples per sample it
yields until it is full, 4000 samples into each reader's stream, so here it pays ~0.3 ms per
sample (~4%) more for reading than in a long run. Torch runs one thread in the main process
(and one per loader worker, as DataLoader sets it); "per core" is samples/s / max(workers, 1).

    python benchmarks/data_throughput.py

Prints a table and writes JSON (``--output``, default runs/benchmarks/data_throughput.json).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import add_output, environment, report
from PIL import Image

WORDS = ("a man woman dog cat riding sitting on top of the with next to wave surfboard beach table plate food "
         "street sign red blue large small two people standing in front building field grass playing frisbee "
         "train tracks kitchen pizza bus parked near water boat young girl holding umbrella").split()


def synthetic_image(rng: np.random.Generator, size: int = 512) -> Image.Image:
    """A smooth random colour field with a few soft blobs and mild noise: compresses like a photo."""
    coarse = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    axis = np.arange(size, dtype=np.float32)
    for _ in range(int(rng.integers(3, 9))):
        (cy, cx), radius = rng.uniform(0, size, 2), rng.uniform(size / 30, size / 6)
        blob = np.outer(np.exp(-(axis - cy) ** 2 / (2 * radius**2)), np.exp(-(axis - cx) ** 2 / (2 * radius**2)))
        pixels += blob[..., None] * rng.uniform(-120, 120, 3).astype(np.float32)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(3, 8)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_shards(directory: Path, shards: int, per_shard: int, seed: int = 0) -> str:
    """Write (or reuse) ``shards`` tar files of ``per_shard`` samples; returns their brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    rng, words = np.random.default_rng(seed), random.Random(seed)
    for shard in range(shards):
        path = directory / f"{shard:05d}.tar"
        if path.is_file():
            continue
        with tarfile.open(path.with_suffix(".tmp"), "w") as tar:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                caption = " ".join(words.choice(WORDS) for _ in range(words.randint(5, 20))).capitalize() + "."
                jpeg = io.BytesIO()
                synthetic_image(rng).save(jpeg, "JPEG", quality=int(rng.integers(90, 96)))
                meta = {"key": key, "caption": caption, "width": 512, "height": 512}
                for name, data in ((f"{key}.jpg", jpeg.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        path.with_suffix(".tmp").rename(path)
    return str(directory / f"{{00000..{shards - 1:05d}}}.tar")


def openalign_loader(pattern: str, model: str, batch_size: int, workers: int) -> Iterable[Any]:
    from openalign.data.loader import Collate
    from openalign.data.sources import WebDatasetSourceConfig
    from openalign.factory import model_config

    config = model_config(model)
    tokenizer = config.build_tokenizer(train=True)  # as the trainer builds it
    dataset = WebDatasetSourceConfig(urls=pattern).build(config.build_transform(train=True), seed=0,
                                                         text_processor=tokenizer)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True,
                                       collate_fn=Collate(tokenizer, config.input_fields),
                                       persistent_workers=False, prefetch_factor=4 if workers else None)


def open_clip_data() -> types.ModuleType:
    """``open_clip_train.data``, with a placeholder for pandas (its CSV dataset's) when it is missing,
    and its tar reader fitted to webdataset ≥ 0.2.96 (which ends each shard with an empty sample)."""
    import webdataset as wds

    placeholder = "pandas" not in sys.modules and importlib.util.find_spec("pandas") is None
    if placeholder:
        sys.modules["pandas"] = types.ModuleType("pandas")
    try:
        import open_clip_train.data as data
    finally:
        if placeholder:
            del sys.modules["pandas"]  # nothing else may mistake the placeholder for pandas
    data.tar_file_expander = functools.partial(wds.tariterators.tar_file_expander, eof_value=None)
    return data


def open_clip_loader(pattern: str, image_size: int, batch_size: int, workers: int) -> Iterable[Any]:
    import open_clip

    args = argparse.Namespace(train_data=pattern, dataset_resampled=True, train_num_samples=10**9,
                              train_data_upsampling_factors=None, batch_size=batch_size, workers=workers,
                              world_size=1, seed=0)
    preprocess = open_clip.image_transform(image_size, is_train=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    return open_clip_data().get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader


def throughput(loader: Iterable[Any], batch_size: int, warmup: int, batches: int) -> float:
    """Samples per second over ``batches`` batches, after ``warmup`` (workers start, buffers fill)."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator  # shuts the workers down before the next measurement
    return batches * batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--shards-dir", type=Path, default=None, help="write the shards here (kept, reused)")
    parser.add_argument("--model", default="align-b7-base")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per reader")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per reader")
    add_output(parser, "data_throughput")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: tokenizers load offline
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork after the tokenizer loads
    torch.set_num_threads(1)
    worker_counts = [int(count) for count in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as temporary:
        directory = args.shards_dir or Path(temporary)
        start = time.perf_counter()
        pattern = write_shards(directory, args.shards, args.samples_per_shard)
        shard_seconds = time.perf_counter() - start
        from openalign.factory import model_config

        image_size = model_config(args.model).preprocess.image_size
        load = os.getloadavg()[0]  # other work on the machine skews the figures
        builders = {
            "openalign": lambda workers: openalign_loader(pattern, args.model, args.batch_size, workers),
            "open_clip": lambda workers: open_clip_loader(pattern, image_size, args.batch_size, workers),
        }
        rows: list[dict[str, Any]] = []
        for workers in worker_counts:
            for name, build in builders.items():
                row: dict[str, Any] = {"pipeline": name, "workers": workers}
                try:
                    readers = max(workers, 1)
                    row["samples_per_second"] = throughput(build(workers), args.batch_size, args.warmup * readers,
                                                           args.batches * readers)
                    row["per_core"] = row["samples_per_second"] / readers
                except Exception as error:  # noqa: BLE001 - reported in the table instead
                    lines = str(error).strip().splitlines() or [""]  # a worker's error: the traceback's last line
                    row["error"] = f"{type(error).__name__}: {lines[-1]}"
                rows.append(row)
                print(row, flush=True)
        shard_bytes = sum(path.stat().st_size for path in directory.glob("*.tar"))
    reference = {row["workers"]: row.get("samples_per_second") for row in rows if row["pipeline"] == "open_clip"}
    cells = []
    for row in rows:
        if "error" in row:
            cells.append([row["pipeline"], str(row["workers"]), row["error"][:80], "-", "-"])
            continue
        base = reference.get(row["workers"])
        row["vs_open_clip"] = row["samples_per_second"] / base if base else None
        ratio = f"{row['vs_open_clip']:.2f}×" if row["vs_open_clip"] else "-"
        cells.append([row["pipeline"], str(row["workers"]), f"{row['samples_per_second']:.1f}",
                      f"{row['per_core']:.1f}", ratio])
    settings = {"model": args.model, "image_size": image_size, "batch_size": args.batch_size, "shards": args.shards,
                "samples_per_shard": args.samples_per_shard, "shard_megabytes": round(shard_bytes / 2**20, 1),
                "shard_seconds": round(shard_seconds, 1), "batches": args.batches, "warmup": args.warmup,
                "cpus": os.cpu_count(), "load_average_before": round(load, 2)}
    report(f"Data pipeline throughput ({args.model}, batch {args.batch_size}, {os.cpu_count()} CPUs)",
           ["pipeline", "workers", "samples/s", "per core samples/s", "× open_clip"], cells, 2,
           {"environment": environment(torch.device("cpu")), "settings": settings, "rows": rows}, args.output)


if __name__ == "__main__":
    main()
