"""Data: sources of image-text pairs, the built-in shapes dataset, transforms, tokenizers, loaders."""

from .karpathy import CaptionedImage, read_karpathy
from .loader import Collate, DataMonitor, EpochBatchSampler, build_loader, move_to_device
from .quality import SkipPolicy, SkipSample
from .shapes import ShapesSpec, build_shapes_dataset
from .sources import (CaptionDataset, KarpathySourceConfig, MixtureSourceConfig, SentencePairsSourceConfig,
                      ShapesSourceConfig, SourceConfig, TableSourceConfig, TFRecordSourceConfig,
                      WebDatasetSourceConfig)
from .stream import ResumableStream, ShardStream
from .tokenizer import Tokenizer, load_hf_tokenizer
from .transforms import ImageTransform

__all__ = [
    "CaptionDataset", "CaptionedImage", "Collate", "DataMonitor", "EpochBatchSampler", "ImageTransform",
    "KarpathySourceConfig", "MixtureSourceConfig", "ResumableStream", "SentencePairsSourceConfig", "ShapesSourceConfig",
    "ShapesSpec", "ShardStream", "SkipPolicy", "SkipSample", "SourceConfig", "TFRecordSourceConfig",
    "TableSourceConfig",
    "Tokenizer", "WebDatasetSourceConfig", "build_loader", "build_shapes_dataset", "load_hf_tokenizer",
    "move_to_device", "read_karpathy",
]
