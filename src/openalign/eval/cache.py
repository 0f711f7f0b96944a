"""An on-disk cache of image and text embeddings, so a second evaluation of the same model and
data skips feature extraction.

Enabled by a directory in ``OPENALIGN_EMBEDDING_CACHE`` (the ``--cache-dir`` option of the eval
commands sets it). An entry is a safetensors file named by a SHA-256 over the model's weights,
the preprocessing (or text processor), and each image's path, size and modification time (or
each text): a retrained model, other preprocessing or a changed file gives a new key, never a
stale result.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CACHE_ENV = "OPENALIGN_EMBEDDING_CACHE"


def cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else None


def cache_key(model: nn.Module, preprocessing: object, entries: Iterable[str], kind: str = "embedding") -> str:
    """SHA-256 over ``kind``, the model's weights, the preprocessing's settings (its ``config``
    if it has one, else its ``repr``) and the entries (:func:`file_entries` or the texts)."""
    digest = hashlib.sha256(kind.encode())
    digest.update(weights_digest(model).encode())
    digest.update(repr(getattr(preprocessing, "config", preprocessing)).encode())
    for entry in entries:
        digest.update(len(entry).to_bytes(8, "little"))  # length-prefixed: no two lists hash alike
        digest.update(entry.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


_WEIGHT_DIGESTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict, hashed once per version of its tensors: an evaluation
    embeds images and texts several times with the same weights (hashing B7 takes seconds),
    and any in-place change (an optimiser step, ``load_state_dict``) bumps a tensor's version."""
    state = model.state_dict()
    signature = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in state.items())
    known = _WEIGHT_DIGESTS.get(model)
    if known is not None and known[0] == signature:
        return known[1]
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    _WEIGHT_DIGESTS[model] = (signature, digest.hexdigest())
    return digest.hexdigest()


def file_entries(paths: Sequence[Path]) -> Iterator[str]:
    """What identifies a file's content for the cache: its absolute path, size and modification time."""
    for path in map(Path, paths):
        stat = path.stat()
        yield f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def load(directory: Path, key: str) -> torch.Tensor | None:
    path = directory / f"{key}.safetensors"
    return load_file(str(path))["embeddings"] if path.is_file() else None


def save(directory: Path, key: str, embeddings: torch.Tensor) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".{key}.{os.getpid()}.tmp"
    save_file({"embeddings": embeddings.contiguous()}, str(staging))
    os.replace(staging, directory / f"{key}.safetensors")
