"""Evaluation tasks that a recipe lists; each runs on a model and returns named metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import Variants
from ..errors import ConfigError
from .shapes import evaluate_shapes


@dataclass
class EvalTaskConfig(Variants):
    """One evaluation; ``task`` picks the member. ``name`` prefixes its metrics in logs and reports."""

    tag_key: ClassVar[str] = "task"

    @property
    def name(self) -> str:
        return str(self.tag)

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        raise NotImplementedError


@dataclass
class ShapesEvalConfig(EvalTaskConfig, tag="shapes"):
    """The built-in dataset at ``root``: retrieval R@1/5/10, zero-shot and 1-NN shape and colour accuracy."""

    root: str
    knn_memory_size: int = 5000

    def __post_init__(self) -> None:
        if self.knn_memory_size < 1:
            raise ConfigError("must be at least 1", "knn_memory_size")

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        return evaluate_shapes(model, self.root, device, batch_size, self.knn_memory_size, show_progress)
