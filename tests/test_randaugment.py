"""RandAugment (big_vision's randaug): pixel operations against PIL's, geometry by hand and against torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageEnhance, ImageOps

from openalign.data.randaugment import OPERATIONS, cutout, grey, rand_augment, rotate, warp
from openalign.data.transforms import ImageTransform, PreprocessConfig
from openalign.errors import ConfigError
from openalign.recipe import load_recipe


def _photo(height: int = 48, width: int = 56, seed: int = 0) -> torch.Tensor:
    """Smooth gradients plus noise, in a narrowed range (so that autocontrast has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 3, y * 2, (x + y) * 1.5]) + rng.integers(0, 40, (3, height, width))
    return torch.from_numpy((30 + base % 170).astype(np.uint8))


def _pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _op(name: str, pixels: torch.Tensor, magnitude: float = 10, seed: int = 0) -> torch.Tensor:
    return OPERATIONS[name](pixels, magnitude / 10, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, reference", [
    ("Equalize", ImageOps.equalize),
    ("Invert", ImageOps.invert),
])
def test_pixel_operations_equal_pils(name, reference):
    pixels = _photo()
    assert torch.equal(_op(name, pixels), _tensor(reference(_pil(pixels))))


def test_autocontrast_is_pils_in_float32():
    """TensorFlow scales in float32, PIL in float64: a level apart where the product lands just under an integer."""
    pixels = _photo()
    difference = (_op("AutoContrast", pixels).int() - _tensor(ImageOps.autocontrast(_pil(pixels))).int()).abs()
    assert difference.max() <= 1 and difference.float().mean() < 0.01
    flat = torch.full((3, 4, 4), 77, dtype=torch.uint8)
    assert torch.equal(_op("AutoContrast", flat), flat)  # nothing to stretch


def test_grey_is_tensorflows_rgb_to_grayscale_for_uint8():
    pixels = torch.tensor([[[0, 255, 10, 200]], [[0, 255, 20, 100]], [[0, 255, 30, 50]]], dtype=torch.uint8)
    # (0.2989 r + 0.587 g + 0.114 b) / 255, then convert_image_dtype's trunc(x * 255.5)
    expected = [int((0.2989 * r + 0.587 * g + 0.114 * b) / 255 * 255.5) for r, g, b in
                [(0, 0, 0), (255, 255, 255), (10, 20, 30), (200, 100, 50)]]
    assert grey(pixels)[0, 0].tolist() == expected == [0, 255, 18, 124]


def test_posterize_solarize_and_solarize_add_by_hand():
    pixels = _photo()
    assert torch.equal(_op("Posterize", pixels, 10), _tensor(ImageOps.posterize(_pil(pixels), 4)))
    assert torch.equal(_op("Posterize", pixels, 2), pixels >> 7 << 7)  # 0 bits: TensorFlow clamps the shift to 7
    assert torch.equal(_op("Solarize", pixels, 5), _tensor(ImageOps.solarize(_pil(pixels), 128)))
    # the threshold 256 cast to uint8 is 0, as TensorFlow casts it: every pixel is inverted (big_vision #110)
    assert torch.equal(_op("Solarize", pixels, 10), 255 - pixels)
    expected = np.where(pixels.numpy() < 128, np.minimum(pixels.numpy().astype(int) + 110, 255), pixels.numpy())
    assert np.array_equal(_op("SolarizeAdd", pixels).numpy(), expected)


@pytest.mark.parametrize("name, enhancer", [("Color", ImageEnhance.Color), ("Contrast", ImageEnhance.Contrast),
                                            ("Brightness", ImageEnhance.Brightness),
                                            ("Sharpness", ImageEnhance.Sharpness)])
@pytest.mark.parametrize("magnitude", [3, 10])
def test_enhance_operations_equal_pils_to_rounding(name, enhancer, magnitude):
    """PIL rounds where TensorFlow truncates, and its grey is ITU-R 601 in integers: within 2 levels."""
    pixels = _photo()
    factor = magnitude / 10 * 1.8 + 0.1
    expected = _tensor(enhancer(_pil(pixels)).enhance(factor)).int()
    difference = (_op(name, pixels, magnitude).int() - expected).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.75


