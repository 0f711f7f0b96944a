"""Config families for models and towers: each concrete config knows how to build its module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import Variants, require_at_least


@dataclass
class TowerConfig(Variants):
    """An encoder: ``build()`` makes the module, whose pooled features are ``output_dim`` wide."""

    def build(self) -> nn.Module:
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        raise NotImplementedError


@dataclass
class ImageTowerConfig(TowerConfig):
    """The family of image encoders: pixels (N, 3, H, W) → pooled features (N, output_dim)."""


@dataclass
class TextTowerConfig(TowerConfig):
    """The family of text encoders: token ids and a mask (N, L) → pooled features (N, output_dim).

    ``tokenizer`` names the tokenizer (a directory or a Hugging Face id) and ``max_length`` the
    padded length of every sequence: both travel with the weights.
    """

    tokenizer: str = "bert-base-uncased"
    max_length: int = 64

    def __post_init__(self) -> None:
        require_at_least(self, 1, "max_length")

    def build_tokenizer(self, train: bool = False) -> Callable[[list[str]], Any]:
        """Strings → ``input_ids`` and ``attention_mask``; by default a Hugging Face tokenizer. In
        training (``train``) literal special tokens in the text (alt-text reading "[SEP]" or
        "[PAD]") are read as text, as COYO-ALIGN's TF-Hub preprocessing reads them (spec
        align-coyo-and-hf.md §3.6); otherwise they are the special tokens, as ``AlignProcessor``
        reads them."""
        from ..data.tokenizer import Tokenizer, load_hf_tokenizer

        return Tokenizer(load_hf_tokenizer(self.tokenizer), self.max_length, split_special_tokens=train)


@dataclass
class ModelConfig(Variants):
    """A whole model; ``architecture`` picks the family member (``dual_encoder``, ...).

    ``name`` is the registry entry the config came from (set by the registry), for reports.
    """

    tag_key: ClassVar[str] = "architecture"
    name: str | None = field(default=None, kw_only=True)

    def build(self) -> nn.Module:
        raise NotImplementedError

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The batch fields the model takes (what the loader must provide)."""
        return ("image", "text")

    @property
    def output_fields(self) -> tuple[str, ...]:
        """What the model's forward returns for the loss: an embedding per input field
        (``<field>_emb``) and ``logit_scale``."""
        return (*(f"{field}_emb" for field in self.input_fields), "logit_scale")

    @property
    def image_feature_dim(self) -> int:
        """Width of ``model.image_features(pixels)``: pooled image features before the projection."""
        raise NotImplementedError

    def build_tokenizer(self, train: bool = False) -> Callable[[list[str]], Any]:
        """What turns a list of strings into the model's text input (token ids, rendered images...);
        ``train``: for training batches, where they differ."""
        raise NotImplementedError

    def build_transform(self, train: bool) -> Callable[..., torch.Tensor]:
        """The image preprocessing matching the weights: PIL image → tensor."""
        raise NotImplementedError
