"""Data: tokenizers and image transforms."""

from .tokenizer import Tokenizer, load_hf_tokenizer
from .transforms import ImageTransform

__all__ = ["ImageTransform", "Tokenizer", "load_hf_tokenizer"]
