"""Vision Transformer image tower, built with timm (shared spec clippo.md §2.1 and §2.3).

The defaults are big_vision's ViT as CLIPPO uses it: no class token, a MAP (multi-head
attention pooling) head, pre-LN blocks with LayerNorm eps 1e-6 and tanh-approximate GELU, and
big_vision's initialisation. timm's ``VisionTransformer`` with ``class_token=False`` and
``global_pool="map"`` has exactly the parameters of big_vision's model (93,474,817 for
CLIPPO's B/16 with its head and temperature); only the names and the fused q/k/v layout differ.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError, OpenAlignError
from ..files import not_a_file
from .base import ImageTowerConfig

log = logging.getLogger(__name__)


@dataclass
class ViTConfig(ImageTowerConfig, tag="vit"):
    """A ViT of ``depth`` pre-LN blocks, ``width`` wide, on ``image_size`` px in ``patch_size`` patches.

    ``pool``: ``map`` (attention pooling with a learned probe, big_vision's MAPHead), ``token``
    (a class token) or ``avg`` (mean of the patch tokens). Every pool reads the final LayerNorm's
    output, as big_vision's ``gap`` does (timm's own ``avg`` would pool first, then normalise,
    in a ``fc_norm`` that timm checkpoints lack). ``init``: ``big_vision`` (spec §2.3) or timm's own.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pool: Literal["map", "token", "avg"] = "map"
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"
    layer_norm_eps: float = 1e-6
    init: Literal["big_vision", "timm"] = "big_vision"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"is {self.image_size}, which patch_size {self.patch_size} does not divide", "image_size")
        if self.width % self.num_heads:
            raise ConfigError(f"is {self.width}, which num_heads {self.num_heads} does not divide", "width")

    @property
    def output_dim(self) -> int:
        return self.width

    def build(self) -> VisionTransformerTower:
        return VisionTransformerTower(self)


class VisionTransformerTower(nn.Module):
    """Pixels (N, 3, H, W) → pooled features (N, width): timm's ViT without a classifier."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.config = config
        self.output_dim = config.width
        self.vit = VisionTransformer(
            img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.width, depth=config.depth,
            num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=True, class_token=config.pool == "token",
            global_pool=config.pool, fc_norm=False, num_classes=0, act_layer=config.activation,
            norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps))
        if config.init == "big_vision":
            big_vision_init(self.vit)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit(pixels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (timm's)."""
        self.vit.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Position embeddings, class token and pooling probe: big_vision decays only ``*/kernel``."""
        return {f"vit.{name}" for name, _ in self.vit.named_parameters()
                if name in ("pos_embed", "cls_token", "attn_pool.latent")}

    def load_timm_checkpoint(self, path: str | Path) -> None:
        """Initialise from a timm ViT checkpoint (``model.safetensors`` or ``pytorch_model.bin`` of
        e.g. ``vit_base_patch16_224.augreg_in21k``, or its directory), as CLIPPO's COCO recipe
        starts from AugReg ImageNet-21k (spec §2.4): the patch embedding, position embeddings
        (the class token's dropped, resampled if the grid differs), blocks and final norm load;
        the pooling head stays as initialised, and the checkpoint's classifier is ignored.
        """
        state = _read_state_dict(Path(path))
        own = self.vit.state_dict()
        skipped = sorted(k for k in state if k.startswith(("head.", "attn_pool.", "fc_norm."))
                         or (k == "cls_token" and k not in own))
        state = {k: v for k, v in state.items() if k not in skipped}
        if "pos_embed" in state:
            state["pos_embed"] = self._fit_positions(state["pos_embed"])
        missing, unexpected = [], sorted(set(state) - set(own))
        for name, tensor in own.items():
            if name not in state:
                missing.append(name)
            elif state[name].shape != tensor.shape:
                raise OpenAlignError(f"'{path}' has {name} of shape {tuple(state[name].shape)}, but this ViT's is "
                                     f"{tuple(tensor.shape)}: the checkpoint is another ViT size")
        not_head = [name for name in missing if not name.startswith("attn_pool.")]
        if unexpected or not_head:
            raise OpenAlignError(f"'{path}' is not a timm ViT checkpoint for this tower: missing {not_head[:4]}, "
                                 f"unexpected {unexpected[:4]}")
        self.vit.load_state_dict(state, strict=False)
        log.info("initialised the ViT from %s (kept as initialised: %s; ignored: %s)", path,
                 ", ".join(missing) or "nothing", ", ".join(skipped) or "nothing")

    def _fit_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """A checkpoint's (1, prefix + h·w, C) position embeddings for this ViT's grid and prefix tokens."""
        from timm.layers import resample_abs_pos_embed

        prefix = positions.shape[1] - math.isqrt(positions.shape[1]) ** 2
        own_prefix = self.vit.num_prefix_tokens
        if prefix < own_prefix:
            raise OpenAlignError("the checkpoint has no class-token position embedding, which this ViT (pool: token) needs")
        patches = resample_abs_pos_embed(positions[:, prefix:], list(self.vit.patch_embed.grid_size), num_prefix_tokens=0)
        return torch.cat([positions[:, :own_prefix], patches], dim=1)


def big_vision_init(vit: nn.Module) -> None:
    """big_vision's initialisation (spec §2.3): lecun-normal patch embedding, N(0, 1/√width)
    position embeddings, xavier-uniform attention (q, k and v each as its own matrix) and MLP
    kernels, N(0, 1e-6) MLP biases, zero other biases, xavier-uniform pooling probe."""
    from timm.layers import AttentionPoolLatent, Mlp
    from timm.layers.weight_init import lecun_normal_

    width = vit.embed_dim
    lecun_normal_(vit.patch_embed.proj.weight)
    nn.init.zeros_(vit.patch_embed.proj.bias)
    nn.init.normal_(vit.pos_embed, std=1 / math.sqrt(width))
    for module in vit.modules():
        if isinstance(module, Mlp):
            for layer in (module.fc1, module.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.normal_(layer.bias, std=1e-6)
        elif isinstance(module, AttentionPoolLatent):
            nn.init.xavier_uniform_(module.latent.data.view(1, -1))  # flax: fan_in 1, fan_out width
            for layer in (module.q, module.kv, module.proj):
                _xavier_per_matrix(layer, width)
        elif hasattr(module, "qkv") and hasattr(module, "proj"):  # a block's attention
            _xavier_per_matrix(module.qkv, width)
            _xavier_per_matrix(module.proj, width)


def _xavier_per_matrix(layer: nn.Linear, width: int) -> None:
    """Xavier-uniform on each width×width slice of a (possibly fused q/k/v) projection; zero bias."""
    for chunk in layer.weight.data.split(width, dim=0):
        nn.init.xavier_uniform_(chunk)
    nn.init.zeros_(layer.bias)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint directory (``model.safetensors`` or ``pytorch_model.bin``, as timm saves them) or file."""
    from ..hf import read_hf_weights, read_weights_file

    if path.is_dir():
        return read_hf_weights(path)
    if not path.is_file():
        raise OpenAlignError(f"timm checkpoint '{path}' {not_a_file(path)}")
    return read_weights_file(path)
