"""``openalign demo``: build the shapes dataset, train a tiny ALIGN on CPU, evaluate, and report."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from .config import peek_yaml
from .distributed import fail_together, init_distributed
from .errors import OpenAlignError
from .eval.shapes import shapes_chance_levels
from .eval.tasks import ShapesEvalConfig
from .files import held_directory
from .progress import console
from .recipe import Recipe, load_recipe
from .train import read_history, train

DEMO_MARKER = ".openalign-demo"  # what tells a demo's own run directory, which it may start afresh
STALE = ("checkpoints", "tensorboard")  # a run from step 0 is a new W&B run anyway; unsynced offline ones are kept
METRIC_LABELS = {
    "image_retrieval_recall@1": "text→image R@1", "image_retrieval_recall@5": "text→image R@5",
    "image_retrieval_recall@10": "text→image R@10", "text_retrieval_recall@1": "image→text R@1",
    "text_retrieval_recall@5": "image→text R@5", "text_retrieval_recall@10": "image→text R@10",
    "zeroshot_shape_acc1": "zero-shot shape top-1", "zeroshot_colour_acc1": "zero-shot colour top-1",
    "knn_shape_acc1": "1-NN shape top-1", "knn_colour_acc1": "1-NN colour top-1",
}


def run_demo(output_dir: str | Path = "runs/demo", overrides: tuple[str, ...] = (), show_progress: bool = True) -> dict[str, Any]:
    """Run the ``demo`` recipe into ``output_dir`` from step 0 and write its report; returns the report data."""
    output_dir = Path(output_dir)
    data_root = output_dir / "data"
    recipe = load_recipe("demo", [f"run.output_dir={output_dir}", f"data.train.root={data_root}", *overrides])
    if Path(recipe.run.output_dir).resolve() != output_dir.resolve():  # the run would go there, its report here
        raise OpenAlignError(f"run.output_dir={recipe.run.output_dir} is not the demo's directory '{output_dir}': "
                             f"pass --out {recipe.run.output_dir} instead")
    if not any(isinstance(task, ShapesEvalConfig) for task in recipe.eval.tasks):  # checked before training
        raise OpenAlignError("the demo's report is its shapes evaluation: keep a 'shapes' task in eval.tasks, or run "
                             "'openalign train demo' for training alone")
    if any((output_dir / stale).exists() for stale in STALE) and not _is_demo_run(output_dir):
        raise OpenAlignError(f"'{output_dir}' holds a run that 'openalign demo' did not make (its checkpoints and "
                             "TensorBoard logs would be deleted): pass another --out")
    # under torchrun the ranks join first, so that rank 0 alone clears the directory and the others wait for it
    main = init_distributed(recipe.train.device).is_main
    with contextlib.ExitStack() as held:
        with fail_together("preparing the demo's directory"):
            if main:  # held before the stale run is deleted: a demo running there keeps its checkpoints
                held.enter_context(held_directory(output_dir, "--out"))
                (output_dir / DEMO_MARKER).write_text("made by 'openalign demo', which starts it afresh each time\n")
                for stale in STALE:  # the demo trains from step 0 each time
                    shutil.rmtree(output_dir / stale, ignore_errors=True)
        started = time.perf_counter()
        result = train(recipe, show_progress=show_progress)
        seconds = time.perf_counter() - started
    evaluated, prefix = next((task, prefix) for task, prefix in zip(recipe.eval.tasks, recipe.eval.prefixes())
                             if isinstance(task, ShapesEvalConfig))  # its data, wherever
    # the model's shapes metrics: not another task's, nor those of a weight average (ema/shapes/...)
    metrics = {key.removeprefix(f"{prefix}/"): value for key, value in result.metrics.items()
               if key.startswith(f"{prefix}/")}
    report = {"dataset": "shapes", "model": recipe.model.name, "task": "demo", "metrics": metrics,
              "chance": shapes_chance_levels(Path(evaluated.root)), "train": _train_summary(recipe, seconds)}
    if main:
        write_report(output_dir, report, read_history(output_dir))
        console.print(metrics_table(report))
        console.print(f"report: {escape(str(output_dir / 'report.md'))}")
    return report


def _is_demo_run(output_dir: Path) -> bool:
    """A run directory the demo made: its marker, or (an earlier version's) a config that trained
    on the shapes dataset generated inside it."""
    if (output_dir / DEMO_MARKER).is_file():
        return True
    root = trained_shapes_root(output_dir)
    return root is not None and Path(root) == output_dir / "data"


def trained_shapes_root(run: str | Path) -> str | None:
    """The shapes dataset a run directory's recipe (its ``config.yaml``) trained on, if it is one."""
    recipe = peek_yaml(Path(run) / "config.yaml") or {}
    data = recipe.get("data")
    train = data.get("train") if isinstance(data, dict) else None
    root = train.get("root") if isinstance(train, dict) and train.get("type") == "shapes" else None
    return root if isinstance(root, str) else None


def _train_summary(recipe: Recipe, seconds: float) -> dict[str, Any]:
    cfg = recipe.train
    return {"steps": cfg.steps, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer, "lr": cfg.lr,
            "samples_seen": cfg.steps * cfg.batch_size, "seconds": round(seconds, 1)}


def metrics_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"openalign demo: {report['model']} on the shapes dataset (test split)")
    for column in ("metric", "value", "chance", "× chance"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, label in METRIC_LABELS.items():
        value, chance = report["metrics"][key], report["chance"][key]
        table.add_row(label, f"{100 * value:.1f}%", f"{100 * chance:.1f}%", f"{value / chance:.1f}")
    return table


def write_report(output_dir: Path, report: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """``metrics.json``, ``curves.png`` (loss and temperature by step) and ``report.md`` in ``output_dir``."""
    (output_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    _plot_curves(history, output_dir / "curves.png")
    summary = report["train"]
    lines = [
        "# openalign demo report", "",
        f"ALIGN (`{report['model']}`) trained for {summary['steps']} steps at batch {summary['batch_size']} "
        f"({summary['optimizer'].upper()}, peak lr {summary['lr']:g}) in {summary['seconds']:.0f} s, "
        "evaluated on the test split of the built-in shapes dataset.", "",
        "| metric | value | chance | × chance |", "|---|---:|---:|---:|",
    ]
    for key, label in METRIC_LABELS.items():
        value, chance = report["metrics"][key], report["chance"][key]
        lines.append(f"| {label} | {100 * value:.1f}% | {100 * chance:.1f}% | {value / chance:.1f} |")
    lines += ["", "![training curves](curves.png)", ""]
    (output_dir / "report.md").write_text("\n".join(lines))


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in history if "loss" in r]
    steps = [r["step"] for r in records]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, key, title in zip(axes, ("loss", "temperature", "lr"), ("contrastive loss", "temperature τ", "learning rate")):
        axis.plot(steps, [r[key] for r in records])
        axis.set_title(title)
        axis.set_xlabel("step")
    axes[1].set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
