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

from collections.abc import Callable, Sequence

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


def fewshot_indices(train_labels: torch.Tensor, num_classes: int, shots: int, seed: int) -> torch.Tensor:
    """The training examples one seed's probe draws: ``shots`` per class, in class order. They
    depend on the labels alone, so only these need embedding."""
    labels = train_labels.long().cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) < shots:
        short = int(counts.argmin())
        raise OpenAlignError(f"class {short} has {int(counts[short])} training examples, fewer than {shots} shots")
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int(counts[c]), generator=generator)[:shots]]
                      for c in range(num_classes)])


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
