"""CLIPPO: one Vision Transformer for images and for text rendered as images (shared spec clippo.md §2).

The text "tokenizer" renders each string with GNU Unifont into an image of the same size as
the pictures (:class:`~openalign.data.render.TextRenderer`), and the same encoder, pooling head
and projection embed both: there are no modality tokens and no separate parameters.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.render import TextRenderer, check_render_settings, missing_font_error, resolve_font_paths
from ..data.tokenizer import TextBatch
from ..data.transforms import ImageTransform, PreprocessConfig
from ..errors import ConfigError, OpenAlignError
from .base import ContrastiveModel, ImageTowerConfig, ModelConfig, image_input, text_fields
from .dual_encoder import MAX_TEMPERATURE, MIN_TEMPERATURE

_TIMM_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # what timm saves


@dataclass
class RenderConfig:
    """How text is rendered (spec §1.1; big_vision's ``render_unifont`` defaults). ``font_path``:
    Unifont ``.hex`` file(s); None means ``$OPENALIGN_UNIFONT``, else Debian's
    ``/usr/share/unifont/unifont.hex``. The image size is the model's ``preprocess.image_size``."""

    font_size: int = 16
    lower: bool = True
    text_brightness: int = 0
    background_brightness: int = 127
    max_chars: int | None = 768
    font_path: str | list[str] | None = None


@dataclass
class ClippoConfig(ModelConfig, tag="one_tower"):
    """One image encoder (``encoder``, a ViT in the paper) for both modalities, a linear ``head``
    to ``embed_dim``, and a learnable logit scale initialised to ``logit_scale_init`` (CLIPPO: 10)."""

    encoder: ImageTowerConfig
    embed_dim: int = 768
    logit_scale_init: float = 10.0
    render: RenderConfig = field(default_factory=RenderConfig)
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(
        image_size=224, resize_size=224, random_flip=False, antialias="never", resize_rounding="floor"))
    # big_vision's resize (spec §4): no antialiasing, truncated to uint8

    def __post_init__(self) -> None:
        low, high = 1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE
        if not low <= self.logit_scale_init <= high:  # written so that NaN fails too
            raise ConfigError(f"must be within {low:g} and {high:g}, got {self.logit_scale_init:g}: logits are cosine "
                              "× scale, so a larger one overflows half precision and a smaller one leaves the "
                              "softmax near uniform (CLIPPO starts at 10)", "logit_scale_init")
        size = getattr(self.encoder, "image_size", None)
        if size is not None and size != self.preprocess.image_size:
            raise ConfigError(f"is {self.preprocess.image_size}, but the encoder takes {size} px images (and text is "
                              f"rendered at the image size): set both to the same value", "preprocess.image_size")
        render = self.render
        try:  # where the config is read, not where a loader worker first renders
            check_render_settings(self.preprocess.image_size, render.font_size, render.text_brightness,
                                  render.background_brightness, render.max_chars)
        except ConfigError as error:
            raise ConfigError(error.message, ("preprocess." if error.key == "image_size" else "render.")
                              + str(error.key)) from None

    @property
    def image_feature_dim(self) -> int:
        return self.encoder.output_dim

    def build(self) -> Clippo:
        return Clippo(self)

    def build_tokenizer(self, train: bool = False) -> RenderedText:
        """Training checks the font files are there: a loader worker reads them first, and its error
        would come wrapped in the loader's."""
        render = self.render
        for path in resolve_font_paths(render.font_path) if train else ():
            if not os.path.isfile(path):
                raise missing_font_error(path)
        return RenderedText(TextRenderer(self.preprocess.image_size, render.font_size, render.lower,
                                         render.text_brightness, render.background_brightness, render.max_chars,
                                         render.font_path))

    def build_transform(self, train: bool) -> ImageTransform:
        return ImageTransform(self.preprocess, train)


