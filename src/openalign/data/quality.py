"""Dirty web data: what makes a sample unusable, and the counts of what was skipped or converted.

Every training source and ``openalign data inspect`` judge a sample by the same functions, so
the reasons ``inspect`` reports are the ones training logs. A skip is raised as
:class:`SkipSample` and handled by a :class:`SkipPolicy`: counted by reason (or, with
``data.strict: true``, turned into an error), and logged when a count reaches a power of two.

The counts live in the process that reads the data (a loader worker, or the training process
with ``num_workers: 0``); :class:`~openalign.data.loader.Collate` attaches a snapshot to every
batch so that the training process can add them up over workers and ranks.
"""

from __future__ import annotations

import io
import logging
import re
import unicodedata
import warnings
from collections import Counter

from PIL import Image

from ..errors import OpenAlignError

log = logging.getLogger("openalign.data")

# The skip reasons, as logs and ``openalign data inspect --json`` name them.
NO_IMAGE = "no image"
NO_CAPTION = "no caption"
EMPTY_CAPTION = "empty caption"  # and "caption not text", "caption not UTF-8": see caption_text
NON_DESCRIPTIVE_CAPTION = "non-descriptive caption"
UNDECODABLE_IMAGE = "undecodable image"
IMAGE_TOO_LARGE = "image too large (decompression bomb)"
IMAGE_TOO_SMALL = "image too small"
UNDECODABLE_RECORD = "undecodable record"
TRUNCATED_SHARD = "truncated or corrupt shard"
CUT_SHORT_SAMPLE = "sample cut short by its shard's end"
CUT_SHORT = "__cut_short__"  # in a raw tar sample: the shard is cut right after its members (TarSample.cut_short)
UNREADABLE_SHARD = "unreadable shard"
EMPTY_SHARD = "empty shard"
REPEATED_FIELD = "repeated field"

# Counts of this process: "skipped/<reason>", "converted/<mode>" (images converted to RGB) and
# "kept/<reason>" (texts used although the model can read nothing of them).
COUNTS: Counter[str] = Counter()
BLANK_RENDER = "kept/text renders blank"
UNKNOWN_TEXT = "kept/text all [UNK]"


def note(key: str) -> int | None:
    """Count one more ``key`` in :data:`COUNTS`; the count where it is a power of two (1, 2, 4,
    ...: the times to log it, so that a log says how often without a line per sample), else None."""
    COUNTS[key] += 1
    return COUNTS[key] if COUNTS[key] & (COUNTS[key] - 1) == 0 else None


class SkipSample(Exception):
    """A sample training cannot use; ``reason`` is one of this module's reasons."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


_CAMERA_FILE_NAME = re.compile(  # a camera's prefix and a counter of 3 digits or more: not "P-51", "Sam 2"
    r"(img|dsc|dscn|dscf|dcp|imgp|cimg|pict|pic|p|sam|mvc|dsci|_mg|image|photo)[ _-]*\d{3,}"
    r"(\.(jpe?g|png|gif|tiff?|bmp|heic|raw|cr2|nef|dng))?", re.IGNORECASE)


def is_descriptive(text: str) -> bool:
    """Whether ``text`` can describe an image: it has a letter, and is not a camera's file name
    (``IMG_1234``, ``DSC01234.JPG``, ``P1010001``). CLIPPO's YFCC-100M text drops non-descriptive
    annotations "following LiT, Appendix E" (shared spec clippo.md §6), naming digits-only
    descriptions; the whole list is not public, and this is openalign's reading of it."""
    return any(char.isalpha() for char in text) and not _CAMERA_FILE_NAME.fullmatch(text.strip())


def caption_text(data: bytes | str | None, missing: str = NO_CAPTION, name: str = "caption") -> str:
    """The stripped caption of a text field's bytes; raises :class:`SkipSample` when it is
    missing (reason ``missing``), not text (a TFRecord ``int64`` feature, say), not UTF-8, or
    empty (reasons ``caption not text``, ``caption not UTF-8``, ``empty caption``; another text
    field's by its ``name`` in place of ``caption``, so that the counts tell them apart). Empty:
    nothing but whitespace and the characters BERT's tokenizer deletes (controls, format
    characters such as zero-width spaces and byte-order marks, U+FFFD), which would train on
    ``[CLS] [SEP]``.

    The same holds for CLIPPO, although big_vision renders whatever it is given (spec clippo.md
    §1.3: invalid UTF-8 as U+FFFD, an empty caption as a blank grey image, outer spaces as
    blank cells): a pair without readable text teaches nothing, so it is skipped and counted by
    reason rather than rendered. Outer whitespace is stripped for CLIPPO too, a deliberate
    difference: a text file's trailing newline is the writing tool's, not the caption's, and
    rendered it is a 16-px control glyph that narrows every line's wrap width (big_vision renders
    a caption that ends in one with the glyph, its lines possibly broken a glyph earlier)."""
    if data is None:
        raise SkipSample(missing)
    if isinstance(data, str):
        text = without_lone_surrogates(data)
    elif isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as error:
            raise SkipSample(f"{name} not UTF-8", str(error)) from None
    else:
        raise SkipSample(f"{name} not text", f"a {type(data).__name__}")
    text = text.strip()
    if not any(not char.isspace() and char != "\ufffd" and unicodedata.category(char) not in ("Cc", "Cf")
               for char in text):  # as BERT's _is_control; unassigned (newer) code points, emoji say, are text
        raise SkipSample(f"empty {name}")
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate as U+FFFD (the replacement character), and a pair
    left as two code units joined into its character. JSON may hold a lone one (``"\\ud83d"``,
    half of an emoji cut by a UTF-16 writer); Hugging Face's fast tokenizers refuse a string with
    one, in the middle of a batch."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# What PIL raises for a file that is not a readable image (truncated, corrupt, of another format, a bomb)
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(data: bytes | None, min_side: int = 1) -> Image.Image:
    """The image in ``data``, opened but not decoded (so that JPEG draft mode can still apply).

    Raises :class:`SkipSample` for missing bytes, bytes PIL cannot identify, images over PIL's
    ``MAX_IMAGE_PIXELS`` (decompression bombs) and images whose shorter side is under ``min_side``.
    Decoding errors (a truncated JPEG) surface later, in :func:`decode_pixels`.
    """
    if data is None:
        raise SkipSample(NO_IMAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise SkipSample(IMAGE_TOO_LARGE, str(error)) from None
    except Image.UnidentifiedImageError:  # its message names the BytesIO object: <_io.BytesIO object at 0x7f...>
        raise SkipSample(UNDECODABLE_IMAGE, f"not an image format PIL reads ({len(data)} bytes, starting "
                                            f"{data[:8]!r})") from None
    except Exception as error:  # noqa: BLE001 - unknown format, corrupt header: all unreadable
        raise SkipSample(UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}") from None
    if min(image.size) < min_side:
        raise SkipSample(IMAGE_TOO_SMALL, f"{image.size[0]}x{image.size[1]} px, under {min_side} px")
    return image


# what decoding an opened image raises for truncated or corrupt image data
DECODING_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError)


