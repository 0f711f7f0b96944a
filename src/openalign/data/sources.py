"""Training data sources: each config builds a dataset of sample dicts ``{"image": Tensor, "text": str}``.

Besides image/caption sources: ``sentence_pairs`` (neighbouring sentences of a text corpus, the
first rendered into the image slot, for CLIPPO's C4 co-training) and ``mixture`` (several
sources sampled per example by weight).
"""

from __future__ import annotations

import bisect
import functools
import glob
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, IterableDataset

from ..config import Variants, require_at_least
from ..distributed import fail_together, world_info
from ..errors import ConfigError, OpenAlignError
from ..files import printable
from .karpathy import CaptionedImage, read_karpathy
from .quality import (CUT_SHORT, CUT_SHORT_SAMPLE, EMPTY_CAPTION, NO_CAPTION, NO_IMAGE, NON_DESCRIPTIVE_CAPTION,
                      REPEATED_FIELD, UNDECODABLE_RECORD, SkipPolicy, SkipSample, caption_text, decode_pixels,
                      dropped_on_reading, image_problem, is_descriptive, open_image)
from .shards import expand_shards, expand_urls, opened_shard, stream_samples
from .shapes import ShapesSpec, build_shapes_dataset
from .stream import ResumableStream, ShardStream
from .tfrecords import CorruptRecord, read_records
from .transforms import ImageTransform, epoch_generator, sample_generator

log = logging.getLogger(__name__)

TextProcessor = Callable[[list[str]], dict[str, torch.Tensor]]
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # a sample field: a Python name, a tar member suffix


def check_extra_fields(names: Iterable[str], key: str) -> None:
    """Extra sample fields must not replace a sample's own ``image`` or ``text`` (silently, in the
    sample dict) and must be plain names (``a/b`` or ``a.b`` would be read back as other members)."""
    for name in names:
        if name in ("image", "text"):
            raise ConfigError(f"names the sample's own field '{name}': give the extra field another name "
                              "(e.g. caption for synthetic captions)", key)
        if not _FIELD_NAME.match(name):
            raise ConfigError(f"has field name {name!r}: use letters, digits and _", key)


REPEATED_FIELDS = "__repeated__"  # in a raw tar sample: the field that more than one member gave


@dataclass
class SourceConfig(Variants):
    """Where training pairs come from.

    ``build`` returns either a map-style dataset indexed by ``(epoch, index)`` (finite sources,
    read in a resumable order) or an iterable dataset (streams).
    """

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None, strict: bool = False) -> Dataset | IterableDataset:
        """``start_step`` is where a resumed run starts (streams are resumed by
        :meth:`~openalign.data.stream.ResumableStream.resume`; the loader's sampler resumes
        map-style sources). ``text_processor`` is the model's (strings → its text input), for
        sources that put text in the image slot (sentence pairs for CLIPPO). ``strict``
        (``data.strict``) makes unusable samples errors instead of counted skips."""
        raise NotImplementedError


class ImageDataset(Dataset):
    """A map-style dataset of image samples indexed by ``(epoch, index)``, so augmentation replays
    exactly on resume. A sample whose image cannot be read is skipped and counted (once an epoch:
    when the epoch draws it), and a readable sample drawn at random (seeded by the epoch and
    index: a resumed run replays it) stands in for it, so that a run of unreadable rows does not
    repeat its neighbour; with ``data.strict`` the skip is an error."""

    def __init__(self, transform: ImageTransform, seed: int, policy: SkipPolicy) -> None:
        self.transform, self.seed, self.policy = transform, seed, policy
        self.dropped: dict[str, int] = {}  # entries the source dropped when it read them (dropped_on_reading)

    def sample(self, epoch: int, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"item {index}"

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        try:
            sample = self.sample(epoch, index)
        except SkipSample as skip:
            self.policy.skip(skip, self.describe(index))
            sample = self._stand_in(epoch, index)
        self.policy.success()
        return sample

    def _stand_in(self, epoch: int, index: int) -> dict[str, Any]:
        """A readable sample in place of the unreadable ``index``. Candidates that fail are not
        counted (each is, when the epoch draws it); ``policy.max_consecutive`` failing in a row
        mean that nearly every image fails (half failing would do so once in 2^100 draws)."""
        generator = sample_generator(self.seed, epoch, index)
        for _ in range(self.policy.max_consecutive):
            candidate = int(torch.randint(len(self), (), generator=generator))
            try:
                return self.sample(epoch, candidate)
            except SkipSample as skip:
                last = f"{skip} ({self.describe(candidate)})"
        raise OpenAlignError(f"data source '{self.policy.source}': {self.policy.max_consecutive} samples drawn at "
                             f"random to stand in for the unreadable {self.describe(index)} could not be read "
                             f"either: nearly every image fails; last: {last}")

    def pixels(self, image: Path | bytes, generator: torch.Generator) -> torch.Tensor:
        """The transformed image of a file or of encoded bytes."""
        if isinstance(image, Path):
            try:
                image = image.read_bytes()
            except OSError as error:
                raise SkipSample(NO_IMAGE, f"{type(error).__name__}: {error}") from None
        with open_image(image) as opened:
            return decode_pixels(self.transform, opened, generator, image)


class CaptionDataset(ImageDataset):
    """Captioned image files; a training sample uses one of the image's captions, chosen at random
    each epoch."""

    def __init__(self, items: list[CaptionedImage], transform: ImageTransform, seed: int,
                 policy: SkipPolicy | None = None) -> None:
        super().__init__(transform, seed, policy or SkipPolicy("captioned images"))
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        return str(self.items[index].path)

    def require_fields(self, fields: Sequence[str]) -> None:
        """Keep the items that carry every text field of ``fields`` (the model's: ALIP's synthetic
        ``caption``) besides the image and text every item has; the others are dropped now and
        counted (``entry without <field>``): in a batch, one would stop training at the step that
        draws it. An error under ``data.strict``, as every drop on reading is."""
        needed = [name for name in fields if name not in ("image", "text")]
        lacking: Counter[str] = Counter()
        kept = []
        for item in self.items:
            if missing := next((name for name in needed if not item.fields.get(name)), None):
                lacking[f"entry without {missing}"] += 1
            else:
                kept.append(item)
        if not kept:
            raise OpenAlignError(f"no entry of '{self.policy.source}' has the field(s) {', '.join(needed)} the model "
                                 f"reads (besides image and text): give each entry its {needed[0]!r}")
        if lacking:
            log.warning("'%s': dropped %d of the %d entries without a field the model reads (%s)", self.policy.source,
                        len(self.items) - len(kept), len(self.items),
                        ", ".join(f"{count} {reason}" for reason, count in sorted(lacking.items())))
        self.items = kept
        for key, count in dropped_on_reading(self.policy.source, lacking, self.policy.strict).items():
            self.dropped[key] = self.dropped.get(key, 0) + count

    def sample(self, epoch: int, index: int) -> dict[str, Any]:
        item = self.items[index]
        generator = sample_generator(self.seed, epoch, index)
        pixels = self.pixels(Path(item.path), generator)
        caption = item.captions[int(torch.randint(len(item.captions), (), generator=generator))]
        return {**item.fields, "image": pixels, "text": caption}


@dataclass
class KarpathySourceConfig(SourceConfig, tag="karpathy"):
    """One split of a Karpathy-style caption JSON (COCO, Flickr30k or your own)."""

    json: str
    split: str = "train"
    image_root: str | None = None

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None, strict: bool = False) -> CaptionDataset:
        dropped: Counter[str] = Counter()
        items = read_karpathy(self.json, self.split, self.image_root, dropped)
        dataset = CaptionDataset(items, transform, seed, SkipPolicy(self.json, strict))
        dataset.dropped = dropped_on_reading(self.json, dropped, strict)
        return dataset


