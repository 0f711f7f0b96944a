"""ALIP's adaptive loss against ALIGN's as the alt-text gets noisier, on the built-in dataset.

The same tiny CLIP towers (``alip-tiny``), steps, batches and data for both; only the objective
differs. ALIGN's: the contrastive loss on image and raw alt-text (label smoothing 0.1, the two
directions summed). ALIP's: the bi-path model (raw alt-text and the synthetic caption through
the one text tower) with the consistency gates and the adaptive loss (shared spec alip.md
§2-§4). The training captions are 0%, 30% and 60% web noise (``alt_text_noise``); the test
captions are clean, and each image's terse ``caption`` stands in for a captioning model. Each
run starts from the same seed and is evaluated on the same test split.

    python benchmarks/alip_vs_align.py                     # 3 noise levels x 2 losses
    python benchmarks/alip_vs_align.py --steps 200 --noise 0 0.6

Prints a table and writes JSON (``--output``, default runs/benchmarks/alip_vs_align.json).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import add_output, environment, report
from openalign.recipe import load_recipe
from openalign.train import train

LOSSES = {
    "ALIGN": ["loss={type: contrastive, label_smoothing: 0.1}", "model.text_fields=[text]"],
    "ALIP": ["loss={type: alip}"],
}
SHOWN = {
    "t→i R@1": "shapes/image_retrieval_recall@1", "i→t R@1": "shapes/text_retrieval_recall@1",
    "t→i R@10": "shapes/image_retrieval_recall@10", "zero-shot colour": "shapes/zeroshot_colour_acc1",
    "zero-shot shape": "shapes/zeroshot_shape_acc1",
}


def run(noise: float, loss: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    data = workdir / f"data-{noise}"
    overrides = [f"data.train.root={data}", f"data.train.alt_text_noise={noise}", f"data.train.num_train={args.train}",
                 f"eval.tasks.0.root={data}", f"train.steps={args.steps}", f"train.warmup_steps={args.steps // 10}",
                 f"train.batch_size={args.batch_size}", f"run.output_dir={workdir / f'run-{noise}-{loss}'}",
                 "run.checkpoint_every=0", "run.tensorboard=false", *LOSSES[loss]]
    started = time.perf_counter()
    result = train(load_recipe("alip-shapes", overrides), show_progress=False)
    return {"noise": noise, "loss": loss, "seconds": time.perf_counter() - started, "metrics": result.metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train", type=int, default=10000, help="training images per dataset")
    add_output(parser, "alip_vs_align")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="alip-vs-align-") as workdir:
        runs = [run(noise, loss, args, Path(workdir)) for noise in args.noise for loss in LOSSES]
    cells = [[f"{r['noise']:.0%}", r["loss"], *(f"{100 * r['metrics'][key]:.1f}" for key in SHOWN.values()),
              f"{r['seconds']:.0f}"] for r in runs]
    payload = {"environment": environment(torch.device("cpu"), steps=args.steps, batch_size=args.batch_size,
                                          train_images=args.train), "runs": runs}
    report("ALIP vs ALIGN's loss on the built-in dataset with noisy alt-text (test split, %)",
           ["noise", "loss", *SHOWN, "s"], cells, 2, payload, args.output)


if __name__ == "__main__":
    main()
