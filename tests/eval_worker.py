"""Run under ``torchrun --nproc_per_node 2``: the shapes evaluation and kNN, sharded across ranks.

Arguments: the shapes dataset root, an output directory. Writes ``rank{r}.json`` with the metrics
every rank computed, and ``rank{r}-cached.json`` from a second and third pass with an embedding cache. The kNN memory size is odd, so the ranks embed uneven numbers of images.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import openalign
from openalign.distributed import init_distributed, shutdown
from openalign.eval import evaluate_shapes
from openalign.eval.cache import CACHE_ENV

KNN_MEMORY = 33


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return openalign.create_model("align-test").eval()


def main(root: Path, out_dir: Path) -> None:
    ctx = init_distributed("cpu")
    model = build_model()
    metrics = evaluate_shapes(model, root, ctx.device, batch_size=8, knn_memory_size=KNN_MEMORY, show_progress=False)
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(metrics))
    # An embedding cache that answers rank 0 only (each rank has its own folder, and rank 0 writes):
    # the second pass must still extract on every rank together, not hang.
    os.environ[CACHE_ENV] = str(out_dir / f"cache{ctx.rank}")
    for _ in range(2):
        cached = evaluate_shapes(model, root, ctx.device, batch_size=8, knn_memory_size=KNN_MEMORY, show_progress=False)
    (out_dir / f"rank{ctx.rank}-cached.json").write_text(json.dumps(cached))
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
