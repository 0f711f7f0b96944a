"""Public constructors: models, tokenizers and transforms by registry name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import deep_merge, from_dict, to_dict
from .errors import OpenAlignError
from .models import ContrastiveModel, ModelConfig
from .registry import list_models, resolve_model_dict

ModelSpec = str | Path | Mapping[str, Any] | ModelConfig  # a registered name, a YAML file, settings, a directory


def model_config(name: ModelSpec, **overrides: Any) -> ModelConfig:
    """The validated config of a registered architecture, a YAML file (a model's, or a recipe's or
    saved model's ``model`` section), a mapping of model settings, or a trained model's directory
    (a registered name comes first), with overrides merged in. A YAML file's section is read as a
    recipe reads it (``text.pretrained`` initialises the text tower); a directory's config is the
    trained model's, whose weights are the directory's (``text.pretrained`` cleared).

    Overrides are keyword settings, nested as mappings (``image={"virtual_batch_size": None}``) or
    with dotted keys (``**{"image.virtual_batch_size": None}``).
    """
    if isinstance(name, ModelConfig):
        raw = to_dict(name)
    elif _is_model_directory(name):
        from .pretrained import pretrained_config

        raw = to_dict(pretrained_config(name))
    else:
        raw = resolve_model_dict(name)
    return from_dict(ModelConfig, deep_merge(raw, _nested(overrides)), "model")


def _is_model_directory(name: object) -> bool:
    """``name`` is a directory, not a registered name or a YAML file (a folder named after its
    architecture, as ``save_pretrained("clippo-b16")`` makes, does not hide the architecture)."""
    return isinstance(name, (str, Path)) and str(name) not in list_models() \
        and Path(name).suffix not in (".yaml", ".yml") and Path(name).expanduser().is_dir()


def _nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys (``image.virtual_batch_size``) as nested mappings, merged in order (copies of the values)."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        for section in reversed(key.split(".")):
            value = {section: value}
        nested = deep_merge(nested, value)
    return nested


def create_model(name: ModelSpec, **overrides: Any) -> ContrastiveModel:
    """A randomly initialised model of a registered architecture, e.g. ``create_model("align-b3-mini")``
    (or of a YAML file's, see :func:`model_config`); :func:`openalign.load_pretrained` loads trained weights.

    Every model has ``encode_image(pixels, normalize=True)``, ``encode_text(**tokenizer(texts),
    normalize=True)``, ``forward(image, text)``, a ``logit_scale`` property and its ``config``.
    """
    if _is_model_directory(name):
        raise OpenAlignError(f"'{name}' is a directory: openalign.load_pretrained('{name}') loads a trained model with "
                             f"its weights; create_model builds an architecture with random weights "
                             f"(create_model(openalign.model_config('{name}')) for this one's)")
    return model_config(name, **overrides).build()


def get_tokenizer(name: ModelSpec) -> Callable[[str | list[str]], dict[str, torch.Tensor]]:
    """The text processor of an architecture: ``tokenizer(["a cat"])`` → ``input_ids``, ``attention_mask``."""
    return model_config(name).build_tokenizer()


def get_transforms(name: ModelSpec, train: bool = False) -> Callable[..., torch.Tensor]:
    """The image preprocessing of an architecture (PIL image → tensor), for evaluation or (``train``)
    training."""
    return model_config(name).build_transform(train)
