"""GLUE-style sentence(-pair) classification by fine-tuning a pixel model on rendered text.

CLIPPO reports GLUE after fully fine-tuning the one-tower model on rendered sentences with a task
head (shared spec clippo.md §5.4). big_vision has no GLUE code, and the spec marks the protocol
"[paper, unverified]": how a sentence pair is laid out in one image is not known. This module
makes and documents its own choice, **unverified against the paper** (arXiv:2212.08045):

- **Pair layout.** Sentence A fills the top half of the image and sentence B the bottom half.
  Each sentence is rendered on its own, full-size, with the model's renderer (so it wraps exactly
  as it would alone, character by character at the full image width), and the first
  ``image_size // 2`` rows of each rendering are kept (``image_size - image_size // 2`` for B).
  At CLIPPO's sizes these are whole 16-px lines, half the lines each (224 px: 7 + 7 lines;
  96 px: 3 + 3; the 32-px test model: 1 + 1). Text that does not fit in its half is dropped,
  silently, as the renderer drops text below the image. No separator is drawn: the boundary is
  the fixed row ``image_size // 2``. Where ``image_size // 2`` is not a multiple of 16 the cut
  falls inside a line.
- **Single-sentence tasks** (SST-2, CoLA: no ``sentence2``) render sentence A over the whole
  image, exactly as the model's text processor does.
- **Head.** A new ``nn.Linear(image_feature_dim, num_classes)`` on the pooled pre-projection
  features (``model.image_features``: CLIPPO's MAP-head ``pre_logits``, spec §2.1), initialised
  N(0, 0.02²) as in BERT/PIXEL, bias 0; the contrastive projection head is not used.
- **Training.** Full fine-tuning of a copy of the model (the caller's is never modified) with
  AdamW, separate learning rates for the encoder and the head, a constant learning rate, weight
  decay on matrices only (not on biases, norms or what the model exempts through
  ``no_weight_decay()``), cross-entropy, shuffling seeded per run, bf16 autocast on GPU. Then
  the validation split is scored in eval mode.
- **Metrics.** ``accuracy``; ``mcc`` (Matthews correlation, the multi-class form of Gorodkin
  2004, equal to the usual one for two classes; CoLA's GLUE metric); ``f1`` for binary tasks
  only, with label index 1 (the second label in sorted order; GLUE's "1") as the positive class
  (MRPC/QQP); ``train_loss``, the mean loss of the last epoch.
- **Regression** (STS-B's similarity scores, 0 to 5): ``regression=True`` gives the head one
  output, trained with the mean squared error, and scores ``pearson`` and ``spearman`` (GLUE's
  STS-B metrics; Spearman's with tied values given their mean rank, as scipy's ``spearmanr``),
  NaN where the predictions or the labels are constant. Scores read as a classification task's
  labels (a class per distinct score) are refused.

Data files (:func:`read_sentence_pairs`): a tab-separated file with a header row naming
``sentence1`` (or ``sentence``), optionally ``sentence2``, and ``label`` (other columns are
ignored; fields are not quoted, as in GLUE's TSVs), or JSON lines with the same keys.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.render import value_range
from ..errors import OpenAlignError
from ..files import not_a_file
from ..precision import autocast
from ..progress import progress_bar
from .features import eval_mode

log = logging.getLogger(__name__)

FIRST_COLUMNS = ("sentence1", "sentence")
SECOND_COLUMN = "sentence2"
LABEL_COLUMN = "label"
HEAD_INIT_STD = 0.02

SentencePairs = tuple[Sequence[str], Sequence[str] | None, Sequence[int] | Sequence[float]]
"""``(first sentences, second sentences or None, label indices or, for regression, scores)``: what
:func:`finetune_sentence_pairs` takes."""


def read_sentence_pairs(path: str | Path, label_names: Sequence[str] | None = None, regression: bool = False
                        ) -> tuple[list[str], list[str] | None, list[Any], list[str]]:
    """``(sentence1, sentence2 or None, label indices, label names)`` of a GLUE-style file.

    ``path`` is a tab-separated file whose header row names ``sentence1`` (or ``sentence``),
    optionally ``sentence2``, and ``label``, or (``.jsonl``) one JSON object per line with those
    keys. Labels map to indices in sorted order of the distinct labels (numerically when all are
    integers: GLUE's ``0``/``1``); pass another split's ``label_names`` to use its mapping, in
    which case a label it lacks is an error. Without a ``sentence2`` column the task is
    single-sentence and the second element is None. With ``regression`` (STS-B) the labels are
    scores, returned as floats, and there are no label names.
    """
    path = Path(path)
    if not path.is_file():
        raise OpenAlignError(f"sentence-pair file '{path}' {not_a_file(path)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise OpenAlignError(f"cannot read sentence-pair file '{path}': {error}") from None
    rows = _read_jsonl(path, text) if path.suffix.lower() == ".jsonl" else _read_tsv(path, text)
    if not rows:
        raise OpenAlignError(f"sentence-pair file '{path}' holds no examples")
    first_key = next(key for key in FIRST_COLUMNS if key in rows[0][1])
    has_second = SECOND_COLUMN in rows[0][1]
    first, second, raw_labels = [], [] if has_second else None, []
    for line, row in rows:
        first.append(row[first_key])
        if second is not None:
            second.append(row[SECOND_COLUMN])
        raw_labels.append(row[LABEL_COLUMN].strip())
        if not raw_labels[-1]:
            raise OpenAlignError(f"'{path}', line {line}: the label is blank (GLUE's test splits are unlabelled: "
                                 "evaluate on the dev split)")
    if regression:
        return first, second, [_score(path, line, label) for (line, _), label in zip(rows, raw_labels)], []
    if label_names is None:
        distinct = set(raw_labels)
        if all(_is_number(label) for label in distinct):  # GLUE's 0 and 1, or pandas' 0.0 and 1.0: in numeric order
            if not all(float(label).is_integer() for label in distinct):
                raise OpenAlignError(f"'{path}' has real-valued labels ({', '.join(sorted(distinct)[:3])}, ...): "
                                     "scores, as STS-B's, are a regression task (regression: true; --regression), "
                                     "not a class per distinct value")
            label_names = sorted(distinct, key=float)
        else:
            label_names = sorted(distinct)
    names = [str(name) for name in label_names]
    index = {name: position for position, name in enumerate(names)}
    unknown = sorted(set(raw_labels) - set(index))
    if unknown:
        raise OpenAlignError(f"'{path}' has labels that the training split lacks: {', '.join(unknown[:5])} "
                             f"(known: {', '.join(names)})")
    return first, second, [index[label] for label in raw_labels], names


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _score(path: Path, line: int, label: str) -> float:
    if not _is_number(label):
        raise OpenAlignError(f"'{path}', line {line}: the label {label!r} is not a finite number (a regression "
                             "task's labels are scores, as STS-B's 0 to 5)")
    return float(label)


def _check_columns(path: Path, columns: Sequence[str], where: str = "") -> None:
    if not any(key in columns for key in FIRST_COLUMNS) or LABEL_COLUMN not in columns:
        raise OpenAlignError(f"'{path}'{where} has columns {', '.join(repr(c) for c in columns) or '(none)'}; "
                             "expected 'sentence1' (or 'sentence'), optionally 'sentence2', and 'label' (GLUE-style)")


def _read_tsv(path: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of each non-blank data line; the header must name the columns."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise OpenAlignError(f"sentence-pair file '{path}' is empty; expected a header row "
                             "(sentence1, sentence2, label) and one example per line")
    records = csv.reader([line for _, line in lines], delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [column.strip() for column in next(records)]
    _check_columns(path, header)
    rows = []
    for (number, _), fields in zip(lines[1:], records):
        if len(fields) != len(header):
            raise OpenAlignError(f"'{path}', line {number}: {len(fields)} tab-separated fields, but the header has "
                                 f"{len(header)} ({', '.join(header)})")
        rows.append((number, dict(zip(header, fields))))
    return rows


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of each non-blank line; every line must have the first line's keys."""
    rows: list[tuple[int, dict[str, str]]] = []
    columns: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as error:
            raise OpenAlignError(f"'{path}', line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise OpenAlignError(f"'{path}', line {number}: expected a JSON object, got {type(record).__name__}")
        if columns is None:
            _check_columns(path, list(record), f", line {number},")
            columns = [key for key in (*FIRST_COLUMNS, SECOND_COLUMN, LABEL_COLUMN) if key in record]
        missing = [key for key in columns if key not in record]
        if missing:
            raise OpenAlignError(f"'{path}', line {number}: lacks {', '.join(missing)}, which line {rows[0][0]} has")
        rows.append((number, {key: "" if record[key] is None else str(record[key]) for key in columns}))
    if columns is None:
        raise OpenAlignError(f"sentence-pair file '{path}' is empty; expected one JSON object per line "
                             "with sentence1, sentence2 (optional) and label")
    return rows


def render_pairs(renderer: Any, first: Sequence[str], second: Sequence[str] | None = None) -> torch.Tensor:
    """(N, 3, H, W) float32 in [-1, 1]: ``first[i]`` in the top ``H // 2`` rows and ``second[i]``
    in the rest, each cut from its own full-size rendering (the layout of this module's
    docstring; shared spec clippo.md §5.4 leaves it open, so it is unverified against the paper).
    With ``second`` None, each image is ``first[i]`` alone over the whole image.

    ``renderer`` is a :class:`~openalign.data.render.TextRenderer` (``.render(texts)`` → uint8
    (N, H, W)); ``value_range`` maps grey levels to the model's input as the renderer does.
    """
    images = renderer.render(list(first))
    if second is not None:
        if len(second) != len(first):
            raise OpenAlignError(f"{len(first)} first sentences but {len(second)} second sentences")
        half = images.shape[1] // 2
        images[:, half:] = renderer.render(list(second))[:, :images.shape[1] - half]
    return value_range(torch.from_numpy(images))


def text_renderer(model: nn.Module) -> Any:
    """The renderer of a model that reads rendered text (CLIPPO); an error for one with a tokenizer."""
    config = getattr(model, "config", None)
    processor = config.build_tokenizer() if config is not None and hasattr(config, "build_tokenizer") else None
    renderer = getattr(processor, "renderer", None)
    if renderer is None or not hasattr(model, "image_features"):
        raise OpenAlignError(f"sentence-pair fine-tuning needs a model that reads rendered text (CLIPPO, whose text "
                             f"processor renders sentences as images and whose image tower embeds them); "
                             f"{type(model).__name__} reads text through {type(processor).__name__}")
    return renderer


def classification_scores(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``accuracy``, ``mcc`` (multi-class Matthews correlation) and, for two classes, ``f1`` of
    class 1, from the confusion matrix of integer ``predictions`` against ``labels``. A zero
    denominator (a constant classifier, or no positive predictions or labels) scores 0."""
    predictions, labels = predictions.long().cpu(), labels.long().cpu()
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    confusion = confusion.reshape(num_classes, num_classes).double()  # rows: true class, columns: predicted
    total, correct = confusion.sum(), confusion.trace()
    scores = {"accuracy": (correct / total).item() if total > 0 else 0.0,
              "mcc": matthews_correlation(confusion)}
    if num_classes == 2:
        scores["f1"] = f1_score(confusion)
    return scores


def matthews_correlation(confusion: torch.Tensor) -> float:
    """MCC of a (true × predicted) confusion matrix: (c·s − Σₖ pₖtₖ) / √((s² − Σₖ pₖ²)(s² − Σₖ tₖ²))
    with c correct, s total, tₖ / pₖ the true / predicted counts of class k; 0 for a zero denominator."""
    confusion = confusion.double()
    true, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    total, correct = confusion.sum(), confusion.trace()
    denominator = (total ** 2 - (predicted ** 2).sum()) * (total ** 2 - (true ** 2).sum())
    if denominator <= 0:
        return 0.0
    return ((correct * total - (predicted * true).sum()) / denominator.sqrt()).item()


def f1_score(confusion: torch.Tensor) -> float:
    """F1 of class 1 of a 2 × 2 (true × predicted) confusion matrix: 2TP / (2TP + FP + FN); 0 when
    there is no positive label or prediction."""
    tp, fp, fn = confusion[1, 1].item(), confusion[0, 1].item(), confusion[1, 0].item()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0


def regression_scores(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``pearson`` and ``spearman`` correlations of ``predictions`` with ``labels`` (STS-B's GLUE
    metrics); Spearman's is Pearson's of the ranks, tied values taking their mean rank. NaN where
    either side is constant, as scipy's."""
    predictions, labels = predictions.double().cpu(), labels.double().cpu()
    return {"pearson": _pearson(predictions, labels),
            "spearman": _pearson(_mean_ranks(predictions), _mean_ranks(labels))}


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return (x @ y / denominator).item() if denominator > 0 else math.nan


def _mean_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values``, each run of equal values given the mean of its ranks."""
    order = values.argsort(stable=True)
    _, run, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the rank of each run's last value
    ranks = torch.empty_like(values)
    ranks[order] = (last - (counts.double() - 1) / 2)[run]
    return ranks


def finetune_sentence_pairs(model: nn.Module, train: SentencePairs, val: SentencePairs, num_classes: int,
                            device: torch.device | str, epochs: int = 3, lr: float = 1e-4, head_lr: float = 1e-3,
                            weight_decay: float = 0.01, batch_size: int = 32, seed: int = 0,
                            show_progress: bool = True, regression: bool = False) -> dict[str, float]:
    """Fine-tune a copy of ``model`` with a linear head on its pooled features for sentence(-pair)
    classification, then score ``val``: ``{"accuracy", "mcc", "f1" (two classes), "train_loss"}``.
    With ``regression`` (STS-B; ``num_classes`` is then ignored) the labels are scores, the head
    has one output trained with the mean squared error, and ``val`` is scored
    ``{"pearson", "spearman", "train_loss"}``.

    ``train`` / ``val`` are ``(first sentences, second sentences or None, label indices)``
    (:func:`read_sentence_pairs` gives them); pairs are rendered into one image with sentence A
    in the top half and B in the bottom half (:func:`render_pairs`; the layout is this module's
    choice, shared spec clippo.md §5.4, unverified against the paper). The encoder trains at
    ``lr`` and the new head at ``head_lr`` (AdamW, constant rates, ``weight_decay`` on matrices),
    ``epochs`` passes in an order drawn from ``seed``. ``model`` itself is left untouched: a
    deep copy is trained on ``device`` and discarded.

    Needs a model exposing ``image_features`` whose text processor renders text (``.renderer``:
    CLIPPO); any other raises :class:`~openalign.errors.OpenAlignError`.
    """
    renderer = text_renderer(model)
    device = torch.device(device)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise OpenAlignError(f"{name} must be at least 1, got {value}")
    outputs = 1 if regression else num_classes
    if not regression and num_classes < 2:
        raise OpenAlignError(f"sentence classification needs at least 2 classes, got {num_classes}")
    train_first, train_second, train_labels = _check_split("training", train, num_classes, regression)
    val_first, val_second, val_labels = _check_split("validation", val, num_classes, regression)
    if (train_second is None) != (val_second is None):
        raise OpenAlignError("one split has second sentences (sentence2) and the other does not")

    generator = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model).to(device).train()
    feature_dim = int(tuned.config.image_feature_dim)
    head = nn.Linear(feature_dim, outputs)
    with torch.no_grad():
        head.weight.copy_(torch.randn(outputs, feature_dim, generator=generator) * HEAD_INIT_STD)
        head.bias.zero_()
    head = head.to(device)
    optimizer = torch.optim.AdamW(_parameter_groups(tuned, lr, weight_decay) + _parameter_groups(head, head_lr,
                                                                                                 weight_decay))
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    epoch_loss = math.nan
    with progress_bar("fine-tuning on sentence pairs", epochs * steps_per_epoch, enabled=show_progress) as advance:
        for epoch in range(epochs):
            order = torch.randperm(len(train_labels), generator=generator).tolist()
            total = torch.zeros((), device=device)
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                pixels = _batch_pixels(renderer, train_first, train_second, chosen, device)
                targets = torch.tensor([train_labels[i] for i in chosen], device=device)
                with autocast(device):
                    logits = head(tuned.image_features(pixels))
                if regression:
                    loss = F.mse_loss(logits.float().squeeze(1), targets.float())
                else:
                    loss = F.cross_entropy(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(chosen)
                advance(1)
            epoch_loss = (total / len(order)).item()
            log.info("sentence-pair fine-tuning epoch %d/%d: mean loss %.4f", epoch + 1, epochs, epoch_loss)

    predictions = []
    with eval_mode(tuned), torch.no_grad(), progress_bar("scoring sentence pairs", len(val_labels),
                                                         enabled=show_progress) as advance:
        for start in range(0, len(val_labels), batch_size):
            chosen = list(range(start, min(start + batch_size, len(val_labels))))
            pixels = _batch_pixels(renderer, val_first, val_second, chosen, device)
            with autocast(device):
                logits = head(tuned.image_features(pixels))
            predictions.append((logits.float().squeeze(1) if regression else logits.float().argmax(dim=1)).cpu())
            advance(len(chosen))
    predicted, labels = torch.cat(predictions), torch.tensor(list(val_labels))
    scores = regression_scores(predicted, labels) if regression else \
        classification_scores(predicted, labels, num_classes)
    return {**scores, "train_loss": epoch_loss}


def _check_split(what: str, split: SentencePairs, num_classes: int, regression: bool = False
                 ) -> tuple[Sequence[str], Sequence[str] | None, Sequence[Any]]:
    first, second, labels = split
    if not len(labels):
        raise OpenAlignError(f"the {what} split holds no examples")
    if len(first) != len(labels) or (second is not None and len(second) != len(labels)):
        raise OpenAlignError(f"the {what} split has {len(first)} first sentences, "
                             f"{'no' if second is None else len(second)} second sentences and {len(labels)} labels")
    if regression:
        if not all(math.isfinite(label) for label in labels):
            raise OpenAlignError(f"the {what} split has a score that is not a finite number")
        return first, second, labels
    bad = [label for label in labels if not 0 <= int(label) < num_classes]
    if bad:
        raise OpenAlignError(f"the {what} split has label {bad[0]}, outside [0, {num_classes}) for {num_classes} "
                             "classes")
    return first, second, labels


def _batch_pixels(renderer: Any, first: Sequence[str], second: Sequence[str] | None, chosen: list[int],
                  device: torch.device) -> torch.Tensor:
    """The rendered examples ``chosen`` on ``device`` (rendered per batch: a whole GLUE split as
    224-px images would not fit in memory)."""
    pixels = render_pairs(renderer, [first[i] for i in chosen], None if second is None else [second[i] for i in chosen])
    return pixels.to(device, non_blocking=True)


def _parameter_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The trainer's AdamW groups (matrices decayed; biases, norms and ``no_weight_decay()`` not) at ``lr``."""
    from ..train.optim import parameter_groups

    return [{**group, "lr": lr} for group in parameter_groups(module, weight_decay, "adamw")]
