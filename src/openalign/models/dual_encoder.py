"""ALIGN's dual encoder: image tower + text tower, L2-normalised embeddings, learnable temperature."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import ImageTransform, PreprocessConfig
from ..config import require_at_least
from ..errors import ConfigError, OpenAlignError
from .base import ContrastiveModel, ImageTowerConfig, ModelConfig, TextTowerConfig, image_input, text_fields, text_input


MIN_TEMPERATURE = 1e-4  # logit scale 1e4: beyond it half precision overflows (65504 at a cosine of 1)
MAX_TEMPERATURE = 100.0  # logit scale 0.01: logits within ±0.01, a softmax all but uniform at every pair


@dataclass
class DualEncoderConfig(ModelConfig, tag="dual_encoder"):
    """Two towers projected to ``embed_dim``.

    With ``image_projection: false`` (ALIGN B7 and L2) the pooled image features are the
    embedding and must already be ``embed_dim`` wide; likewise ``text_projection`` (ALIGN always
    projects text, with bias; CLIP towers project inside). ``temperature_init`` is τ at step 0
    (logits = cosine / τ); ``max_logit_scale`` caps 1/τ (CLIP, ALIP: 100) in the logits and, after
    every training step, in the parameter; ``min_logit_scale`` floors the parameter after every
    step (open_clip and ALIP clamp ``logit_scale`` to [0, ln 100]: a multiplier of at least 1).
    ``temperature_init`` is within ``MIN_TEMPERATURE`` and ``MAX_TEMPERATURE`` (1e-4 and 100; the
    papers start at 0.07 or 1).

    ``text_fields`` are the batch fields the one text tower embeds, each into ``<field>_emb``:
    ``[text]`` for ALIGN, ``[text, caption]`` for ALIP's bi-path model (raw text and synthetic
    caption through the same weights, shared spec alip.md §1).
    """

    image: ImageTowerConfig
    text: TextTowerConfig
    embed_dim: int = 640
    image_projection: bool = True
    text_projection: bool = True
    temperature_init: float = 1.0
    max_logit_scale: float | None = None
    min_logit_scale: float | None = None
    text_fields: tuple[str, ...] = ("text",)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        require_at_least(self, 1, "embed_dim")
        for tower, projected in (("image", self.image_projection), ("text", self.text_projection)):
            width = getattr(self, tower).output_dim
            if not projected and width != self.embed_dim:
                raise ConfigError(
                    f"is {self.embed_dim}, but {tower}_projection is false, so the pooled {tower} features "
                    f"({width}-d) are the embedding: set embed_dim to {width} or {tower}_projection to true",
                    "embed_dim")
        size = getattr(self.image, "image_size", None)  # a ViT takes one size; a convolutional tower any
        if size is not None and size != self.preprocess.image_size:
            raise ConfigError(f"is {self.preprocess.image_size}, but the image tower takes {size} px images: set "
                              "both to the same value", "preprocess.image_size")
        if not MIN_TEMPERATURE <= self.temperature_init:
            raise ConfigError(f"must be at least {MIN_TEMPERATURE:g}, got {self.temperature_init:g}: logits are "
                              "cosine / temperature, and a smaller one overflows half precision (and, below "
                              "3e-39, float32) and saturates the softmax", "temperature_init")
        if not self.temperature_init <= MAX_TEMPERATURE:
            raise ConfigError(f"must be at most {MAX_TEMPERATURE:g}, got {self.temperature_init:g}: logits are "
                              "cosine / temperature, so a larger one leaves every logit within "
                              f"±{1 / MAX_TEMPERATURE:g}, a softmax near uniform and gradients near zero; the "
                              "papers start at 1 (ALIGN) or 0.07 (CLIP's logit scale 14.3 is its inverse)",
                              "temperature_init")
        if self.max_logit_scale is not None and self.max_logit_scale < 1 / self.temperature_init:
            raise ConfigError(f"must be at least 1 / temperature_init ({1 / self.temperature_init:g}), or null",
                              "max_logit_scale")
        if self.min_logit_scale is not None and not 0 < self.min_logit_scale <= 1 / self.temperature_init:
            raise ConfigError(f"must be positive and at most 1 / temperature_init ({1 / self.temperature_init:g}), "
                              "or null", "min_logit_scale")
        if not self.text_fields or len(set(self.text_fields)) != len(self.text_fields) or "image" in self.text_fields:
            raise ConfigError("must name one or more distinct batch fields other than 'image', e.g. [text, caption]",
                              "text_fields")

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The batch fields the model takes."""
        return ("image", *self.text_fields)

    @property
    def image_feature_dim(self) -> int:
        """Width of the pooled, unprojected image features (what linear probes use)."""
        return self.image.output_dim

    def build(self) -> DualEncoder:
        return DualEncoder(self)

    def build_tokenizer(self, train: bool = False) -> Callable[[list[str]], dict[str, torch.Tensor]]:
        return self.text.build_tokenizer(train)

    def build_transform(self, train: bool) -> ImageTransform:
        return ImageTransform(self.preprocess, train)


