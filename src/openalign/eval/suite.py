"""Evaluation suites (a list of tasks in one YAML file) and reports that merge result files.

A suite file (``openalign eval suite align`` for the shipped ``configs/suites/align.yaml``, or
any path)::

    tasks:
      - {task: knn, train_root: data/imagenet/train, val_root: data/imagenet/val}
      - {task: retrieval, json: data/karpathy/dataset_flickr30k.json, image_root: data/flickr30k-images}
    batch_size: 256

Each task writes one CLIP_benchmark-schema record (``dataset``, ``model``, ``pretrained``,
``task``, ``metrics``, ``language``) to ``OUTPUT_DIR/<task name>.json``. ``openalign eval
report DIR...`` merges the records found under the directories into a markdown table and a CSV,
and shows the retrieval tasks' example pictures (``<task name>_examples.png``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..config import flatten, from_dict, load_yaml, to_dict
from ..distributed import world_info
from ..errors import OpenAlignError
from ..files import read_json, replaceable
from ..precision import Precision, precision_name, precision_scope
from ..registry import find_config
from . import cache
from .datasets import read_lines_or_json
from .examples import is_examples_picture
from .tasks import EvalTaskConfig, task_problems

log = logging.getLogger(__name__)

RECORD_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")
# records name a task as CLIP_benchmark does where it has one (the others: openalign's names). The
# full-data probe follows the CLIP paper (appendix A.3: L-BFGS logistic regression on pre-projection
# features, C searched on held-out training images), not CLIP_benchmark's "linear_probe" (AdamW on
# normalised embeddings, a weight-decay sweep; openalign's clip_benchmark_probe task): its records say
# so, so that tables do not mix the two
RECORD_TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
                "linear_probe": "logistic_regression_probe", "clip_benchmark_probe": "linear_probe"}
EXAMPLES_SUFFIX = "_examples.png"


@dataclass
class SuiteConfig:
    """A named list of evaluation tasks; ``names`` (optional) labels each task's result file.
    With ``examples``, tasks that can draw their results (retrieval) also write ``<name>_examples.png``.
    ``precision``: the model's (``auto``: bf16 autocast on GPU, fp32 on CPU); a paper that
    evaluates in fp32 (ALIP) says ``fp32``."""

    tasks: list[EvalTaskConfig]
    names: list[str] = field(default_factory=list)
    batch_size: int = 256
    examples: bool = True
    precision: Precision = "auto"


def load_suite(name_or_path: str | Path) -> SuiteConfig:
    """A shipped suite (``align``, ``clippo``, ``alip``) or a suite YAML file, validated."""
    suite = from_dict(SuiteConfig, load_yaml(find_config("suites", name_or_path)), "suite")
    if suite.batch_size < 1:
        raise OpenAlignError(f"suite '{name_or_path}' has batch_size {suite.batch_size}; it must be at least 1")
    if not suite.tasks:
        raise OpenAlignError(f"suite '{name_or_path}' lists no tasks")
    if suite.names and len(suite.names) != len(suite.tasks):
        raise OpenAlignError(f"suite '{name_or_path}' has {len(suite.names)} names for {len(suite.tasks)} tasks")
    repeated = sorted(name for name, count in Counter(suite.names).items() if count > 1)
    if repeated:  # each names a result file: a second would replace the first's
        raise OpenAlignError(f"suite '{name_or_path}' names several tasks {', '.join(map(repr, repeated))}: each "
                             "name is a result file, so the names must differ")
    unsafe = [name for name in suite.names if not name or name.startswith(".") or "/" in name or "\\" in name]
    if unsafe:
        raise OpenAlignError(f"suite '{name_or_path}': task name {unsafe[0]!r} is not a plain file name (no "
                             "folders, no leading dot): it names a result file in the output folder")
    return suite


def run_suite(suite: SuiteConfig, model: nn.Module, pretrained: str, output_dir: str | Path, device: torch.device,
              show_progress: bool = True, precision: Precision | None = None) -> list[dict[str, Any]]:
    """Run every task at ``precision`` (default: the suite's), writing one record per task to
    ``output_dir``; returns the records."""
    if problems := task_problems(suite.tasks, "tasks", model):
        raise OpenAlignError(f"the suite cannot run (checked before any task runs): {'; '.join(problems)}. Relative "
                             "paths are read from the working directory; for data elsewhere, copy the suite's YAML "
                             "(a shipped suite's is openalign/configs/suites/NAME.yaml), set its paths and pass the "
                             "copy's path: openalign eval suite my_suite.yaml")
    output_dir = Path(output_dir)
    names = suite.names or [f"{index:02d}-{task.name}" for index, task in enumerate(suite.tasks)]
    if output_dir.exists() and not output_dir.is_dir():
        raise OpenAlignError(f"the suite's output folder '{output_dir}' is a file")
    for name in names:  # earlier results are replaced; other files of those names are not
        record = replaceable(output_dir / f"{name}.json", is_record_file, "an openalign result")
        if suite.examples:  # a picture beside its record is an earlier suite's (before pictures were marked, too)
            replaceable(output_dir / f"{name}{EXAMPLES_SUFFIX}",
                        lambda picture: is_examples_picture(picture) or is_record_file(record),
                        "an openalign examples picture")
    output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with _embedding_cache(), precision_scope(precision or suite.precision):  # the examples reuse the embeddings
        for name, task in zip(names, suite.tasks):
            log.info("suite task %s (%s)", name, task.name)
            listed = list_settings(task)
            metrics = task.run(model, device, suite.batch_size, show_progress)
            # the dataset as its name in the suite, else as the data names it (as the eval commands do)
            record = make_record(name if suite.names else task.dataset, model.config.name, pretrained, task.name,
                                 metrics, task, getattr(model, "weights_path", None), precision_name(device), listed)
            (output_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
            records.append(record)
            if suite.examples:
                task.write_examples(model, device, output_dir / f"{name}{EXAMPLES_SUFFIX}", suite.batch_size)
    return records


@contextmanager
def _embedding_cache() -> Iterator[None]:
    """The user's embedding cache if one is set, else (in a single process: ranks would not
    share it) a temporary one for the duration."""
    if cache.cache_dir() is not None or world_info()[1] > 1:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="openalign-embeddings-") as directory:
        os.environ[cache.CACHE_ENV] = directory
        try:
            yield
        finally:
            del os.environ[cache.CACHE_ENV]


def list_settings(settings: EvalTaskConfig) -> dict[str, str]:
    """The list files a task reads (class names, prompts): each file's absolute path (a shipped
    list's name as it is) and a hash of what it holds, ``<key>_sha256``. Taken before the task runs,
    they describe the lists it ran with, whatever happens to the files meanwhile."""
    listed = {}
    for key in settings.list_files:
        if value := getattr(settings, key):
            if Path(value).expanduser().is_file():
                listed[key] = str(Path(value).expanduser().resolve())
            content = json.dumps(read_lines_or_json(value, key), ensure_ascii=False, sort_keys=True)
            listed[f"{key}_sha256"] = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return listed


def make_record(dataset: str, model: str | None, pretrained: str, task: str, metrics: dict[str, float],
                settings: EvalTaskConfig | None = None, weights: str | None = None,
                precision: str | None = None, listed: dict[str, str] | None = None) -> dict[str, Any]:
    """A result in CLIP_benchmark's schema, ``task`` by CLIP_benchmark's name where it has one
    (``zeroshot_classification``, ``zeroshot_retrieval``; see ``RECORD_TASKS``); then what it takes
    to reproduce it: the task's ``settings`` (its split, files, k, templates, shots, ...), the
    ``weights`` read (a run directory's checkpoint), its list files (``listed``: :func:`list_settings`
    as the task began; read now where not given), the ``precision`` it computed in (bf16, fp16
    or fp32: ``auto`` resolved, so that a GPU's and a CPU's results tell apart) and openalign's version."""
    record = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": RECORD_TASKS.get(task, task),
              "metrics": metrics, "language": "en"}
    if settings is not None:  # the files it read, absolute: a relative path names no data once copied elsewhere
        record["settings"] = {**to_dict(settings), **{key: str(Path(value).expanduser().resolve()) for key in
                                                     settings.data_paths if (value := getattr(settings, key))}}
        record["settings"].update(list_settings(settings) if listed is None else listed)
    if weights is not None:
        record["weights"] = weights
    if precision is not None:
        record["precision"] = precision
    return {**record, "openalign": __version__}