@dataclass
class TableSourceConfig(SourceConfig, tag="table"):
    """A table of captioned images: CSV, TSV or parquet (``path``: a file or a glob of them).

    ``image_column`` holds image paths (relative to ``image_root``, by default the table's
    folder) or, in parquet, the encoded image bytes; ``text_column`` the caption;
    ``extra_columns`` maps more sample fields to columns (``{caption: synthetic_caption}``, or
    ``{label: class_id}``: numbers and lists keep their type).
    Rows with an empty caption or a missing image file are dropped when the table is read, with
    a logged count; a missing column is an error that lists the table's columns.
    """

    path: str
    image_column: str = "image"
    text_column: str = "caption"
    extra_columns: dict[str, str] = field(default_factory=dict)
    image_root: str | None = None

    def __post_init__(self) -> None:
        check_extra_fields(self.extra_columns, "extra_columns")

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None, strict: bool = False) -> TableDataset:
        rows, dropped = self._read_rows()
        dataset = TableDataset([row for _, row in rows], transform, seed, SkipPolicy(self.path, strict))
        dataset.dropped = dropped_on_reading(self.path, dropped, strict)
        return dataset

    def rows(self) -> list[tuple[Path | bytes, str, dict[str, Any]]]:
        """``(image path or bytes, caption, extra fields)`` of every usable row, in table order."""
        return [row for _, row in self.located_rows()]

    def located_rows(self) -> list[tuple[str, tuple[Path | bytes, str, dict[str, Any]]]]:
        """:meth:`rows`, each after where it is: ``'<table> data row <n>'`` (counted from 1 after
        the header), to name a row whose image turns out unreadable."""
        return self._read_rows()[0]

    def _read_rows(self) -> tuple[list[tuple[str, tuple[Path | bytes, str, dict[str, Any]]]], Counter[str]]:
        """:meth:`located_rows`, and the rows dropped, by reason."""
        tables = sorted(glob.glob(self.path))
        if not tables:
            raise OpenAlignError(f"no table matches '{self.path}' (data.train.path: .csv, .tsv or .parquet files)")
        rows: list[tuple[str, tuple[Path | bytes, str, dict[str, Any]]]] = []
        dropped: Counter[str] = Counter()
        missing = ""  # where the first missing image file was looked for
        for table_path in map(Path, tables):
            columns = _read_table(table_path, byte_columns=(self.text_column,), path_columns=(self.image_column,))
            wanted = [self.image_column, self.text_column, *self.extra_columns.values()]
            if absent := [name for name in wanted if name not in columns]:  # (missing: the first missing image)
                raise OpenAlignError(f"table '{table_path}' has no column {', '.join(map(repr, absent))}; its columns "
                                     f"are {', '.join(columns)} (name them with --image-column / --text-column / "
                                     "--extra-column, or in a recipe data.train.image_column / text_column / "
                                     "extra_columns)")
            root = Path(self.image_root) if self.image_root is not None else table_path.parent
            for number, (image, text) in enumerate(zip(columns[self.image_column], columns[self.text_column])):
                if isinstance(text, (list, tuple, dict)):  # parquet: a list column (several captions), a struct
                    raise OpenAlignError(f"table '{table_path}' column '{self.text_column}' holds "
                                         f"{'lists' if not isinstance(text, dict) else 'structs'} ({str(text)[:60]}), "
                                         "not text: a row takes one caption; for several captions per image, give "
                                         "each its own row (pandas: df.explode(column))")
                try:  # the checks shard captions get; a number (a parquet column of numbers) is its text, NaN none
                    text = caption_text(None if _blank(text) else text if isinstance(text, bytes) else str(text),
                                        EMPTY_CAPTION)
                except SkipSample as skip:
                    dropped[skip.reason] += 1
                    continue
                image = _image_cell(image, table_path, self.image_column)
                if isinstance(image, str) and image.lower().startswith(("http://", "https://")):
                    dropped[IMAGE_URL] += 1  # a URL list: img2dataset downloads it
                    continue
                if isinstance(image, str):
                    image = root / image
                if image is None or (isinstance(image, Path) and not image.is_file()):
                    dropped["missing image file"] += 1
                    missing = missing or printable(f"{table_path} data row {number + 1}: {image or 'an empty cell'}")
                    continue
                try:  # as a webdataset sample without the field is skipped
                    extra = {name: _cell(columns[column][number], column)
                             for name, column in self.extra_columns.items()}
                except SkipSample as skip:
                    dropped[skip.reason] += 1
                    continue
                rows.append((f"{table_path} data row {number + 1}", (image, text, extra)))
        if dropped:
            log.warning("table '%s': dropped %s%s", self.path, ", ".join(
                f"{n} row(s) with {why}" for why, n in sorted(dropped.items())), f" (the first missing: {missing})"
                if missing else "")
        if not rows:
            urls_most = dropped[IMAGE_URL] >= dropped["missing image file"]  # the hint for the most rows' reason
            hint = "; download the URLs with img2dataset first (see the README's data section)" \
                if dropped[IMAGE_URL] and urls_most else f"; the first missing image: {missing}" if missing else ""
            raise OpenAlignError(f"table '{self.path}' has no usable row (dropped: {dict(dropped)}){hint}")
        return rows, dropped


