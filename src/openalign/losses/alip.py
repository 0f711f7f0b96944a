"""ALIP's adaptive contrastive loss with the Language and Description Consistency Gates
(shared spec alip.md §2-§4).

Where the paper's figure and the released code disagree, this follows the code (spec §8):

- the Language Consistency Gate clips with **min**(1, ·) (the figure's max(·, 1) would make the
  Description Consistency Gate never fire);
- the Description Consistency Gate weights are exp(γ_p (S − H)), down-weighting pairs that match
  worse than their running average (the figure has the sign reversed), unclipped, and only for
  samples whose raw text and caption disagree (S_tc < H_tc).

Two deliberate differences: the three running averages are module buffers, so checkpoints carry
them and a resumed run continues them (the original keeps Python floats that a restart resets);
and the gates and losses are computed in float32 from embeddings that mixed precision may have
left in half precision (the original computes the gates on them as they are, spec §4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import gather_with_grad, world_info
from ..errors import ConfigError
from .base import LossConfig
from .contrastive import local_cross_entropy


@dataclass
class ALIPLossConfig(LossConfig, tag="alip"):
    """``gamma_s``, ``gamma_p``: the gates' sharpness (2 and 2 in ALIP's code); ``momentum``: of the
    running averages of the three similarities (0.99, each starting at 1.0)."""

    gamma_s: float = 2.0
    gamma_p: float = 2.0
    momentum: float = 0.99

    def __post_init__(self) -> None:
        for key in ("gamma_s", "gamma_p"):
            if not 0 < getattr(self, key) < math.inf:  # NaN too: every weight, and the loss, would be NaN
                raise ConfigError("must be positive and finite", key)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("must be in [0, 1)", "momentum")

    def build(self) -> ALIPLoss:
        return ALIPLoss(self.gamma_s, self.gamma_p, self.momentum)


class ALIPLoss(nn.Module):
    """``loss_fn(image_emb, text_emb, caption_emb, logit_scale)`` on L2-normalised embeddings → the
    total loss L_text + L_caption; the latest gate statistics are in ``last_stats``.

    With x, t, c the global batch (gathered from every rank) of image, raw-text and caption
    embeddings, and without gradient:
    S_tc = ⟨t, c⟩, S_xt = ⟨x, t⟩, S_xc = ⟨x, c⟩ per sample; each running average H ← m·H +
    (1 − m)·mean(S) is updated with the batch first; W_s = min(1, exp(γ_s (S_tc − H_tc)));
    where S_tc < H_tc, W_t = exp(γ_p (S_xt − H_xt)) and W_c = exp(γ_p (S_xc − H_xc)), else 1.
    Then L_p = mean_i W_s,i W_p,i ½[CE(s x_i Y_pᵀ, i) + CE(s y_p,i Xᵀ, i)] for p in {t, c}, a plain
    mean (weights are not renormalised). Each rank scores its own rows against the gathered
    columns (gradients flow back to their owners), so with DDP's averaging the gradient is
    exactly that of the loss on the whole global batch.
    """

    def __init__(self, gamma_s: float = 2.0, gamma_p: float = 2.0, momentum: float = 0.99) -> None:
        super().__init__()
        self.gamma_s, self.gamma_p, self.momentum = gamma_s, gamma_p, momentum
        for name in ("history_text_caption", "history_image_text", "history_image_caption"):
            self.register_buffer(name, torch.tensor(1.0))
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, caption_emb: torch.Tensor,
                logit_scale: torch.Tensor | float) -> torch.Tensor:
        logit_scale = torch.as_tensor(logit_scale)
        shapes = [tuple(e.shape) for e in (image_emb, text_emb, caption_emb)]
        if len(shapes[0]) != 2 or len(set(shapes)) != 1 or logit_scale.numel() != 1:
            # checked before the running averages move: broadcasting would let a (1, d) caption through the gates
            raise ValueError(f"ALIP's loss takes image, raw-text and caption embeddings of one shape (N, d), row i "
                             f"of each the same example, and one logit scale; got {', '.join(map(str, shapes))} and "
                             f"a logit scale of shape {tuple(logit_scale.shape)}")
        image_emb, text_emb, caption_emb = image_emb.float(), text_emb.float(), caption_emb.float()
        logit_scale = logit_scale.float().reshape(())
        all_image, all_text, all_caption = (gather_with_grad(e) for e in (image_emb, text_emb, caption_emb))
        weight_sample, weight_text, weight_caption = self.gates(all_image.detach(), all_text.detach(),
                                                                all_caption.detach())
        rank, _ = world_info()
        local = slice(rank * image_emb.shape[0], (rank + 1) * image_emb.shape[0])
        loss_text = (weight_sample[local] * weight_text[local]
                     * self.per_sample_loss(image_emb, text_emb, all_image, all_text, logit_scale)).mean()
        loss_caption = (weight_sample[local] * weight_caption[local]
                        * self.per_sample_loss(image_emb, caption_emb, all_image, all_caption, logit_scale)).mean()
        self.last_stats.update(loss_text=loss_text.detach(), loss_caption=loss_caption.detach())
        return loss_text + loss_caption

    @torch.no_grad()
    def gates(self, image: torch.Tensor, text: torch.Tensor, caption: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_s, W_t, W_c)`` over the global batch, after updating the running averages."""
        s_tc, s_xt, s_xc = (text * caption).sum(-1), (image * text).sum(-1), (image * caption).sum(-1)
        for history, similarity in ((self.history_text_caption, s_tc), (self.history_image_text, s_xt),
                                    (self.history_image_caption, s_xc)):
            history.mul_(self.momentum).add_((1 - self.momentum) * similarity.mean())
        inconsistent = s_tc < self.history_text_caption
        weight_sample = torch.exp(self.gamma_s * (s_tc - self.history_text_caption)).clamp(max=1.0)
        ones = torch.ones_like(s_tc)
        weight_text = torch.where(inconsistent, torch.exp(self.gamma_p * (s_xt - self.history_image_text)), ones)
        weight_caption = torch.where(inconsistent, torch.exp(self.gamma_p * (s_xc - self.history_image_caption)), ones)
        self.last_stats = {
            "similarity_text_caption": s_tc.mean(), "similarity_image_text": s_xt.mean(),
            "similarity_image_caption": s_xc.mean(), "history_text_caption": self.history_text_caption.clone(),
            "history_image_text": self.history_image_text.clone(),
            "history_image_caption": self.history_image_caption.clone(), "weight_sample": weight_sample.mean(),
            "weight_text": weight_text.mean(), "weight_caption": weight_caption.mean(),
        }
        return weight_sample, weight_text, weight_caption

    @staticmethod
    def per_sample_loss(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
                        logit_scale: torch.Tensor) -> torch.Tensor:
        """½[CE(image→text) + CE(text→image)] of each local row against the global batch."""
        image_to_text, text_to_image = local_cross_entropy(image, text, all_image, all_text, logit_scale,
                                                           reduction="none")
        return (image_to_text + text_to_image) / 2
