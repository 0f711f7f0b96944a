"""Linear probes on frozen features: CLIPPO's closed-form few-shot ridge regression, and the
full-data logistic-regression probe with CLIP's sweep of its L2 strength.

CLIPPO (shared spec clippo.md §5.2, big_vision ``evaluators/fewshot_lsr.py``): for each seed,
sample ``shots`` training examples per class, standardise the features with the sample's own
mean and population std (+1e-5, as ``jnp.std``), append a constant feature of 100 (an almost
unregularised bias), regress the one-hot labels mapped to ±1 with ridge penalty λ = 1024 in
closed form, and score ``argmax(x W)`` on the test features. The reported accuracy is the mean
over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import OpenAlignError

BIAS_FEATURE = 100.0
STD_EPS = 1e-5


def ridge_fewshot_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                        test_labels: torch.Tensor, num_classes: int, shots: int = 10,
                        seeds: Sequence[int] = (0, 1, 2), l2: float = 1024.0) -> dict[str, float | list[float]]:
    """``{"acc1": mean over seeds, "acc1_per_seed": [...]}`` of the few-shot ridge probe.

    Features are the frozen pre-projection ones (CLIPPO: the image tower's pooled output);
    every class needs at least ``shots`` training examples.
    """
    accuracies = []
    for seed in seeds:
        chosen = fewshot_indices(train_labels, num_classes, shots, seed)
        accuracies.append(ridge_accuracy(train_features.cpu()[chosen], train_labels.cpu()[chosen], test_features,
                                         test_labels, num_classes, l2))
    return {"acc1": sum(accuracies) / len(accuracies), "acc1_per_seed": accuracies}


def fewshot_indices(train_labels: torch.Tensor, num_classes: int, shots: int, seed: int,
                    class_names: Sequence[str] | None = None) -> torch.Tensor:
    """The training examples one seed's probe draws: ``shots`` per class, in class order. They
    depend on the labels alone, so only these need embedding."""
    labels = train_labels.long().cpu()
    counts = class_counts(labels, num_classes, shots, f"{shots} shots", class_names)
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int(counts[c]), generator=generator)[:shots]]
                      for c in range(num_classes)])


def class_counts(labels: torch.Tensor, num_classes: int, needed: int, what: str,
                 class_names: Sequence[str] | None = None, context: str = "") -> torch.Tensor:
    """Each class's number of ``labels``; a class with fewer than ``needed`` is an error naming
    it (by ``class_names`` where given), ``context`` and ``what`` needed them."""
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) < needed:
        short, count = int(counts.argmin()), int(counts.min())
        name = f"class '{class_names[short]}'" if class_names is not None else f"class {short}"
        raise OpenAlignError(f"{name} has {count} training example{'' if count == 1 else 's'}{context}, fewer than "
                             f"{what}")
    return counts


def ridge_accuracy(x: torch.Tensor, labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor,
                   num_classes: int, l2: float = 1024.0) -> float:
    """Top-1 accuracy on the test features of the ridge probe fitted to the sampled ``x``."""
    x = x.cpu().double()
    mean, std = x.mean(dim=0), x.std(dim=0, correction=0) + STD_EPS
    targets = 2.0 * torch.nn.functional.one_hot(labels.cpu().long(), num_classes).double() - 1.0
    weights = ridge_regression(_with_bias((x - mean) / std), targets, l2)
    predictions = (_with_bias((test_features.double().cpu() - mean) / std) @ weights).argmax(dim=1)
    return (predictions == test_labels.cpu()).double().mean().item()


def ridge_regression(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """W minimising ‖xW − y‖² + l2‖W‖²: ``(xᵀx + λI)⁻¹xᵀy``, or the equal dual ``xᵀ(xxᵀ + λI)⁻¹y``
    when there are fewer rows than features (few-shot: N ≪ D)."""
    rows, features = x.shape
    if rows < features:
        return x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(rows, dtype=x.dtype), y)
    return torch.linalg.solve(x.T @ x + l2 * torch.eye(features, dtype=x.dtype), x.T @ y)


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.full((x.shape[0], 1), BIAS_FEATURE, dtype=x.dtype)], dim=1)


def logistic_regression_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                              test_labels: torch.Tensor, num_classes: int, c: float | None = None,
                              max_iter: int = 1000, val_proportion: float = 0.2, seed: int = 0,
                              standardize: bool = False) -> dict[str, float]:
    """The full-data linear probe: multinomial logistic regression (:func:`fit_logistic_regression`)
    on the features as they are, as CLIP fits scikit-learn's (``standardize``: on features
    standardised with the training mean and std instead); the test metrics of
    :func:`~openalign.eval.classification.classification_metrics` under CLIP_benchmark's linear-probe
    names (``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``) and the ``c`` used.

    ``c=None`` chooses C as CLIP does (paper appendix A.3): :func:`search_c` scores each C on a
    held-out ``val_proportion`` of every class's training examples (split with ``seed``); the
    probe with the best C is then refitted on all of them.
    """
    from .classification import classification_metrics

    if c is None:
        fit, held_out = stratified_split(train_labels, val_proportion, seed)

        def val_accuracy(candidate: float) -> float:
            return _fit_and_score(train_features[fit], train_labels[fit], train_features[held_out],
                                  train_labels[held_out], num_classes, candidate, max_iter, standardize)[0]

        c = search_c(val_accuracy)
    logits = _fit_and_score(train_features, train_labels, test_features, test_labels, num_classes, c, max_iter,
                            standardize)[1]
    return {**{f"lp_{name}": value for name, value in classification_metrics(logits, test_labels.cpu()).items()},
            "c": c}


def _fit_and_score(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, num_classes: int, c: float, max_iter: int,
                   standardize: bool) -> tuple[float, torch.Tensor]:
    """(top-1 accuracy, logits) on the test features of the probe fitted with ``c``."""
    x = train_features.cpu().double()
    mean, std = (x.mean(dim=0), x.std(dim=0, correction=0) + STD_EPS) if standardize else (0.0, 1.0)
    weight, bias = fit_logistic_regression((x - mean) / std, train_labels, num_classes, c, max_iter)
    logits = ((test_features.cpu().double() - mean) / std) @ weight + bias
    return (logits.argmax(dim=1) == test_labels.cpu()).double().mean().item(), logits


def stratified_split(labels: torch.Tensor, val_proportion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, held-out rows): ``floor(val_proportion × n)`` random examples of each class with
    ``n`` examples are held out, at most ``n - 1``, so that every class stays in the fit."""
    labels = labels.long().cpu()
    generator = torch.Generator().manual_seed(seed)
    fit, held_out = [], []
    for label in labels.unique():
        rows = torch.nonzero(labels == label).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        count = min(int(val_proportion * len(rows)), len(rows) - 1)
        held_out.append(rows[:count])
        fit.append(rows[count:])
    held_out_rows = torch.cat(held_out)
    if not len(held_out_rows):
        raise OpenAlignError(f"holding out {val_proportion:g} of each class's training examples leaves none to "
                             "choose C on: give the probe more training examples, or a fixed C")
    return torch.cat(fit).sort().values, held_out_rows.sort().values