IMAGE_URL = "image URL, not a file"


def _blank(value: Any) -> bool:
    """Whether a table cell holds nothing: null, or a float column's NaN (pyarrow writes it as is)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value: Any, column: str) -> Any:
    """An extra column's value: text stripped, numbers and lists as they are; raises
    :class:`SkipSample` for an empty cell or text that is blank or not UTF-8, with a reason that
    names the column (not the caption's)."""
    if _blank(value) or isinstance(value, (bytes, str)):
        return caption_text(None if _blank(value) else value, f"empty column {column}", f"column {column}")
    return value


def _image_cell(value: Any, table: Path, column: str) -> bytes | str | None:
    """An image cell: encoded bytes, a path, or a Hugging Face ``Image`` struct (``{bytes, path}``);
    None for an empty one."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None or isinstance(value, bytes):
        return value or None
    if isinstance(value, (str, int)) and not isinstance(value, bool):  # a number: a file name in a parquet int column
        return str(value).strip() or None
    raise OpenAlignError(f"table '{table}' column '{column}' holds {type(value).__name__} {str(value)[:40]!r}; "
                         "expected image paths, encoded image bytes, or Hugging Face Image structs {bytes, path}")


_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}  # of CSV and TSV files, by the suffix
_COMPRESSIONS = tuple(_CODECS)


def _table_format(path: Path) -> str | None:
    """``parquet``, ``csv`` or ``tsv`` by the file name (any case; CSV and TSV also compressed, as
    ``captions.tsv.gz``), or None."""
    name = path.name.lower()
    compressed = name.endswith(_COMPRESSIONS)
    kind = Path(name.rsplit(".", 1)[0] if compressed else name).suffix.lstrip(".")
    return kind if kind in ("csv", "tsv") or (kind == "parquet" and not compressed) else None


def _read_table(path: Path, text_columns: tuple[str, ...] = (), byte_columns: tuple[str, ...] = (),
                path_columns: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """Columns of a CSV, TSV or parquet file, as Python lists.

    In CSV and TSV, ``text_columns`` are read as written: type inference would turn a caption
    "007" into 7 and a file name "0001" into 1; other columns keep inferred numbers (labels).
    ``path_columns`` too, their bytes decoded as the file system decodes names (a name that is
    not UTF-8 still names its file, rather than making the table unreadable).
    ``byte_columns`` are read as undecoded bytes, so that one caption that is not UTF-8 is one
    dropped row rather than an unreadable table. Fields may be quoted as RFC 4180 (and pandas)
    quote them. A TSV is read unquoted, as alt-text TSVs are written (CC3M's: a caption may begin
    with ``"``), unless it is quoted as a quoting writer quotes (:func:`_read_tsv`).
    """
    kind = _table_format(path)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif kind in ("csv", "tsv"):
            binary = (*byte_columns, *path_columns)
            if kind == "tsv":
                table = _read_tsv(path, text_columns, binary)
            else:
                table = _read_delimited(path, kind, text_columns, binary, quoted=True)
                _check_quotes(path, table)
        else:
            raise OpenAlignError(f"table '{path}' is not .csv, .tsv (either may be compressed: .gz, .bz2, .zst, "
                                 ".lz4) or .parquet")
    except OpenAlignError:
        raise
    except Exception as error:  # pyarrow's parse errors name the line
        raise OpenAlignError(f"cannot read table '{path}': {error}") from None
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    for name in path_columns if kind != "parquet" else ():  # read as bytes above: decoded as file names are
        if name in columns:
            columns[name] = [None if cell is None else os.fsdecode(cell) for cell in columns[name]]
    return columns


def _read_tsv(path: Path, text_columns: tuple[str, ...], byte_columns: tuple[str, ...]) -> Any:
    """A TSV, unquoted unless it is quoted as RFC 4180 (and pandas, and the csv module) quote it.

    CC3M's alt-text TSVs are unquoted: a caption that begins with ``"`` is text, and read quoted
    it would lose its quote marks (``"Best" pizza`` -> ``Best pizza``) or, unclosed, swallow the
    rows after it. The unquoted reading is taken unless it fails (a quoted field holds a tab or a
    line break) or every field that begins with a quote is a whole quoted field (``"..."``, with
    inner quotes doubled), which only a writer that quotes makes."""
    try:
        unquoted = _read_delimited(path, "tsv", text_columns, byte_columns, quoted=False)
    except Exception:  # noqa: BLE001 - fields with tabs or line breaks in quotes: only the quoted reading holds
        return _read_delimited(path, "tsv", text_columns, byte_columns, quoted=True)
    if _quoted_as_written(unquoted):
        return _read_delimited(path, "tsv", text_columns, byte_columns, quoted=True)
    return unquoted


def _quoted_as_written(table: Any) -> bool:
    """Whether some field or column name of ``table`` (read unquoted) begins with a quote, and each
    that does is a whole RFC 4180 quoted field."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = [name for name in table.column_names if name.startswith('"')]  # a header quoted too
    opened, whole = len(names), sum(bool(re.fullmatch(r'"([^"]|"")*"', name)) for name in names)
    for column in table.columns:
        if not (pa.types.is_string(column.type) or pa.types.is_binary(column.type)):
            continue
        opened += pc.sum(pc.match_substring_regex(column, '^"')).as_py() or 0
        whole += pc.sum(pc.match_substring_regex(column, '^"([^"]|"")*"$')).as_py() or 0
    return opened > 0 and whole == opened


def _read_delimited(path: Path, kind: str, text_columns: tuple[str, ...], byte_columns: tuple[str, ...],
                    quoted: bool) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    compression = _CODECS.get(path.suffix.lower())  # any case: pyarrow's own guess knows '.gz' only
    # quoted fields may hold line breaks (pandas writes them): the parser must not cut blocks at every line
    parse = pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", quote_char='"' if quoted else False,
                               newlines_in_values=quoted)
    types = {**dict.fromkeys(text_columns, pa.string()), **dict.fromkeys(byte_columns, pa.binary())}
    with pa.input_stream(str(path), compression=compression) as stream:
        return pacsv.read_csv(stream, parse_options=parse, convert_options=pacsv.ConvertOptions(
            strings_can_be_null=False, column_types=types))


def _check_quotes(path: Path, table: Any) -> None:
    """A CSV field that opens with a quote never closed runs to the end of the file, taking the rows
    after it; pyarrow reads that without complaint, so it is an error here, naming the row. A
    field spanning lines is what such a quote leaves, and is also a legitimate quoted multi-line
    caption: only then is the file read again, by Python's strict CSV reader, which fails at the end
    of the data inside a quote; the other fields spanning lines are logged."""
    import csv
    import io

    import pyarrow as pa
    import pyarrow.compute as pc

    spanning = [pc.match_substring_regex(table.column(name), "[\n\r]") for name in table.column_names
                if pa.types.is_string(table.column(name).type) or pa.types.is_binary(table.column(name).type)]
    if not spanning:
        return
    flags = functools.reduce(pc.or_, spanning)
    rows = pc.indices_nonzero(pc.fill_null(flags, False)).to_pylist()
    if not rows:
        return
    limit = csv.field_size_limit(2**31 - 1)  # a field holding the rows it swallowed is long
    read = 0
    try:
        with pa.input_stream(str(path), compression=_CODECS.get(path.suffix.lower())) as stream, \
                io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="") as text:
            for _ in csv.reader(text, strict=True):
                read += 1
    except csv.Error as error:
        if "unexpected end of data" in str(error):  # the header is the first row read
            raise OpenAlignError(f"table '{path}' has a quote that is never closed: a field of data row {read} "
                                 "opens with it and runs to the end of the file, taking the rows after it. Close "
                                 "the quote, or write a quote inside a quoted field as two (\"\")") from None
    finally:
        csv.field_size_limit(limit)
    log.warning("table '%s': %d row(s) have fields spanning several lines (the first: data row %d): right for quoted "
                "multi-line captions; if a quote was left open, the rows up to its closing were read as one",
                path, len(rows), rows[0] + 1)


