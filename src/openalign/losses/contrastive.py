"""ALIGN's normalised-softmax contrastive loss (shared spec align-coyo-and-hf.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import gather_with_grad, world_info
from ..errors import ConfigError
from .base import LossConfig


@dataclass
class ContrastiveLossConfig(LossConfig, tag="contrastive"):
    """``directions: sum`` adds the image→text and text→image terms (ALIGN, COYO-ALIGN);
    ``mean`` averages them (CLIP, big_vision's ``bidirectional_contrastive_loss`` for CLIPPO)."""

    label_smoothing: float = 0.1
    directions: Literal["sum", "mean"] = "sum"

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("must be in [0, 1)", "label_smoothing")

    def build(self) -> ContrastiveLoss:
        return ContrastiveLoss(self.label_smoothing, self.directions)


def local_cross_entropy(image_emb: torch.Tensor, text_emb: torch.Tensor, all_image: torch.Tensor,
                        all_text: torch.Tensor, logit_scale: torch.Tensor, label_smoothing: float = 0.0,
                        reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``(image→text, text→image)`` cross-entropy of this rank's rows against the gathered batch:
    row i of ``image_emb`` must pick its own caption among ``all_text``, and the reverse; the
    positives sit at this rank's offset in the gathered order. ``reduction`` as ``F.cross_entropy``."""
    if image_emb.shape[0] != text_emb.shape[0] or all_image.shape[0] != all_text.shape[0]:
        raise ValueError(f"the loss pairs row i of the image embeddings with row i of the text embeddings, but "
                         f"got {image_emb.shape[0]} images and {text_emb.shape[0]} texts")
    rank, _ = world_info()
    local = image_emb.shape[0]
    labels = torch.arange(local, device=image_emb.device) + rank * local
    options = {"label_smoothing": label_smoothing, "reduction": reduction}
    return (F.cross_entropy(logit_scale * image_emb @ all_text.T, labels, **options),
            F.cross_entropy(logit_scale * text_emb @ all_image.T, labels, **options))


class ContrastiveLoss(nn.Module):
    """Image→text plus text→image cross-entropy over the global batch, with label smoothing.

    Each rank scores its own rows against the features gathered from every rank (gradients
    flow back to their owners), and averages over its rows; DDP's gradient averaging then
    gives exactly the single-device objective on the whole batch:
    L = mean_i CE_ε(row i of X Yᵀ·s) + mean_j CE_ε(row j of Y Xᵀ·s).
    The two directions are **summed** by default, as COYO-ALIGN does (Hugging Face's
    ``align_loss`` averages them, as ``directions="mean"`` does). Logits and softmax are
    computed in fp32.
    """

    def __init__(self, label_smoothing: float = 0.1, directions: str = "sum") -> None:
        super().__init__()
        if directions not in ("sum", "mean"):
            raise ValueError(f"directions must be 'sum' or 'mean', got {directions!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.directions = directions
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float
                ) -> torch.Tensor:
        image_emb, text_emb, logit_scale = image_emb.float(), text_emb.float(), torch.as_tensor(logit_scale).float()
        all_image, all_text = gather_with_grad(image_emb), gather_with_grad(text_emb)
        loss_i2t, loss_t2i = local_cross_entropy(image_emb, text_emb, all_image, all_text, logit_scale,
                                                 self.label_smoothing)
        self.last_stats = {"loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach()}
        total = loss_i2t + loss_t2i
        return total / 2 if self.directions == "mean" else total
