"""Reading weight, state and JSON files, with one clear error for a truncated or corrupt file.

A download cut short or a checkpoint written while the disk filled up fails here with the file's
path and what to do, instead of the storage library's own exception from deep in a load.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import OpenAlignError


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise OpenAlignError(f"'{path}' is truncated or corrupt ({error}): copy or download it again") from None


def read_torch_file(path: str | Path) -> Any:
    """A ``torch.save`` file, loaded with ``weights_only`` so that no pickled code runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused an object: never load it otherwise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's own line that names what was refused ("Unsupported global: GLOBAL print ...")
        refused = next((line.split(":", 1)[1].split(". ")[0].strip() for line in lines
                        if line.startswith("WeightsUnpickler error:")), lines[0] if lines else type(error).__name__)
        raise OpenAlignError(f"'{path}' holds more than tensors ({refused}); openalign loads weights only "
                             "with weights_only, so that no pickled code runs: save its state dict alone") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise OpenAlignError(f"'{path}' is truncated or corrupt ({str(error).strip().splitlines()[0]}): copy or "
                             "download it again") from None


def read_json(path: str | Path) -> Any:
    """A JSON file's value."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OpenAlignError(f"cannot read '{path}': {error}") from None


@contextlib.contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block completes it replaces ``path``
    in one rename, so that readers (other ranks, a resumed job) see the old file or the whole new
    one, never half of one. When the block raises, the temporary file is removed. The name is
    unique across processes and hosts, so ranks sharing a filesystem never write into one file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def filled_whole(directory: str | Path, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A temporary directory beside ``directory`` to write files into. When the block completes,
    the files of ``directory`` named in ``replaces`` are removed and the new files moved in (the
    directory is created if need be; its other files stay). When the block raises, ``directory``
    is untouched: a refused or failed save never costs the model that was there."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
    temporary.mkdir()
    try:
        yield temporary
        directory.mkdir(exist_ok=True)
        for name in replaces:
            (directory / name).unlink(missing_ok=True)
        for path in temporary.iterdir():
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