class TableDataset(ImageDataset):
    """``(epoch, index)`` → ``{"image", "text", **extra}`` of a table row; augmentation seeded per sample."""

    def __init__(self, rows: list[tuple[Path | bytes, str, dict[str, Any]]], transform: ImageTransform,
                 seed: int, policy: SkipPolicy | None = None) -> None:
        super().__init__(transform, seed, policy or SkipPolicy("table"))
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index: int) -> str:
        image = self.rows[index][0]
        return f"row {index}" if isinstance(image, bytes) else str(image)

    def sample(self, epoch: int, index: int) -> dict[str, Any]:
        image, text, extra = self.rows[index]
        return {**extra, "image": self.pixels(image, sample_generator(self.seed, epoch, index)), "text": text}


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
        self.spec()  # its checks, as config errors of these keys

    def spec(self) -> ShapesSpec:
        return ShapesSpec(num_train=self.num_train, num_test=self.num_test, image_size=self.image_size, seed=self.seed,
                          alt_text_noise=self.alt_text_noise)

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None, strict: bool = False) -> CaptionDataset:
        """Rank 0 generates the dataset if needed while the other ranks wait: ``root`` must be
        visible to every rank (one machine, or a shared filesystem)."""
        with fail_together("generating the shapes dataset"):  # a barrier; rank 0's error stops every rank
            if world_info()[0] == 0:
                build_shapes_dataset(self.root, self.spec())
        return CaptionDataset(read_karpathy(Path(self.root) / "dataset_shapes.json", "train"), transform, seed,
                              SkipPolicy(self.root, strict))