class DualEncoder(ContrastiveModel):
    """ALIGN (shared spec align-coyo-and-hf.md §1.3, §6.2).

    The temperature is stored as its logarithm (``log_temperature``), so τ = exp(log τ) is
    positive whatever the optimiser does. The trainer gives it no LAMB trust ratio and, unless
    ``weight_decay_scope: all`` (ALIP), no weight decay, so each step moves log τ by at most about
    lr: the multiplicative τ ← τ(1 ∓ lr) update that tfa LAMB's trust ratio gives COYO-ALIGN's
    scalar τ (spec §1.3) where the gradient's sign holds from step to step, smaller where it
    flips (Adam's update is then below 1). Hugging Face's ``temperature`` is ``exp(log_temperature)``.
    """

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__(config)
        self.image_tower = config.image.build()
        self.text_tower = config.text.build()
        self.image_projection = (nn.Linear(config.image.output_dim, config.embed_dim)
                                 if config.image_projection else None)
        self.text_projection = (nn.Linear(config.text.output_dim, config.embed_dim)
                                if config.text_projection else None)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature_init)))
        for projection in (self.image_projection, self.text_projection):
            if projection is not None:  # Keras Dense defaults: glorot-uniform kernel, zero bias
                nn.init.xavier_uniform_(projection.weight)
                nn.init.zeros_(projection.bias)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier of cosine similarities in the logits: 1 / temperature, at most
        ``max_logit_scale``.

        Training keeps the parameter within the cap (:meth:`constrain_parameters`); the cap here
        covers loaded weights past it. Its gradient is the uncapped one, so that at the cap the
        loss can still lower the scale (``clamp`` would pass no gradient there, as open_clip,
        which clamps only the parameter, does).
        """
        scale = (-self.log_temperature).exp()
        if self.config.max_logit_scale is None:
            return scale
        return scale - (scale - self.config.max_logit_scale).clamp(min=0).detach()

    @torch.no_grad()
    def constrain_parameters(self) -> None:
        """Clamp the log-temperature into the range ``min_logit_scale`` and ``max_logit_scale`` set;
        the trainer calls this after every optimiser step, as open_clip and ALIP clamp
        ``logit_scale`` (shared spec alip.md §1)."""
        highest, lowest = self.config.max_logit_scale, self.config.min_logit_scale  # log τ = -log(scale)
        if highest is not None or lowest is not None:
            self.log_temperature.clamp_(min=None if highest is None else -math.log(highest),
                                        max=None if lowest is None else -math.log(lowest))

    def train(self, mode: bool = True) -> DualEncoder:
        if mode:  # a tower that refuses training (optimize_for_inference) refuses before any module switches
            self.image_tower.train()
        return super().train(mode)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, embed_dim) fp32 embeddings of preprocessed pixels (N, 3, H, W), L2-normalised unless not
        ``normalize``."""
        features = _project(self.image_projection, self.image_features(pixels))
        return F.normalize(features, dim=-1) if normalize else features

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled features, before projection and normalisation. A ViT tower takes
        its ``image_size`` only; a convolutional one any size its kernels fit."""
        size = getattr(self.config.image, "image_size", None)
        pixels = image_input(pixels, next(self.image_tower.parameters()).dtype, size)
        try:
            return self.image_tower(pixels)
        except RuntimeError as error:  # torch's "Kernel size can't be greater than actual input size"
            if "greater than actual input size" not in str(error):
                raise
            raise OpenAlignError(f"encode_image: {pixels.shape[2]}×{pixels.shape[3]} px images are too small for this "
                                 "model's image tower (its strided convolutions leave nothing for a kernel); make "
                                 "them with the model's preprocess, which resizes to the size it was trained "
                                 "at") from None

    def encode_text(self, input_ids: torch.Tensor | Mapping[str, torch.Tensor],
                    attention_mask: torch.Tensor | None = None, normalize: bool = True,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, embed_dim) fp32 embeddings of token ids and their mask (N, L), as the tokenizer gives
        them: ``model.encode_text(**tokenizer(texts))``, or the tokenizer's whole output,
        ``model.encode_text(tokenizer(texts))``; L2-normalised unless not ``normalize``.
        ``token_type_ids``, which BERT tokenizers and ``AlignProcessor`` also give, are taken when
        they are all 0 (one text segment, as ALIGN embeds text) and refused otherwise."""
        if (fields := text_fields(input_ids, "input_ids", "attention_mask")) is not None:
            if attention_mask is not None:
                raise OpenAlignError("encode_text was given the tokenizer's output, which holds its attention mask, "
                                     "and another attention_mask: pass one or the other")
            token_type_ids = input_ids.get("token_type_ids", token_type_ids)  # type: ignore[union-attr]
            input_ids, attention_mask = fields
        if token_type_ids is not None and bool(torch.as_tensor(token_type_ids).ne(0).any()):
            raise OpenAlignError("encode_text embeds one text segment per row (token_type_ids all 0); these mark a "
                                 "second segment: tokenize each text on its own")
        if attention_mask is None:
            raise OpenAlignError("encode_text needs the attention mask as well as the token ids: pass "
                                 "model.encode_text(**tokenizer(texts))")
        text = self.config.text
        text_input(input_ids, attention_mask, getattr(text, "vocab_size", None),
                   getattr(text, "max_position_embeddings", None) or getattr(text, "max_length", None))
        features = _project(self.text_projection, self.text_tower(input_ids, attention_mask))
        return F.normalize(features, dim=-1) if normalize else features

    def init_from(self, name_or_path: str | Path) -> None:
        """``train.init_from``: start from the weights of a trained model of this architecture, read
        as :func:`openalign.load_pretrained` reads it (an openalign model, checkpoint or run
        directory; a Hugging Face ``AlignModel`` directory or hub id, so that a recipe can
        fine-tune ``kakaobrain/align-base``; ALIP's released ``ALIP_YFCC15M_B32.pt``). Every
        weight must match by name and shape."""
        from ..pretrained import load_pretrained_weights

        load_pretrained_weights(self, name_or_path)

    def forward(self, image: torch.Tensor, text: Mapping[str, torch.Tensor] | None = None,
                **other_texts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embeddings of a batch, named as the losses take them: ``image_emb``, ``<field>_emb`` for
        each of ``text_fields`` (each a tokenizer's output), and ``logit_scale``."""
        texts = other_texts if text is None else {"text": text, **other_texts}
        if set(texts) != set(self.config.text_fields) or not all(isinstance(v, Mapping) for v in texts.values()):
            fields = ", ".join(f"{name}=tokenizer(...)" for name in self.config.text_fields)
            raise OpenAlignError(f"this model's forward takes the image and its text fields, each a tokenizer's "
                                 f"output: model(image, {fields}); got {', '.join(texts) or 'no text'}")
        outputs = {"image_emb": self.encode_image(image)}
        for field_name in self.config.text_fields:
            outputs[f"{field_name}_emb"] = self.encode_text(texts[field_name]["input_ids"],
                                                            texts[field_name]["attention_mask"])
        outputs["logit_scale"] = self.logit_scale
        return outputs


def _project(projection: nn.Linear | None, features: torch.Tensor) -> torch.Tensor:
    """Pooled features in fp32, through ``projection`` in fp32 even under bf16 autocast, as
    COYO-ALIGN forces both projection Dense layers to float32 (spec §3.7); what follows
    (normalising, the logits) is fp32 too. A model cast to bf16 or fp16 (``model.half()``)
    projects with its weights in fp32 likewise."""
    features = features.float()
    if projection is None:
        return features
    with torch.autocast(features.device.type, enabled=False):
        if projection.weight.dtype == torch.float32:
            return projection(features)  # the module itself, so that its hooks run
        bias = None if projection.bias is None else projection.bias.float()
        return F.linear(features, projection.weight.float(), bias)
