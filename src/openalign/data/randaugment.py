"""RandAugment as big_vision's ``randaug(N, M)`` applies it (CLIPPO's COCO recipe: ``randaug(2, 10)``).

big_vision's op is the TensorFlow EfficientNet ``distort_image_with_randaugment``: each of ``N``
layers picks one of 16 operations uniformly and always applies it (the per-layer probability it
draws is never used), at the shared magnitude ``M`` of 10, on the 8-bit image after the resize
and flip. The operations and their arguments at magnitude ``M``:

========================  =====================================================================
AutoContrast              each channel stretched to 0-255 (unchanged where it is flat)
Equalize                  each channel's histogram equalised (PIL's ``ImageOps.equalize``)
Invert                    ``255 - x``
Rotate                    ``M/10 * 30`` degrees about the centre, sign drawn
Posterize                 the low ``8 - int(M/10 * 4)`` bits cleared (4 at M = 10; at most 7, as
                          TensorFlow clamps a shift by the type's width)
Solarize                  pixels at or above ``int(M/10 * 256)`` inverted; the threshold is cast to
                          uint8 as TensorFlow casts it, so at M = 10 (256, cast to 0) every pixel
                          is (big_vision issue #110)
SolarizeAdd               ``int(M/10 * 110)`` added to pixels below 128, clipped
Color, Contrast,          blended with their grey, mean-grey, black and smoothed versions by the
Brightness, Sharpness     factor ``M/10 * 1.8 + 0.1`` (1.9 at M = 10: pushed away from them)
ShearX, ShearY            ``M/10 * 0.3``, about the top-left corner, sign drawn
TranslateX, TranslateY    ``M/10 * 100`` pixels (whatever the image size), sign drawn
Cutout                    a square of side ``2 * int(M/10 * 40)`` centred at a random pixel
========================  =====================================================================

Geometric operations sample the nearest pixel and fill what they uncover with grey (128), as
``tfa.image.transform`` does. Grey is ``tf.image.rgb_to_grayscale``'s (luma, truncated as
``convert_image_dtype`` truncates), and AutoContrast scales in float32, as TensorFlow's
``to_float``: PIL's versions of both differ by a level on some pixels. One deliberate
difference: TensorFlow's ``contrast`` blends with a constant of ``pixels / 256`` (its
histogram's *count* over 256 bins, not its mean: 196 for any 224x224 image) where PIL's
``ImageEnhance.Contrast``, which it says it reproduces, blends with the mean grey level; this
one blends with the mean grey level (PIL's behaviour, of the grey above).
All randomness comes from the ``generator`` given, so a sample's augmentation replays on resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

MAX_LEVEL = 10
FILL = 128
_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # PIL's ImageFilter.SMOOTH


def rand_augment(pixels: torch.Tensor, num_layers: int, magnitude: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``pixels`` (uint8, (3, H, W)) through ``num_layers`` operations drawn uniformly from
    :data:`OPERATIONS`, each at ``magnitude`` (0-10)."""
    for _ in range(num_layers):
        operation = _OPERATION_LIST[int(torch.randint(len(_OPERATION_LIST), (), generator=generator))]
        pixels = operation(pixels, magnitude / MAX_LEVEL, generator)
    return pixels


def blend(degenerate: torch.Tensor, image: torch.Tensor, factor: float) -> torch.Tensor:
    """``degenerate + factor * (image - degenerate)``, clipped to 0-255 and truncated to uint8
    (factor 0: ``degenerate``; 1: ``image``; above 1 it pushes ``image`` away from ``degenerate``)."""
    mixed = degenerate.float() + factor * (image.float() - degenerate.float())
    return mixed.clamp_(0, 255).to(torch.uint8)


def autocontrast(pixels: torch.Tensor) -> torch.Tensor:
    """Each channel stretched to 0-255, in float32 as TensorFlow's (PIL's float64 differs by a
    level on the few pixels whose product lands just below an integer)."""
    low = pixels.amin(dim=(1, 2), keepdim=True).float()
    high = pixels.amax(dim=(1, 2), keepdim=True).float()
    scale = 255.0 / (high - low).clamp(min=1)
    stretched = (pixels.float() * scale - low * scale).clamp_(0, 255).to(torch.uint8)
    return torch.where(high > low, stretched, pixels)