@dataclass(kw_only=True)
class StreamOptions:
    """The settings the shard streams share (see :mod:`openalign.data.stream`).

    ``resampled``: draw shards with replacement, an endless stream for very large datasets,
    with training length in steps (open_clip's ``--dataset-resampled``); false: epochs, each
    reading every sample once, the shards split between ranks and loader workers (each needs at
    least one shard). ``open_shards`` shards are read at once per reader and ``shuffle_buffer``
    raw samples are shuffled together. Samples whose image is under ``min_image_side`` pixels
    on its shorter side are skipped (ALIGN's filter used 200; COYO is already filtered).
    ``extra_keys`` carries more fields into the samples, by name (see :class:`FieldsDecoder`).
    ``text_key`` may name several members, ``title.txt;description.txt;tags.txt``: ``text_choice:
    first`` takes the first usable one, ``random`` one of the usable ones at random (per sample,
    from the sample's seed: a resumed run draws the same), as CLIPPO samples YFCC-100M's title,
    description or tags; ``drop_non_descriptive`` counts a text without a letter, or a camera's
    file name, as unusable (:func:`~openalign.data.quality.is_descriptive`; CLIPPO's YFCC text).
    Unreadable samples and
    shards are skipped and counted by reason (``data.strict: true`` makes them errors), and
    ``max_consecutive_errors`` skips in a row (a wrong URL, a dead bucket) stop the run with an
    error instead of spinning forever.
    """

    extra_keys: dict[str, str] = field(default_factory=dict)
    text_choice: Literal["first", "random"] = "first"
    drop_non_descriptive: bool = False
    resampled: bool = True
    open_shards: int = 8
    shuffle_buffer: int = 2000
    min_image_side: int = 10
    max_consecutive_errors: int = 100

    def check_stream(self, urls: str, example: str) -> None:
        if not urls:
            raise ConfigError(f"must name the files, e.g. '{example}'", "urls")
        require_at_least(self, 1, "open_shards", "shuffle_buffer", "min_image_side", "max_consecutive_errors")
        check_extra_fields(self.extra_keys, "extra_keys")

    def stream(self, urls: str, shards: list[str], read_shard: Callable[[str], Iterable[Any]],
               decode: Callable[[Any, torch.Generator], dict[str, Any]], seed: int, strict: bool) -> ShardStream:
        policy = SkipPolicy(urls, strict, self.max_consecutive_errors)
        return ShardStream(shards, read_shard, decode, policy, seed, self.resampled, self.open_shards,
                           self.shuffle_buffer)


@dataclass
class FieldsDecoder:
    """A raw sample's fields (``jpg``, ``txt``, ...: bytes) → ``{"image", "text", **extra}``; what
    cannot be used raises :class:`~openalign.data.quality.SkipSample` with the reason.

    An extra field is text, unless its member is a class label (``cls``, ``label.cls``:
    webdataset's convention, an integer; a TFRecord ``int64`` feature) or JSON (``concepts.json``:
    the parsed value, e.g. a list of visual concepts).
    """

    image_keys: tuple[str, ...]
    text_key: str
    extra_keys: dict[str, str]
    transform: ImageTransform
    min_image_side: int = 1
    text_choice: str = "first"
    drop_non_descriptive: bool = False

    def texts(self, fields: dict[str, Any], generator: torch.Generator | None = None,
              image: bytes | None = None) -> dict[str, Any]:
        """The caption and the extra fields. With ``image``, a sample skipped for an extra member
        it lacks is skipped for its image instead where that cannot be used: a caption job
        (``caption.txt``) leaves an image it cannot decode without one. The caption's own
        reasons stay as they are, as ``data inspect`` counts them, and cost no decoding."""
        texts = {"text": choose_caption(fields, self.text_key, self.text_choice, self.drop_non_descriptive,
                                        generator)}
        for name, key in self.extra_keys.items():
            try:
                texts[name] = extra_value(key, fields.get(key))
            except SkipSample as skip:
                raise (image is not None and image_problem(image, self.min_image_side)) or skip from None
        return texts

    def __call__(self, fields: dict[str, bytes], generator: torch.Generator | None = None) -> dict[str, Any]:
        if REPEATED_FIELDS in fields:
            raise SkipSample(REPEATED_FIELD, f"more than one member for {fields[REPEATED_FIELDS]!r}")
        check_not_cut_short(fields, self.image_keys, self.extra_keys.values(), self.text_key.split(";"))
        data = next((fields[key] for key in self.image_keys if key in fields), None)
        if data is None:
            raise SkipSample(NO_IMAGE, f"none of the fields {', '.join(self.image_keys)}; it has "
                                       f"{', '.join(sorted(fields)) or 'none'}")
        texts = self.texts(fields, generator, data)  # first: cheaper than decoding the image
        with open_image(data, self.min_image_side) as image:
            return {**texts, "image": decode_pixels(self.transform, image, generator, data)}


