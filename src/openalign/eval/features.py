"""Batched embedding of images and texts with a model's ``encode_image`` / ``encode_text``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..errors import OpenAlignError
from ..precision import autocast
from ..progress import progress_bar


@torch.no_grad()
def embed_images(model: nn.Module, transform: Callable[[Image.Image], torch.Tensor], paths: Sequence[Path],
                 device: torch.device, batch_size: int = 256, show_progress: bool = True,
                 description: str = "embedding images") -> torch.Tensor:
    """(N, dim) L2-normalised fp32 image embeddings on the CPU, in the order of ``paths``."""
    chunks = []
    with progress_bar(description, len(paths), enabled=show_progress) as advance:
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([_load(path, transform) for path in paths[start:start + batch_size]])
            chunks.append(encode_image_batch(model, batch.to(device)))
            advance(len(batch))
    return torch.cat(chunks)


@torch.no_grad()
def encode_image_batch(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised fp32 embeddings on the CPU of a batch of preprocessed images, computed on the
    model's device and dtype (bf16 autocast on GPU, channels-last)."""
    parameter = next(model.parameters())
    pixels = pixels.to(parameter.device, parameter.dtype).contiguous(memory_format=torch.channels_last)
    with autocast(parameter.device):
        return model.encode_image(pixels, normalize=True).float().cpu()


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer: Callable[[list[str]], dict[str, torch.Tensor]], texts: Sequence[str],
                device: torch.device, batch_size: int = 256, show_progress: bool = True,
                description: str = "embedding texts") -> torch.Tensor:
    """(N, dim) L2-normalised fp32 text embeddings on the CPU, in the order of ``texts``."""
    chunks = []
    with progress_bar(description, len(texts), enabled=show_progress) as advance:
        for start in range(0, len(texts), batch_size):
            tokens = {k: v.to(device) for k, v in tokenizer(list(texts[start:start + batch_size])).items()}
            with autocast(device):
                chunks.append(model.encode_text(**tokens).float().cpu())
            advance(tokens["input_ids"].shape[0])
    return torch.cat(chunks)


def _load(path: Path, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return transform(image)
    except OSError as error:
        raise OpenAlignError(f"cannot read evaluation image '{path}': {error}") from None
