"""Training data sources: each config builds a dataset of sample dicts ``{"image": Tensor, "text": str}``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from ..config import Variants
from ..distributed import barrier, world_info
from ..errors import ConfigError, OpenAlignError
from .karpathy import CaptionedImage, read_karpathy
from .shapes import ShapesSpec, build_shapes_dataset
from .transforms import ImageTransform

log = logging.getLogger(__name__)


@dataclass
class SourceConfig(Variants):
    """Where training pairs come from.

    ``build`` returns either a map-style dataset indexed by ``(epoch, index)`` (finite sources,
    read in a resumable order) or an iterable dataset (streams).
    """

    def build(self, transform: ImageTransform, seed: int) -> Dataset | IterableDataset:
        raise NotImplementedError


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The RNG of one sample's augmentation and caption choice: a pure function of its position."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63))


class CaptionDataset(Dataset):
    """Captioned image files, indexed by ``(epoch, index)`` so augmentation replays exactly on resume.

    A training sample uses one of the image's captions, chosen at random each epoch.
    """

    def __init__(self, items: list[CaptionedImage], transform: ImageTransform, seed: int) -> None:
        self.items = items
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        item = self.items[index]
        generator = sample_generator(self.seed, epoch, index)
        try:
            with Image.open(item.path) as image:
                pixels = self.transform(image, generator)
        except (OSError, UnidentifiedImageError) as error:
            raise OpenAlignError(f"cannot read training image '{item.path}': {error}") from None
        caption = item.captions[int(torch.randint(len(item.captions), (), generator=generator))]
        return {"image": pixels, "text": caption}


@dataclass
class KarpathySourceConfig(SourceConfig, tag="karpathy"):
    """One split of a Karpathy-style caption JSON (COCO, Flickr30k or your own)."""

    json: str
    split: str = "train"
    image_root: str | None = None

    def build(self, transform: ImageTransform, seed: int) -> CaptionDataset:
        return CaptionDataset(read_karpathy(self.json, self.split, self.image_root), transform, seed)


@dataclass
class ShapesSourceConfig(SourceConfig, tag="shapes"):
    """The built-in shapes dataset under ``root``, generated there first if missing."""

    root: str
    num_train: int = 20000
    num_test: int = 500
    image_size: int = 64
    seed: int = 0

    def spec(self) -> ShapesSpec:
        return ShapesSpec(num_train=self.num_train, num_test=self.num_test, image_size=self.image_size, seed=self.seed)

    def build(self, transform: ImageTransform, seed: int) -> CaptionDataset:
        """Rank 0 generates the dataset if needed while the other ranks wait: ``root`` must be
        visible to every rank (one machine, or a shared filesystem)."""
        if world_info()[0] == 0:
            build_shapes_dataset(self.root, self.spec())
        barrier()
        return CaptionDataset(read_karpathy(Path(self.root) / "dataset_shapes.json", "train"), transform, seed)


@dataclass
class WebDatasetSourceConfig(SourceConfig, tag="webdataset"):
    """Tar shards as img2dataset writes them (``KEY.jpg`` + ``KEY.txt``), streamed with ``webdataset``.

    ``urls`` is a brace pattern (``shards/{00000..01023}.tar``), an fsspec URL or a ``pipe:``
    command. Shards are resampled with replacement: every rank and worker draws its own
    seeded stream, so training length is set in steps. Unreadable samples are skipped with a
    warning.
    """

    urls: str
    image_keys: str = "jpg;jpeg;png;webp"
    text_key: str = "txt"
    shuffle_buffer: int = 2000

    def __post_init__(self) -> None:
        if not self.urls:
            raise ConfigError("must name the shards, e.g. 'data/cc3m/{00000..00331}.tar'", "urls")

    def build(self, transform: ImageTransform, seed: int) -> IterableDataset:
        import webdataset as wds

        def to_sample(sample: dict[str, Any]) -> dict[str, Any]:
            return {"image": transform(sample["image"]), "text": sample["text"]}

        return wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, deterministic=True),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(self.shuffle_buffer),
            wds.decode("pil", handler=wds.warn_and_continue),
            wds.rename(image=self.image_keys, text=self.text_key, handler=wds.warn_and_continue),
            wds.map(to_sample, handler=wds.warn_and_continue),
        )