@dataclass
class WebDatasetSourceConfig(SourceConfig, StreamOptions, tag="webdataset"):
    """Tar shards as img2dataset writes them (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``).

    ``urls`` is a brace pattern (``shards/{00000..01023}.tar``; several joined by ``::``), an
    object-storage URL read through fsspec (``s3://bucket/cc3m/{00000..00331}.tar``) or a
    ``pipe:`` command (``pipe:aws s3 cp s3://bucket/cc3m/00000.tar -``); local shards are checked
    when the source is built. Members are grouped into samples as webdataset groups them, and
    shards are opened with webdataset's ``gopen``; the stream itself is
    :class:`~openalign.data.stream.ShardStream`, because webdataset's shuffle buffer cannot
    resume where it stopped. ``extra_keys`` maps sample fields to members: ``{caption:
    caption.txt}`` reads the synthetic captions ``openalign data caption`` adds (ALIP).
    """

    urls: str
    image_keys: str = "jpg;jpeg;png;webp"
    text_key: str = "txt"

    def __post_init__(self) -> None:
        self.check_stream(self.urls, "data/cc3m/{00000..00331}.tar")

    def shards(self) -> list[str]:
        """The shard URLs: the pattern expanded; local ones must exist."""
        return expand_urls(self.urls, "shards")

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None, strict: bool = False) -> ShardStream:
        # tar fields are matched lower-cased (read_tar_shard), so are the keys: JPG finds a.jpg
        decode = FieldsDecoder(tuple(key.lower() for key in self.image_keys.split(";")), self.text_key.lower(),
                               {name: key.lower() for name, key in self.extra_keys.items()}, transform,
                               self.min_image_side, self.text_choice, self.drop_non_descriptive)
        return self.stream(self.urls, self.shards(), read_tar_shard, decode, seed, strict)


def choose_caption(fields: dict[str, Any], text_key: str, text_choice: str = "first",
                   drop_non_descriptive: bool = False, generator: torch.Generator | None = None) -> str:
    """A sample's caption: of the members ``text_key`` names (``;``-separated), the first usable
    one, or (``text_choice: random``) one of the usable ones drawn with ``generator`` (the first
    without one); none usable skips the sample for the reason of the first member it has."""
    usable, skips = [], []
    for key in text_key.split(";"):
        try:
            text = caption_text(fields.get(key))
            if drop_non_descriptive and not is_descriptive(text):
                raise SkipSample(NON_DESCRIPTIVE_CAPTION, repr(text[:40]))
        except SkipSample as skip:
            skips.append(skip)
            continue
        usable.append(text)
        if text_choice == "first":
            break
    if not usable:  # the reason of the first member there is (a missing title says less than a dropped description)
        raise next((skip for skip in skips if skip.reason != NO_CAPTION), skips[0])
    if len(usable) == 1 or generator is None:
        return usable[0]
    return usable[int(torch.randint(len(usable), (), generator=generator))]


def extra_value(key: str, data: bytes | int | float | None) -> Any:
    """An extra field's value by its member's kind: a number (a TFRecord's ``int64`` or ``float``
    feature), an int label (``*cls``), parsed JSON (``*json``) or stripped text; a missing or
    unreadable one (JSON ``null`` and a NaN included: no batch can use it) skips the sample."""
    if isinstance(data, float) and math.isnan(data):
        raise SkipSample(f"no {key}", "NaN")
    if isinstance(data, int | float):
        return data
    if data is not None and key.endswith(("cls", "json")):
        try:
            value = int(data) if key.endswith("cls") else json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise SkipSample(f"unreadable {key}", str(error)) from None
        if value is None:
            raise SkipSample(f"no {key}", "null")
        return value
    return caption_text(data, f"no {key}", key)


def read_tar_shard(url: str) -> Iterator[dict[str, bytes]]:
    """The samples of a tar shard as ``{field: bytes}`` (field names lower-cased; members webdataset
    would ignore are left out). A field given twice (``a.jpg`` and ``a.JPG``), which webdataset
    refuses, is named under :data:`REPEATED_FIELDS`, for the decoder to skip the sample. A shard
    left before its end (the reader closed, a run stopping) is closed without a word: a ``pipe:``
    command's exit status then (ended by SIGPIPE or SIGTERM) says nothing of the shard (:func:`opened_shard`)."""
    with opened_shard(url) as stream:
        for sample in stream_samples(stream):
            if sample.key is None:
                continue
            fields: dict[str, Any] = {}
            for name, data in sample.field_items():
                name = name.lower()
                if name in fields:
                    fields[REPEATED_FIELDS] = name
                fields.setdefault(name, data)
            if sample.cut_short:
                fields[CUT_SHORT] = True
            yield fields


def check_not_cut_short(fields: dict[str, Any], image_keys: Sequence[str], keys: Iterable[str],
                        text_keys: Sequence[str] = ()) -> None:
    """Skip a sample that the shard's cut left without the image (one of ``image_keys``), a field
    of ``keys``, or every one of ``text_keys`` (several text members: any may be absent), for that
    reason rather than as a sample lacking the field."""
    if CUT_SHORT in fields and (not any(key in fields for key in image_keys) or
                                any(key not in fields for key in keys) or
                                (text_keys and not any(key in fields for key in text_keys))):
        kept = sorted(name for name in fields if name not in (CUT_SHORT, REPEATED_FIELDS))
        raise SkipSample(CUT_SHORT_SAMPLE, f"the shard ends after its {', '.join(kept) or 'no'} member(s)")


