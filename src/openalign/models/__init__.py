"""Model towers and architectures; each is built from a config dataclass (see ``openalign.registry``)."""

from .base import ContrastiveModel, ImageTowerConfig, ModelConfig, TextTowerConfig
from .bert import BertTextTower, BertTowerConfig
from ..data.transforms import PreprocessConfig
from .clip_towers import ClipTextConfig, ClipTokenizer, OpenClipViTConfig
from .clippo import Clippo, ClippoConfig, RenderConfig
from .dual_encoder import DualEncoder, DualEncoderConfig
from .efficientnet import EfficientNet, EfficientNetConfig
from .ghost_bn import GhostBatchNorm2d
from .vit import VisionTransformerTower, ViTConfig

__all__ = [
    "BertTextTower", "BertTowerConfig", "ClipTextConfig", "ClipTokenizer", "Clippo", "ClippoConfig",
    "ContrastiveModel", "DualEncoder", "DualEncoderConfig", "EfficientNet", "EfficientNetConfig",
    "GhostBatchNorm2d", "ImageTowerConfig", "ModelConfig", "OpenClipViTConfig", "PreprocessConfig",
    "RenderConfig", "TextTowerConfig", "ViTConfig", "VisionTransformerTower",
]
