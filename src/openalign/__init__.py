"""openalign: train, evaluate and use ALIGN-family contrastive image-text models."""

from . import data, eval, losses, models
from .errors import ConfigError, OpenAlignError
from .factory import create_model, get_tokenizer, get_transforms, model_config
from .inference import classify, optimize_for_inference, zero_shot_classifier
from .pretrained import load_pretrained
from .registry import list_models, list_recipes

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "OpenAlignError", "classify", "create_model", "get_tokenizer", "get_transforms", "list_models",
    "list_recipes", "load_pretrained", "model_config", "optimize_for_inference", "zero_shot_classifier",
]
