"""Training objectives, called as ``loss_fn(**model(**batch))``."""

from .base import LossConfig
from .contrastive import ContrastiveLoss, ContrastiveLossConfig

__all__ = ["ContrastiveLoss", "ContrastiveLossConfig", "LossConfig"]
