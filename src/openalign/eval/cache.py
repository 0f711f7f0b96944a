"""An on-disk cache of image and text embeddings, so a second evaluation of the same model and
data skips feature extraction.

Enabled by a directory in ``OPENALIGN_EMBEDDING_CACHE`` (the ``--cache-dir`` option of the eval
commands sets it). An entry is a safetensors file named by a SHA-256 over the model's weights
and its config (settings that hold no weights: activation, layer-norm epsilon, pooling), the
precision it runs at, the preprocessing (or text processor), and each image's path, size and
modification time (or each text): a retrained or reconfigured model, bf16 instead of fp32, other
preprocessing or a changed file gives a new key, never a stale result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import OpenAlignError
from ..files import read_safetensors, write_safetensors, written_whole
from ..precision import autocast_dtype

log = logging.getLogger(__name__)

CACHE_ENV = "OPENALIGN_EMBEDDING_CACHE"


def cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else None


def cache_key(model: nn.Module, preprocessing: object, entries: Iterable[str], kind: str = "embedding") -> str:
    """SHA-256 over ``kind``, the model's weights and config (its registry name aside), the
    precision :func:`~openalign.precision.autocast` sets on the model's device, which modules are
    in train mode, the preprocessing's settings (its ``config`` if it has one, else its ``repr``,
    and its ``train`` flag) and the entries (:func:`file_entries` or the texts)."""
    digest = hashlib.sha256(kind.encode())
    digest.update(weights_digest(model).encode())
    digest.update(repr(dataclasses.replace(model.config, name=None)).encode())
    digest.update(str(autocast_dtype(next(model.parameters()).device)).encode())  # None: fp32
    # train mode (dropout, batch statistics) and a training transform (random crops) embed otherwise
    digest.update(str([name for name, module in model.named_modules() if module.training]).encode())
    digest.update(repr(getattr(preprocessing, "config", preprocessing)).encode())
    digest.update(f"train={getattr(preprocessing, 'train', None)}".encode())
    for entry in entries:
        digest.update(len(entry).to_bytes(8, "little"))  # length-prefixed: no two lists hash alike
        digest.update(entry.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


# Models whose weights are held fixed (see fixed_weights): how many scopes hold each, and its digest.
_HELD: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


@contextmanager
def fixed_weights(model: nn.Module) -> Iterator[None]:
    """Within this scope the caller promises not to change ``model``'s weights, so they are hashed
    at most once: an evaluation embeds texts and images many times with the same weights (a
    zero-shot classifier once per class), and hashing B7 takes seconds. Outside any scope every
    key hashes the weights afresh, so no change is missed (even one made through ``.data``, which
    no version counter sees). Scopes nest."""
    held = _HELD.setdefault(model, [0, None])
    held[0] += 1
    try:
        yield
    finally:
        held[0] -= 1
        if not held[0]:
            del _HELD[model]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (once per :func:`fixed_weights` scope)."""
    held = _HELD.get(model)
    if held is not None and held[1] is not None:
        return held[1]
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    if held is not None:
        held[1] = digest.hexdigest()
    return digest.hexdigest()


def file_entries(paths: Sequence[Path]) -> Iterator[str]:
    """What identifies a file's content for the cache: its absolute path, size and modification time."""
    for path in map(Path, paths):
        stat = path.stat()
        yield f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def load(directory: Path, key: str, rows: int) -> torch.Tensor | None:
    """The cached embeddings (a floating-point matrix of ``rows`` rows), or None: none cached, or a
    damaged entry or one of another shape (removed, to be computed again)."""
    path = directory / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        embeddings = read_safetensors(path)["embeddings"]
        if embeddings.ndim != 2 or embeddings.shape[0] != rows or not embeddings.is_floating_point():
            raise OpenAlignError(f"it holds a {embeddings.dtype} tensor of shape {tuple(embeddings.shape)}, not "
                                 f"{rows} rows of embeddings")
        return embeddings
    except (OpenAlignError, KeyError) as error:
        log.warning("embedding cache entry %s is unreadable (%s): computing it again", path, error)
        path.unlink(missing_ok=True)
        return None


def save(directory: Path, key: str, embeddings: torch.Tensor) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    with written_whole(directory / f"{key}.safetensors") as staging:
        write_safetensors({"embeddings": embeddings.contiguous()}, staging)
