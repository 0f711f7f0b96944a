"""CLIPPO's text rendering: a caption → a greyscale image of it in GNU Unifont.

A numpy reimplementation of big_vision's ``render_unifont`` op (shared spec clippo.md §1), exact
for ``font_size=16``, the only size CLIPPO used: ASCII-only lowercasing, UTF-8 decoding with
U+FFFD replacement, ``max_chars`` truncation, per-glyph horizontal trimming, character-level
wrapping by pixel budget, crop/pad and colouring.

- :func:`render_text` / :func:`render_texts`: uint8 [H, W] / [N, H, W] images.
- :class:`TextRenderer`: a picklable callable that adds big_vision's ``value_range(-1, 1)``,
  float32 [3, H, W] in [-1, 1]; what the data pipeline and the model consume.
- :class:`Unifont`: the glyph table, parsed once per process from ``font_path``, else
  ``$OPENALIGN_UNIFONT``, else :data:`DEFAULT_UNIFONT`.

Decisions where big_vision gives no usable answer:

- Glyphs whose hex string is neither 32 nor 64 digits wide (the 24- and 32-px glyphs of newer
  Unifont releases, on which big_vision raises a KeyError) are skipped with one logged warning
  per file, so those code points render as 4-px blanks.
- ``font_size`` other than 16 raises ValueError: big_vision's antialiased area-resize path
  (§1.3) is not reproduced. So are ``monospace``, ``spacing`` and ``min_width`` (fixed at
  big_vision's defaults False, 1 and 4, which CLIPPO used).

Details §1.3 leaves implicit, taken from how big_vision slices: a glyph's kept columns
``[first, last)`` are clipped to the 16-px cell (a few glyphs inked only in columns 14–15 are
3 px wide, not 4); the image is cropped by pixel rows, so an ``image_size`` that is not a
multiple of 16 shows the top of one more line; ``max_chars`` of 0 or None means no limit.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, OpenAlignError
from .quality import BLANK_RENDER, note

log = logging.getLogger(__name__)

DEFAULT_UNIFONT = "/usr/share/unifont/unifont.hex"
"""Debian/Ubuntu's ``unifont`` package (15.0.01 on bookworm; shared spec clippo.md §1.4)."""

FONT_ENV = "OPENALIGN_UNIFONT"
"""Environment variable naming the hex file(s); several are separated by ``os.pathsep``."""

GLYPH_SIZE = 16
_NUM_CODEPOINTS = 0x110000
_MIN_WIDTH = 4  # big_vision's min_width
_SPACING = 1  # big_vision's spacing: blank columns kept left of the ink
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_FontPath = str | os.PathLike | Sequence[str | os.PathLike]


def resolve_font_paths(font_path: _FontPath | None = None) -> tuple[str, ...]:
    """The hex files to load: ``font_path`` (one path or several), else ``$OPENALIGN_UNIFONT``, else
    :data:`DEFAULT_UNIFONT`. Several files go into one table; a later file's glyph wins."""
    if font_path is None:
        env = os.environ.get(FONT_ENV, "")
        paths: list[str | os.PathLike] = [part for part in env.split(os.pathsep) if part] or [DEFAULT_UNIFONT]
    elif isinstance(font_path, (str, os.PathLike)):
        paths = [font_path]
    else:
        paths = list(font_path)
    if not paths:
        raise ValueError("font_path names no hex file")
    return tuple(os.path.abspath(os.fspath(path)) for path in paths)


def missing_font_error(path: str) -> OpenAlignError:
    return OpenAlignError(
        f"Unifont hex file not found: {path}. Install it with `apt-get install unifont` (Debian/Ubuntu; "
        f"it provides {DEFAULT_UNIFONT}), or download the Unifont 9.0.06 hex files that the released CLIPPO "
        "checkpoints used (unifont-9.0.06.hex and unifont_upper-9.0.06.hex from https://unifoundry.com/pub/unifont/"
        f"unifont-9.0.06/font-builds/, gunzipped) and point ${FONT_ENV} (paths separated by '{os.pathsep}') or "
        "the setting model.render.font_path (render_text's font_path) at them.")


