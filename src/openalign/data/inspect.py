"""``openalign data inspect``: what is in a set of webdataset shards or TFRecord files, and what
training would skip.

Each sample is checked as the training source checks it (:mod:`openalign.data.quality`): an
image member that PIL decodes completely, and a non-empty UTF-8 caption; skips are named by the
reasons training logs. The summary counts samples, the usable ones, skips
by reason, unreadable (truncated) shards, caption lengths and image sizes in histogram bins, and
image modes (grayscale, CMYK and alpha images are usable: the transforms convert them to RGB).
"""

from __future__ import annotations

import bisect
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import OpenAlignError
from ..progress import progress_bar
from .quality import (NO_IMAGE, REPEATED_FIELD, UNDECODABLE_IMAGE, UNDECODABLE_RECORD, SkipSample,
                      open_image)
from .shards import ShardReadError, expand_urls
from .sources import (REPEATED_FIELDS, TFRecordSourceConfig, WebDatasetSourceConfig, check_not_cut_short,
                      choose_caption)
from .tfrecords import CorruptRecord

IMAGE_KEYS = tuple(WebDatasetSourceConfig.image_keys.split(";"))  # what training reads
TFRECORD_IMAGE_KEYS = (TFRecordSourceConfig.image_key,)  # and from TFRecords
MIN_IMAGE_SIDE = WebDatasetSourceConfig.min_image_side
CAPTION_EDGES = (1, 10, 20, 40, 80, 160, 320)  # characters
IMAGE_EDGES = (32, 64, 128, 256, 512, 1024, 2048)  # pixels, the longer side


def inspect_shards(patterns: Sequence[str], text_key: str = "txt", image_keys: Sequence[str] = IMAGE_KEYS,
                   show_progress: bool = True, min_image_side: int = MIN_IMAGE_SIDE,
                   drop_non_descriptive: bool = False) -> dict[str, Any]:
    """The summary of the shards ``patterns`` name (paths, globs, brace patterns, and the URLs
    training reads: ``s3://...``, ``pipe:...``): ``samples``, ``usable``, ``skipped`` {reason:
    count}, ``failed_shards`` {url: error}, ``empty_shards`` [url] (read whole, without a
    sample), ``caption_chars`` and ``image_longer_side`` histograms {bin: count}, ``image_modes``
    {mode: count}. ``text_key`` and ``drop_non_descriptive`` are the training source's (several
    ``;``-separated members: the first usable one is measured)."""
    shards = [url for pattern in patterns for url in expand_urls(pattern, "shards")]
    if tables := [url for url in shards if url.lower().endswith((".csv", ".tsv", ".parquet"))]:
        raise OpenAlignError(f"'{tables[0]}' is a table: data inspect reads webdataset tar shards and TFRecord "
                             "files; write the table's pairs as shards with 'openalign data convert TABLE --out DIR' "
                             "(or train from it as it is: data.train.type=table)")
    skipped: Counter[str] = Counter()
    captions: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    failed: dict[str, str] = {}
    empty: list[str] = []  # whole, but without a sample: an archive of nothing, say, or a file of zeros
    samples = usable = 0
    with progress_bar("inspecting shards", len(shards), enabled=show_progress) as advance:
        for shard in shards:
            # a TFRecord's image is under the TFRecord source's key, unless other keys were asked for
            keys = TFRECORD_IMAGE_KEYS if _is_tfrecord(shard) and image_keys is IMAGE_KEYS else image_keys
            before = samples
            try:
                for fields in _samples(shard):
                    samples += 1
                    reason = (fields.reason if isinstance(fields, SkipSample)
                              else _check(fields, text_key, keys, min_image_side, captions, sizes, modes,
                                          drop_non_descriptive))
                    if reason:
                        skipped[reason] += 1
                    else:
                        usable += 1
            except (ShardReadError, tarfile.TarError, OSError) as error:
                failed[shard] = f"{type(error).__name__}: {error}"
            else:
                if samples == before:
                    empty.append(shard)
            advance()
    return {"shards": len(shards), "samples": samples, "usable": usable, "skipped": dict(skipped),
            "failed_shards": failed, "empty_shards": empty, "caption_chars": _ordered(captions, CAPTION_EDGES),
            "image_longer_side": _ordered(sizes, IMAGE_EDGES), "image_modes": dict(modes)}