def search_c(score: Callable[[float], float], low: int = -6, high: int = 6, coarse_step: float = 2.0,
             resolution: float = 0.125) -> float:
    """The C in [10^low, 10^high] that maximises ``score`` (ties: the smaller C), by CLIP's
    parametric binary search (paper appendix A.3): score C = 10^-6, 10^-4, ..., 10^6; then score
    the points half a step to either side of the best exponent, and halve the step again until it is
    ``resolution`` (8 points a decade). About 15 fits instead of the 97 of the full grid."""
    scores: dict[float, float] = {}

    def best_after(exponents: list[float]) -> float:
        for exponent in exponents:
            if low <= exponent <= high and exponent not in scores:
                scores[exponent] = score(10.0 ** exponent)
        return max(scores, key=lambda exponent: (scores[exponent], -exponent))

    best = best_after([low + coarse_step * i for i in range(int((high - low) / coarse_step) + 1)])
    step = coarse_step / 2
    while step >= resolution:
        best = best_after([best - step, best + step])
        step /= 2
    return 10.0 ** best


def fit_logistic_regression(x: torch.Tensor, labels: torch.Tensor, num_classes: int, c: float = 1.0,
                            max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (D, C), bias (C,))`` minimising ``Σ cross-entropy + ‖W‖² / (2c)`` with the bias
    unpenalised (scikit-learn's multinomial objective and ``C``), by full-batch L-BFGS in float64."""
    x, y = x.double(), labels.cpu().long()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  history_size=50, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y, reduction="sum") + (weight ** 2).sum() / (2 * c)
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


# ------------------------------------------------------------------ CLIP_benchmark's linear probe

WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()  # CLIP_benchmark's grid: 1e-6..1e2, 12 a decade