def _current_task_name(record: dict[str, Any]) -> str:
    """The task name openalign writes now, for a record an earlier version wrote: the tasks
    before they took CLIP_benchmark's names, and the logistic-regression probe, which an earlier
    version named ``linear_probe`` (CLIP_benchmark's own such records have no ``c``)."""
    task = record["task"]
    if task == "linear_probe" and "c" not in record["metrics"]:
        return task
    return RECORD_TASKS.get(task, task)


def is_record(value: Any) -> bool:
    """Whether ``value`` (a JSON file's) is a result record as the eval commands write them."""
    return isinstance(value, dict) and set(RECORD_KEYS) <= set(value) and isinstance(value["metrics"], dict)


def is_record_file(path: Path) -> bool:
    """Whether ``path`` holds a result record (so that a command may replace it)."""
    try:
        return is_record(read_json(path))
    except OpenAlignError:
        return False


def collect_records(paths: list[str | Path]) -> list[dict[str, Any]]:
    """The result records in the given files and (recursively) directories. Other JSON found in a
    directory is skipped; a file named explicitly must be a record."""
    files: list[tuple[Path, bool]] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [(file, False) for file in sorted(path.rglob("*.json"))]
        elif path.is_file():
            files.append((path, True))
        else:
            raise OpenAlignError(f"'{path}' is neither a result file nor a directory of them")
    records, skipped = [], []
    for file, named in files:
        try:
            record = read_json(file)
        except OpenAlignError:
            if named:
                raise
            skipped.append(file)
            continue
        if is_record(record):
            records.append({**record, "task": _current_task_name(record)})
        elif named:
            raise OpenAlignError(f"'{file}' is not a result record: expected the JSON that an eval command writes, "
                                 f"with {', '.join(RECORD_KEYS)}")
        else:
            skipped.append(file)
    if skipped:
        log.warning("skipped %d JSON file(s) that are not readable result records: %s%s", len(skipped),
                    ", ".join(map(str, skipped[:3])), ", ..." if len(skipped) > 3 else "")
    if not records:
        raise OpenAlignError(f"no result records (JSON with {', '.join(RECORD_KEYS)}) under {', '.join(map(str, paths))}")
    return records


