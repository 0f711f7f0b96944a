"""CLIPPO text rendering (shared spec clippo.md §1) against a deliberately naive reference.

The reference parses the hex file itself, unpacks bits MSB-first, trims, wraps with explicit
per-glyph loops and paints pixel by pixel; the renderer must match it exactly.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from openalign.data.render import (DEFAULT_UNIFONT, FONT_ENV, TextRenderer, Unifont, render_text, render_texts,
                                   value_range)
from openalign.errors import OpenAlignError

pytestmark = pytest.mark.skipif(not Path(DEFAULT_UNIFONT).is_file(),
                                reason=f"{DEFAULT_UNIFONT} is absent (install it with `apt-get install unifont`)")


# --- the naive reference ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hex_glyphs() -> dict[int, str]:
    """Code point → hex string, read line by line from the Debian file."""
    glyphs = {}
    with open(DEFAULT_UNIFONT) as file:
        for line in file:
            code, hexbits = line.rstrip("\n").split(":")
            glyphs[int(code, 16)] = hexbits
    return glyphs


def reference_glyph(hex_glyphs: dict[int, str], codepoint: int) -> list[list[int]]:
    """16 rows × 16 columns of 0/1; an 8-px glyph fills the left 8 columns, a missing one is blank."""
    hexbits = hex_glyphs.get(codepoint, "0" * 64)
    digits_per_row = len(hexbits) // 16  # 2 for 8-px glyphs, 4 for 16-px ones
    bitmap = []
    for row in range(16):
        value = int(hexbits[row * digits_per_row:(row + 1) * digits_per_row], 16)
        bits = [(value >> (4 * digits_per_row - 1 - col)) & 1 for col in range(4 * digits_per_row)]
        bitmap.append(bits + [0] * (16 - len(bits)))
    return bitmap


def reference_columns(bitmap: list[list[int]]) -> list[int]:
    """The kept columns: first = max(c0 - 1, 0), last = max(c1 + 1, first + 4), sliced within the cell."""
    inked = [col for col in range(16) if any(bitmap[row][col] for row in range(16))]
    if not inked:
        first, last = 0, 4
    else:
        first = max(inked[0] - 1, 0)
        last = max(inked[-1] + 1, first + 4)
    return [col for col in range(first, last) if col < 16]


def reference_render(hex_glyphs: dict[int, str], text: str | bytes, image_size: int = 224, lower: bool = True,
                     max_chars: int | None = 768, text_brightness: int = 0,
                     background_brightness: int = 127) -> np.ndarray:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if lower:
        text = "".join(chr(ord(ch) + 32) if "A" <= ch <= "Z" else ch for ch in text)
    if max_chars:
        text = text[:max_chars]
    image = [[background_brightness] * image_size for _ in range(image_size)]
    if not text:
        return np.array(image, dtype=np.uint8)
    glyphs = []
    for ch in text:
        bitmap = reference_glyph(hex_glyphs, ord(ch))
        glyphs.append((bitmap, reference_columns(bitmap)))
    div = image_size - max(len(columns) for _, columns in glyphs)
    cumulative, current_line, x = 0, -1, 0
    for bitmap, columns in glyphs:
        cumulative += len(columns)
        line = cumulative // div
        if line != current_line:
            current_line, x = line, 0
        for col in columns:
            for row in range(16):
                y = 16 * line + row
                if bitmap[row][col] and y < image_size:
                    image[y][x] = text_brightness
            x += 1
        assert x <= image_size
    return np.array(image, dtype=np.uint8)


CASES = {
    "ascii": "a man riding a wave on top of a surfboard",
    "punctuation": "Hello, world! It's 3:45pm - \"quotes\" & (brackets) [x] {y} 100% ~_~",
    "uppercase": "ÜBER ÉCOLE ΑΒΓ ДЖ THE QUICK BROWN FOX",
    "accented": "crème brûlée, façade, naïve coöperation, smörgåsbord, Ångström",
    "cjk": "中文字幕 日本語のテキスト 한국어 문장",
    "mixed_width": "a 中 b 文 c" * 6,
    "wraps": "two dogs play with a frisbee in the park while a man watches " * 4,
    "overflow": "the quick brown fox jumps over the lazy dog; " * 16,
    "empty": "",
    "blanks": "a \ue000 b \U0001F600 c   d",
    "controls": "line one\nline two\tafter a tab\r\x00",
    "cell_edge": "a\u0903b\u0a83c\u17c8",
    "invalid_utf8": b"caf\xc3 \xff\xfe ok \xe2\x82 \x80 end",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(hex_glyphs, name):
    text = CASES[name]
    assert np.array_equal(render_text(text), reference_render(hex_glyphs, text))


@pytest.mark.parametrize("name", ["ascii", "wraps", "overflow", "cjk"])
@pytest.mark.parametrize("image_size", [100, 64])
def test_matches_reference_other_sizes(hex_glyphs, name, image_size):
    text = CASES[name]
    ours = render_text(text, image_size=image_size, text_brightness=255, background_brightness=3)
    reference = reference_render(hex_glyphs, text, image_size, text_brightness=255, background_brightness=3)
    assert ours.shape == (image_size, image_size) and np.array_equal(ours, reference)


def test_options_match_reference(hex_glyphs):
    text = "MiXeD CaSe " * 100
    assert np.array_equal(render_text(text, lower=False), reference_render(hex_glyphs, text, lower=False))
    for max_chars in (10, 0, None):
        assert np.array_equal(render_text(text, max_chars=max_chars),
                              reference_render(hex_glyphs, text, max_chars=max_chars))
    assert np.array_equal(render_text(text, max_chars=10), render_text(text[:10].lower()))
    assert not np.array_equal(render_text(text, max_chars=10), render_text(text))


# --- hand-checked facts (shared spec clippo.md §1.3, measured with Unifont 15.0.01) -----------

def test_glyph_table_facts(hex_glyphs):
    font = Unifont.load()
    assert len(font) == 57086
    assert hex_glyphs[ord("a")] == "0000000000003C42023E4242463A0000"
    a = np.array(reference_glyph(hex_glyphs, ord("a")), dtype=bool)
    assert np.array_equal(font.bitmaps[font.index[ord("a")]], a)
    assert a[6].tolist() == [False, False, True, True, True, True] + [False] * 10  # 0x3C
    widths = {ch: int(font.width[font.index[ord(ch)]]) for ch in "aimw -.,'!1\n\u0903\U0001F600"}
    assert widths == {"a": 7, "i": 6, "m": 8, "w": 8, " ": 4, "-": 5, ".": 4, ",": 4, "'": 4, "!": 4, "1": 6,
                      "\n": 16, "\u0903": 3, "\U0001F600": 4}
    for ch, width in widths.items():
        assert len(reference_columns(reference_glyph(hex_glyphs, ord(ch)))) == width


def test_first_line_break():
    """Where "a man riding a wave on top of a surfboard" wraps at 224 px.

    e_i includes glyph i and div = 224 - 8 = 216 (m and w are 8 px): "...of a s" ends at e = 202
    and "u" at 209 < 216, so "u" stays on line 0 and line 1 starts at "r". The spec's measured
    first line "a man riding a wave on top of a s" is what the same caption gives with one 16-px
    glyph in it (e.g. a trailing newline): div = 208 pushes "u" (209) to line 1.
    """
    caption = "a man riding a wave on top of a surfboard"
    full = render_text(caption)
    assert np.array_equal(full[:16], render_text(caption[:34])[:16])  # "... of a su"
    assert np.array_equal(full[16:32], render_text(caption[34:])[:16]) and (full[32:] == 127).all()  # "rfboard"
    with_newline = render_text(caption + "\n")
    assert np.array_equal(with_newline[:16], render_text(caption[:33])[:16])  # "... of a s"
    tail = render_text("urfboard")
    drawn = int(np.nonzero((tail[:16] == 0).any(axis=0))[0].max()) + 1
    assert np.array_equal(with_newline[16:32, :drawn], tail[:16, :drawn])


def test_ascii_only_lowercasing():
    assert np.array_equal(render_text("ÜBER ÉCOLE"), render_text("Über École"))
    assert not np.array_equal(render_text("ÜBER ÉCOLE"), render_text("über école"))
    assert np.array_equal(render_text("ΑΒΓ"), render_text("ΑΒΓ", lower=False))


def test_blanks_and_invalid_bytes():
    assert (render_text("") == 127).all() and render_text("").dtype == np.uint8
    # unknown code points and spaces are 4-px blanks
    assert np.array_equal(render_text("a\ue000b"), render_text("a b"))
    assert np.array_equal(render_text("a\U0001F600b"), render_text("a b"))
    assert np.array_equal(render_text(b"a\xffb"), render_text("a\ufffdb"))
    assert np.array_equal(render_text("text".encode()), render_text("text"))
    overflow = render_text("x" * 700)
    assert (overflow[208:] == 0).any() and np.array_equal(overflow, render_text("x" * 760))


def test_a_text_that_is_not_a_string_is_named():
    """None or NaN (a table's missing caption) or one image's list of captions: an error that says so,
    not a TypeError from inside the renderer."""
    for bad in (None, float("nan"), ["two", "captions"], 7):
        with pytest.raises(OpenAlignError, match=r"text to render must be a string \(or UTF-8 bytes\), got"):
            render_text(bad)
        with pytest.raises(OpenAlignError, match="give one caption per image"):
            TextRenderer(image_size=32).batch(["fine", bad])


def test_batch_matches_single():
    texts = [CASES[name] for name in sorted(CASES)]
    batch = render_texts(texts)
    assert batch.shape == (len(texts), 224, 224) and batch.dtype == np.uint8
    for text, image in zip(texts, batch):
        assert np.array_equal(image, render_text(text))


# --- the model-facing renderer ----------------------------------------------------------------

def test_text_renderer_values():
    renderer = TextRenderer()
    pixels = renderer("A Man Riding A Wave")
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2])
    background = np.float32(127) / np.float32(255) * np.float32(2) - np.float32(1)
    assert set(pixels.unique().tolist()) == {-1.0, float(background)}
    assert abs(float(background) + 0.0039216) < 1e-7
    grey = render_text("A Man Riding A Wave")
    assert torch.equal(pixels[0], torch.from_numpy(grey.astype(np.float32) / np.float32(255) * np.float32(2)
                                                   - np.float32(1)))
    texts = ["a", "", "中文", "x" * 800]
    batch = renderer.batch(texts)
    assert batch.shape == (4, 3, 224, 224)
    assert torch.equal(batch, torch.stack([renderer(text) for text in texts]))
    assert torch.equal(value_range(torch.from_numpy(render_texts(texts))), batch)
    buffer = torch.full((4, 3, 224, 224), 5.0)
    assert renderer.batch(texts, out=buffer) is buffer and torch.equal(buffer, batch)
    with pytest.raises(ValueError, match="out must be"):
        renderer.batch(texts, out=torch.empty(3, 3, 224, 224))
    assert (batch[1] == float(background)).all()


def test_texts_that_render_blank_are_counted_and_said(caplog):
    """Text of characters the font lacks (emoji beyond the BMP, CJK Extension B) renders as the empty
    text does: the same image for all of them, which the model cannot tell apart."""
    from openalign.data.quality import BLANK_RENDER, COUNTS

    renderer = TextRenderer(image_size=32)
    with caplog.at_level(logging.WARNING, logger="openalign"):
        # private-use code points, which no Unifont file draws (emoji, which its upper-plane file does)
        images = renderer.batch(["\ue000\ue001", "a cat", "", "\U000F0000", "  ", "\ue002"])
    assert torch.equal(images[0], images[2]) and torch.equal(images[3], images[2])  # blank, as the empty text
    assert COUNTS[BLANK_RENDER] == 3  # the empty and the blank text are not counted: nothing to draw there
    TextRenderer(image_size=32, text_brightness=127).batch(["a cat"])  # ink as the background: all is blank
    assert COUNTS[BLANK_RENDER] == 3
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2 and warnings[0].startswith("1 text(s) so far rendered blank: none of their characters")
    assert warnings[1].startswith("2 text(s) so far rendered blank")  # at powers of two: 1, 2, 4, ...


def test_text_renderer_pickles():
    renderer = TextRenderer(image_size=112)
    expected = renderer("pickled")
    clone = pickle.loads(pickle.dumps(renderer))
    assert len(pickle.dumps(renderer)) < 1000  # the font table does not travel
    assert clone == renderer and torch.equal(clone("pickled"), expected)


# --- fonts and errors -------------------------------------------------------------------------

def test_missing_font(tmp_path, monkeypatch):
    missing = tmp_path / "absent.hex"
    with pytest.raises(OpenAlignError, match="apt-get install unifont") as error:
        render_text("a", font_path=missing)
    assert "9.0.06" in str(error.value) and FONT_ENV in str(error.value)
    monkeypatch.setenv(FONT_ENV, str(missing))
    with pytest.raises(OpenAlignError, match="apt-get install unifont"):
        TextRenderer()("a")


def test_malformed_font_files(tmp_path):
    bad = tmp_path / "bad.hex"
    bad.write_text("0061:0000000000003C42023E4242463A0000\nnot a glyph line\n")
    with pytest.raises(OpenAlignError, match=r"bad\.hex, line 2"):
        Unifont.load(bad)
    bad.write_text("0061:0000000000003C42023E4242463A0000\n0062:00000000000000000000000000000XYZ\n")
    with pytest.raises(OpenAlignError, match=r"line 2: the glyph of U\+0062 is not hexadecimal"):
        Unifont.load(bad)
    bad.write_text("0061:0000000000003C42023E4242463A0000\n")  # a font without Basic Latin: blank captions
    with pytest.raises(OpenAlignError, match=r"has no glyph for 93 of the 94 printable ASCII characters "
                                             r"\(!\"#\$%&'\(\)\*\.\.\.\): give GNU Unifont's unifont.hex"):
        Unifont.load(bad)


def test_custom_and_combined_fonts(tmp_path, monkeypatch, caplog):
    upper = tmp_path / "upper.hex"
    smiley = "".join(f"{row:04X}" for row in [0x0000, 0x0FF0, 0x1008, 0x2004, 0x4422, 0x4002, 0x4002, 0x4812,
                                               0x47E2, 0x2004, 0x1008, 0x0FF0, 0, 0, 0, 0])
    upper.write_text(f"01F600:{smiley}\n01F601:{'F' * 48}\n")  # a 24-px glyph: skipped with a warning
    with caplog.at_level(logging.WARNING, logger="openalign.data.render"):
        font = Unifont.load([DEFAULT_UNIFONT, upper])
    assert "skipped 1 glyph" in caplog.text and "U+1F601" in caplog.text
    assert len(font) == 57087 and font.width[font.index[0x1F600]] == 15 and font.index[0x1F601] == 0
    image = render_text("a\U0001F600", font_path=[DEFAULT_UNIFONT, upper])
    assert (image[:16, 7:22] == 0).any() and np.array_equal(image[:, :7], render_text("a")[:, :7])
    monkeypatch.setenv(FONT_ENV, f"{DEFAULT_UNIFONT}:{upper}")
    assert np.array_equal(render_text("a\U0001F600"), image)


def test_bad_settings():
    with pytest.raises(ValueError, match="font_size"):
        render_text("a", font_size=8)
    with pytest.raises(ValueError, match="font_size"):
        TextRenderer(font_size=32)
    with pytest.raises(ValueError, match="image_size"):
        render_text("a", image_size=16)
    with pytest.raises(ValueError, match="background_brightness"):
        render_text("a", background_brightness=300)
