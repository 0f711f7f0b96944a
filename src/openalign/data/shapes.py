"""The built-in dataset: procedural images of coloured shapes with varied natural captions.

Each image shows one shape (a colour, a size, a place on a 3x3 grid) or, for a fraction of
images, two shapes side by side or one above the other. Captions are drawn from many templates
and mention different subsets of the attributes, like alt-text does; some leave the colour
out, so that matching them needs the shape, which is harder to see than the colour. Every image is generated
from its own seed ``(seed, split, index)``, so the dataset is identical on every machine.

On disk (the layout :mod:`openalign.data.karpathy` reads)::

    ROOT/dataset_shapes.json   Karpathy-style: images with split, captions and class labels
    ROOT/classnames.json       {"shape": [...], "colour": [...]}
    ROOT/images/{train,test}/NNNNNN.png

Test images carry five captions each (like COCO and Flickr30k); single-shape images carry
``labels`` {"shape", "colour"} for zero-shot and nearest-neighbour classification. Every image
also has a ``caption``: a terse, complete description standing in for a captioning model's
output (ALIP's synthetic captions). ``alt_text_noise`` replaces that share of the training
captions with realistic web noise: a fluent caption of another picture, a file name, or
unrelated text.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError, OpenAlignError
from ..progress import progress_bar

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215), "yellow": (240, 210, 30),
    "purple": (135, 50, 175), "orange": (245, 135, 20), "black": (15, 15, 15), "white": (245, 245, 245),
}
SIZES = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
POSITIONS = {  # grid cell (row, column) → how captions say it
    (0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner",
}
SINGLE_TEMPLATES = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {size} {colour} {shape} {position}",
    "a {colour} {shape} {position}",
    "{position}, a {colour} {shape}",
    "there is a {size} {shape} {position} and it is {colour}",
    "{colour} {shape} on a plain background",
    "an image of a {shape} coloured {colour}",
    "a {size} {shape}, {colour}, {position}",
    "the {shape} is {colour}",
    "simple drawing of a {size} {colour} {shape}",
    "a {shape}",
    "a drawing of a {shape}",
    "a {size} {shape} {position}",
    "a {shape} {position}",
    "a photo of a {shape}",
    "{position}, a {size} {shape}",
    "there is a {shape} {position}",
    "simple drawing of a {shape}",
)
PAIR_TEMPLATES = (
    "a {c1} {s1} {relation} a {c2} {s2}",
    "two shapes: a {c1} {s1} and a {c2} {s2}",
    "a {c1} {s1} next to a {c2} {s2}",
    "a picture with a {c1} {s1} {relation} a {c2} {s2}",
    "a {c2} {s2} and a {c1} {s1}",
)
NOISE_TEXTS = (  # alt-text that says nothing about the picture
    "free shipping on all orders", "click here to see more", "untitled", "stock photo", "best price guaranteed",
    "my holiday pictures 2019", "wallpaper hd download", "product image", "see description", "new arrivals",
    "photo by john", "home decor ideas", "thumbnail", "copyright all rights reserved",
)
_SPLIT_IDS = {"train": 0, "test": 1}
_SUPERSAMPLE = 4
MAX_IMAGE_SIZE = 1024  # drawn at 4x: a 4096-px canvas; larger would take gigabytes per image


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate: sizes of the splits, image side in pixels, seed, share of two-shape images,
    and the share of training captions replaced by web noise (``alt_text_noise``, for ALIP)."""

    num_train: int = 10000  # the demo's: a recipe with only data.train.root uses what 'data shapes' builds
    num_test: int = 500
    image_size: int = 48
    seed: int = 0
    pair_fraction: float = 0.25
    captions_per_test_image: int = 5
    alt_text_noise: float = 0.0

    def __post_init__(self) -> None:
        for name, least in (("num_train", 1), ("num_test", 1), ("captions_per_test_image", 1), ("image_size", 16)):
            if getattr(self, name) < least:
                raise ConfigError(f"must be at least {least}, got {getattr(self, name)}", name)
        if self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(f"must be at most {MAX_IMAGE_SIZE}, got {self.image_size}", "image_size")
        for name in ("alt_text_noise", "pair_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"must be a fraction in [0, 1], got {getattr(self, name)}", name)


def fix_articles(text: str) -> str:
    """'a orange' → 'an orange'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "cross":  # a plus sign: arms 0.4 r wide
        half = 0.2 * r
        outline = [(half, r), (half, half), (r, half), (r, -half), (half, -half), (half, -r),
                   (-half, -r), (-half, -half), (-r, -half), (-r, half), (-half, half), (-half, r)]
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline]
    if shape == "star":
        radii, count = [r if i % 2 == 0 else 0.45 * r for i in range(10)], 10
    else:
        count = {"triangle": 3, "square": 4, "diamond": 4}[shape]
        radii = [r] * count
    base = {"triangle": -math.pi / 2, "square": math.pi / 4, "diamond": 0.0, "star": -math.pi / 2}[shape]
    return [(cx + radii[i] * math.cos(base + angle + 2 * math.pi * i / count),
             cy + radii[i] * math.sin(base + angle + 2 * math.pi * i / count)) for i in range(count)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float,
                rng: np.random.Generator) -> None:
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    tilt = {"square": 0.17, "diamond": 0.17, "cross": 0.17, "triangle": 0.26}.get(shape, math.pi)
    draw.polygon(_polygon(shape, cx, cy, r, float(rng.uniform(-tilt, tilt))), fill=fill)


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """A plain grey of random brightness and tint, lit by a soft gradient (no pixel noise: it
    hides a small shape's edges from a tiny network far more than it adds realism)."""
    level = rng.uniform(95, 165) + rng.uniform(-12, 12, size=3)
    ramp = np.linspace(-1.0, 1.0, size * _SUPERSAMPLE)
    light = rng.uniform(-10, 10) * ramp[:, None] + rng.uniform(-10, 10) * ramp[None, :]
    pixels = np.clip(level[None, None, :] + light[:, :, None], 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _single(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, Any]]:
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    scale = ("small", "large")[rng.integers(2)]
    cell = (int(rng.integers(3)), int(rng.integers(3)))
    side = size * _SUPERSAMPLE
    radius = side * (rng.uniform(0.12, 0.15) if scale == "small" else rng.uniform(0.22, 0.26))
    cx = side * (0.24 + 0.26 * cell[1] + rng.uniform(-0.03, 0.03))
    cy = side * (0.24 + 0.26 * cell[0] + rng.uniform(-0.03, 0.03))
    image = _background(size, rng)
    _draw_shape(ImageDraw.Draw(image), shape, colour, cx, cy, radius, rng)
    return image, {"shape": shape, "colour": colour, "size": scale, "position": POSITIONS[cell]}


def _pair(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, Any]]:
    side = size * _SUPERSAMPLE
    picks = rng.choice(len(SHAPES) * len(COLOURS), size=2, replace=False)
    objects = [(SHAPES[p // len(COLOURS)], list(COLOURS)[p % len(COLOURS)]) for p in picks]
    horizontal = bool(rng.integers(2))
    image = _background(size, rng)
    draw = ImageDraw.Draw(image)
    for k, (shape, colour) in enumerate(objects):
        along, across = (0.27 if k == 0 else 0.73) + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.12, 0.12)
        cx, cy = (along, across) if horizontal else (across, along)
        _draw_shape(draw, shape, colour, side * cx, side * cy, side * rng.uniform(0.15, 0.19), rng)
    return image, {"objects": objects, "horizontal": horizontal}


def _single_caption(attrs: dict[str, Any], template: str, rng: np.random.Generator) -> str:
    size_word = SIZES[attrs["size"]][rng.integers(3)]
    return template.format(size=size_word, colour=attrs["colour"], shape=attrs["shape"], position=attrs["position"])


def _pair_caption(attrs: dict[str, Any], template: str, rng: np.random.Generator) -> str:
    (s1, c1), (s2, c2) = attrs["objects"]
    relation = "to the left of" if attrs["horizontal"] else "above"
    if rng.integers(2):  # say it from the second object's side
        (s1, c1), (s2, c2) = (s2, c2), (s1, c1)
        relation = "to the right of" if attrs["horizontal"] else "below"
    return template.format(c1=c1, s1=s1, c2=c2, s2=s2, relation=relation)


def synthetic_caption(attrs: dict[str, Any]) -> str:
    """What a good captioner would say: every attribute, tersely (the stand-in for ALIP's OFA captions)."""
    if "objects" in attrs:
        (s1, c1), (s2, c2) = attrs["objects"]
        return fix_articles(f"a {c1} {s1} {'to the left of' if attrs['horizontal'] else 'above'} a {c2} {s2}")
    return fix_articles(f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {attrs['position']}")


def noisy_alt_text(attrs: dict[str, Any], rng: np.random.Generator) -> str:
    """Web noise in place of a caption: wrong attributes, a file name, or unrelated text."""
    kind = rng.integers(3)
    if kind == 0:  # a fluent caption of some other picture
        wrong = {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": list(COLOURS)[rng.integers(len(COLOURS))],
                 "size": ("small", "large")[rng.integers(2)], "position": list(POSITIONS.values())[rng.integers(9)]}
        return fix_articles(_single_caption(wrong, SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))], rng))
    if kind == 1:
        number = int(rng.integers(1, 99999))
        return (f"IMG_{number:04d}.jpg", f"DSC{number:05d}.JPG", f"image ({number % 50}).png")[rng.integers(3)]
    return NOISE_TEXTS[rng.integers(len(NOISE_TEXTS))]


def generate_example(spec: ShapesSpec, split: str, index: int
                     ) -> tuple[Image.Image, list[str], dict[str, str] | None, str]:
    """One image, its captions, its class labels (None for two-shape images) and its synthetic
    caption. With ``alt_text_noise``, that share of the training captions is web noise (the test
    captions stay clean, so evaluation measures alignment)."""
    rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split], index])
    is_pair = rng.uniform() < spec.pair_fraction
    image, attrs = (_pair if is_pair else _single)(rng, spec.image_size)
    image = image.resize((spec.image_size,) * 2, Image.Resampling.LANCZOS)
    templates = PAIR_TEMPLATES if is_pair else SINGLE_TEMPLATES
    count = spec.captions_per_test_image if split == "test" else 1
    chosen = rng.choice(len(templates), size=count, replace=False)
    caption = _pair_caption if is_pair else _single_caption
    captions = [fix_articles(caption(attrs, templates[t], rng)) for t in chosen]
    labels = None if is_pair else {"shape": attrs["shape"], "colour": attrs["colour"]}
    noise_rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split], index, 1])  # leaves the draws above alone
    if split == "train" and spec.alt_text_noise:
        captions = [noisy_alt_text(attrs, noise_rng) if noise_rng.uniform() < spec.alt_text_noise else caption
                    for caption in captions]
    return image, captions, labels, synthetic_caption(attrs)


