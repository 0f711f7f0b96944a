"""Public constructors: models, tokenizers and transforms by registry name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import deep_merge, from_dict, to_dict
from .errors import ConfigError, OpenAlignError
from .models import ContrastiveModel, ModelConfig
from .registry import resolve_model_dict


def model_config(name: str | Path | ModelConfig, **overrides: Any) -> ModelConfig:
    """The validated config of a registered architecture, a YAML file (a model's, or a recipe's or
    saved model's ``model`` section) or a trained model's directory, with overrides merged in.

    Overrides are keyword settings, nested as mappings (``image={"virtual_batch_size": None}``) or
    dotted as on the command line (``**{"image.virtual_batch_size": None}``).
    """
    if isinstance(name, ModelConfig):
        raw = to_dict(name)
    elif Path(name).expanduser().is_dir():
        from .pretrained import pretrained_config

        raw = to_dict(pretrained_config(name))
    else:
        raw = resolve_model_dict(name)
    return from_dict(ModelConfig, deep_merge(raw, _nested(overrides)), "model")


def _nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys (``image.virtual_batch_size``) as nested mappings."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *sections, last = key.split(".")
        node = nested
        for depth, section in enumerate(sections):
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"is set to {node!r} and has settings under it too; give one or the other",
                                  "model." + ".".join(sections[:depth + 1]))
        node[last] = deep_merge(node[last], value) if isinstance(value, Mapping) and isinstance(
            node.get(last), Mapping) else value
    return nested


def create_model(name: str | Path | ModelConfig, **overrides: Any) -> ContrastiveModel:
    """A randomly initialised model of a registered architecture, e.g. ``create_model("align-b3-mini")``
    (or of a YAML file's, see :func:`model_config`); :func:`openalign.load_pretrained` loads trained weights.

    Every model has ``encode_image(pixels, normalize=True)``, ``encode_text(**tokenizer(texts),
    normalize=True)``, ``forward(image, text)``, a ``logit_scale`` property and its ``config``.
    """
    if not isinstance(name, ModelConfig) and Path(name).expanduser().is_dir():
        raise OpenAlignError(f"'{name}' is a directory: openalign.load_pretrained('{name}') loads a trained model with "
                             f"its weights; create_model builds an architecture with random weights "
                             f"(create_model(openalign.model_config('{name}')) for this one's)")
    return model_config(name, **overrides).build()


def get_tokenizer(name: str | Path | ModelConfig) -> Callable[[str | list[str]], dict[str, torch.Tensor]]:
    """The text processor of an architecture: ``tokenizer(["a cat"])`` → ``input_ids``, ``attention_mask``."""
    return model_config(name).build_tokenizer()


def get_transforms(name: str | Path | ModelConfig, train: bool = False) -> Callable[..., torch.Tensor]:
    """The image preprocessing of an architecture (PIL image → tensor), for evaluation or (``train``)
    training."""
    return model_config(name).build_transform(train)
