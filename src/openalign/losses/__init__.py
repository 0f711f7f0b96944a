"""Training objectives, called as ``loss_fn(**model(**batch))``."""

from .alip import ALIPLoss, ALIPLossConfig
from .base import LossConfig
from .contrastive import ContrastiveLoss, ContrastiveLossConfig

__all__ = ["ALIPLoss", "ALIPLossConfig", "ContrastiveLoss", "ContrastiveLossConfig", "LossConfig"]