def build_shapes_dataset(root: str | Path, spec: ShapesSpec = ShapesSpec(), show_progress: bool = True) -> Path:
    """Write the dataset under ``root`` and return the path of its Karpathy JSON.

    An existing dataset with the same spec is reused; one with another spec is an error rather
    than being overwritten. The JSON is written last, so its presence marks a complete dataset.
    """
    root = Path(root)
    index_path = root / "dataset_shapes.json"
    if index_path.is_file():
        existing = json.loads(index_path.read_text()).get("spec")
        if isinstance(existing, dict) and {**asdict(ShapesSpec()), **existing} == asdict(spec):
            return index_path
        differ = {key: value for key, value in existing.items() if asdict(spec).get(key) != value} \
            if isinstance(existing, dict) else {}
        use = " ".join(f"data.train.{key}={value}" for key, value in differ.items())
        raise OpenAlignError(f"'{root}' already holds a shapes dataset built with {existing}, not {asdict(spec)}: "
                             f"to use it, set {use or 'its settings'} (a recipe's keys; 'data shapes' takes "
                             "--num-train, --num-test, --image-size, --alt-text-noise, --seed), or choose another "
                             "directory, or delete that one")
    images, sentence_id = [], 0
    total = spec.num_train + spec.num_test
    with progress_bar("building the shapes dataset", total, enabled=show_progress) as advance:
        for split, count in (("train", spec.num_train), ("test", spec.num_test)):
            folder = root / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image, captions, labels, synthetic = generate_example(spec, split, index)
                filename = f"{index:06d}.png"
                image.save(folder / filename)
                sentences = [{"raw": c, "tokens": c.replace(",", "").split(), "imgid": len(images),
                              "sentid": sentence_id + k} for k, c in enumerate(captions)]
                images.append({"filepath": f"images/{split}", "filename": filename, "imgid": len(images),
                               "split": split, "sentids": [s["sentid"] for s in sentences],
                               "sentences": sentences, "labels": labels, "caption": synthetic})
                sentence_id += len(captions)
                advance()
    (root / "classnames.json").write_text(json.dumps({"shape": list(SHAPES), "colour": list(COLOURS)}, indent=1))
    index_path.write_text(json.dumps({"dataset": "shapes", "spec": asdict(spec), "images": images}))
    return index_path