def collect_examples(paths: list[str | Path]) -> list[Path]:
    """The example pictures (``*_examples.png``) in the given directories, recursively."""
    return [file for path in map(Path, paths) if path.is_dir() for file in sorted(path.rglob(f"*{EXAMPLES_SUFFIX}"))]


def report_files(output: str | Path) -> tuple[Path, Path, Path]:
    """The markdown table, the CSV and the pictures' folder of the report ``output`` names: the
    prefix (``reports/align_v1.0``: ``align_v1.0.md``, not ``align_v1.md``) or its ``.md`` or
    ``.csv`` file."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix.lower() in (".md", ".csv") else output
    return (stem.with_name(f"{stem.name}.md"), stem.with_name(f"{stem.name}.csv"),
            stem.with_name(f"{stem.name}_examples"))


def write_report(records: list[dict[str, Any]], output: str | Path, examples: list[Path] = ()) -> tuple[Path, Path]:
    """``output``.md (a table per task: one row per model and dataset, then the example pictures,
    copied to ``output``_examples/) and ``output``.csv (one row per model, dataset, task and metric)."""
    markdown, table, pictures = report_files(output)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    records = _told_apart(records)
    lines = ["# openalign evaluation report", ""]
    for task in sorted({record["task"] for record in records}):
        rows = [record for record in records if record["task"] == task]
        metrics = sorted({key for record in rows for key in record["metrics"]}, key=_natural)
        lines += [f"## {task}", "", "| model | pretrained | dataset | " + " | ".join(metrics) + " |",
                  "|---|---|---|" + "---:|" * len(metrics)]
        for record in sorted(rows, key=lambda r: (str(r["model"]), str(r["pretrained"]), str(r["dataset"]))):
            values = [_format(metric, record["metrics"].get(metric)) for metric in metrics]
            cells = [str(record[key]).replace("|", "\\|") for key in ("model", "pretrained", "dataset")]
            lines.append("| " + " | ".join(cells + values) + " |")  # a '|' in a path is no column break
        lines.append("")
    lines += _example_section(examples, pictures)
    markdown.write_text("\n".join(lines))
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "pretrained", "dataset", "task", "metric", "value"])
        for record in records:
            for metric, value in sorted(record["metrics"].items(), key=lambda item: _natural(item[0])):
                writer.writerow([record["model"], record["pretrained"], record["dataset"], record["task"], metric, value])
    return markdown, table


def _told_apart(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with the settings in which records of one model, weights source, dataset and
    task differ (``k``, ``split``, the checkpoint read) added to their ``dataset``, so that a 1-NN
    and a 20-NN result, or two checkpoints of one run, are not two rows that look alike."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for position, record in enumerate(records):
        key = tuple(str(record[name]) for name in ("model", "pretrained", "dataset", "task"))
        groups.setdefault(key, []).append(position)
    told = list(records)
    for positions in groups.values():
        if len(positions) < 2:
            continue
        described = {position: _described(records[position]) for position in positions}
        known = [one for one in described.values() if one is not None]
        differing = sorted({name for one in known for name in one
                            if len({json.dumps(other.get(name), sort_keys=True) for other in known}) > 1})
        for position, one in described.items():
            shown = "settings not recorded" if one is None else ", ".join(
                f"{name}={_short(one.get(name))}" for name in differing)
            if shown:
                told[position] = {**records[position], "dataset": f"{records[position]['dataset']} ({shown})"}
    return told


def _described(record: dict[str, Any]) -> dict[str, Any] | None:
    """A record's settings, flattened to dotted keys, and the folder name of the weights it read;
    None for a record written before records carried settings."""
    if "settings" not in record:
        return None
    flat = {key: value for key, value in flatten(record["settings"] or {}).items() if key != "task"}
    if record.get("weights"):
        flat["weights"] = Path(record["weights"]).name
    if record.get("precision"):
        flat["precision"] = record["precision"]
    return flat


def _short(value: Any, width: int = 40) -> str:
    """A setting as a report cell shows it: text as it is, other values as JSON, cut at ``width``
    (80 templates would make a cell of thousands of characters)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def _natural(name: str) -> list[tuple[int, int | str]]:
    """A sort key that orders the numbers in names by value: recall@1, recall@5, recall@10."""
    return [(1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", name)]


def _example_section(examples: list[Path], folder: Path) -> list[str]:
    """Markdown showing each picture, copied (under a name made of its run folder and file) into ``folder``."""
    if not examples:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["## retrieval examples", ""]
    for picture in examples:
        name = f"{picture.parent.name}-{picture.name}"
        shutil.copyfile(picture, folder / name)
        lines += [f"### {picture.parent.name}: {picture.name.removesuffix(EXAMPLES_SUFFIX)}", "",
                  f"![{name}]({folder.name}/{name})", ""]
    return lines


# the settings a probe's record carries beside its metrics (CLIP_benchmark's linear probe records these)
_SETTINGS = ("c", "weight_decay", "lr", "epochs", "seed", "fewshot_k")


def _format(metric: str, value: Any) -> str:
    """Recalls and accuracies as percentages; ranks, losses and the probes' settings as numbers; none
    or NaN (acc5 of fewer than 5 classes) as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}" if metric.endswith(("_rank", "loss")) or metric in _SETTINGS else f"{100 * value:.2f}"
