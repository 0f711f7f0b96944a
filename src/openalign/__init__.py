"""openalign: train, evaluate and use ALIGN-family contrastive image-text models."""

from typing import TYPE_CHECKING

from .errors import ConfigError, OpenAlignError
from .lazy import lazy_exports

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "OpenAlignError", "classify", "create_model", "get_tokenizer", "get_transforms", "list_models",
    "list_recipes", "load_pretrained", "model_config", "optimize_for_inference", "zero_shot_classifier",
]

# imported on first use (``openalign.create_model``, ``from openalign import data``): most import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "factory": ("create_model", "get_tokenizer", "get_transforms", "model_config"),
    "inference": ("classify", "optimize_for_inference", "zero_shot_classifier"),
    "pretrained": ("load_pretrained",),
    "registry": ("list_models", "list_recipes"),
}, submodules=("data", "eval", "losses", "models"))

if TYPE_CHECKING:
    from .factory import create_model, get_tokenizer, get_transforms, model_config
    from .inference import classify, optimize_for_inference, zero_shot_classifier
    from .pretrained import load_pretrained
    from .registry import list_models, list_recipes
