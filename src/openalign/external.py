"""Weights released by the papers' own code, loaded into the openalign model of the same architecture.

- **open_clip state dicts** (``visual.*``, ``token_embedding.weight``, ``transformer.*``,
  ``ln_final.*``, ``text_projection``, ``logit_scale``), as ``torch.save`` or safetensors files:
  ALIP's released ``ALIP_YFCC15M_B32.pt`` (its DDP ``module.`` prefix dropped; shared spec
  alip.md §8.20) into ``alip-vit-b32``, or any open_clip ViT CLIP of the model's sizes and GELU.
- **big_vision checkpoints** (``.npz`` of ``/``-joined parameter names): CLIPPO's released
  ``clippo_b16_*.npz`` (spec clippo.md §2.2, §6) into ``clippo-b16``.

A file carries no architecture, so the caller names it (``load_pretrained(path,
architecture="alip-vit-b32")``, ``openalign convert PATH DIR --architecture alip-vit-b32``); the
weights must then fit it exactly: a missing, extra or misshapen weight is an error naming it.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import OpenAlignError

# big_vision saves {"params": ..., "opt": ...} (the optimiser's state is skipped); a file of the
# parameters alone has no prefix
BIG_VISION_PREFIXES = ("params/", "")


def load_external_weights(model: nn.Module, path: Path) -> None:
    """Load the weights file ``path`` (open_clip's or big_vision's, by its kind) into ``model``."""
    if path.suffix == ".npz":
        load_big_vision_weights(model, path)
    else:
        load_open_clip_weights(model, path)


def load_open_clip_weights(model: nn.Module, path: Path) -> None:
    """An open_clip state dict into a dual encoder with open_clip towers (ALIP's architecture)."""
    from .hf import read_weights_file
    from .models.clip_towers import ClipTextConfig, OpenClipViTConfig
    from .train.checkpoint import load_state

    config = model.config
    if not (isinstance(getattr(config, "image", None), OpenClipViTConfig)
            and isinstance(getattr(config, "text", None), ClipTextConfig)):
        from .pretrained import model_directory_hint

        if hint := model_directory_hint(path):
            raise OpenAlignError(f"'{path}' {hint}")
        raise OpenAlignError(f"'{path}' is read as an open_clip state dict, which loads into a model with open_clip "
                             f"towers (alip-vit-b32, alip-tiny), not into '{config.name}'")
    raw = read_weights_file(path)
    if not isinstance(raw, dict) or not raw:
        raise OpenAlignError(f"'{path}' holds a {type(raw).__name__}, not a state dict (weight names → tensors)")
    others = [f"{key} ({type(value).__name__})" for key, value in raw.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise OpenAlignError(f"'{path}' holds values that are not weights ({', '.join(others[:3])}): save the model's "
                             "state dict alone, or under the key 'state_dict'")
    state = {key.removeprefix("module."): value for key, value in raw.items()}
    state.pop("attn_mask", None)  # the causal mask some open_clip versions saved: the towers build their own
    ours = {_from_open_clip(key): value for key, value in state.items()}
    if "log_temperature" in ours and ours["log_temperature"].numel() == 1:  # else reported as misshapen
        ours["log_temperature"] = -ours["log_temperature"].reshape(())
    load_state(model, ours, f"open_clip weights '{path}'", name=_to_open_clip)


def _from_open_clip(key: str) -> str:
    if key == "logit_scale":  # open_clip's log of the logit scale: −log τ
        return "log_temperature"
    if key.startswith("visual."):
        return f"image_tower.{key.removeprefix('visual.')}"
    return f"text_tower.transformer.{key}"


def _to_open_clip(key: str) -> str:
    if key == "log_temperature":
        return "logit_scale"
    if key.startswith("image_tower."):
        return f"visual.{key.removeprefix('image_tower.')}"
    return key.removeprefix("text_tower.transformer.")


def load_big_vision_weights(model: nn.Module, path: Path) -> None:
    """A big_vision CLIPPO checkpoint (``params/img/...``, ``params/t``) into a CLIPPO model whose
    ViT has the checkpoint's sizes; timm's reader of big_vision ViTs loads the encoder."""
    from .models.clippo import Clippo

    if not isinstance(model, Clippo) or not hasattr(model.encoder, "vit"):
        raise OpenAlignError(f"'{path}' is read as a big_vision checkpoint, which loads into a CLIPPO model with a "
                             f"ViT encoder (clippo-b16), not into '{model.config.name}'")
    try:  # shapes first, from the headers (the optimiser's state, most of the file, is never read); timm reads
        with np.load(path, allow_pickle=False) as archive:  # the encoder: the file's arrays are read once
            prefix = next((p for p in BIG_VISION_PREFIXES if f"{p}img/embedding/kernel" in archive.files), "params/")
            found = {name[len(prefix):].removeprefix("img/"): _npz_shape(archive, name) for name in archive.files
                     if name.startswith(prefix) and not name.startswith("opt/")}
            _check_big_vision_fits(model, found, path)
            head = {name: archive[f"{prefix}{name}"] for name in ("img/head/kernel", "img/head/bias", "t")}
        with torch.no_grad():
            model.encoder.vit.load_pretrained(str(path), prefix=f"{prefix}img/")  # transposes, q/k/v, MAP head
            model.head.weight.copy_(torch.from_numpy(head["img/head/kernel"].T.copy()))
            model.head.bias.copy_(torch.from_numpy(head["img/head/bias"].copy()))
            model.log_temperature.fill_(-float(head["t"].reshape(-1)[0]))  # t = log of the logit scale
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # not the fit check's errors
        raise OpenAlignError(f"'{path}' is not a readable .npz file ({error}): copy or download it again") from None


def _npz_shape(archive: np.lib.npyio.NpzFile, name: str) -> tuple[int, ...]:
    """The shape of an array in an ``.npz`` file from its header, the array itself not read."""
    member_name = f"{name}.npy" if f"{name}.npy" in archive.zip.namelist() else name  # np.load lists both
    with archive.zip.open(member_name) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            return tuple(np.lib.format.read_array_header_1_0(member)[0])
        if version == (2, 0):
            return tuple(np.lib.format.read_array_header_2_0(member)[0])
    return tuple(archive[name].shape)  # a later format version: read it


def _check_big_vision_fits(model: nn.Module, found: dict[str, tuple[int, ...]], path: Path) -> None:
    """Every tensor the model needs is in the checkpoint at the model's shape, and the checkpoint
    has no encoder block the model lacks: timm's reader would otherwise resample position
    embeddings or load a deeper encoder's first blocks without a word."""
    from .train.checkpoint import check_fits

    vit, width = model.encoder.vit, model.encoder.output_dim
    heads, patch = vit.blocks[0].attn.num_heads, vit.patch_embed.patch_size[0]
    mlp, tokens = vit.blocks[0].mlp.fc1.out_features, vit.pos_embed.shape[1]
    attention = {f"{part}/kernel": (width, heads, width // heads) for part in ("query", "key", "value")}
    attention |= {f"{part}/bias": (heads, width // heads) for part in ("query", "key", "value")}
    attention |= {"out/kernel": (heads, width // heads, width), "out/bias": (width,)}
    block = {f"MultiHeadDotProductAttention_0/{name}": shape for name, shape in attention.items()}
    block |= {f"LayerNorm_{i}/{part}": (width,) for i in (0, 1) for part in ("scale", "bias")}
    block |= {"MlpBlock_0/Dense_0/kernel": (width, mlp), "MlpBlock_0/Dense_0/bias": (mlp,),
              "MlpBlock_0/Dense_1/kernel": (mlp, width), "MlpBlock_0/Dense_1/bias": (width,)}
    expected = {"embedding/kernel": (patch, patch, 3, width), "embedding/bias": (width,),
                "pos_embedding": (1, tokens, width), "Transformer/encoder_norm/scale": (width,),
                "Transformer/encoder_norm/bias": (width,), "head/kernel": (width, model.config.embed_dim),
                "head/bias": (model.config.embed_dim,)}
    expected |= {f"Transformer/encoderblock_{i}/{name}": shape for i in range(len(vit.blocks)) for name, shape in
                 block.items()}
    if model.encoder.config.pool == "map":
        expected |= {"MAPHead_0/probe": (1, 1, width), "MAPHead_0/LayerNorm_0/scale": (width,),
                     "MAPHead_0/LayerNorm_0/bias": (width,)}
        expected |= {f"MAPHead_0/{name}": shape for name, shape in block.items() if not name.startswith("LayerNorm")}
    expected["t"] = (1,)  # the log of the logit scale, beside the image tower
    check_fits(found, expected, f"big_vision weights '{path}' do not fit '{model.config.name}'")
