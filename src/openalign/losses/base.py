"""The loss config family: each member builds a loss module called on the model's outputs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import Variants


@dataclass
class LossConfig(Variants):
    """A training objective; ``build()`` returns a module called as ``loss_fn(**model_outputs)``."""

    def build(self) -> nn.Module:
        raise NotImplementedError
