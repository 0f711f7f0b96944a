"""Public constructors: models, tokenizers and transforms by registry name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import deep_merge, from_dict, to_dict
from .models import ModelConfig
from .registry import resolve_model_dict


def model_config(name: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """The validated config of a registered architecture (or a YAML path), with overrides merged in.

    Overrides are keyword settings, nested as mappings: ``image={"virtual_batch_size": None}``.
    """
    raw = to_dict(name) if isinstance(name, ModelConfig) else resolve_model_dict(name)
    return from_dict(ModelConfig, deep_merge(raw, overrides), "model")


def create_model(name: str | ModelConfig, **overrides: Any) -> nn.Module:
    """A randomly initialised model of a registered architecture, e.g. ``create_model("align-b3-mini")``.

    The model has ``encode_image(pixels, normalize=True)``, ``encode_text(input_ids,
    attention_mask, normalize=True)``, a ``logit_scale`` property and its ``config``.
    """
    return model_config(name, **overrides).build()


def get_tokenizer(name: str | ModelConfig) -> Callable[[str | list[str]], dict[str, torch.Tensor]]:
    """The text processor of an architecture: ``tokenizer(["a cat"])`` → ``input_ids``, ``attention_mask``."""
    return model_config(name).build_tokenizer()


def get_transforms(name: str | ModelConfig, train: bool) -> Callable[..., torch.Tensor]:
    """The image preprocessing of an architecture (PIL image → tensor), for training or evaluation."""
    return model_config(name).build_transform(train)
