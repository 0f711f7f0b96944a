"""Training data sources: each config builds a dataset of sample dicts ``{"image": Tensor, "text": str}``.

Besides image/caption sources: ``sentence_pairs`` (neighbouring sentences of a text corpus, the
first rendered into the image slot, for CLIPPO's C4 co-training) and ``mixture`` (several
sources sampled per example by weight).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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

TextProcessor = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass
class SourceConfig(Variants):
    """Where training pairs come from.

    ``build`` returns either a map-style dataset indexed by ``(epoch, index)`` (finite sources,
    read in a resumable order) or an iterable dataset (streams).
    """

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None) -> Dataset | IterableDataset:
        """``start_step`` is where a resumed run starts: streams use it to draw fresh data;
        map-style sources ignore it (the loader's sampler resumes them exactly).
        ``text_processor`` is the model's (strings → its text input), for sources that put
        text in the image slot (sentence pairs for CLIPPO)."""
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
        return {**item.fields, "image": pixels, "text": caption}


@dataclass
class KarpathySourceConfig(SourceConfig, tag="karpathy"):
    """One split of a Karpathy-style caption JSON (COCO, Flickr30k or your own)."""

    json: str
    split: str = "train"
    image_root: str | None = None

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None) -> CaptionDataset:
        return CaptionDataset(read_karpathy(self.json, self.split, self.image_root), transform, seed)


@dataclass
class TableSourceConfig(SourceConfig, tag="table"):
    """A table of captioned images: CSV, TSV or parquet (``path``: a file or a glob of them).

    ``image_column`` holds image paths (relative to ``image_root``, by default the table's
    folder) or, in parquet, the encoded image bytes; ``text_column`` the caption;
    ``extra_columns`` maps more sample fields to columns (``{caption: synthetic_caption}``).
    Rows with an empty caption or a missing image file are dropped when the table is read, with
    a logged count; a missing column is an error that lists the table's columns.
    """

    path: str
    image_column: str = "image"
    text_column: str = "caption"
    extra_columns: dict[str, str] = field(default_factory=dict)
    image_root: str | None = None

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None) -> TableDataset:
        return TableDataset(self.rows(), transform, seed)

    def rows(self) -> list[tuple[Path | bytes, str, dict[str, str]]]:
        """``(image path or bytes, caption, extra fields)`` of every usable row, in table order."""
        tables = sorted(glob.glob(self.path))
        if not tables:
            raise OpenAlignError(f"no table matches '{self.path}' (data.train.path: .csv, .tsv or .parquet files)")
        rows: list[tuple[Path | bytes, str, dict[str, str]]] = []
        dropped = {"empty caption": 0, "missing image file": 0}
        for table_path in map(Path, tables):
            columns = _read_table(table_path)
            wanted = [self.image_column, self.text_column, *self.extra_columns.values()]
            missing = [name for name in wanted if name not in columns]
            if missing:
                raise OpenAlignError(f"table '{table_path}' has no column {', '.join(map(repr, missing))}; its columns "
                                     f"are {', '.join(columns)} (set data.train.image_column / text_column / "
                                     "extra_columns)")
            root = Path(self.image_root) if self.image_root is not None else table_path.parent
            for number, (image, text) in enumerate(zip(columns[self.image_column], columns[self.text_column])):
                text = str(text).strip() if text is not None else ""
                if not text:
                    dropped["empty caption"] += 1
                    continue
                if not isinstance(image, bytes):
                    image = root / str(image)
                    if not image.is_file():
                        dropped["missing image file"] += 1
                        continue
                extra = {name: str(columns[column][number] or "").strip() for name, column in self.extra_columns.items()}
                rows.append((image, text, extra))
        if any(dropped.values()):
            log.warning("table '%s': dropped %s", self.path, ", ".join(f"{n} row(s) with {why}" for why, n in
                                                                        dropped.items() if n))
        if not rows:
            raise OpenAlignError(f"table '{self.path}' has no usable row (dropped: {dropped})")
        return rows


def _read_table(path: Path) -> dict[str, list[Any]]:
    """Columns of a CSV, TSV or parquet file, as Python lists."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif path.suffix in (".csv", ".tsv"):
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ","),
                                   convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        else:
            raise OpenAlignError(f"table '{path}' is not .csv, .tsv or .parquet")
    except OpenAlignError:
        raise
    except Exception as error:  # pyarrow's parse errors name the line
        raise OpenAlignError(f"cannot read table '{path}': {error}") from None
    return {name: table.column(name).to_pylist() for name in table.column_names}


