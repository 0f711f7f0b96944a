"""Linear probes on frozen features: CLIPPO's closed-form few-shot ridge regression.

CLIPPO (shared spec clippo.md §5.2, big_vision ``evaluators/fewshot_lsr.py``): for each seed,
sample ``shots`` training examples per class, standardise the features with the sample's own
mean and population std (+1e-5, as ``jnp.std``), append a constant feature of 100 (an almost
unregularised bias), regress the one-hot labels mapped to ±1 with ridge penalty λ = 1024 in
closed form, and score ``argmax(x W)`` on the test features. The reported accuracy is the mean
over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

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
                              test_labels: torch.Tensor, num_classes: int, c: float = 1.0,
                              max_iter: int = 1000) -> dict[str, float]:
    """The full-data linear probe: multinomial logistic regression (:func:`fit_logistic_regression`)
    on features standardised with the training mean and std; the test metrics of
    :func:`~openalign.eval.classification.classification_metrics`."""
    from .classification import classification_metrics

    x = train_features.cpu().double()
    mean, std = x.mean(dim=0), x.std(dim=0, correction=0) + STD_EPS
    weight, bias = fit_logistic_regression((x - mean) / std, train_labels, num_classes, c, max_iter)
    logits = ((test_features.cpu().double() - mean) / std) @ weight + bias
    return classification_metrics(logits, test_labels.cpu())


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
