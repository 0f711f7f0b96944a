"""Batched embedding of images and texts with a model's ``encode_image`` / ``encode_text``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..data.karpathy import CaptionedImage
from ..data.quality import UNREADABLE_IMAGE_ERRORS
from ..distributed import all_ranks_agree, fail_together, gather_strided_rows, world_info
from ..errors import OpenAlignError
from ..precision import autocast
from ..progress import progress_bar
from . import cache

# Image files the evaluation and inference commands pick up from folders and globs.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
Transform = Callable[[Image.Image], torch.Tensor]


def eval_transform(model: nn.Module) -> Transform:
    """The model's own evaluation preprocessing (the one that travels with its weights)."""
    return model.config.build_transform(train=False)


@torch.no_grad()
def embed_images(model: nn.Module, transform: Transform, paths: Sequence[Path], device: torch.device,
                 batch_size: int = 256, show_progress: bool = True,
                 description: str = "embedding images", pre_projection: bool = False) -> torch.Tensor:
    """(N, dim) L2-normalised fp32 image embeddings on the CPU, in the order of ``paths``; with
    ``pre_projection``, the image tower's pooled features instead (not normalised, not
    projected: what linear probes use).

    Inside a process group every rank embeds ``paths[rank::world_size]`` and all ranks receive
    all rows (every rank must call this with the same ``paths``). With an embedding cache
    directory set (:mod:`openalign.eval.cache`), a second call on the same model, preprocessing
    and files reads the result back instead.
    """
    kind = "pre_projection" if pre_projection else "embedding"

    def extract() -> torch.Tensor:
        rank, world_size = world_info()
        mine = paths[rank::world_size]
        chunks = [torch.zeros(0, model.config.image_feature_dim if pre_projection else _embed_dim(model))]
        # an image that only this rank reads may fail: every rank stops, none waits in the gather
        with fail_together(description), \
                progress_bar(description, len(mine), enabled=show_progress and rank == 0) as advance:
            for start in range(0, len(mine), batch_size):
                batch = torch.stack([_load(path, transform) for path in mine[start:start + batch_size]])
                chunks.append(encode_image_batch(model, batch, pre_projection))
                advance(len(batch))
        return gather_strided_rows(torch.cat(chunks), len(paths))

    return _cached(model, transform, cache.file_entries(paths), len(paths), kind, extract)


@torch.no_grad()
def encode_image_batch(model: nn.Module, pixels: torch.Tensor, pre_projection: bool = False) -> torch.Tensor:
    """L2-normalised fp32 embeddings on the CPU of a batch of preprocessed images (or, with
    ``pre_projection``, the image tower's pooled features), computed on the model's device and
    dtype (bf16 autocast on GPU, channels-last)."""
    parameter = next(model.parameters())
    pixels = pixels.to(parameter.device, parameter.dtype).contiguous(memory_format=torch.channels_last)
    with autocast(parameter.device):
        features = model.image_features(pixels) if pre_projection else model.encode_image(pixels, normalize=True)
    return features.float().cpu()


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer: Callable[[list[str]], dict[str, torch.Tensor]], texts: Sequence[str],
                device: torch.device, batch_size: int = 256, show_progress: bool = True,
                description: str = "embedding texts") -> torch.Tensor:
    """(N, dim) L2-normalised fp32 text embeddings on the CPU, in the order of ``texts``; sharded
    across ranks and cached like :func:`embed_images`. ``tokenizer`` is the model's text processor
    (strings → the keyword inputs of ``model.encode_text``: token ids, or rendered text for CLIPPO)."""
    texts = list(texts)

    def extract() -> torch.Tensor:
        rank, world_size = world_info()
        mine = texts[rank::world_size]
        chunks = [torch.zeros(0, _embed_dim(model))]
        with fail_together(description), \
                progress_bar(description, len(mine), enabled=show_progress and rank == 0) as advance:
            for start in range(0, len(mine), batch_size):
                batch = mine[start:start + batch_size]
                inputs = {k: v.to(device) for k, v in tokenizer(batch).items()}
                with autocast(device):
                    chunks.append(model.encode_text(**inputs).float().cpu())
                advance(len(batch))
        return gather_strided_rows(torch.cat(chunks), len(texts))

    return _cached(model, tokenizer, texts, len(texts), "text", extract)


def _cached(model: nn.Module, preprocessing: object, entries: Iterable[str], rows: int, kind: str,
            extract: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``extract()``, or its result (``rows`` embeddings, one per entry) read back from the
    embedding cache when one is set and holds it. Rank 0 writes entries; the cache answers only if
    it answers every rank (``extract`` is collective, so ranks must not part ways)."""
    directory = cache.cache_dir()
    if directory is None:
        return extract()
    key = cache.cache_key(model, preprocessing, entries, kind)  # the entries streamed: ImageNet's are 1.28M
    cached = cache.load(directory, key, rows)
    if all_ranks_agree(cached is not None):
        return cached
    embeddings = extract()
    if world_info()[0] == 0:
        cache.save(directory, key, embeddings)
    return embeddings


def _embed_dim(model: nn.Module) -> int:
    return int(model.config.embed_dim)


def _load(path: Path, transform: Transform) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return transform(image)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise OpenAlignError(f"cannot read evaluation image '{path}': {error}") from None


def embed_captioned(model: nn.Module, items: Sequence[CaptionedImage], device: torch.device, batch_size: int = 256,
                    show_progress: bool = True, transform: Transform | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(image embeddings, caption embeddings, text_to_image)`` of captioned images, every caption
    of every item in order: what :func:`~openalign.eval.retrieval.retrieval_metrics` takes.
    ``transform``: the images' preprocessing, by default the model's (:func:`eval_transform`)."""
    config = model.config
    image_emb = embed_images(model, transform or eval_transform(model), [item.path for item in items], device,
                             batch_size, show_progress)
    captions = [caption for item in items for caption in item.captions]
    text_emb = embed_texts(model, config.build_tokenizer(), captions, device, batch_size, show_progress)
    return image_emb, text_emb, [index for index, item in enumerate(items) for _ in item.captions]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``with eval_mode(model):`` puts the model in eval mode and restores its mode afterwards;
    its weights are held fixed meanwhile (:func:`~openalign.eval.cache.fixed_weights`)."""
    was_training = model.training
    with cache.fixed_weights(model):
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