class RenderedText:
    """CLIPPO's text processor: strings → ``{"pixels": (N, 3, H, W)}`` in [-1, 1], what
    :meth:`Clippo.encode_text` takes (the same interface as a tokenizer's ``input_ids``)."""

    def __init__(self, renderer: TextRenderer) -> None:
        self.renderer = renderer

    def __call__(self, texts: str | bytes | Sequence[str | bytes]) -> TextBatch:
        one = isinstance(texts, (str, bytes))  # one text (iterating bytes would give ints)
        return TextBatch(pixels=self.renderer.batch([texts] if one else list(texts)))

    def __repr__(self) -> str:
        """What identifies its output, e.g. for the embedding cache: the settings and each font file's
        path and content digest (a font replaced in place renders otherwise; each node's copy of
        the same font, with its own modification time, gives the same key)."""
        fonts = [f"{path}|{_font_digest(path, stat.st_size, stat.st_mtime_ns)}" if (stat := _stat(path)) else path
                 for path in resolve_font_paths(self.renderer.font_path)]
        return f"RenderedText({self.renderer!r}, fonts={fonts})"


class Clippo(ContrastiveModel):
    """The CLIPPO one-tower model (spec §2.1): ẑ = head(encoder(x)) / (‖·‖ + 1e-8) for images and
    rendered text alike; logits = exp(t)·ẑᵢ·ẑₜ with t learned, unclipped, and no bias.

    The scale is stored as ``log_temperature`` = −t (temperature = 1 / scale), the convention the
    trainer and the other models share; the optimiser sees the same magnitudes either way.
    """

    def __init__(self, config: ClippoConfig) -> None:
        super().__init__(config)
        from timm.layers.weight_init import lecun_normal_

        self.encoder = config.encoder.build()
        self.head = nn.Linear(self.encoder.output_dim, config.embed_dim)
        lecun_normal_(self.head.weight)  # flax Dense default; head_zeroinit=False
        nn.init.zeros_(self.head.bias)
        self.log_temperature = nn.Parameter(torch.tensor(-math.log(config.logit_scale_init)))

    def no_weight_decay(self) -> set[str]:
        """The scale, and what the encoder exempts (position embeddings, pooling probe): big_vision
        decays kernels only."""
        exempt = getattr(self.encoder, "no_weight_decay", set)()
        return {"log_temperature"} | {f"encoder.{name}" for name in exempt}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled features (big_vision's ``pre_logits``), before the head; a ViT encoder
        takes its ``image_size`` only."""
        size = getattr(self.config.encoder, "image_size", None)
        return self.encoder(image_input(pixels, next(self.encoder.parameters()).dtype, size))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, embed_dim) fp32 embeddings of preprocessed pixels (N, 3, H, W), normalised unless not
        ``normalize``."""
        features = self.head(self.image_features(pixels)).float()  # bf16 autocast: normalise in fp32
        return features / (features.norm(dim=-1, keepdim=True) + 1e-8) if normalize else features

    def encode_text(self, pixels: torch.Tensor | Mapping[str, torch.Tensor] | None = None, normalize: bool = True,
                    **other: Any) -> torch.Tensor:
        """Rendered text (what :meth:`ClippoConfig.build_tokenizer` gives: ``model.encode_text(**tokenizer(texts))``,
        or the processor's whole output, ``model.encode_text(tokenizer(texts))``) goes through the same path."""
        if other:  # token ids from another model's tokenizer
            raise OpenAlignError(f"encode_text takes rendered text (pixels), not {', '.join(other)}: {_MAKE_TEXT}")
        if (fields := text_fields(pixels, "pixels")) is not None:
            (pixels,) = fields
        return self.encode_image(_rendered_text(pixels), normalize)

    def forward(self, image: torch.Tensor, text: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both modalities in one pass of the shared encoder (equal to two passes: nothing mixes
        examples), split back into the embeddings the contrastive loss takes."""
        if not isinstance(text, Mapping) or "pixels" not in text:
            raise OpenAlignError("CLIPPO's forward takes the image and the rendered text: model(image, "
                                 "text=tokenizer(texts))")
        # each checked as encode_image / encode_text check it (8-bit renderings, another size), then one pass
        dtype, size = next(self.encoder.parameters()).dtype, getattr(self.config.encoder, "image_size", None)
        image, rendered = image_input(image, dtype, size), image_input(_rendered_text(text["pixels"]), dtype, size)
        embeddings = self.encode_image(torch.cat([image, rendered]))
        image_emb, text_emb = embeddings.split([image.shape[0], rendered.shape[0]])
        return {"image_emb": image_emb, "text_emb": text_emb, "logit_scale": self.logit_scale}

    def init_from(self, path: str | Path) -> None:
        """``train.init_from``: the whole model from a trained openalign CLIPPO model (a model, checkpoint,
        weight-average or run directory, read as :func:`openalign.load_pretrained` reads it) or from a
        released big_vision CLIPPO checkpoint (``.npz``, spec §6); or the encoder alone from a timm ViT
        checkpoint (spec §2.4: ImageNet-21k AugReg B/16), a file or timm's directory of one. An
        openalign directory is told by its ``config.yaml`` or ``checkpoints/``, which timm's lack."""
        from ..pretrained import CONFIG_FILE, load_pretrained_weights, model_directory_hint

        location = Path(path).expanduser()
        if not location.exists():
            raise OpenAlignError(f"'{path}' does not exist: CLIPPO initialises from an openalign CLIPPO model, "
                                 "checkpoint or run directory, a big_vision .npz or a timm ViT checkpoint")
        if location.is_dir() and ((location / CONFIG_FILE).is_file() or (location / "checkpoints").is_dir()):
            load_pretrained_weights(self, location)
            return
        if location.suffix == ".npz":
            from ..external import load_big_vision_weights

            load_big_vision_weights(self, location)
            return
        if location.is_file() and (hint := model_directory_hint(location)):  # an openalign model's weights file
            raise OpenAlignError(f"'{path}' {hint}")
        if location.is_dir() and not any((location / name).is_file() for name in _TIMM_WEIGHTS):
            raise OpenAlignError(f"'{path}' holds no model: neither an openalign one ({CONFIG_FILE} and "
                                 f"model.safetensors), a run's checkpoints/, nor a timm ViT checkpoint "
                                 f"({' or '.join(_TIMM_WEIGHTS)})")
        load = getattr(self.encoder, "load_timm_checkpoint", None)
        if load is None:
            raise OpenAlignError(f"this CLIPPO encoder ({type(self.encoder).__name__}) cannot load timm checkpoints; "
                                 "initialise the whole model from an openalign CLIPPO model directory or a big_vision "
                                 ".npz instead")
        load(location)


@functools.lru_cache(maxsize=16)
def _font_digest(path: str, size: int, mtime_ns: int) -> str:
    """The SHA-256 of a font file (read once per size and modification time: a few MB)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:16]


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:  # a missing font is reported where it is read
        return None


_MAKE_TEXT = "CLIPPO reads text rendered as images: model.encode_text(**tokenizer(texts)) with CLIPPO's tokenizer"


def _rendered_text(pixels: object) -> torch.Tensor:
    """``pixels`` if it is a batch of rendered texts (N, 3, H, W), else an error that says how to make one."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
        shown = f"a tensor of shape {tuple(pixels.shape)}" if isinstance(pixels, torch.Tensor) else \
            type(pixels).__name__
        raise OpenAlignError(f"encode_text takes a batch of rendered texts (N, 3, H, W), got {shown}: {_MAKE_TEXT}")
    if not pixels.is_floating_point():  # grey levels 0..255 would embed as text of another contrast
        raise OpenAlignError(f"encode_text takes rendered texts in [-1, 1], got {pixels.dtype} ones: {_MAKE_TEXT} "
                             "(8-bit renderings from render_texts: openalign.data.render.value_range first)")
    return pixels