def _parse_hex_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Code points (int64 [n]) and 16-bit pixel rows (uint16 [n, 16], bit 15 = column 0) of a ``.hex`` file.

    Lines are ``CODEPOINT:HEX`` (4 digits in the BMP file, 6 in ``unifont_upper``; see shared spec
    clippo.md §1.2). 32 hex digits are an 8×16 glyph, placed in the left 8 columns; 64 digits a
    16×16 glyph. Other widths are skipped with a warning; anything else malformed raises.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise missing_font_error(path) from None
    except OSError as error:
        raise OpenAlignError(f"cannot read Unifont hex file {path}: {error}") from None
    glyphs: dict[int, tuple[list[int], list[int], list[bytes]]] = {32: ([], [], []), 64: ([], [], [])}
    skipped: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        code, colon, bits = line.partition(b":")
        if not colon or not 1 <= len(code) <= 6 or code.translate(None, _HEX_DIGITS):
            raise OpenAlignError(f"{path}, line {number}: malformed Unifont hex line {raw[:40]!r} "
                                 "(expected CODEPOINT:HEXDIGITS)")
        codepoint = int(code, 16)
        if codepoint >= _NUM_CODEPOINTS:
            raise OpenAlignError(f"{path}, line {number}: code point U+{codepoint:X} is beyond U+10FFFF")
        if len(bits) in glyphs:
            numbers, codepoints, strings = glyphs[len(bits)]
            numbers.append(number)
            codepoints.append(codepoint)
            strings.append(bits)
        else:
            skipped.append(f"U+{codepoint:04X} (line {number}, {len(bits)} hex digits)")
    if skipped:
        log.warning("%s: skipped %d glyph(s) that are neither 8 nor 16 px wide (they render as blanks), e.g. %s",
                    path, len(skipped), ", ".join(skipped[:5]))
    narrow = _decode_hex(path, 16, *glyphs[32]).astype(np.uint16) << 8  # 8 px: the left half of the cell
    wide = _decode_hex(path, 32, *glyphs[64]).astype(np.uint16)
    wide = (wide[:, 0::2] << 8) | wide[:, 1::2]
    order = np.argsort(np.asarray(glyphs[32][0] + glyphs[64][0], dtype=np.int64), kind="stable")  # file order
    codepoints = np.asarray(glyphs[32][1] + glyphs[64][1], dtype=np.int64)[order]
    return codepoints, np.concatenate([narrow, wide])[order]


