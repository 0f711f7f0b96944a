"""Training data sources: each config builds a dataset of sample dicts ``{"image": Tensor, "text": str}``."""

from __future__ import annotations

import logging
import random
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

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0) -> Dataset | IterableDataset:
        """``start_step`` is where a resumed run starts: streams use it to draw fresh data;
        map-style sources ignore it (the loader's sampler resumes them exactly)."""
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
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            raise OpenAlignError(f"cannot read training image '{item.path}': {error}") from None
        caption = item.captions[int(torch.randint(len(item.captions), (), generator=generator))]
        return {"image": pixels, "text": caption}


@dataclass
class KarpathySourceConfig(SourceConfig, tag="karpathy"):
    """One split of a Karpathy-style caption JSON (COCO, Flickr30k or your own)."""

    json: str
    split: str = "train"
    image_root: str | None = None

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0) -> CaptionDataset:
        return CaptionDataset(read_karpathy(self.json, self.split, self.image_root), transform, seed)


@dataclass
class ShapesSourceConfig(SourceConfig, tag="shapes"):
    """The built-in shapes dataset under ``root``, generated there first if missing."""

    root: str
    num_train: int = ShapesSpec.num_train
    num_test: int = ShapesSpec.num_test
    image_size: int = ShapesSpec.image_size
    seed: int = ShapesSpec.seed

    def spec(self) -> ShapesSpec:
        return ShapesSpec(num_train=self.num_train, num_test=self.num_test, image_size=self.image_size, seed=self.seed)

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0) -> CaptionDataset:
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
    command; local patterns are checked when the source is built. Shards are resampled with
    replacement: every rank and worker draws its own stream, seeded by (seed, rank, worker) and
    by the step the run starts from, so a resumed run reads new data rather than replaying the
    stream's beginning (a stream cannot be resumed at the exact sample; map-style sources can).
    Training length is set in steps. Unreadable samples and empty captions are skipped and
    counted in the log; ``max_consecutive_errors`` failures in a row (a wrong URL, a dead
    bucket) stop the run with an error instead of spinning forever.
    """

    urls: str
    image_keys: str = "jpg;jpeg;png;webp"
    text_key: str = "txt"
    shuffle_buffer: int = 2000
    max_consecutive_errors: int = 100

    def __post_init__(self) -> None:
        if not self.urls:
            raise ConfigError("must name the shards, e.g. 'data/cc3m/{00000..00331}.tar'", "urls")
        if self.max_consecutive_errors < 1:
            raise ConfigError("must be at least 1", "max_consecutive_errors")

    def local_shards(self) -> list[Path] | None:
        """The shard paths of a local pattern, or None for remote URLs and ``pipe:`` commands."""
        if "://" in self.urls or self.urls.startswith("pipe:"):
            return None
        import braceexpand

        return [Path(url) for pattern in self.urls.split("::") for url in braceexpand.braceexpand(pattern)]

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0) -> IterableDataset:
        import webdataset as wds

        shards = self.local_shards()
        if shards is not None:
            missing = [path for path in shards if not path.is_file()]
            if missing:
                raise OpenAlignError(f"{len(missing)} of the {len(shards)} shards of '{self.urls}' do not exist, "
                                     f"e.g. '{missing[0]}' (data.train.urls must match img2dataset's tar files)")
        stream_seed = seed * 1_000_003 + start_step
        errors = _SkipCounter(self.urls, self.max_consecutive_errors)
        buffer = self.shuffle_buffer

        def shuffle(samples):
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rng = random.Random(f"{stream_seed}/{rank}/{worker}")  # str seeds hash deterministically
            return wds.shuffle(buffer, initial=min(100, buffer), rng=rng)(samples)

        def to_sample(sample: dict[str, Any]) -> dict[str, Any]:
            text = sample["text"].strip() if isinstance(sample["text"], str) else ""
            if not text:
                raise ValueError(f"sample '{sample.get('__key__')}' has an empty caption")
            errors.success()
            return {"image": transform(sample["image"]), "text": text}

        return wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=stream_seed, deterministic=True),
            wds.tarfile_to_samples(handler=errors),
            shuffle,
            wds.decode("pil", handler=errors),
            wds.rename(image=self.image_keys, text=self.text_key, handler=errors),
            wds.map(to_sample, handler=errors),
        )


class _SkipCounter:
    """A webdataset error handler: skip the sample, count it, log every power of two, and raise
    once ``limit`` errors come in a row (per loader worker)."""

    def __init__(self, urls: str, limit: int) -> None:
        self.urls, self.limit = urls, limit
        self.total = self.in_a_row = 0

    def success(self) -> None:
        self.in_a_row = 0

    def __call__(self, error: Exception) -> bool:
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise OpenAlignError(f"{self.in_a_row} consecutive samples of '{self.urls}' failed; last error: "
                                 f"{error!r}") from None
        if self.total & (self.total - 1) == 0:
            log.warning("skipped %d unreadable sample(s) of '%s' so far; latest: %r", self.total, self.urls, error)
        return True
