"""CLIP's towers, as open_clip builds them: a ViT with a class token and a causal text
Transformer with CLIP's byte-level BPE (ALIP's architecture, shared spec alip.md §1).

Thin wrappers over ``open_clip.transformer``: the towers are open_clip's own modules (their
initialisation included: CLIP's for the text tower, PyTorch defaults for the ViT blocks, as
ALIP's code has), each ending in its bias-free projection to ``output_dim``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..data.tokenizer import PUNCTUATION_CUTS, TextBatch, open_clip_reads_the_prefix_alike, shorten_long_text
from ..errors import ConfigError, OpenAlignError
from .base import ImageTowerConfig, TextTowerConfig

_ACTIVATIONS = {"gelu": nn.GELU}


def _open_clip():
    try:
        import open_clip.transformer
        import open_clip.tokenizer
    except ImportError:
        raise OpenAlignError("CLIP towers need open_clip: pip install open_clip_torch") from None
    return open_clip


@dataclass
class OpenClipViTConfig(ImageTowerConfig, tag="open_clip_vit"):
    """open_clip's ``VisionTransformer``: patches without bias, a class token, ``ln_pre``, pre-LN
    blocks, ``ln_post`` on the class token, and a bias-free projection to ``output_dim``."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 512
    activation: Literal["gelu"] = "gelu"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"is {self.image_size}, which patch_size {self.patch_size} does not divide", "image_size")

    def build(self) -> nn.Module:
        transformer = _open_clip().transformer
        return transformer.VisionTransformer(
            image_size=self.image_size, patch_size=self.patch_size, width=self.width, layers=self.layers,
            heads=self.heads, mlp_ratio=self.mlp_ratio, output_dim=self.output_dim,
            act_layer=_ACTIVATIONS[self.activation])


@dataclass
class ClipTextConfig(TextTowerConfig, tag="clip_text"):
    """open_clip's ``TextTransformer``: token and position embeddings, pre-LN blocks under a causal
    mask, ``ln_final``, the feature at the end-of-text token (the largest id), and a bias-free
    projection to ``output_dim``. The tokenizer is CLIP's BPE, whose vocabulary ships inside
    ``open_clip_torch`` (``tokenizer: clip-bpe``); ``max_length`` is the context length."""

    tokenizer: str = "clip-bpe"
    max_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 512
    activation: Literal["gelu"] = "gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokenizer != "clip-bpe":
            raise ConfigError(f"is '{self.tokenizer}'; the CLIP text tower reads CLIP's BPE ids: use 'clip-bpe'",
                              "tokenizer")

    def build(self) -> nn.Module:
        return ClipTextTower(self)

    def build_tokenizer(self, train: bool = False) -> ClipTokenizer:
        """open_clip's tokenizer, in training too: ALIP trained with it (a literal ``<end_of_text>``
        in the text is the special token there)."""
        return ClipTokenizer(self.max_length)


class ClipTextTower(nn.Module):
    """Token ids (and an unused mask, for the towers' common signature) → projected features."""

    def __init__(self, config: ClipTextConfig) -> None:
        super().__init__()
        self.output_dim = config.output_dim
        self.transformer = _open_clip().transformer.TextTransformer(
            context_length=config.max_length, vocab_size=config.vocab_size, width=config.width, heads=config.heads,
            layers=config.layers, mlp_ratio=config.mlp_ratio, output_dim=config.output_dim,
            act_layer=_ACTIVATIONS[config.activation])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(input_ids)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (open_clip's)."""
        self.transformer.set_grad_checkpointing(enable)


class ClipTokenizer:
    """CLIP's tokenizer (open_clip's ``SimpleTokenizer``: ftfy, HTML unescape, whitespace
    collapse, lower case, byte-level BPE), [SOT] ids [EOT] zero-padded to ``max_length``; longer
    texts are cut with [EOT] kept last. Returns ``input_ids`` and ``attention_mask`` (1 up to [EOT])."""

    def __init__(self, max_length: int = 77) -> None:
        self.max_length = max_length
        self._tokenizer = None

    def __call__(self, texts: str | Sequence[str]) -> TextBatch:
        if self._tokenizer is None:
            self._tokenizer = _open_clip().tokenizer.SimpleTokenizer()
        tokenizer, kept = self._tokenizer, self.max_length - 2  # [SOT] and [EOT]
        # open_clip splits words at any whitespace and punctuation: a long text is cut there first
        # (shorten_long_text), where it reads the prefix as it reads the text
        batch = [shorten_long_text(text, kept, lambda prefix, most: len(tokenizer.encode(prefix)),
                                   separators=" \t\n" + PUNCTUATION_CUTS, cuts_at=open_clip_reads_the_prefix_alike)
                 for text in ([texts] if isinstance(texts, str) else texts)]
        ids = tokenizer(batch, context_length=self.max_length)
        # up to [EOT], the highest id (where CLIP pools): id 0, the padding, is also the token "!"
        positions = torch.arange(ids.shape[1])
        return TextBatch(input_ids=ids, attention_mask=(positions[None] <= ids.argmax(dim=-1)[:, None]).long())

    def __getstate__(self) -> dict:
        return {"max_length": self.max_length, "_tokenizer": None}

    def __repr__(self) -> str:
        return f"ClipTokenizer(open_clip SimpleTokenizer, max_length={self.max_length})"