def test_translations_and_shears_by_hand():
    pixels = torch.arange(3 * 20 * 30, dtype=torch.int64).view(3, 20, 30).remainder(200).to(torch.uint8)
    moved = warp(pixels, (1.0, 0, 7, 0, 1.0, 0))  # the content moves 7 pixels left; grey comes in on the right
    assert torch.equal(moved[:, :, :23], pixels[:, :, 7:]) and (moved[:, :, 23:] == 128).all()
    moved = warp(pixels, (1.0, 0, 0, 0, 1.0, -4))  # 4 pixels down
    assert torch.equal(moved[:, 4:], pixels[:, :16]) and (moved[:, :4] == 128).all()
    sheared = warp(pixels, (1.0, 0.3, 0, 0, 1.0, 0))  # row y samples x + 0.3 y, nearest
    for y in (0, 5, 19):
        for x in (0, 10, 23, 29):
            source = int(np.floor(x + 0.3 * y + 0.5))
            expected = pixels[:, y, source] if source < 30 else torch.full((3,), 128, dtype=torch.uint8)
            assert torch.equal(sheared[:, y, x], expected)
    # TensorFlow's float32 and std::round: at row 5, -0.3 * 5 is -1.50000006, and column 1 samples -0.5000001,
    # which rounds to -1 (outside: grey), where float64 and floor(x + 0.5) would take column 0
    assert torch.equal(warp(pixels, (1.0, -0.3, 0, 0, 1.0, 0))[:, 5, 1], torch.full((3,), 128, dtype=torch.uint8))
    signs = {int(_op("TranslateX", pixels, 1, seed)[0, 0, 0]) for seed in range(20)}  # 10 pixels, either way
    assert signs == {int(pixels[0, 0, 10]), 128}


def test_rotation_is_about_the_centre():
    pixels = _photo(32, 32)
    quarter = rotate(pixels, 90)
    assert torch.equal(quarter, torch.rot90(pixels, 1, dims=(1, 2))) or torch.equal(
        quarter, torch.rot90(pixels, -1, dims=(1, 2)))
    for degrees in (30, -30):  # torchvision's nearest rotation with grey fill, to the odd pixel on a rounding edge
        expected = TF.rotate(pixels, degrees, interpolation=TF.InterpolationMode.NEAREST, fill=[128.0] * 3)
        assert (rotate(pixels, degrees) != expected).any(dim=0).float().mean() < 0.03


def test_cutout_greys_a_square_about_a_drawn_pixel():
    pixels = _photo(120, 130)
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        top, left = int(torch.randint(120, (), generator=generator)), int(torch.randint(130, (), generator=generator))
        out = cutout(pixels, 40, torch.Generator().manual_seed(seed))
        expected = pixels.clone()
        expected[:, max(0, top - 40):top + 40, max(0, left - 40):left + 40] = 128
        assert torch.equal(out, expected)


def test_rand_augment_applies_the_drawn_operations_and_replays():
    pixels = _photo()
    assert torch.equal(rand_augment(pixels, 0, 10, torch.Generator().manual_seed(0)), pixels)
    names = list(OPERATIONS)
    chosen = set()
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        name = names[int(torch.randint(len(names), (), generator=generator))]
        chosen.add(name)
        assert torch.equal(rand_augment(pixels, 1, 10, torch.Generator().manual_seed(seed)),
                           OPERATIONS[name](pixels, 1.0, generator))  # always applied, at the magnitude given
    assert len(chosen) >= 12
    twice = rand_augment(pixels, 2, 10, torch.Generator().manual_seed(3))
    assert torch.equal(twice, rand_augment(pixels, 2, 10, torch.Generator().manual_seed(3)))


def test_the_transform_augments_in_training_only_and_the_config_is_checked():
    image = _pil(_photo(64, 64))
    config = PreprocessConfig(image_size=48, resize_size=56, rand_augment=(2, 10))
    plain = PreprocessConfig(image_size=48, resize_size=56)
    train, reference = ImageTransform(config, train=True), ImageTransform(plain, train=True)
    outputs = [train(image, torch.Generator().manual_seed(seed)) for seed in range(4)]
    assert all(not torch.equal(out, reference(image, torch.Generator().manual_seed(seed)))
               for seed, out in enumerate(outputs))
    assert torch.equal(outputs[1], train(image, torch.Generator().manual_seed(1)))  # replayable on resume
    assert torch.equal(ImageTransform(config, train=False)(image), ImageTransform(plain, train=False)(image))
    for bad in ((2,), (2, 11), (-1, 5)):
        with pytest.raises(ConfigError, match=r"rand_augment.*must be \[N, M\]"):
            PreprocessConfig(rand_augment=bad)
    assert load_recipe("clippo-b16-coco").model.preprocess.rand_augment == (2, 10)  # big_vision's COCO recipe