def _decode_hex(path: str, width: int, lines: list[int], codepoints: list[int], strings: list[bytes]) -> np.ndarray:
    """``strings`` (each ``2 * width`` characters) as uint8 [n, width]; a non-hex glyph raises naming its line."""
    try:
        decoded = bytes.fromhex(b"".join(strings).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        decoded = b""
    if len(decoded) != len(strings) * width:  # bytes.fromhex skips spaces, so also check the length
        for number, codepoint, string in zip(lines, codepoints, strings):
            if string.translate(None, _HEX_DIGITS):
                raise OpenAlignError(f"{path}, line {number}: the glyph of U+{codepoint:04X} is not hexadecimal: "
                                     f"{string[:64]!r}")
    return np.frombuffer(decoded, dtype=np.uint8).reshape(-1, width)


class Unifont:
    """A Unifont glyph table with each glyph's trimmed column range precomputed (shared spec clippo.md §1.3).

    Row 0 of every table is the blank glyph that code points absent from the files map to.

    - ``bitmaps``: bool [G, 16, 16], row-major, True = ink.
    - ``index``: int32 [0x110000], code point → row.
    - ``first``, ``width``: int32 [G], the kept columns ``[first, first + width)``: first =
      max(c₀ − 1, 0), last = min(max(c₁ + 1, first + 4), 16) for the first/last inked columns c₀/c₁
      (big_vision slices ``[first:last]``, so ``last`` is clipped to the cell); no ink keeps [0, 4).
    - ``columns``: uint16 [G, 16], column c of the glyph with bit r = row r, for rendering.

    Build it with :meth:`load`, which caches one table per tuple of paths.
    """

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.paths = paths
        parsed = [_parse_hex_file(path) for path in paths]
        codepoints = np.concatenate([cps for cps, _ in parsed])
        rows = np.concatenate([rows for _, rows in parsed])
        # a code point defined twice (within or across files) keeps its last definition
        unique, last_from_end = np.unique(codepoints[::-1], return_index=True)
        keep = len(codepoints) - 1 - last_from_end
        rows = np.concatenate([np.zeros((1, GLYPH_SIZE), np.uint16), rows[keep]])
        self.index = np.zeros(_NUM_CODEPOINTS, dtype=np.int32)
        self.index[unique] = np.arange(1, len(unique) + 1, dtype=np.int32)
        missing = [chr(code) for code in range(0x21, 0x7F) if not self.index[code]]
        if missing:  # captions would render (partly) blank, and a text tower would learn nothing from them
            raise OpenAlignError(f"the font {', '.join(paths)} has no glyph for {len(missing)} of the 94 printable "
                                 f"ASCII characters ({''.join(missing[:10])}...): give GNU Unifont's unifont.hex "
                                 "(the Basic Multilingual Plane), with unifont_upper.hex after it if wanted")
        shifts = np.arange(GLYPH_SIZE - 1, -1, -1, dtype=np.uint16)
        self.bitmaps = ((rows[:, :, None] >> shifts) & 1).astype(bool)
        packed = np.packbits(self.bitmaps.transpose(0, 2, 1), axis=-1, bitorder="little")
        self.columns = np.ascontiguousarray(packed).view("<u2")[..., 0].astype(np.uint16)
        ink = self.bitmaps.any(axis=1)
        has_ink = ink.any(axis=1)
        first_ink = ink.argmax(axis=1)
        last_ink = GLYPH_SIZE - 1 - ink[:, ::-1].argmax(axis=1)
        first = np.where(has_ink, np.maximum(first_ink - _SPACING, 0), 0)
        last = np.where(has_ink, np.minimum(np.maximum(last_ink + _SPACING, first + _MIN_WIDTH), GLYPH_SIZE),
                        _MIN_WIDTH)
        self.first = first.astype(np.int32)
        self.width = (last - first).astype(np.int32)
        self.has_ink = has_ink  # bool [G]: False for the blank row 0 and for spaces
        for table in (self.index, self.bitmaps, self.columns, self.first, self.width, self.has_ink):
            table.setflags(write=False)  # shared by every caller through the cache

    @staticmethod
    def load(font_path: _FontPath | None = None) -> Unifont:
        """The table for ``font_path`` (see :func:`resolve_font_paths`), parsed once per process."""
        return _load_unifont(resolve_font_paths(font_path))

    def __len__(self) -> int:
        return len(self.bitmaps) - 1

    def __repr__(self) -> str:
        return f"Unifont({len(self)} glyphs from {', '.join(self.paths)})"


@functools.lru_cache(maxsize=8)
def _load_unifont(paths: tuple[str, ...]) -> Unifont:
    return Unifont(paths)


@functools.lru_cache(maxsize=8)
def _column_palette(ink: float, background: float, dtype: str) -> np.ndarray:
    """[65536, 16] of ``dtype``: a 16-pixel column's values for each ink pattern (bit r = row r)."""
    bits = (np.arange(1 << GLYPH_SIZE, dtype=np.uint32)[:, None] >> np.arange(GLYPH_SIZE, dtype=np.uint32)) & 1
    palette = np.where(bits == 1, np.asarray(ink, dtype), np.asarray(background, dtype))
    palette.setflags(write=False)
    return palette


def check_render_settings(image_size: int, font_size: int, text_brightness: int, background_brightness: int,
                          max_chars: int | None) -> None:
    """A :class:`ConfigError` naming the setting (its ``key``) that cannot be rendered with."""
    if font_size != GLYPH_SIZE:
        raise ConfigError(f"is {font_size}, which is not supported: only 16 (Unifont's native size, what CLIPPO used) "
                          "is implemented; big_vision's resized-glyph path is not", "font_size")
    if image_size <= GLYPH_SIZE:
        raise ConfigError(f"must exceed the {GLYPH_SIZE}-px glyph cell, got {image_size}", "image_size")
    for name, value in (("text_brightness", text_brightness), ("background_brightness", background_brightness)):
        if not 0 <= value <= 255:
            raise ConfigError(f"must be a grey level in [0, 255], got {value}", name)
    if max_chars is not None and max_chars < 0:
        raise ConfigError(f"must be non-negative (0 or None: no limit), got {max_chars}", "max_chars")


def text_codepoints(text: str | bytes, lower: bool = True, max_chars: int | None = 768) -> np.ndarray:
    """Steps 1–2 of shared spec clippo.md §1.3: ASCII-only lowercasing, UTF-8 decoding (invalid
    bytes → U+FFFD, as TF's ``errors='replace'``) and truncation to ``max_chars`` code points
    (0 or None: no limit, as in big_vision). Returns int64 code points."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):  # None or NaN from a table, a list of one image's captions
        raise OpenAlignError(f"text to render must be a string (or UTF-8 bytes), got {type(text).__name__} "
                             f"{text!r:.60}: give one caption per image (big_vision renders a list's first)")
    if max_chars:
        text = text[:max_chars]
    codepoints = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4").astype(np.int64)
    if lower:
        codepoints += ((codepoints >= 0x41) & (codepoints <= 0x5A)) * 0x20  # A–Z only, as tf.strings.lower
    return codepoints


def _render_into(out: np.ndarray, font: Unifont, codepoints: np.ndarray, palette: np.ndarray) -> None:
    """Paint ``codepoints`` over all of ``out`` ([H, W], ``palette``'s dtype), steps 3–7 of shared spec
    clippo.md §1.3, vectorised: gather trimmed glyph columns, wrap by cumulative width, colour by
    ``palette`` (see :func:`_column_palette`)."""
    height, width = out.shape
    num_lines = -(-height // GLYPH_SIZE)
    rows = np.take(font.index, codepoints)
    widths = np.take(font.width, rows)
    visible = 0
    if len(rows):
        ends = np.cumsum(widths)  # e_i = Σ_{j<=i} w_j
        line = ends // (width - widths.max())  # ⌊e_i / div⌋, div = image_size − max width
        visible = int(np.searchsorted(line, num_lines))  # lines never decrease; the ones below the image are cut
    if visible == 0:  # the empty string (or a first glyph wrapped below a tiny image)
        out.fill(palette[0, 0])
        return
    rows, widths, ends, line = rows[:visible], widths[:visible], ends[:visible], line[:visible]
    starts = ends - widths
    line_starts = np.take(starts, np.searchsorted(line, line))  # where each glyph's line begins in the strip
    # column k of the text strip (k = starts[i] + offset within glyph i) goes to (line[i], x = k - line_starts[i])
    strip = np.arange(ends[-1], dtype=np.int64)
    source = np.repeat(rows * GLYPH_SIZE + np.take(font.first, rows) - starts, widths) + strip
    target = np.repeat(line * width - line_starts, widths) + strip
    canvas = np.zeros(num_lines * width, dtype=np.uint16)
    canvas[target] = np.take(font.columns.reshape(-1), source)
    pixels = np.take(palette, canvas, axis=0).reshape(num_lines, width, GLYPH_SIZE).transpose(0, 2, 1)
    full = height // GLYPH_SIZE
    out[:full * GLYPH_SIZE].reshape(full, GLYPH_SIZE, width)[...] = pixels[:full]
    if full < num_lines:  # image_size not a multiple of 16: the last line is cut at the bottom
        out[full * GLYPH_SIZE:] = pixels[full, :height - full * GLYPH_SIZE]


def _render_batch(font: Unifont, texts: Sequence[str | bytes], image_size: int, lower: bool, text_brightness: int,
                  background_brightness: int, max_chars: int | None) -> np.ndarray:
    palette = _column_palette(text_brightness, background_brightness, "uint8")
    out = np.empty((len(texts), image_size, image_size), dtype=np.uint8)
    for image, text in zip(out, texts):
        _render_into(image, font, text_codepoints(text, lower, max_chars), palette)
    return out


def render_texts(texts: Sequence[str | bytes], image_size: int = 224, font_size: int = 16, lower: bool = True,
                 text_brightness: int = 0, background_brightness: int = 127, max_chars: int | None = 768,
                 font_path: _FontPath | None = None) -> np.ndarray:
    """Render each text as big_vision's ``render_unifont`` does (shared spec clippo.md §1.3): uint8 [N, H, W].

    Glyphs are trimmed to their ink plus one blank column on the left (at least 4 px; blanks and
    code points missing from the font are 4-px blanks) and wrapped character by character, no word
    boundaries: glyph i goes on line ⌊e_i / (image_size − max width)⌋ with e_i the cumulative width
    up to and including it. Lines are 16 px tall and flush left from (0, 0); text below the image is
    dropped. Control characters (``\\n``, ``\\t``) are drawn as their Unifont glyphs, not obeyed.
    Ink is ``text_brightness``, everything else ``background_brightness``.
    """
    check_render_settings(image_size, font_size, text_brightness, background_brightness, max_chars)
    return _render_batch(Unifont.load(font_path), texts, image_size, lower, text_brightness, background_brightness,
                         max_chars)


def render_text(text: str | bytes, image_size: int = 224, font_size: int = 16, lower: bool = True,
                text_brightness: int = 0, background_brightness: int = 127, max_chars: int | None = 768,
                font_path: _FontPath | None = None) -> np.ndarray:
    """One text as a uint8 [image_size, image_size] image; see :func:`render_texts`.

    ``bytes`` are decoded as UTF-8 with invalid bytes → U+FFFD; the empty string gives a uniform
    background. Only ``font_size=16`` is supported (ValueError otherwise).
    """
    return render_texts([text], image_size, font_size, lower, text_brightness, background_brightness, max_chars,
                        font_path)[0]


def _value_range_levels() -> np.ndarray:
    """float32 [256]: big_vision's ``value_range(-1, 1)`` of each grey level, vmin + x / 255 · (vmax − vmin)."""
    grey = np.arange(256, dtype=np.float32)
    levels = np.float32(-1) + grey / np.float32(255) * np.float32(2)
    levels.setflags(write=False)
    return levels


_LEVELS = _value_range_levels()


def value_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 renderings [..., H, W] → the model's float32 input [..., 3, H, W], on the same device.

    Exactly what :class:`TextRenderer` returns (a table lookup, so the same bits on any device). For
    throughput, a data pipeline can ship the 12× smaller uint8 images and convert on the GPU.
    """
    grey = torch.tensor(_LEVELS, device=images.device)[images.long()]
    return grey.unsqueeze(-3).expand(*images.shape[:-2], 3, *images.shape[-2:]).contiguous()


def _note_if_blank(font: Unifont, codepoints: np.ndarray, text: str | bytes) -> None:
    """Count a text none of whose characters has ink in the font (emoji outside the Basic
    Multilingual Plane, rare CJK; whitespace alone aside) and say so now and then: every such text
    renders as the empty text does, one image to the model for different pictures."""
    if font.has_ink[np.take(font.index, codepoints)].any() or all(chr(code).isspace() for code in codepoints):
        return
    if (count := note(BLANK_RENDER)) is not None:
        shown = text.decode("utf-8", "replace") if isinstance(text, (bytes, bytearray, memoryview)) else text
        log.warning("%d text(s) so far rendered blank: none of their characters has a glyph in the font (latest: "
                    "%r); they are all one image to the model (in training they teach it "
                    "nothing, as queries or labels they cannot be told apart)", count, shown[:40])


@dataclass
class TextRenderer:
    """CLIPPO's text "tokenizer": ``render_unifont`` then ``value_range(-1, 1)`` (shared spec clippo.md §1.1).

    ``renderer(text)`` gives float32 [3, H, W] in [-1, 1] (x / 255 · 2 − 1, three identical
    channels: ink −1.0, background 127/255 · 2 − 1); ``renderer.batch(texts)`` gives [N, 3, H, W].
    Pickles without its font table, which each process loads (once) on first use.
    """

    image_size: int = 224
    font_size: int = 16
    lower: bool = True
    text_brightness: int = 0
    background_brightness: int = 127
    max_chars: int | None = 768
    font_path: Any = None  # str, path or sequence of them; None: $OPENALIGN_UNIFONT, else DEFAULT_UNIFONT
    _font: Unifont | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_render_settings(self.image_size, self.font_size, self.text_brightness, self.background_brightness,
                              self.max_chars)

    @property
    def font(self) -> Unifont:
        """The glyph table, loaded on first use (once per process and path)."""
        if self._font is None:
            self._font = Unifont.load(self.font_path)
        return self._font

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_font": None}

    def render(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """uint8 [N, H, W] images, as :func:`render_texts` with these settings."""
        return _render_batch(self.font, texts, self.image_size, self.lower, self.text_brightness,
                             self.background_brightness, self.max_chars)

    def batch(self, texts: Sequence[str | bytes], out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [N, 3, H, W] in [-1, 1], written into ``out`` if given (a contiguous CPU float32
        tensor of that shape, e.g. a reused pinned buffer: filling fresh memory costs more than rendering)."""
        palette = _column_palette(float(_LEVELS[self.text_brightness]), float(_LEVELS[self.background_brightness]),
                                  "float32")
        shape = (len(texts), 3, self.image_size, self.image_size)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        elif (tuple(out.shape) != shape or out.dtype != torch.float32 or out.device.type != "cpu"
              or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous CPU float32 tensor of shape {shape}, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        images = out.numpy()
        ink_shows = self.text_brightness != self.background_brightness  # else every text renders blank
        for image, text in zip(images, texts):
            codepoints = text_codepoints(text, self.lower, self.max_chars)
            _render_into(image[0], self.font, codepoints, palette)
            image[1:] = image[0]
            if ink_shows:
                _note_if_blank(self.font, codepoints, text)
        return out

    def __call__(self, text: str | bytes) -> torch.Tensor:
        """float32 [3, H, W] in [-1, 1]."""
        return self.batch([text])[0]