class TableDataset(Dataset):
    """``(epoch, index)`` → ``{"image", "text", **extra}`` of a table row; augmentation seeded per sample."""

    def __init__(self, rows: list[tuple[Path | bytes, str, dict[str, str]]], transform: ImageTransform,
                 seed: int) -> None:
        self.rows, self.transform, self.seed = rows, transform, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        image, text, extra = self.rows[index]
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        try:
            with Image.open(source) as opened:
                pixels = self.transform(opened, sample_generator(self.seed, epoch, index))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            where = f"row {index}" if isinstance(image, bytes) else f"'{image}'"
            raise OpenAlignError(f"cannot read training image {where}: {error}") from None
        return {**extra, "image": pixels, "text": text}


@dataclass
class ShapesSourceConfig(SourceConfig, tag="shapes"):
    """The built-in shapes dataset under ``root``, generated there first if missing; samples also
    carry its synthetic ``caption``; ``alt_text_noise`` makes that share of raw captions web noise."""

    root: str
    num_train: int = ShapesSpec.num_train
    num_test: int = ShapesSpec.num_test
    image_size: int = ShapesSpec.image_size
    seed: int = ShapesSpec.seed
    alt_text_noise: float = ShapesSpec.alt_text_noise

    def __post_init__(self) -> None:
        if not 0.0 <= self.alt_text_noise <= 1.0:
            raise ConfigError("must be a fraction in [0, 1]", "alt_text_noise")

    def spec(self) -> ShapesSpec:
        return ShapesSpec(num_train=self.num_train, num_test=self.num_test, image_size=self.image_size, seed=self.seed,
                          alt_text_noise=self.alt_text_noise)

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None) -> CaptionDataset:
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
    Training length is set in steps. ``extra_keys`` carries more text fields into the samples,
    by name: ``{caption: caption.txt}`` reads the synthetic captions ``openalign data caption``
    adds (ALIP). Unreadable samples, empty captions and samples missing a field are skipped and
    counted in the log; ``max_consecutive_errors`` failures in a row (a wrong URL, a dead
    bucket) stop the run with an error instead of spinning forever.
    """

    urls: str
    image_keys: str = "jpg;jpeg;png;webp"
    text_key: str = "txt"
    extra_keys: dict[str, str] = field(default_factory=dict)
    shuffle_buffer: int = 2000
    max_consecutive_errors: int = 100

    def __post_init__(self) -> None:
        _check_stream(self.urls, self.max_consecutive_errors, "data/cc3m/{00000..00331}.tar")

    def local_shards(self) -> list[Path] | None:
        """The shard paths of a local pattern, or None for remote URLs and ``pipe:`` commands."""
        if "://" in self.urls or self.urls.startswith("pipe:"):
            return None
        import braceexpand

        return [Path(url) for pattern in self.urls.split("::") for url in braceexpand.braceexpand(pattern)]

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None) -> IterableDataset:
        import webdataset as wds

        shards = self.local_shards()
        if shards is not None:
            missing = [path for path in shards if not path.is_file()]
            if missing:
                raise OpenAlignError(f"{len(missing)} of the {len(shards)} shards of '{self.urls}' do not exist, "
                                     f"e.g. '{missing[0]}' (data.train.urls must match img2dataset's tar files)")
        stream_seed = seed * 1_000_003 + start_step
        errors = _SkipCounter(self.urls, self.max_consecutive_errors)
        extra = dict(self.extra_keys)
        buffer = self.shuffle_buffer

        def shuffle(samples):
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rng = random.Random(f"{stream_seed}/{rank}/{worker}")  # str seeds hash deterministically
            return wds.shuffle(buffer, initial=min(100, buffer), rng=rng)(samples)

        def to_sample(sample: dict[str, Any]) -> dict[str, Any]:
            texts = {}
            for name in ("text", *extra):
                value = sample[name]
                texts[name] = (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)).strip()
                if not texts[name]:
                    raise ValueError(f"sample '{sample.get('__key__')}' has an empty '{name}'")
            errors.success()
            return {**texts, "image": transform(sample["image"])}

        return wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=stream_seed, deterministic=True),
            wds.tarfile_to_samples(handler=errors),
            shuffle,
            wds.decode("pil", handler=errors),
            wds.rename(image=self.image_keys, text=self.text_key, **extra, handler=errors),
            wds.map(to_sample, handler=errors),
        )


@dataclass
class TFRecordSourceConfig(SourceConfig, tag="tfrecord"):
    """TFRecord files of ``tf.train.Example`` records with ``jpg`` (encoded image) and ``txt``
    (caption) bytes features: COYO-ALIGN's training data and img2dataset's ``--output_format
    tfrecord`` (shared spec align-coyo-and-hf.md §4.1), read without TensorFlow (the ``tfrecord``
    package). ``urls``: local files, a glob or a brace pattern (``coyo/*.tfrecord``).

    A stream: the files are split between ranks and loader workers (each needs at least one),
    each pass visits a worker's files in a fresh seeded order, and samples go through a shuffle
    buffer. Undecodable images, empty or non-UTF-8 captions and the rest of a truncated file are
    skipped and counted in the log; ``max_consecutive_errors`` failures in a row stop the run.
    ``extra_keys`` carries more bytes features as text fields (``{caption: caption}``).
    """

    urls: str
    image_key: str = "jpg"
    text_key: str = "txt"
    extra_keys: dict[str, str] = field(default_factory=dict)
    shuffle_buffer: int = 2000
    max_consecutive_errors: int = 100

    def __post_init__(self) -> None:
        _check_stream(self.urls, self.max_consecutive_errors, "data/coyo/*.tfrecord")

    def files(self) -> list[str]:
        import braceexpand

        found = sorted({match for pattern in braceexpand.braceexpand(self.urls) for match in glob.glob(pattern)})
        if not found:
            raise OpenAlignError(f"no TFRecord file matches '{self.urls}' (data.train.urls)")
        return found

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None) -> TFRecordStream:
        return TFRecordStream(self, self.files(), transform, seed * 1_000_003 + start_step)


class TFRecordStream(IterableDataset):
    """The endless, sharded, shuffled stream of a :class:`TFRecordSourceConfig`."""

    def __init__(self, config: TFRecordSourceConfig, files: list[str], transform: ImageTransform, seed: int) -> None:
        self.config, self.files, self.transform, self.seed = config, files, transform, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, num_shards = _stream_shard()
        if len(self.files) < num_shards:
            raise OpenAlignError(f"{len(self.files)} TFRecord file(s) for {num_shards} readers (ranks × loader "
                                 "workers): each needs at least one file; lower data.num_workers or split the files")
        mine = self.files[shard::num_shards]
        rng = random.Random(f"{self.seed}/{shard}")
        errors = _SkipCounter(self.config.urls, self.config.max_consecutive_errors)
        buffer: list[dict[str, Any]] = []
        while True:
            for path in rng.sample(mine, len(mine)):
                for sample in self._samples(path, errors):
                    buffer.append(sample)
                    if len(buffer) >= self.config.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            buffer = []

    def _samples(self, path: str, errors: _SkipCounter) -> Iterator[dict[str, Any]]:
        from tfrecord.reader import tfrecord_loader

        config = self.config
        keys = [config.image_key, config.text_key, *config.extra_keys.values()]
        records = tfrecord_loader(path, None, {key: "byte" for key in keys})
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - a truncated or corrupt file: skip its rest
                errors(OpenAlignError(f"'{path}' is unreadable from here on: {error!r}"))
                return
            try:
                yield self._decode(record)
                errors.success()
            except Exception as error:  # noqa: BLE001 - one bad record
                errors(error)

    def _decode(self, record: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        texts = {}
        for name, key in (("text", config.text_key), *config.extra_keys.items()):
            texts[name] = bytes(record[key]).decode("utf-8").strip()
            if not texts[name]:
                raise ValueError(f"empty '{key}'")
        with Image.open(io.BytesIO(bytes(record[config.image_key]))) as image:
            return {**texts, "image": self.transform(image)}


def _check_stream(urls: str, max_consecutive_errors: int, example: str) -> None:
    """The settings the streaming sources share."""
    if not urls:
        raise ConfigError(f"must name the files, e.g. '{example}'", "urls")
    if max_consecutive_errors < 1:
        raise ConfigError("must be at least 1", "max_consecutive_errors")


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


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


@dataclass
class SentencePairsSourceConfig(SourceConfig, tag="sentence_pairs"):
    """Pairs of neighbouring sentences of a text corpus, CLIPPO's next-sentence contrastive data
    (shared spec clippo.md §3.2): sentence A is rendered into the ``image`` slot by the model's
    text processor, sentence B is the ``text``; the same loss applies.

    ``path``: text files (a brace pattern or a glob): ``.txt`` holds one document per line,
    ``.jsonl`` / ``.jsonl.gz`` one JSON object per line with the document in ``text_field`` (C4's
    layout). Documents are split into sentences after ``.``, ``!`` or ``?``; pairs whose
    sentences are shorter than ``min_chars`` are dropped (the paper's filters are unpublished).
    The pairs are held in memory.
    """

    path: str
    text_field: str = "text"
    min_chars: int = 10

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None) -> SentencePairDataset:
        if text_processor is None or "pixels" not in text_processor(["probe"]):
            raise OpenAlignError("data source 'sentence_pairs' renders sentences into the image slot, so it needs a "
                                 "model that reads rendered text (CLIPPO, e.g. model: clippo-b16)")
        pairs = [pair for document in _read_documents(self.path, self.text_field)
                 for pair in _neighbour_pairs(document, self.min_chars)]
        if not pairs:
            raise OpenAlignError(f"'{self.path}' holds no pair of neighbouring sentences of at least "
                                 f"{self.min_chars} characters")
        log.info("sentence pairs: %d from '%s'", len(pairs), self.path)
        return SentencePairDataset(pairs, text_processor)


class SentencePairDataset(Dataset):
    """``(epoch, index)`` → ``{"image": rendered sentence A, "text": sentence B}``."""

    def __init__(self, pairs: list[tuple[str, str]], text_processor: TextProcessor) -> None:
        self.pairs, self.text_processor = pairs, text_processor

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        first, second = self.pairs[key[1]]
        return {"image": self.text_processor([first])["pixels"][0], "text": second}


def _read_documents(pattern: str, text_field: str) -> Iterator[str]:
    import braceexpand

    paths = sorted({Path(match) for expanded in braceexpand.braceexpand(pattern) for match in glob.glob(expanded)})
    if not paths:
        raise OpenAlignError(f"no text files match '{pattern}' (data.train.path: .txt, .jsonl or .jsonl.gz files)")
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if ".jsonl" not in path.name:
                    yield line.strip()
                    continue
                try:
                    yield str(json.loads(line)[text_field])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise OpenAlignError(f"{path}, line {number}: not a JSON object with a '{text_field}' field "
                                         "(set data.train.text_field)") from None


def _neighbour_pairs(document: str, min_chars: int) -> list[tuple[str, str]]:
    sentences = [sentence.strip() for sentence in _SENTENCE_END.split(document)]
    return [(a, b) for a, b in zip(sentences, sentences[1:]) if len(a) >= min_chars and len(b) >= min_chars]


@dataclass
class MixtureSourceConfig(SourceConfig, tag="mixture"):
    """Several sources mixed per example with probabilities ``weights`` (normalised), as big_vision's
    ``sample_from_datasets`` mixes CLIPPO's image/alt-text and C4 data (shared spec clippo.md
    §3.2): each batch holds a random share of each, and they are each other's negatives.

    The mixture is a stream: every rank and loader worker reads its own shard of each map-style
    source (reshuffled each pass) and its own stream of each streaming source, and a resumed
    run draws fresh examples.
    """

    sources: list[SourceConfig]
    weights: list[float]

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("must list at least one source", "sources")
        if len(self.weights) != len(self.sources) or any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
            raise ConfigError(f"must be {len(self.sources)} non-negative numbers (one per source), not all 0", "weights")

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None) -> MixtureDataset:
        children = [source.build(transform, seed + index, start_step, text_processor)
                    for index, source in enumerate(self.sources)]
        return MixtureDataset(children, self.weights, seed * 1_000_003 + start_step)


class MixtureDataset(IterableDataset):
    """An endless stream drawing each example from child ``i`` with probability ``weights[i]``."""

    def __init__(self, children: list[Dataset | IterableDataset], weights: list[float], seed: int) -> None:
        self.children, self.seed = children, seed
        self.weights = [w / sum(weights) for w in weights]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, num_shards = _stream_shard()
        rng = random.Random(f"{self.seed}/{shard}")
        streams = [iter(child) if isinstance(child, IterableDataset)
                   else _endless(child, shard, num_shards, self.seed + index)
                   for index, child in enumerate(self.children)]
        while True:
            yield next(streams[rng.choices(range(len(streams)), self.weights)[0]])


def _stream_shard() -> tuple[int, int]:
    """``(this reader's index, number of readers)`` over all ranks and their loader workers."""
    worker = torch.utils.data.get_worker_info()
    worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
    rank, world_size = world_info()
    return rank * num_workers + worker_id, world_size * num_workers


def _endless(dataset: Dataset, shard: int, num_shards: int, seed: int) -> Iterator[dict[str, Any]]:
    """A map-style dataset's examples ``shard::num_shards`` of a fresh permutation per pass, forever."""
    if len(dataset) < num_shards:
        raise OpenAlignError(f"a mixture source has {len(dataset)} examples, fewer than the {num_shards} "
                             "ranks × loader workers that each need a share")
    epoch = 0
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for index in order[shard::num_shards].tolist():
            yield dataset[(epoch, index)]
        epoch += 1
