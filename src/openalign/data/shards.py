"""Reading webdataset tar shards directly: expanding shard patterns, grouping members into
samples as webdataset does, and telling a truncated shard from a whole one. Shared by
``openalign data caption`` and ``openalign data inspect``."""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OpenAlignError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")
# webdataset's split of a member name into the sample key and the field (everything after the first dot).
KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class ShardReadError(Exception):
    """A shard cannot be read (truncated, corrupt, not a tar)."""


def expand_shards(patterns: Sequence[str]) -> list[Path]:
    """Local shard paths from paths, globs and brace patterns (``shards/{00000..00009}.tar``).

    Raises :class:`OpenAlignError` naming every path or glob that matches no file.
    """
    import braceexpand

    found: dict[Path, None] = {}
    missing: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(str(pattern)):
            expanded = os.path.expanduser(expanded)
            if glob.has_magic(expanded):
                matches = sorted(Path(match) for match in glob.glob(expanded) if Path(match).is_file())
                if not matches:
                    missing.append(expanded)
                found.update(dict.fromkeys(matches))
            elif Path(expanded).is_file():
                found[Path(expanded)] = None
            else:
                missing.append(expanded)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise OpenAlignError(f"{len(missing)} shard(s) not found: {shown}")
    if not found:
        raise OpenAlignError("no shards given: pass tar paths, globs or brace patterns ('shards/{00000..00009}.tar')")
    return list(found)


@dataclass
class TarSample:
    """One webdataset sample: consecutive members sharing a key (``key`` None: a member webdataset ignores)."""

    key: str | None
    members: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)

    def fields(self) -> dict[str, bytes]:
        """The file members by field (the name after the key: ``jpg``, ``txt``, ``caption.txt``)."""
        found = {}
        for info, data in self.members:
            match = KEY_EXT.match(info.name) if info.isfile() else None
            if match:
                found[match.group(2)] = data or b""
        return found

    def image(self) -> tuple[tarfile.TarInfo, bytes] | None:
        for info, data in self.members:
            match = KEY_EXT.match(info.name)
            if info.isfile() and match and match.group(2).lower() in IMAGE_EXTENSIONS:
                return info, data or b""
        return None


def read_samples(tar: tarfile.TarFile) -> Iterator[TarSample]:
    """The shard's samples in member order (members grouped by key as webdataset groups them);
    read errors become :class:`ShardReadError`."""
    current: TarSample | None = None
    members = iter(tar)
    while True:
        try:
            info = next(members, None)
            if info is None:
                check_end_of_archive(tar)
                break
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            raise ShardReadError(f"{type(error).__name__}: {error}") from error
        match = KEY_EXT.match(info.name) if info.isfile() else None
        key = match.group(1) if match else None
        if current is None or key is None or key != current.key:
            if current is not None:
                yield current  # complete: a sample ends where the next key starts
            current = TarSample(key)
        try:
            data = tar.extractfile(info).read() if info.isfile() else None
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            raise ShardReadError(f"{type(error).__name__}: {error}") from error
        current.members.append((info, data))
    if current is not None:
        yield current


def check_end_of_archive(tar: tarfile.TarFile) -> None:
    """``tarfile`` ends quietly at a cut in a header; a whole tar ends with two zero blocks."""
    tar.fileobj.seek(tar.offset)
    tail = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise ShardReadError(f"no end-of-archive marker after byte {tar.offset}: the shard is truncated")


def decode_image(data: bytes) -> Any:
    """A decoded RGB PIL image, or None for bytes PIL cannot decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception:  # noqa: BLE001 - any decoding failure (corrupt, truncated, bomb) skips the sample
        return None
