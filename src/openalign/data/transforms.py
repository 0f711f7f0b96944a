"""Image preprocessing: PIL image → normalised float tensor (3, H, W)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..config import require_at_least
from ..errors import ConfigError
from .randaugment import rand_augment

_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


@dataclass
class PreprocessConfig:
    """Image preprocessing that travels with the weights (shared spec align-coyo-and-hf.md §3.5).

    Train: squash-resize to ``resize_size``, random ``image_size`` crop, optional horizontal
    flip. Eval: the same resize, then a centre crop. Its offset, where the margin is odd, is
    ``center_crop: round``: ``round(margin / 2)``, torchvision's ``CenterCrop`` (open_clip, CLIP),
    or ``floor``: ``margin // 2``, transformers' image processors (``AlignProcessor``; Hugging Face
    directories load with it). They differ by a pixel where ``margin / 2`` rounds up (an odd
    margin ``4k + 3``, such as 292 → 289); ALIGN's 346 → 289 is the same either way.
    ``resize_mode: shortest`` resizes the shorter side to ``resize_size`` keeping the aspect
    ratio instead (CLIP's and ALIP's evaluation: bicubic 224, centre crop 224).
    Pixels are then mapped by ``(x / 255 - mean) / std``; ALIGN's 0.5/0.5 gives [-1, 1].

    ``random_area`` (training only) replaces the resize and crop by a random-area crop of the
    image, as DALI's ``image_random_crop`` and torchvision's ``RandomResizedCrop`` take it (ALIP:
    area [0.7, 1] of the image, aspect ``random_aspect`` [0.8, 1.25] drawn log-uniformly, up to 100
    tries, else the whole image cut to the nearest allowed aspect), squashed to ``image_size``
    with ``train_interpolation`` (default: ``interpolation``).
    ``antialias``: where a shrinking resize antialiases. ``eval`` (ALIGN): COYO-ALIGN trained on
    ``tf.image.resize``, which does not, and ``AlignProcessor`` evaluates with torchvision's,
    which does; ``never`` (CLIPPO: big_vision's ``resize``); ``always`` (ALIP: DALI and PIL).
    ``jpeg_draft``: whether training decodes a large JPEG at a reduced scale (:class:`ImageTransform`);
    by default (null) only where training's resize antialiases (not nearest). Scaled decoding averages pixels,
    so before a resize that does not antialias (ALIGN's ``tf.image.resize``, CLIPPO's) it would
    blur what the reference training aliases: set ``true`` there to trade that for decoding speed.
    ``resize_rounding``: how the resized pixels become 8-bit again. ``round`` (default): to the
    nearest level, as torchvision's uint8 resize and ``AlignProcessor`` do; ``floor``: the resize
    in float, then truncated, as big_vision's ``resize`` casts its result back to uint8 (CLIPPO,
    spec clippo.md §4; rounding would make half the pixels one level brighter); bilinear or nearest
    only (torch's float bicubic is not torchvision's uint8 one).
    ``rand_augment: [N, M]`` (training only): after the crop and flip, ``N`` RandAugment operations
    at magnitude ``M`` (0-10) on the 8-bit image, as big_vision's ``randaug(N, M)``
    (:mod:`openalign.data.randaugment`; CLIPPO's COCO recipe: ``[2, 10]``).
    """

    image_size: int = 289
    resize_size: int = 346
    resize_mode: Literal["squash", "shortest"] = "squash"
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    random_flip: bool = True
    center_crop: Literal["round", "floor"] = "round"
    antialias: Literal["eval", "never", "always"] = "eval"
    random_area: tuple[float, float] | None = None
    random_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    train_interpolation: Literal["nearest", "bilinear", "bicubic"] | None = None
    jpeg_draft: bool | None = None
    resize_rounding: Literal["round", "floor"] = "round"
    rand_augment: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        require_at_least(self, 1, "image_size")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"must give 3 values (red, green, blue), got {list(getattr(self, name))}", name)
        if min(self.std) <= 0:
            raise ConfigError(f"must be positive (pixels are divided by it), got {list(self.std)}", "std")
        if self.resize_size < self.image_size:
            raise ConfigError(f"must be at least image_size ({self.image_size}) so the crop fits", "resize_size")
        if self.resize_rounding == "floor" and "bicubic" in (self.interpolation, self.train_interpolation):
            raise ConfigError("floor works with bilinear and nearest resizing, not bicubic (torch's float bicubic "
                              "weighs pixels differently from torchvision's uint8 one)", "resize_rounding")
        for name, upper in (("random_area", 1.0), ("random_aspect", math.inf)):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or not 0 < value[0] <= value[1] <= upper):
                raise ConfigError(f"must be [low, high] with 0 < low <= high{' <= 1' if upper == 1 else ''}, "
                                  f"got {list(value)}", name)
        if self.rand_augment is not None:
            layers, magnitude = self.rand_augment if len(self.rand_augment) == 2 else (None, None)
            if not (isinstance(layers, int) and layers >= 0 and isinstance(magnitude, (int, float))
                    and 0 <= magnitude <= 10):
                raise ConfigError(f"must be [N, M]: N operations (0 or more) at magnitude M (0-10), as big_vision's "
                                  f"randaug(2, 10); got {list(self.rand_augment)}", "rand_augment")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG of one pass's order. Seeds stay within 63 bits however large ``seed`` grows (a
    stream resumed on other ranks or workers several times is reseeded each time)."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) % (2**63))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The RNG of one sample's augmentation (and caption choice): a pure function of its position."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63))


class ImageTransform:
    """ALIGN's preprocessing (shared spec align-coyo-and-hf.md §3.5), set by a :class:`PreprocessConfig`.

    Squash-resize to ``resize_size`` (aspect ratio not kept; torchvision's resize of the uint8
    image, antialiased in evaluation exactly as ``transformers``' ``AlignProcessor`` does it and,
    by default, not in training, as COYO's ``tf.image.resize``: ``antialias``), then a random crop
    and flip in training or a centre crop in eval (``PreprocessConfig.center_crop``), then
    ``x * (1 / (255 std)) - mean / std`` (ALIGN: ``x / 127.5 - 1``). Training randomness comes
    from ``generator``, so a sample's augmentation can be replayed exactly on resume.

    In training with ``jpeg_draft`` (by default where the resize antialiases: ALIP), a JPEG at
    least twice the resize in both sides is decoded at a reduced scale (PIL's draft mode:
    libjpeg's scaled IDCT by 1/2, 1/4 or 1/8, never below the resize), which before an
    antialiasing resize changes pixels by resampling noise only and saves most of the decoding
    time of large web images. Evaluation decodes in full, exactly as ``AlignProcessor`` does.
    """

    def __init__(self, config: PreprocessConfig, train: bool) -> None:
        self.config = config
        self.train = train
        std = np.asarray(config.std, dtype=np.float64)
        self.scale = torch.tensor(1.0 / (255.0 * std), dtype=torch.float32).view(3, 1, 1)
        self.offset = torch.tensor(np.asarray(config.mean) / std, dtype=torch.float32).view(3, 1, 1)
        self.antialias = config.antialias == "always" or (config.antialias == "eval" and not train)
        self.interpolation = _INTERPOLATION[(config.train_interpolation if train else None) or config.interpolation]
        self.draft_size = _draft_size(config)
        antialiases = self.antialias and self.interpolation != InterpolationMode.NEAREST_EXACT  # nearest never does
        self.draft = train and (antialiases if config.jpeg_draft is None else config.jpeg_draft)

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor, generator: torch.Generator | None = None,
                 encoded: bytes | None = None) -> torch.Tensor:
        """The preprocessed image: a PIL image, or 8-bit pixels (a ``(H, W[, C])`` array or a
        ``(C, H, W)`` tensor, as torchvision decodes). ``encoded``, the bytes ``image`` was opened
        from, lets an RGB or grayscale JPEG that draft mode would not shrink be decoded by
        torchvision's libjpeg-turbo decoder instead of PIL's: the same pixels, bit for bit, in
        three quarters of the time."""
        cfg = self.config
        if not isinstance(image, Image.Image):
            image = _from_pixels(image)
        if self._torchvision_decodes(image, encoded):
            pixels = _jpeg_decoder()(encoded)
        else:
            if self.draft and getattr(image, "format", None) == "JPEG":
                image.draft(image.mode, (self.draft_size, self.draft_size))  # a no-op once decoded or small
            image = to_rgb(image)
            pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        if self.train and cfg.random_area is not None:
            top, left, height, width = random_area_box(pixels.shape[1], pixels.shape[2], cfg.random_area,
                                                       cfg.random_aspect, generator)
            pixels = self._resize(pixels[:, top:top + height, left:left + width], [cfg.image_size, cfg.image_size])
            return self._flip_and_normalise(pixels, generator)
        # torchvision's resize of the uint8 image, as transformers' AlignProcessor does it
        size = [cfg.resize_size] if cfg.resize_mode == "shortest" else [cfg.resize_size, cfg.resize_size]
        pixels = self._resize(pixels, size)
        span_h, span_w = pixels.shape[1] - cfg.image_size, pixels.shape[2] - cfg.image_size
        if not self.train:  # centred: torchvision's CenterCrop rounds the offset, transformers' floors it
            top, left = (span // 2 if cfg.center_crop == "floor" else round(span / 2) for span in (span_h, span_w))
        elif span_h == span_w:  # one draw of both offsets (squash: the crops of earlier releases)
            top, left = (int(v) for v in torch.randint(0, span_h + 1, (2,), generator=generator))
        else:
            top, left = (int(torch.randint(0, span + 1, (), generator=generator)) for span in (span_h, span_w))
        return self._flip_and_normalise(pixels[:, top:top + cfg.image_size, left:left + cfg.image_size], generator)

    def _resize(self, pixels: torch.Tensor, size: list[int]) -> torch.Tensor:
        if self.config.resize_rounding == "round":  # torchvision's uint8 resize rounds
            return TF.resize(pixels, size, interpolation=self.interpolation, antialias=self.antialias)
        resized = TF.resize(pixels.float(), size, interpolation=self.interpolation, antialias=self.antialias)
        return resized.clamp_(0, 255).to(torch.uint8)  # truncates, as tf.cast does

    def _flip_and_normalise(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.train and self.config.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            pixels = pixels.flip(-1)
        if self.train and self.config.rand_augment is not None:
            pixels = rand_augment(pixels, *self.config.rand_augment, generator=generator)
        return pixels.float().mul_(self.scale).sub_(self.offset)

    def _torchvision_decodes(self, image: Image.Image, encoded: bytes | None) -> bool:
        if encoded is None or getattr(image, "format", None) != "JPEG" or image.mode not in ("RGB", "L"):
            return False
        if _jpeg_decoder() is None:
            return False
        size = self.draft_size  # draft mode shrinks by 2 or more when both sides allow it
        return not (self.draft and min(image.size[0] // size, image.size[1] // size) >= 2)


@functools.cache
def _jpeg_decoder() -> Callable[[bytes], torch.Tensor] | None:
    """torchvision's libjpeg-turbo decoder (bytes → (3, H, W) uint8), or None where this
    torchvision has none: torchvision 0.29 deprecates its image decoding for TorchCodec's, and
    PIL decodes the same pixels (a quarter slower)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return lambda encoded: decode_jpeg(torch.frombuffer(bytearray(encoded), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _draft_size(cfg: PreprocessConfig) -> int:
    """The side a training JPEG may be decoded down to: the resize, or with ``random_area``, the
    smallest image whose smallest allowed crop still covers ``image_size``."""
    if cfg.random_area is None:
        return cfg.resize_size
    return math.ceil(cfg.image_size * math.sqrt(max(cfg.random_aspect[1], 1 / cfg.random_aspect[0])
                                                / cfg.random_area[0]))


def random_area_box(height: int, width: int, area: tuple[float, float], aspect: tuple[float, float],
                    generator: torch.Generator | None = None, attempts: int = 100) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop covering a share ``area`` of the image with
    aspect ratio (width / height) in ``aspect``, drawn log-uniformly; after ``attempts`` crops that
    do not fit, the whole image cut to the nearest allowed aspect ratio, centred (DALI's and
    torchvision's ``RandomResizedCrop`` procedure)."""
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(attempts):
        share, slant = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = height * width * (area[0] + (area[1] - area[0]) * share)
        ratio = math.exp(log_low + (log_high - log_low) * slant)
        crop_w, crop_h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
            return top, left, crop_h, crop_w
    ratio = width / height
    crop_h, crop_w = height, width
    if ratio < aspect[0]:
        crop_h = max(1, round(width / aspect[0]))
    elif ratio > aspect[1]:
        crop_w = max(1, round(height * aspect[1]))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _from_pixels(pixels: object) -> Image.Image:
    """A PIL image of 8-bit pixels: a ``(H, W)``, ``(H, W, 1|3|4)`` array or a ``(1|3, H, W)`` tensor."""
    if isinstance(pixels, torch.Tensor):
        if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
            raise TypeError(f"preprocess takes a tensor image as uint8 (C, H, W) with 1 or 3 channels, as torchvision "
                            f"decodes it; got {str(pixels.dtype).removeprefix('torch.')} {tuple(pixels.shape)}")
        pixels = pixels.permute(1, 2, 0).cpu().numpy()
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"preprocess takes a PIL image, a uint8 array (H, W, C) or a uint8 tensor (C, H, W); "
                        f"got {type(pixels).__name__} (open a file with PIL.Image.open)")
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or pixels.ndim == 3 and pixels.shape[2] in (1, 3, 4)):
        raise TypeError(f"preprocess takes an array image as uint8 (H, W) or (H, W, 1|3|4); got {pixels.dtype} "
                        f"{pixels.shape}")
    return Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in 8-bit RGB. PIL's own conversion clips 16-bit and float pixels to 0-255 (a
    16-bit PNG turns nearly white, a float TIFF of 0-1 black); they are scaled instead: 16-bit
    integers by 255/65535 (an ``I`` image only when its values exceed 255, as PIL opens some
    16-bit PNGs so), floats from 0-1 when they lie within it, else clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values * (255 / 65535)
        elif image.mode == "F" and values.min(initial=0) >= 0 and values.max(initial=0) <= 1:
            values = values * 255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")