def clip_benchmark_probe_rows(labels: torch.Tensor, num_classes: int, fewshot_k: int = -1, seed: int = 0,
                              val_proportion: float | None = None, class_names: Sequence[str] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the training rows CLIP_benchmark's linear probe trains on, in its order; the rows it holds out
    to choose the weight decay on, or None). With ``val_proportion`` (its ``--val_proportion``), a
    random share of the rows is held out first (:func:`random_split_rows`); then the rest are
    permuted, and with ``fewshot_k > 0`` only the first ``fewshot_k`` of each class are kept
    (:func:`fewshot_permutation`). The draws come from one generator seeded with ``seed``, in
    CLIP_benchmark's order. The rows depend on the labels alone, so only they need embedding.
    ``class_names`` name the classes in the error for one with fewer than ``fewshot_k`` rows."""
    labels = labels.long().cpu()
    generator = torch.Generator().manual_seed(seed)
    rows, held_out = torch.arange(len(labels)), None
    if val_proportion is not None:
        if not 0 < val_proportion < 1:
            raise OpenAlignError(f"val_proportion is {val_proportion:g}: a share of the training examples lies "
                                 "between 0 and 1")
        rows, held_out = random_split_rows(len(labels), val_proportion, generator)
        if not len(held_out) or not len(rows):
            raise OpenAlignError(f"a share of {val_proportion:g} of {len(labels)} training examples holds out "
                                 f"{len(held_out)} and keeps {len(rows)}: both need at least one")
    held = f" once {len(held_out)} are held out" if held_out is not None else ""
    return rows[fewshot_permutation(labels[rows], num_classes, fewshot_k, generator, class_names, held)], held_out


def adamw_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                       test_labels: torch.Tensor, num_classes: int, val_features: torch.Tensor | None = None,
                       val_labels: torch.Tensor | None = None, fewshot_k: int = -1, lr: float = 0.1,
                       epochs: int = 10, batch_size: int = 64, seed: int = 0,
                       device: str | torch.device = "cpu") -> dict[str, float]:
    """CLIP_benchmark's ``linear_probe`` (``metrics/linear_probe.py``; shared spec anchors §6.2) on
    L2-normalised image embeddings: a linear layer trained (:func:`train_linear_probe`) with AdamW
    and cross-entropy for ``epochs`` passes of shuffled ``batch_size`` batches, the learning rate
    following a cosine from ``lr`` to 0 over all steps (no warm-up).

    ``train_features`` are the rows :func:`clip_benchmark_probe_rows` chose, in its order. With
    ``val_features``, the weight decay is chosen on them (:func:`weight_decay_sweep`) and the final
    probe trains on the training and validation rows together (few-shot, ``fewshot_k > 0``: on the
    training rows alone); without, the weight decay is 0. Returns the test metrics of
    :func:`~openalign.eval.classification.classification_metrics` under CLIP_benchmark's names
    (``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``) and the settings it records;
    ``lp_acc5`` is NaN unless some test label is 5 or more, as CLIP_benchmark's probe has it.

    The probe's initialisation and shuffling draw from a generator seeded with ``seed``: the same
    initialisation as CLIP_benchmark's (which seeds the global generator), another shuffling
    order. Training is in fp32 (CLIP_benchmark: AMP on GPU).
    """
    from .classification import classification_metrics

    x, y = train_features.to(device, torch.float32), train_labels.to(device, torch.long)  # moved once, not per fit
    if (val_features is None) != (val_labels is None):
        raise OpenAlignError("give val_features and val_labels together (the weight decay is chosen on both)")
    if val_labels is not None and not len(val_labels):
        raise OpenAlignError("the validation set to choose the weight decay on is empty")

    def fit(features: torch.Tensor, labels: torch.Tensor, weight_decay: float) -> torch.nn.Linear:
        return train_linear_probe(features, labels, num_classes, weight_decay, lr, epochs, batch_size, seed, device)

    if val_features is not None and val_labels is not None:
        val_x, val_y = val_features.to(device, torch.float32), val_labels.to(device, torch.long)

        def val_accuracy(weight_decay: float) -> float:
            logits = _probe_logits(fit(x, y, weight_decay), val_x)
            return (logits.argmax(dim=1) == val_y.cpu()).double().mean().item()

        weight_decay = weight_decay_sweep(val_accuracy)
        if fewshot_k < 0:  # full data: the final probe also learns from the validation rows
            x, y = torch.cat([x, val_x]), torch.cat([y, val_y])
    else:
        weight_decay = 0.0
    logits = _probe_logits(fit(x, y, weight_decay), test_features.float())
    metrics = {f"lp_{name}": value for name, value in classification_metrics(logits, test_labels.cpu()).items()}
    if int(test_labels.max()) < 5:  # as CLIP_benchmark's probe: no top-5 unless a test label is 5 or more
        metrics["lp_acc5"] = math.nan
    return {**metrics, "weight_decay": weight_decay, "lr": lr, "epochs": epochs, "seed": seed,
            "fewshot_k": fewshot_k, "normalized": True}


def fewshot_permutation(labels: torch.Tensor, num_classes: int, fewshot_k: int, generator: torch.Generator,
                        class_names: Sequence[str] | None = None, context: str = "") -> torch.Tensor:
    """The training rows CLIP_benchmark's probe uses, in its order: a random permutation of all
    rows, keeping (``fewshot_k > 0``) only the first ``fewshot_k`` of each class. Every class needs
    ``fewshot_k`` rows (CLIP_benchmark checks only the classes it saw: one without training
    images passed there, unseen by the probe); the error names the class and ``context``."""
    if fewshot_k == 0:
        raise OpenAlignError("fewshot_k must be at least 1 (examples per class), or -1 for all of them")
    labels = labels.long().cpu()
    permutation = torch.randperm(len(labels), generator=generator)
    if fewshot_k < 0:
        return permutation
    counts = class_counts(labels, num_classes, fewshot_k, f"fewshot_k={fewshot_k}", class_names, context)
    permuted = labels[permutation]
    by_class = torch.argsort(permuted, stable=True)  # each class's rows, in permutation order
    first_of_class = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(by_class)
    rank[by_class] = torch.arange(len(labels)) - first_of_class[permuted[by_class]]  # place within its class
    return permutation[rank < fewshot_k]


def random_split_rows(count: int, proportion: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept rows, held-out rows) as ``torch.utils.data.random_split(rows, [1 - proportion, proportion])``
    splits them (CLIP_benchmark's ``--val_proportion``): ``floor`` of each share, the remainder given
    to the kept rows first, both in the order of one random permutation."""
    kept, held_out = math.floor(count * (1 - proportion)), math.floor(count * proportion)
    remainder = count - kept - held_out
    kept, held_out = kept + (remainder + 1) // 2, held_out + remainder // 2
    permutation = torch.randperm(count, generator=generator)
    return permutation[:kept], permutation[kept:kept + held_out]