@dataclass
class TFRecordSourceConfig(SourceConfig, StreamOptions, tag="tfrecord"):
    """TFRecord files of ``tf.train.Example`` records with ``jpg`` (encoded image) and ``txt``
    (caption) bytes features: COYO-ALIGN's training data and img2dataset's ``--output_format
    tfrecord`` (shared spec align-coyo-and-hf.md §4.1), read without TensorFlow
    (:mod:`openalign.data.tfrecords`, CRCs checked; the ``tfrecord`` package's protobuf). ``urls``:
    files, globs or brace patterns, local or remote (``coyo/*.tfrecord``,
    ``gs://bucket/coyo/*.tfrecord`` through fsspec, ``pipe:gsutil cat gs://...``). A record that
    fails its CRC or does not parse is skipped; a file cut short ends there. ``extra_keys``
    carries more features as fields (``{caption: caption}``; ``int64`` features are labels, ``float``
    ones numbers, as COYO's scores); GZIP-compressed files are read too.
    """

    urls: str
    image_key: str = "jpg"
    text_key: str = "txt"

    def __post_init__(self) -> None:
        self.check_stream(self.urls, "data/coyo/*.tfrecord")

    def files(self) -> list[str]:
        return expand_urls(self.urls, "TFRecord files")

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None, strict: bool = False) -> ShardStream:
        decode = RecordDecoder((self.image_key,), self.text_key, dict(self.extra_keys), transform, self.min_image_side,
                               self.text_choice, self.drop_non_descriptive)
        return self.stream(self.urls, self.files(), read_tfrecord_file, decode, seed, strict)


def read_tfrecord_file(url: str) -> Iterator[bytes | CorruptRecord]:
    """The serialized records of a TFRecord file (parsed later, so one bad record skips alone)."""
    with opened_shard(url) as stream:
        yield from read_records(stream)


class RecordDecoder(FieldsDecoder):
    """A serialized ``tf.train.Example`` → a training sample, through its bytes features."""

    def __call__(self, record: bytes | CorruptRecord,  # type: ignore[override]
                 generator: torch.Generator | None = None) -> dict[str, Any]:
        if isinstance(record, CorruptRecord):
            raise SkipSample(UNDECODABLE_RECORD, record.detail)
        return super().__call__(example_fields(record), generator)


def example_fields(record: bytes) -> dict[str, Any]:
    """A serialized ``tf.train.Example``'s features: bytes features as bytes, ``int64`` ones as
    ints, ``float`` ones as floats (COYO's scores, as img2dataset writes them; the first value of
    each); one that does not parse raises :class:`SkipSample`."""
    from google.protobuf.message import DecodeError
    from tfrecord import example_pb2

    example = example_pb2.Example()
    try:
        example.ParseFromString(record)
    except DecodeError as error:
        raise SkipSample(UNDECODABLE_RECORD, str(error)) from None
    fields: dict[str, Any] = {}
    for key, feature in example.features.feature.items():
        if feature.bytes_list.value:
            fields[key] = bytes(feature.bytes_list.value[0])
        elif feature.int64_list.value:
            fields[key] = int(feature.int64_list.value[0])
        elif feature.float_list.value:
            fields[key] = float(feature.float_list.value[0])
    return fields


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


@dataclass
class SentencePairsSourceConfig(SourceConfig, tag="sentence_pairs"):
    """Pairs of neighbouring sentences of a text corpus, CLIPPO's next-sentence contrastive data
    (shared spec clippo.md §3.2): sentence A is rendered into the ``image`` slot by the model's
    text processor, sentence B is the ``text``; the same loss applies.

    ``path``: text files (a brace pattern or a glob), optionally gzipped: ``.txt`` holds one
    document per line, ``.json`` / ``.jsonl`` one JSON object per line with the document in
    ``text_field`` (C4's ``c4-train.*.json.gz``). Documents are split into sentences after ``.``,
    ``!`` or ``?``; pairs whose sentences are shorter than ``min_chars`` are dropped (the paper's
    filters are unpublished). The pairs are held in memory.
    """

    path: str
    text_field: str = "text"
    min_chars: int = 10

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None, strict: bool = False) -> SentencePairDataset:
        if text_processor is None or "pixels" not in text_processor(["probe"]):
            raise OpenAlignError("data source 'sentence_pairs' renders sentences into the image slot, so it needs a "
                                 "model that reads rendered text (CLIPPO, e.g. model: clippo-b16)")
        dropped: Counter[str] = Counter()
        pairs = [pair for document in _read_documents(self.path, self.text_field, dropped)
                 for pair in _neighbour_pairs(document, self.min_chars)]
        if not pairs:
            raise OpenAlignError(f"'{self.path}' holds no pair of neighbouring sentences of at least "
                                 f"{self.min_chars} characters")
        log.info("sentence pairs: %d from '%s'", len(pairs), self.path)
        dataset = SentencePairDataset(pairs, text_processor)
        dataset.dropped = dropped_on_reading(self.path, dropped, strict)
        return dataset


class SentencePairDataset(Dataset):
    """``(epoch, index)`` → ``{"image": rendered sentence A, "text": sentence B}``."""

    def __init__(self, pairs: list[tuple[str, str]], text_processor: TextProcessor) -> None:
        self.pairs, self.text_processor = pairs, text_processor
        self.dropped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        first, second = self.pairs[key[1]]
        return {"image": self.text_processor([first])["pixels"][0], "text": second}


NOT_UTF8_DOCUMENT = "document not UTF-8"


