"""Config families for models and towers: each concrete config knows how to build its module."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import Variants, require_at_least
from ..errors import OpenAlignError


@dataclass
class TowerConfig(Variants):
    """An encoder: ``build()`` makes the module, whose pooled features are ``output_dim`` wide."""

    def build(self) -> nn.Module:
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        raise NotImplementedError


@dataclass
class ImageTowerConfig(TowerConfig):
    """The family of image encoders: pixels (N, 3, H, W) → pooled features (N, output_dim)."""


@dataclass
class TextTowerConfig(TowerConfig):
    """The family of text encoders: token ids and a mask (N, L) → pooled features (N, output_dim).

    ``tokenizer`` names the tokenizer (a directory or a Hugging Face id) and ``max_length`` the
    padded length of every sequence: both travel with the weights.
    """

    tokenizer: str = "bert-base-uncased"
    max_length: int = 64

    def __post_init__(self) -> None:
        require_at_least(self, 1, "max_length")

    def build_tokenizer(self, train: bool = False) -> Callable[[list[str]], Any]:
        """Strings → ``input_ids`` and ``attention_mask``; by default a Hugging Face tokenizer. In
        training (``train``) literal special tokens in the text (alt-text reading "[SEP]" or
        "[PAD]") are read as text, as COYO-ALIGN's TF-Hub preprocessing reads them (spec
        align-coyo-and-hf.md §3.6); otherwise they are the special tokens, as ``AlignProcessor``
        reads them."""
        from ..data.tokenizer import Tokenizer, load_hf_tokenizer

        return Tokenizer(load_hf_tokenizer(self.tokenizer), self.max_length, split_special_tokens=train)


@dataclass
class ModelConfig(Variants):
    """A whole model; ``architecture`` picks the family member (``dual_encoder``, ...).

    ``name`` is the registry entry the config came from (set by the registry), for reports.
    """

    tag_key: ClassVar[str] = "architecture"
    name: str | None = field(default=None, kw_only=True)

    def build(self) -> ContrastiveModel:
        raise NotImplementedError

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The batch fields the model takes (what the loader must provide)."""
        return ("image", "text")

    @property
    def output_fields(self) -> tuple[str, ...]:
        """What the model's forward returns for the loss: an embedding per input field
        (``<field>_emb``) and ``logit_scale``."""
        return (*(f"{field}_emb" for field in self.input_fields), "logit_scale")

    @property
    def image_feature_dim(self) -> int:
        """Width of ``model.image_features(pixels)``: pooled image features before the projection."""
        raise NotImplementedError

    def build_tokenizer(self, train: bool = False) -> Callable[[list[str]], Any]:
        """What turns a list of strings into the model's text input (token ids, rendered images...);
        ``train``: for training batches, where they differ."""
        raise NotImplementedError

    def build_transform(self, train: bool) -> Callable[..., torch.Tensor]:
        """The image preprocessing matching the weights: PIL image → tensor."""
        raise NotImplementedError