def train_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, lr: float,
                       epochs: int, batch_size: int, seed: int, device: str | torch.device = "cpu"
                       ) -> torch.nn.Linear:
    """CLIP_benchmark's probe training: a ``nn.Linear`` initialised as PyTorch initialises one,
    AdamW (``weight_decay`` on all parameters), cross-entropy, ``epochs`` passes over ``x`` in
    shuffled ``batch_size`` batches (the last one smaller), cosine learning rate without warm-up."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], num_classes, device="meta").to_empty(device="cpu")
    torch.nn.init.kaiming_uniform_(probe.weight, a=math.sqrt(5), generator=generator)  # nn.Linear's own
    bound = 1 / math.sqrt(x.shape[1])
    torch.nn.init.uniform_(probe.bias, -bound, bound, generator=generator)
    probe = probe.to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = x.to(device, torch.float32), y.to(device)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    with torch.enable_grad():
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=generator).to(device)
            for step in range(steps_per_epoch):
                rows = order[step * batch_size:(step + 1) * batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * (1 + math.cos(math.pi * (epoch * steps_per_epoch + step) / total)) * lr
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(probe(x[rows]), y[rows]).backward()
                optimizer.step()
    return probe


def weight_decay_sweep(score: Callable[[float], float]) -> float:
    """The weight decay CLIP_benchmark's probe takes (after CLIP's appendix A.3): score the 7 points
    1e-6, 1e-4.67, ..., 1e2 of its 97-point grid, then the grid points 8, 4, 2 and 1 steps either
    side of the best so far; the best is the first highest score in the order scored (each round:
    left, best, right), so ties go to the smaller weight decay. Each weight decay is trained once."""
    scores: dict[int, float] = {}

    def best_of(candidates: list[int]) -> int:
        for index in candidates:
            if index not in scores:
                scores[index] = score(WEIGHT_DECAYS[index])
        return max(candidates, key=scores.__getitem__)  # the first of equal scores

    best = best_of(list(range(0, len(WEIGHT_DECAYS), 16)))
    span = 8
    while span:
        best = best_of([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[best]


@torch.no_grad()
def _probe_logits(probe: torch.nn.Linear, features: torch.Tensor) -> torch.Tensor:
    return probe(features.to(probe.weight.device)).float().cpu()