def _read_documents(pattern: str, text_field: str, dropped: Counter[str]) -> Iterator[str]:
    """The documents of the text files ``pattern`` names (every path it names must exist, and every
    glob match a file); a line that is not UTF-8 is dropped and counted in ``dropped``, with a
    warning per file, and a file that cannot be read (a cut-off download) is an error naming it."""
    paths = sorted(expand_shards([pattern], "text file"))
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        json_lines = Path(path.name.removesuffix(".gz")).suffix in (".json", ".jsonl")
        undecodable = 0
        try:
            with opener(path, "rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    try:
                        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # an editor's byte-order mark
                    except UnicodeDecodeError:
                        undecodable += 1
                        continue
                    if not line.strip():
                        continue
                    if not json_lines:
                        yield line.strip()
                        continue
                    try:
                        yield str(json.loads(line)[text_field])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise OpenAlignError(f"{path}, line {number}: not a JSON object with a '{text_field}' field "
                                             "(set data.train.text_field)") from None
        except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            raise OpenAlignError(f"cannot read text file '{path}' ({type(error).__name__}: {error}): a cut-off "
                                 "download? Fetch it again, or leave it out of data.train.path") from None
        if undecodable:
            log.warning("'%s': dropped %d line(s) that are not UTF-8", path, undecodable)
            dropped[NOT_UTF8_DOCUMENT] += undecodable


def _neighbour_pairs(document: str, min_chars: int) -> list[tuple[str, str]]:
    sentences = [sentence.strip() for sentence in _SENTENCE_END.split(document)]
    return [(a, b) for a, b in zip(sentences, sentences[1:]) if len(a) >= min_chars and len(b) >= min_chars]


@dataclass
class MixtureSourceConfig(SourceConfig, tag="mixture"):
    """Several sources mixed per example with probabilities ``weights`` (normalised), as big_vision's
    ``sample_from_datasets`` mixes CLIPPO's image/alt-text and C4 data (shared spec clippo.md
    §3.2): each batch holds a random share of each, and they are each other's negatives.

    The mixture is a stream (resumed exactly, as its children are): every rank and loader worker
    reads its own shard of each map-style source (reshuffled each pass) and its own stream of
    each streaming source.
    """

    sources: list[SourceConfig]
    weights: list[float]

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("must list at least one source", "sources")
        if len(self.weights) != len(self.sources) or any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
            raise ConfigError(f"must be {len(self.sources)} non-negative numbers (one per source), not all 0", "weights")

    def build(self, transform: ImageTransform, seed: int, start_step: int = 0,
              text_processor: TextProcessor | None = None, strict: bool = False) -> MixtureDataset:
        children = [source.build(transform, seed + index, start_step, text_processor, strict)
                    for index, source in enumerate(self.sources)]
        return MixtureDataset(children, self.weights, seed)


class MixtureDataset(ResumableStream):
    """An endless stream drawing each example from child ``i`` with probability ``weights[i]``.

    A reader's position is the number of draws so far and each child's position.
    """

    def __init__(self, children: list[Dataset | IterableDataset], weights: list[float], seed: int) -> None:
        super().__init__(seed)
        for child in children:
            if isinstance(child, IterableDataset) and not isinstance(child, ResumableStream):
                raise OpenAlignError(f"a mixture cannot hold the stream {type(child).__name__}")
        self.children = children
        self.weights = [w / sum(weights) for w in weights]

    @property
    def dropped(self) -> dict[str, int]:
        """What its children dropped when they read their indexes."""
        return dict(sum((Counter(getattr(child, "dropped", {})) for child in self.children), Counter()))

    def require_fields(self, fields: Sequence[str]) -> None:
        """Each child's :meth:`CaptionDataset.require_fields`, where it has one."""
        for child in self.children:
            if callable(require := getattr(child, "require_fields", None)):
                require(fields)

    def reseed(self, salt: int) -> None:
        super().reseed(salt)
        for child in self.children:
            if isinstance(child, ResumableStream):
                child.reseed(salt)

    def fingerprint(self) -> str:
        """Its streams' fingerprints and its weights: a shard added to any source changes it."""
        parts = [child.fingerprint() if isinstance(child, ResumableStream) else
                 f"{len(child) if hasattr(child, '__len__') else '?'} items" for child in self.children]
        return hashlib.sha256(repr((parts, self.weights)).encode()).hexdigest()[:16]

    def check_readers(self, num_readers: int, warn: bool = True) -> None:
        for child in self.children:
            if isinstance(child, ResumableStream):
                child.check_readers(num_readers, warn)
            elif len(child) < num_readers:
                raise OpenAlignError(f"a mixture source has {len(child)} examples, fewer than the {num_readers} "
                                     "readers (ranks × loader workers) that each need a share")

    def iterate(self, reader: int, num_readers: int, position: tuple[int, tuple[Any, ...]] | None
                ) -> Iterator[tuple[dict[str, Any], tuple[int, tuple[Any, ...]]]]:
        self.check_readers(num_readers, warn=False)
        draws, positions = position or (0, (None,) * len(self.children))
        rng = random.Random(f"{self.seed}/{reader}")
        for _ in range(draws):
            rng.random()
        streams = [child.iterate(reader, num_readers, positions[index]) if isinstance(child, ResumableStream)
                   else _endless(child, reader, num_readers, self.seed + index, positions[index])
                   for index, child in enumerate(self.children)]
        positions = list(positions)
        cumulative = list(itertools.accumulate(self.weights))
        while True:
            index = min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(streams) - 1)
            draws += 1
            sample, positions[index] = next(streams[index])
            yield sample, (draws, tuple(positions))


def _endless(dataset: Dataset, reader: int, num_readers: int, seed: int, position: tuple[int, int] | None
             ) -> Iterator[tuple[dict[str, Any], tuple[int, int]]]:
    """A map-style dataset's examples ``reader::num_readers`` of a fresh permutation per pass,
    forever, with the position ``(pass, examples taken in it)`` after each."""
    epoch, taken = position or (0, 0)
    while True:
        order = torch.randperm(len(dataset), generator=epoch_generator(seed, epoch))
        mine = order[reader::num_readers].tolist()
        for position_in_pass in range(taken, len(mine)):
            yield dataset[(epoch, mine[position_in_pass])], (epoch, position_in_pass + 1)
        epoch, taken = epoch + 1, 0
