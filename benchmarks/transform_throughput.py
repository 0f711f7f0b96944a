"""Image preprocessing time per image on one CPU thread: a model's training and evaluation
``ImageTransform`` on decoded JPEGs of web sizes, with each ``preprocess.resize_rounding``.

``round`` is torchvision's uint8 resize (its fast path; ALIGN and ALIP); ``floor`` is
torchvision's float resize, truncated to uint8, as big_vision's ``resize`` does (CLIPPO). The images are random-noise JPEGs (quality 90) opened with PIL, decoded inside the
transform as a loader worker does; each figure is the best of ``--repeats`` passes over
``--images`` images.

    python benchmarks/transform_throughput.py [--rand-augment 2,10]

Prints a table and writes JSON (``--output``, default runs/benchmarks/transform_throughput.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import time
from typing import Any

import numpy as np
import torch
from common import add_output, environment, report
from PIL import Image

from openalign.data import ImageTransform
from openalign.factory import model_config

SIZES = ((500, 375), (1024, 768))  # width × height: a typical web photo, and a large one


def jpegs(count: int, size: tuple[int, int], seed: int) -> list[bytes]:
    """``count`` JPEG files of ``size`` (quality 90) of smooth noise."""
    generator = np.random.default_rng(seed)
    files = []
    for _ in range(count):
        small = generator.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize(size, Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def milliseconds_per_image(transform: ImageTransform, files: list[bytes], repeats: int) -> float:
    best = float("inf")
    generator = torch.Generator().manual_seed(0)
    for _ in range(repeats):
        start = time.perf_counter()
        for data in files:
            transform(Image.open(io.BytesIO(data)), generator, encoded=data)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clippo-b16", help="whose preprocessing (its size, crop, antialiasing)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rand-augment", metavar="N,M", help="with preprocess.rand_augment [N, M] (training only; "
                                                                  "CLIPPO's COCO recipe: 2,10)")
    add_output(parser, "transform_throughput")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preprocess = model_config(args.model).preprocess
    if args.rand_augment:
        layers, magnitude = args.rand_augment.split(",")
        preprocess = dataclasses.replace(preprocess, rand_augment=(int(layers), float(magnitude)))
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        files = jpegs(args.images, size, seed=size[0])
        for train in (True, False):
            row: dict[str, Any] = {"image": f"{size[0]}×{size[1]}", "split": "train" if train else "eval"}
            for rounding in ("round", "floor"):
                config = dataclasses.replace(preprocess, resize_rounding=rounding)
                row[f"{rounding}_ms"] = milliseconds_per_image(ImageTransform(config, train), files, args.repeats)
            rows.append(row)
    cells = [(row["image"], row["split"], f"{row['round_ms']:.2f}", f"{row['floor_ms']:.2f}",
              f"{row['floor_ms'] / row['round_ms']:.2f}") for row in rows]
    report(f"{args.model}'s preprocessing, ms per image on one CPU thread (decoding included)",
           ("image", "transform", "round ms", "floor ms", "floor / round"), cells, 2,
           {"environment": environment(torch.device("cpu"), model=args.model, images=args.images,
                                       rand_augment=preprocess.rand_augment), "results": rows},
           args.output)


if __name__ == "__main__":
    main()