def _samples(url: str) -> Iterator[dict[str, Any] | SkipSample]:
    """The samples of a tar shard, or of a TFRecord file (:func:`_is_tfrecord`), as ``{field: bytes}``,
    read as training reads them; a TFRecord record that fails its CRC or does not parse comes as
    its :class:`SkipSample`."""
    from .sources import example_fields, read_tar_shard, read_tfrecord_file

    if not _is_tfrecord(url):
        yield from read_tar_shard(url)
        return
    for record in read_tfrecord_file(url):
        try:
            if isinstance(record, CorruptRecord):
                raise SkipSample(UNDECODABLE_RECORD, record.detail)
            yield example_fields(record)
        except SkipSample as skip:
            yield skip


def _is_tfrecord(url: str) -> bool:
    """A TFRecord file, by its name: ``*.tfrecord*`` or ``*.tfrec`` (any case)."""
    name = url.rsplit("/", 1)[-1].lower()
    return ".tfrecord" in name or name.endswith(".tfrec")


def _check(members: dict[str, Any], text_key: str, image_keys: Sequence[str], min_image_side: int,
           captions: Counter[str], sizes: Counter[str], modes: Counter[str], drop_non_descriptive: bool = False
           ) -> str | None:
    """Why training would skip a sample (the reason it would log), or None; updates the
    histograms of what it reads."""
    text_key, image_keys = text_key.lower(), [key.lower() for key in image_keys]  # fields are lower-cased
    try:
        if REPEATED_FIELDS in members:
            raise SkipSample(REPEATED_FIELD)
        check_not_cut_short(members, image_keys, (), text_key.split(";"))
        data = next((members[key] for key in image_keys if key in members), None)
        if data is None:
            raise SkipSample(NO_IMAGE)
        caption = choose_caption(members, text_key, drop_non_descriptive=drop_non_descriptive)
        captions[_bin(len(caption), CAPTION_EDGES)] += 1  # every readable caption
        with open_image(data, min_image_side) as image:
            try:
                image.load()
            except Exception as error:  # noqa: BLE001 - truncated or corrupt image data
                raise SkipSample(UNDECODABLE_IMAGE, str(error)) from None
            size, mode = image.size, image.mode
    except SkipSample as skip:
        return skip.reason
    sizes[_bin(max(size), IMAGE_EDGES)] += 1
    modes[mode] += 1
    return None


def _bin(value: int, edges: Sequence[int]) -> str:
    """The histogram bin of ``value``: "<e0", "e0-e1", ..., ">=eN"."""
    position = bisect.bisect_right(edges, value)
    if position == 0:
        return f"<{edges[0]}"
    if position == len(edges):
        return f">={edges[-1]}"
    return f"{edges[position - 1]}-{edges[position] - 1}"


def _ordered(counts: Counter[str], edges: Sequence[int]) -> dict[str, int]:
    """The bins in ascending order, empty ones included."""
    bins = [f"<{edges[0]}"] + [f"{low}-{high - 1}" for low, high in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    return {name: counts.get(name, 0) for name in bins}


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable report of :func:`inspect_shards`' summary."""
    lines = [f"{summary['shards']} shard(s), {summary['samples']} samples, {summary['usable']} usable"]
    lines += [f"  skipped, {reason}: {count}" for reason, count in sorted(summary["skipped"].items())]
    lines += [f"  unreadable shard {path}: {error}" for path, error in summary["failed_shards"].items()]
    if empty := summary["empty_shards"]:
        lines.append(f"  {len(empty)} shard(s) without a sample: {', '.join(empty[:5])}"
                     f"{' ...' if len(empty) > 5 else ''}")
    for title, counts in (("caption characters", summary["caption_chars"]),
                          ("image longer side (px)", summary["image_longer_side"]),
                          ("image modes", dict(sorted(summary["image_modes"].items())))):
        shown = ", ".join(f"{name}: {count}" for name, count in counts.items() if count)
        lines.append(f"{title}: {shown or 'none'}")
    return "\n".join(lines)
