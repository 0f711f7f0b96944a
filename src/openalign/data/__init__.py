"""Data: sources of image-text pairs, the built-in shapes dataset, transforms, tokenizers, loaders."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

__all__ = [
    "CaptionDataset", "CaptionedImage", "Collate", "DataMonitor", "EpochBatchSampler", "ImageTransform",
    "KarpathySourceConfig", "MixtureSourceConfig", "ResumableStream", "SentencePairsSourceConfig", "ShapesSourceConfig",
    "ShapesSpec", "ShardStream", "SkipPolicy", "SkipSample", "SourceConfig", "TFRecordSourceConfig",
    "TableSourceConfig",
    "Tokenizer", "WebDatasetSourceConfig", "build_loader", "build_shapes_dataset", "load_hf_tokenizer",
    "move_to_device", "read_karpathy",
]

# imported on first use, so that ``openalign.data.shapes`` (whose defaults the CLI's help shows) needs no torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "karpathy": ("CaptionedImage", "read_karpathy"),
    "loader": ("Collate", "DataMonitor", "EpochBatchSampler", "build_loader", "move_to_device"),
    "quality": ("SkipPolicy", "SkipSample"),
    "shapes": ("ShapesSpec", "build_shapes_dataset"),
    "sources": ("CaptionDataset", "KarpathySourceConfig", "MixtureSourceConfig", "SentencePairsSourceConfig",
                "ShapesSourceConfig", "SourceConfig", "TableSourceConfig", "TFRecordSourceConfig",
                "WebDatasetSourceConfig"),
    "stream": ("ResumableStream", "ShardStream"),
    "tokenizer": ("Tokenizer", "load_hf_tokenizer"),
    "transforms": ("ImageTransform",),
})

if TYPE_CHECKING:
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