class ContrastiveModel(nn.Module):
    """What every openalign model has, under the same names (timm's and open_clip's habit): its
    ``config`` and ``input_fields``, ``encode_image`` / ``encode_text`` (L2-normalised fp32
    embeddings by default), ``image_features``, ``forward(image, text, ...)`` (the embeddings the
    loss takes), a learned ``log_temperature`` with ``temperature`` and ``logit_scale``,
    ``constrain_parameters`` (after each optimiser step), ``no_weight_decay`` and
    ``save_pretrained``. ``encode_text`` takes what the model's tokenizer gives:
    ``model.encode_text(**tokenizer(texts))``. ``weights_path``: where :func:`~openalign.load_pretrained`
    read the weights (a run directory's checkpoint, a hub id's cached snapshot), else None."""

    log_temperature: nn.Parameter

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.input_fields = config.input_fields
        self.weights_path: str | None = None

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier of cosine similarities in the logits."""
        return (-self.log_temperature).exp()

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, *args: torch.Tensor, normalize: bool = True, **inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled image features before any projection or normalisation (for probes and kNN)."""
        raise NotImplementedError

    @torch.no_grad()
    def constrain_parameters(self) -> None:
        """Project parameters back into their allowed range after an optimiser step; none by default."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in every tower (``train.grad_checkpointing``): in training, each
        block keeps only its input and is recomputed in the backward pass, the same gradients and
        batch-norm statistics for less activation memory and one more forward pass."""
        towers = [module for module in self.children() if callable(getattr(module, "set_grad_checkpointing", None))]
        if not towers:
            raise OpenAlignError(f"{type(self).__name__} has no tower that can checkpoint its activations")
        for tower in towers:
            tower.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that optimisers must neither decay nor adapt (timm's convention)."""
        return {"log_temperature"}

    def save_pretrained(self, directory: str | Path, format: str = "openalign", overwrite: bool = False) -> Path:
        """Write the model, its tokenizer and preprocessing: ``format="openalign"`` (read back by
        ``openalign.load_pretrained``) or ``"hf"`` (a ``transformers`` ``AlignModel`` directory, for
        the ALIGN models it can represent)."""
        from ..pretrained import save_pretrained

        return save_pretrained(self, directory, format, overwrite)


def image_input(pixels: torch.Tensor, dtype: torch.dtype, size: int | None = None) -> torch.Tensor:
    """``pixels`` as an image tower takes them: a floating-point (N, 3, H, W) batch, in the
    weights' ``dtype`` (a model cast to bf16 takes fp32 pixels too), ``size`` px square where the
    tower takes one size only (a ViT: its position embeddings are one per patch of that grid).
    What a preprocess was forgotten for (a PIL image, 8-bit pixels, one image without its batch
    dimension, channels last, another size) is an error that says how to make the input."""
    make = "torch.stack([preprocess(image) for image in images]) with the model's preprocess"
    if not isinstance(pixels, torch.Tensor):
        given = "a PIL image" if type(pixels).__module__.startswith("PIL") else f"a {type(pixels).__name__}"
        raise OpenAlignError(f"encode_image takes preprocessed pixels, a float tensor (N, 3, H, W); got {given}: make "
                             f"them with {make} (or use openalign.classify)")
    if not pixels.is_floating_point():
        raise OpenAlignError(f"encode_image takes preprocessed pixels; got {pixels.dtype} ones: make them with {make}, "
                             "which rescales and normalises 8-bit images")
    if pixels.ndim == 3 and pixels.shape[0] == 3:
        raise OpenAlignError(f"encode_image takes a batch (N, 3, H, W); got one image {tuple(pixels.shape)}: "
                             "pass pixels[None]")
    if pixels.ndim == 4 and pixels.shape[1] != 3 and pixels.shape[3] == 3:
        raise OpenAlignError(f"encode_image takes channels first (N, 3, H, W); got {tuple(pixels.shape)}: "
                             "pass pixels.permute(0, 3, 1, 2)")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise OpenAlignError(f"encode_image takes RGB pixels (N, 3, H, W); got shape {tuple(pixels.shape)}")
    if size is not None and tuple(pixels.shape[2:]) != (size, size):
        raise OpenAlignError(f"encode_image takes {size}×{size} px images (this model's ViT has position embeddings "
                             f"for that size only); got {pixels.shape[2]}×{pixels.shape[3]}: make them with {make}, "
                             f"which resizes and crops to {size} px")
    return pixels.to(dtype)


def text_input(input_ids: object, attention_mask: object, vocab_size: int | None, positions: int | None) -> None:
    """An error that says how to make the input unless ``input_ids`` and ``attention_mask`` are
    what a tokenizer gives: integer (N, L) tensors of one shape, L within the ``positions`` the
    tower has, ids within ``vocab_size`` (checked on the CPU only: on a GPU it would wait for the
    device at every step, and training's ids come from the tokenizer)."""
    make = "model.encode_text(**tokenizer(texts)) with the model's tokenizer"
    for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.is_floating_point():
            shown = (f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"
                     if isinstance(tensor, torch.Tensor) else type(tensor).__name__)
            raise OpenAlignError(f"encode_text takes {name} as an integer tensor (N, L), one row per text; got "
                                 f"{shown}: {make}")
    assert isinstance(input_ids, torch.Tensor) and isinstance(attention_mask, torch.Tensor)
    if input_ids.shape != attention_mask.shape:
        raise OpenAlignError(f"encode_text: input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} differ in shape: {make}")
    if positions is not None and input_ids.shape[1] > positions:
        raise OpenAlignError(f"encode_text: texts of {input_ids.shape[1]} tokens, but the text tower has "
                             f"{positions} positions: {make}, which truncates")
    if vocab_size is None or input_ids.device.type != "cpu" or not input_ids.numel() or \
            torch.compiler.is_compiling():  # a compiled graph would break at the check
        return
    low, high = (int(value) for value in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        raise OpenAlignError(f"encode_text: token ids from {low} to {high}, but the vocabulary holds 0 to "
                             f"{vocab_size - 1}: ids of another tokenizer? {make}")


def text_fields(given: object, *names: str) -> tuple[Any, ...] | None:
    """The fields ``names`` of a tokenizer's whole output passed as ``encode_text``'s first argument
    (``model.encode_text(tokenizer(texts))``, as CLIP_benchmark calls it); None for a tensor.
    Texts themselves are an error that says to tokenize them."""
    if isinstance(given, str) or (isinstance(given, (list, tuple)) and given and all(isinstance(t, str) for t in given)):
        raise OpenAlignError("encode_text takes what the model's tokenizer makes of texts, not the texts: "
                             "model.encode_text(**tokenizer(texts)), with tokenizer = openalign.get_tokenizer(<model>) "
                             "or the one load_pretrained returns")
    if not isinstance(given, Mapping):
        return None
    if missing := [name for name in names if name not in given]:
        raise OpenAlignError(f"encode_text was given a mapping of {', '.join(map(str, given)) or 'nothing'}, without "
                             f"{', '.join(missing)}: pass this model's tokenizer's output, model.encode_text(tokenizer("
                             "texts)) or model.encode_text(**tokenizer(texts))")
    return tuple(given[name] for name in names)
