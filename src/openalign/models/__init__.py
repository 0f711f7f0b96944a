"""Model towers and architectures; each is built from a config dataclass (see ``openalign.registry``)."""

from .base import ImageTowerConfig, ModelConfig, TextTowerConfig
from .bert import BertTextTower, BertTowerConfig
from ..data.transforms import PreprocessConfig
from .dual_encoder import DualEncoder, DualEncoderConfig
from .efficientnet import EfficientNet, EfficientNetConfig
from .ghost_bn import GhostBatchNorm2d

__all__ = [
    "BertTextTower", "BertTowerConfig", "DualEncoder", "DualEncoderConfig", "EfficientNet",
    "EfficientNetConfig", "GhostBatchNorm2d", "ImageTowerConfig", "ModelConfig", "PreprocessConfig",
    "TextTowerConfig",
]
