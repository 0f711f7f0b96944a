"""Reading webdataset tar shards directly: expanding shard patterns, grouping members into
samples as webdataset does, and telling a truncated shard from a whole one. Shared by
the webdataset training source, ``openalign data caption`` and ``openalign data inspect``."""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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


def read_samples(tar: tarfile.TarFile, stream_end: Callable[[], None] | None = None) -> Iterator[TarSample]:
    """The shard's samples in member order (members grouped by key as webdataset groups them);
    read errors, and a tar cut short, become :class:`ShardReadError`. ``stream_end`` checks the
    end of a tar read as a stream (see :func:`stream_samples`); by default the file is seeked."""
    current: TarSample | None = None
    members = iter(tar)
    while True:
        try:
            info = next(members, None)
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:  # a cut inside a member: drop its sample
            raise ShardReadError(f"{type(error).__name__}: {error}") from error
        if info is None:  # the last sample's members are whole, even if the tar was cut right after them
            if current is not None:
                yield current
            try:
                (stream_end or (lambda: check_end_of_archive(tar)))()
            except (tarfile.TarError, EOFError, OSError, ValueError) as error:
                raise ShardReadError(f"{type(error).__name__}: {error}") from error
            return
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


def check_end_of_archive(tar: tarfile.TarFile) -> None:
    """``tarfile`` ends quietly at a cut in a header; a whole tar ends with two zero blocks."""
    tar.fileobj.seek(tar.offset)
    tail = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise ShardReadError(f"no end-of-archive marker after byte {tar.offset}: the shard is truncated")


class _CountingReader(io.RawIOBase):
    """A read-only stream that counts the bytes taken from ``raw``."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[:len(data)] = data
        self.count += len(data)
        return len(data)


def stream_samples(fileobj: BinaryIO) -> Iterator[TarSample]:
    """The samples of a tar read front to back (a pipe, an object-storage stream, a local file),
    as :func:`read_samples` gives them. A tar cut short, even at a member boundary where
    ``tarfile`` stops quietly, raises :class:`ShardReadError` after its last whole sample."""
    counter = _CountingReader(fileobj)
    try:
        tar = tarfile.open(fileobj=counter, mode="r|*")
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise ShardReadError(f"{type(error).__name__}: {error}") from error

    def stream_end() -> None:
        while counter.read(1 << 16):  # drain: a whole tar has two zero blocks after the last member
            pass
        if counter.count < tar.offset + 2 * tarfile.BLOCKSIZE:
            raise ShardReadError(f"the tar ends at byte {counter.count}, before its end-of-archive marker: "
                                 "the shard is truncated")

    with tar:
        yield from read_samples(tar, stream_end)


def has_scheme(url: str) -> bool:
    """Whether ``url`` names a protocol (``s3://``, ``pipe:``, ``file://``) rather than a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", url) is not None


def expand_urls(pattern: str, what: str) -> list[str]:
    """The files a training source names: brace patterns (``{00000..00099}``), several joined by
    ``::``, and globs, local or remote (fsspec; ``pipe:`` commands are taken as they are).
    Raises :class:`OpenAlignError` naming local files that do not exist and globs that match
    nothing."""
    import braceexpand

    urls: list[str] = []
    missing: list[str] = []
    for part in pattern.split("::"):
        for url in braceexpand.braceexpand(part):
            if url.startswith("pipe:"):
                urls.append(url)
            elif glob.has_magic(url):
                if has_scheme(url):
                    import fsspec

                    filesystem, path = fsspec.core.url_to_fs(url)
                    matches = sorted(filesystem.unstrip_protocol(match) for match in filesystem.glob(path))
                else:
                    matches = sorted(match for match in glob.glob(os.path.expanduser(url)) if Path(match).is_file())
                urls.extend(matches)
                missing.extend([] if matches else [url])
            elif has_scheme(url) or Path(url).expanduser().is_file():
                urls.append(url)
            else:
                missing.append(url)
    if missing:
        raise OpenAlignError(f"{len(missing)} of the {len(urls) + len(missing)} {what} that '{pattern}' names "
                             f"do not exist, e.g. '{missing[0]}' (data.train.urls)")
    return urls


def open_url(url: str) -> BinaryIO:
    """A binary stream of a shard: local paths, ``file:``, ``pipe:`` commands and http(s) through
    webdataset's ``gopen``; other URLs (``s3://``, ``gs://``, ``az://``, ``hf://`` ...) through fsspec,
    which needs the filesystem's package (s3fs, gcsfs, adlfs ...)."""
    scheme = url.split(":", 1)[0] if has_scheme(url) else ""
    if scheme in ("", "file", "pipe", "http", "https"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def decode_image(data: bytes) -> Any:
    """A decoded RGB PIL image, or None for bytes PIL cannot decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception:  # noqa: BLE001 - any decoding failure (corrupt, truncated, bomb) skips the sample
        return None
