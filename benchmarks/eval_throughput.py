"""Metric time on synthetic embeddings: openalign's chunked retrieval and kNN against the naive
full-matrix computation, at COCO-5k and ImageNet-like sizes.

Retrieval: 5,000 images × 25,000 captions (COCO Karpathy test). kNN: a memory bank of training
embeddings against validation queries (ImageNet: 1,281,167 × 50,000). The naive versions build
the whole similarity matrix at once; they are skipped (reported as "skipped") when that matrix
would exceed ``--naive-limit-gib``, which is the point: the chunked versions never need it.
Both sides are checked to agree where both run.

    python benchmarks/eval_throughput.py                                   # CPU-sized defaults
    python benchmarks/eval_throughput.py --device cuda --knn-memory 1281167 --knn-queries 50000

Prints a table and writes JSON (``--output``, default runs/benchmarks/eval_throughput.json).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import add_output, environment, report
from openalign.eval import knn_classify, retrieval_metrics


def naive_retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """Text→image and image→text R@1/5/10 from the full similarity matrix."""
    scores = text_emb @ image_emb.T
    positive = text_to_image[:, None] == torch.arange(image_emb.shape[0], device=scores.device)[None]
    metrics = {}
    for k in (1, 5, 10):
        metrics[f"image_retrieval_recall@{k}"] = positive.gather(1, scores.topk(k, dim=1).indices).any(1).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = positive.T.gather(1, scores.T.topk(k, dim=1).indices).any(1).float().mean().item()
    return metrics


def naive_knn(memory: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Weighted k=20 votes from the full similarity matrix."""
    similarity, index = (queries @ memory.T).topk(20, dim=1)
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    return votes.scatter_add_(1, labels[index], (similarity / 0.07).exp())


def timed(function: Callable[[], Any], device: torch.device, warmup: Callable[[], Any]) -> tuple[Any, float]:
    """``function()`` and its seconds, after ``warmup()`` (the same call on a slice of the data) has
    loaded its kernels and made the library handles (cuBLAS's takes a good part of a second)."""
    warmup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--knn-memory", type=int, default=200_000, help="ImageNet: 1281167")
    parser.add_argument("--knn-queries", type=int, default=10_000, help="ImageNet: 50000")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--naive-limit-gib", type=float, default=4.0)
    add_output(parser, "eval_throughput")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)

    def embeddings(rows: int) -> torch.Tensor:
        return F.normalize(torch.randn(rows, args.dim, generator=generator), dim=1).to(device)

    rows: list[dict[str, Any]] = []
    image_emb = embeddings(args.images)
    text_to_image = torch.arange(args.images).repeat_interleave(args.captions_per_image).to(device)
    text_emb = F.normalize(image_emb[text_to_image] + 0.9 * embeddings(len(text_to_image)), dim=1)
    few = 20 * args.captions_per_image  # the first 20 images' captions: the warm-up
    ours, seconds = timed(lambda: retrieval_metrics(image_emb, text_emb, text_to_image), device,
                          lambda: retrieval_metrics(image_emb[:20], text_emb[:few], text_to_image[:few]))
    retrieval_gib = 2 * len(text_to_image) * args.images * 4 / 2**30  # scores and their transpose's top-k input
    row = {"task": "retrieval", "size": f"{args.images} images × {len(text_to_image)} captions",
           "openalign_seconds": seconds, "naive_seconds": None, "naive_matrix_gib": retrieval_gib}
    if retrieval_gib <= args.naive_limit_gib:
        naive, row["naive_seconds"] = timed(
            lambda: naive_retrieval(image_emb, text_emb, text_to_image), device,
            lambda: naive_retrieval(image_emb[:20], text_emb[:few], text_to_image[:few]))
        assert all(abs(naive[k] - ours[k]) < 1e-6 for k in naive), (naive, ours)
    rows.append(row)

    memory, queries = embeddings(args.knn_memory), embeddings(args.knn_queries)
    labels = torch.randint(0, args.classes, (args.knn_memory,), generator=generator).to(device)
    few_memory, few_queries = memory[:1000], queries[:100]  # the warm-up
    votes, seconds = timed(lambda: knn_classify(memory, labels, queries, args.classes, k=20), device,
                           lambda: knn_classify(few_memory, labels[:1000], few_queries, args.classes, k=20))
    knn_gib = args.knn_memory * args.knn_queries * 4 / 2**30
    row = {"task": "kNN (k=20)", "size": f"{args.knn_memory} memory × {args.knn_queries} queries",
           "openalign_seconds": seconds, "naive_seconds": None, "naive_matrix_gib": knn_gib}
    if knn_gib <= args.naive_limit_gib:
        naive, row["naive_seconds"] = timed(lambda: naive_knn(memory, labels, queries, args.classes), device,
                                            lambda: naive_knn(few_memory, labels[:1000], few_queries, args.classes))
        assert torch.equal(naive.argmax(1), votes.argmax(1))
    rows.append(row)

    env = environment(device, dim=args.dim)
    cells = [(row["task"], row["size"], f"{row['openalign_seconds']:.2f}",
              "skipped" if row["naive_seconds"] is None else f"{row['naive_seconds']:.2f}",
              f"{row['naive_matrix_gib']:.1f}") for row in rows]
    report(f"metric time on {env['device']}, {args.dim}-d embeddings",
           ("task", "size", "openalign s", "naive s", "naive matrix GiB"), cells, 2,
           {"environment": env, "results": rows}, args.output)

if __name__ == "__main__":
    main()