def decode_pixels(transform, image: Image.Image, generator=None, encoded: bytes | None = None):  # noqa: ANN001, ANN201
    """``transform(image, generator, encoded)`` (an ImageTransform; ``encoded``: the bytes ``image``
    was opened from), counting a conversion to RGB; decoding errors (truncated or corrupt image
    data) raise :class:`SkipSample`."""
    if image.mode != "RGB":
        COUNTS[f"converted/{image.mode}"] += 1
    try:
        return transform(image, generator, encoded)
    except DECODING_ERRORS as error:
        raise SkipSample(UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}") from None


def image_problem(data: bytes, min_side: int = 1) -> SkipSample | None:
    """Why the image in ``data`` cannot be used (decoded whole to find out), or None. For a sample
    skipped for another reason first: a caption job leaves an undecodable image uncaptioned, and
    its image, not the caption it lacks, is the reason to count."""
    try:
        with open_image(data, min_side) as image:
            image.load()
    except SkipSample as skip:
        return skip
    except DECODING_ERRORS as error:
        return SkipSample(UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}")
    return None


class SkipPolicy:
    """What a source does with a :class:`SkipSample`: count and log it, or, ``strict``, raise.

    ``max_consecutive`` skips in a row (a wrong URL, a dead bucket, shards of another format)
    raise an error instead of spinning forever; the run of skips is per reading process. Only
    the thread that yields a source's samples reports to its policy (a shard stream's reading
    thread hands its skips over), so the counts and the run follow the data alone.
    """

    def __init__(self, source: str, strict: bool = False, max_consecutive: int = 100) -> None:
        self.source, self.strict, self.max_consecutive = source, strict, max_consecutive
        self.in_a_row = 0

    def success(self) -> None:
        self.in_a_row = 0

    def skip(self, skip: SkipSample, where: str = "") -> None:
        """Count (and now and then log) ``skip`` of the sample or shard at ``where``."""
        where = f" ({where})" if where else ""
        if self.strict:
            raise OpenAlignError(f"data source '{self.source}': {skip}{where}; data.strict is true, so this is "
                                 "an error (set data.strict: false to skip and count such samples)")
        self.in_a_row += 1
        if self.in_a_row >= self.max_consecutive:
            raise OpenAlignError(f"{self.in_a_row} consecutive samples or shards of '{self.source}' failed "
                                 f"(raise max_consecutive_errors if that is expected); last: {skip}{where}")
        if (count := note(f"skipped/{skip.reason}")) is not None:
            what = "shard(s)" if skip.reason.endswith("shard") else "sample(s)"  # a shard's failure counts once
            log.warning("data source '%s': skipped %d %s so far for %s; latest%s: %s", self.source,
                        count, what, skip.reason, where, skip.detail or skip.reason)


def dropped_on_reading(source: str, dropped: Counter[str], strict: bool) -> dict[str, int]:
    """What a source dropped when it read its index (a table's rows, a caption file's images), as
    the run's skip counts (``skipped/<reason>``: the summary line and ``data_summary.json``); with
    ``strict`` (``data.strict``), any is an error, as a skipped sample is."""
    if strict and +dropped:
        described = ", ".join(f"{count} for {reason}" for reason, count in sorted(dropped.items()) if count)
        raise OpenAlignError(f"data source '{source}' dropped entries when it was read ({described}); data.strict "
                             "is true, so this is an error (set data.strict: false to drop and count them)")
    return {f"skipped/{reason}": count for reason, count in dropped.items() if count}


def summarise(counts: dict[str, int]) -> str:
    """One line for the log: ``1,234 skipped (empty caption 12, ...); 56 converted to RGB (CMYK 3, ...)``."""
    parts = []
    for kind, verb in (("skipped", "skipped"), ("converted", "converted to RGB")):
        items = sorted(((key.split("/", 1)[1], n) for key, n in counts.items() if key.startswith(kind + "/") and n),
                       key=lambda item: -item[1])
        total = sum(n for _, n in items)
        parts.append(f"{total:,} {verb}" + (" (" + ", ".join(f"{reason} {n:,}" for reason, n in items) + ")"
                                             if items else ""))
    return "; ".join(parts)