def equalize(pixels: torch.Tensor) -> torch.Tensor:
    channels = []
    for channel in pixels:
        histogram = torch.bincount(channel.reshape(-1).long(), minlength=256)
        used = histogram[histogram > 0]
        step = int(used.sum() - used[-1]) // 255
        if step == 0:
            channels.append(channel)
            continue
        table = (torch.cumsum(histogram, 0) + step // 2) // step
        table = torch.cat([table.new_zeros(1), table[:-1]]).clamp_(0, 255)
        channels.append(table[channel.long()].to(torch.uint8))
    return torch.stack(channels)


def grey(pixels: torch.Tensor) -> torch.Tensor:
    """The luma of ``pixels`` as ``tf.image.rgb_to_grayscale`` computes it for uint8 (weights
    0.2989, 0.587, 0.114 on values / 255, then ``convert_image_dtype``'s ``trunc(x * 255.5)``), as
    three equal uint8 channels."""
    weights = torch.tensor([0.2989, 0.5870, 0.1140]).view(3, 1, 1)
    luma = (pixels.float() / 255 * weights).sum(dim=0) * 255.5
    return luma.to(torch.uint8).expand(3, -1, -1).clone()


def sharpen_source(pixels: torch.Tensor) -> torch.Tensor:
    """``pixels`` smoothed with PIL's 3x3 SMOOTH kernel, truncated to uint8; the border kept as it is."""
    smoothed = F.conv2d(pixels.float()[:, None], _SMOOTH.view(1, 1, 3, 3))[:, 0]
    result = pixels.clone()
    result[:, 1:-1, 1:-1] = smoothed.clamp_(0, 255).to(torch.uint8)
    return result


def warp(pixels: torch.Tensor, matrix: tuple[float, float, float, float, float, float]) -> torch.Tensor:
    """``pixels`` sampled at ``(a0 x + a1 y + a2, b0 x + b1 y + b2)`` for each output pixel
    ``(x, y)`` (``matrix = (a0, a1, a2, b0, b1, b2)``), nearest pixel, grey (128) outside the image:
    ``tfa.image.transform``'s projective transform without the perspective terms, in float32 and
    rounding halves away from zero (``std::round``) as its kernel does."""
    height, width = pixels.shape[1:]
    a0, a1, a2, b0, b1, b2 = (torch.tensor(value, dtype=torch.float32) for value in matrix)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    source_x = _round_half_away(a0 * x + a1 * y + a2)
    source_y = _round_half_away(b0 * x + b1 * y + b2)
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    sampled = pixels[:, source_y.clamp(0, height - 1), source_x.clamp(0, width - 1)]
    return torch.where(inside, sampled, torch.full_like(sampled, FILL))


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    return (torch.sign(values) * torch.floor(values.abs() + 0.5)).long()


def rotate(pixels: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotated by ``degrees`` (counter-clockwise on screen for positive) about the image's centre."""
    height, width = pixels.shape[1:]
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2
    y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2
    return warp(pixels, (cos, -sin, x_offset, sin, cos, y_offset))


def cutout(pixels: torch.Tensor, half: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``2 half`` square (cut at the border) centred at a random pixel, filled with grey."""
    height, width = pixels.shape[1:]
    top = int(torch.randint(height, (), generator=generator))
    left = int(torch.randint(width, (), generator=generator))
    result = pixels.clone()
    result[:, max(0, top - half):top + half, max(0, left - half):left + half] = FILL
    return result


def _signed(value: float, generator: torch.Generator | None) -> float:
    return value if bool(torch.rand((), generator=generator) < 0.5) else -value


def _enhance(level: float) -> float:
    return level * 1.8 + 0.1


def _contrast(pixels: torch.Tensor, level: float, generator: torch.Generator | None) -> torch.Tensor:
    mean = int(grey(pixels)[0].double().mean().item() + 0.5)  # PIL's ImageEnhance.Contrast, of TensorFlow's grey
    return blend(torch.full_like(pixels, mean), pixels, _enhance(level))


def _posterize(pixels: torch.Tensor, bits: int) -> torch.Tensor:
    shift = min(8 - bits, 7)  # TensorFlow clamps a shift to the type's width less one
    return pixels >> shift << shift


def _solarize_add(pixels: torch.Tensor, level: float, generator: torch.Generator | None) -> torch.Tensor:
    added = (pixels.int() + int(level * 110)).clamp_(0, 255).to(torch.uint8)
    return torch.where(pixels < 128, added, pixels)


Operation = Callable[[torch.Tensor, float, "torch.Generator | None"], torch.Tensor]  # (pixels, level, generator)

# big_vision's operations in its order, so that an index drawn picks the same one; level is M / 10
OPERATIONS: dict[str, Operation] = {
    "AutoContrast": lambda pixels, level, generator: autocontrast(pixels),
    "Equalize": lambda pixels, level, generator: equalize(pixels),
    "Invert": lambda pixels, level, generator: 255 - pixels,
    "Rotate": lambda pixels, level, generator: rotate(pixels, _signed(level * 30, generator)),
    "Posterize": lambda pixels, level, generator: _posterize(pixels, int(level * 4)),
    "Solarize": lambda pixels, level, generator: torch.where(pixels < int(level * 256) % 256, pixels, 255 - pixels),
    "Color": lambda pixels, level, generator: blend(grey(pixels), pixels, _enhance(level)),
    "Contrast": _contrast,
    "Brightness": lambda pixels, level, generator: blend(torch.zeros_like(pixels), pixels, _enhance(level)),
    "Sharpness": lambda pixels, level, generator: blend(sharpen_source(pixels), pixels, _enhance(level)),
    "ShearX": lambda pixels, level, generator: warp(pixels, (1.0, _signed(level * 0.3, generator), 0, 0, 1.0, 0)),
    "ShearY": lambda pixels, level, generator: warp(pixels, (1.0, 0, 0, _signed(level * 0.3, generator), 1.0, 0)),
    "TranslateX": lambda pixels, level, generator: warp(pixels, (1.0, 0, _signed(level * 100, generator), 0, 1.0, 0)),
    "TranslateY": lambda pixels, level, generator: warp(pixels, (1.0, 0, 0, 0, 1.0, _signed(level * 100, generator))),
    "Cutout": lambda pixels, level, generator: cutout(pixels, int(level * 40), generator),
    "SolarizeAdd": _solarize_add,
}
_OPERATION_LIST = tuple(OPERATIONS.values())
