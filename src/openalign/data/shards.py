"""Reading webdataset tar shards directly: expanding shard patterns, grouping members into
samples as webdataset does, and telling a truncated shard from a whole one. Shared by
the webdataset training source, ``openalign data caption`` and ``openalign data inspect``."""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import io
import logging
import lzma
import os
import re
import signal
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import OpenAlignError
from ..files import not_a_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")
# webdataset's split of a member name into the sample key and the field (everything after the first dot).
KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
# Members webdataset skips as metadata (its default ``skip_meta``): ``__index__``, ``__meta__/...``.
SKIPPED_META = re.compile(r"__[^/]*__($|/)")
# What reading a damaged tar (or its compressed stream) raises.
READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


class ShardReadError(Exception):
    """A shard cannot be read (truncated, corrupt, not a tar)."""


def brace_expand(pattern: str) -> list[str]:
    """``pattern``'s brace ranges and lists expanded (``{00000..00009}``, ``{a,b}``), as webdataset
    expands them; unbalanced braces are an :class:`OpenAlignError` naming the pattern."""
    import braceexpand

    try:
        return list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise OpenAlignError(f"'{pattern}' has unbalanced braces: a range is written {{00000..00099}}, a list "
                             "{a,b}") from None


def expand_shards(patterns: Sequence[str], what: str = "shard") -> list[Path]:
    """Local file paths from paths, globs and brace patterns (``shards/{00000..00009}.tar``).

    Raises :class:`OpenAlignError` naming every path or glob that matches no file (``what``: the
    kind of file, for the message).
    """
    found: dict[Path, None] = {}
    missing: list[str] = []
    for pattern in patterns:
        for expanded in brace_expand(str(pattern)):
            expanded = os.path.expanduser(expanded)
            if Path(expanded).is_file():  # a file whose name holds '[', '*' or '?' is itself, not a glob
                found[Path(expanded)] = None
            elif glob.has_magic(expanded):
                matches = sorted(Path(match) for match in glob.glob(expanded) if Path(match).is_file())
                if not matches:
                    missing.append(expanded)
                found.update(dict.fromkeys(matches))
            else:  # a folder or a FIFO is no shard either, and is said to be what it is
                missing.append(f"{expanded} ({not_a_file(expanded)})" if os.path.lexists(expanded) else expanded)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise OpenAlignError(f"{len(missing)} {what}(s) not found: {shown}")
    if not found:
        raise OpenAlignError(f"no {what}s given: pass paths, globs or brace patterns ('shards/{{00000..00009}}.tar')")
    return list(found)


def member_key(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """``(sample key, field)`` of a member, or None for one webdataset ignores (not a regular file,
    no dot in its name, metadata such as ``__index__``)."""
    if not info.isfile() or SKIPPED_META.match(info.name):
        return None
    match = KEY_EXT.match(info.name)
    return (match.group(1), match.group(2)) if match else None


@dataclass
class TarSample:
    """One webdataset sample: consecutive members sharing a key, plus the members webdataset
    ignores that lie among them (kept, so that a shard can be rewritten whole). ``key`` None:
    only ignored members, before the shard's first sample. ``cut_short``: the shard is cut or
    damaged right after the sample's members, so members it had may be missing (its members
    are whole)."""

    key: str | None
    members: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)
    cut_short: bool = False

    def field_items(self) -> list[tuple[str, bytes]]:
        """``(field, data)`` of the sample's members in order (the field is the name after the key:
        ``jpg``, ``txt``, ``caption.txt``); a field can repeat (``a.jpg`` and ``a.JPG``)."""
        return [(found[1], data or b"") for info, data in self.members if (found := member_key(info))]

    def fields(self) -> dict[str, bytes]:
        """The file members by field; of a repeated field, the first."""
        found: dict[str, bytes] = {}
        for name, data in self.field_items():
            found.setdefault(name, data)
        return found

    def image(self) -> tuple[tarfile.TarInfo, bytes] | None:
        for info, data in self.members:
            found = member_key(info)
            if found and found[1].lower() in IMAGE_EXTENSIONS:
                return info, data or b""
        return None


def read_samples(tar: tarfile.TarFile, archive_end: Callable[[int], bytes] | None = None,
                 keep_ignored: bool = False) -> Iterator[TarSample]:
    """The shard's samples in member order, members grouped by key as webdataset groups them
    (the members it ignores stay in the sample they lie in and break no sample, their bytes
    read only with ``keep_ignored``: a copy of the shard needs them, training does not); read
    errors, and a tar cut short or damaged, become :class:`ShardReadError`.

    ``tarfile`` stops quietly at a header it cannot parse (a cut, a flipped bit), so where it
    stops there must be the end-of-archive marker, two zero blocks: ``archive_end(offset)``
    returns the bytes there (by default the file is seeked; see :func:`stream_samples`).
    """
    current: TarSample | None = None
    while True:
        try:
            info = tar.next()
            tail = (archive_end or (lambda offset: _seek_read(tar, offset)))(tar.offset) if info is None else b""
        except READ_ERRORS as error:  # a cut inside a header
            yield from _cut_short(current)
            raise ShardReadError(f"{type(error).__name__}: {error}") from error
        tar.members.clear()  # a stream keeps every header it read otherwise: memory grows with the shard
        if info is None:
            if not _is_end_marker(tail):
                yield from _cut_short(current)
                raise ShardReadError(f"no end-of-archive marker at byte {tar.offset}, where the tar's members "
                                     "end: the shard is truncated or its next header is corrupt")
            if current is not None:
                yield current
            return
        found = member_key(info)
        if current is None or (found is not None and found[0] != current.key):
            if current is not None:
                yield current  # complete: a sample ends where the next key starts
            current = TarSample(found[0] if found else None)
        try:
            data = tar.extractfile(info).read() if info.isfile() and (found or keep_ignored) else None
        except READ_ERRORS as error:  # a cut inside the member's data
            yield from _cut_short(current)
            raise ShardReadError(f"{type(error).__name__}: {error}") from error
        current.members.append((info, data))


def _cut_short(sample: TarSample | None) -> Iterator[TarSample]:
    """The sample being read where the shard is cut, marked as such: its whole members may be
    all it needs (a cut between two samples), or it lost some (a cut inside it). The reader
    judges: a sample lacking a field it needs is skipped as cut short, not as lacking it."""
    if sample is not None and sample.members:
        sample.cut_short = True
        yield sample


def ends_whole(tar: tarfile.TarFile) -> bool:
    """Whether a tar that ``tarfile`` has read to its end (it stops quietly at a cut or a damaged
    header) ends there with the end-of-archive marker, two zero blocks."""
    return _is_end_marker(_seek_read(tar, tar.offset))


def _is_end_marker(tail: bytes) -> bool:
    """Whether the bytes where a tar's members end are its end-of-archive marker, two zero blocks."""
    return len(tail) == 2 * tarfile.BLOCKSIZE and not tail.strip(b"\0")


def _seek_read(tar: tarfile.TarFile, offset: int) -> bytes:
    tar.fileobj.seek(offset)
    return tar.fileobj.read(2 * tarfile.BLOCKSIZE)


# Compressed tars: magic bytes and a streaming decompressor. bzip2's is "BZh", a block size
# digit and a block's own magic (a plain tar's first member may be named "BZh..." too).
_COMPRESSED: tuple[tuple[re.Pattern[bytes], Callable[[BinaryIO], BinaryIO]], ...] = (
    (re.compile(rb"\x1f\x8b"), lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    (re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"), lambda raw: bz2.BZ2File(raw)),  # a block, or an empty stream
    (re.compile(rb"\xfd7zXZ\x00"), lambda raw: lzma.LZMAFile(raw)),
)


class _TarStream(io.RawIOBase):
    """The (decompressed) bytes of a tar read front to back, keeping the latest ones, so that the
    bytes where ``tarfile`` stopped can be checked after it stops."""

    WINDOW = 1 << 16  # more than tarfile reads ahead of the header it parses (one 10 KiB record)

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.count, self.window = raw, 0, bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[:len(data)] = data
        self._keep(data)
        return len(data)

    def _keep(self, data: bytes) -> None:
        self.count += len(data)
        self.window += data
        if len(self.window) > 2 * self.WINDOW:  # trimmed now and then: each byte is copied about once
            del self.window[:-self.WINDOW]

    def archive_end(self, offset: int) -> bytes:
        """Up to two blocks from ``offset`` (read on as needed), then the rest of the stream
        drained: a pipe's writer is not left blocked."""
        while self.count < offset + 2 * tarfile.BLOCKSIZE and (data := self.raw.read(1 << 16)):
            self._keep(data)
        start = len(self.window) - (self.count - offset)
        if start < 0:
            raise ShardReadError(f"cannot check the end of the tar: byte {offset} was read too long ago")
        tail = bytes(self.window[start:start + 2 * tarfile.BLOCKSIZE])
        while self.raw.read(1 << 16):
            pass
        return tail


class _Prefixed(io.RawIOBase):
    """``head`` (bytes already read from ``raw``) followed by the rest of ``raw``."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            data, self.head = self.head[:len(buffer)], self.head[len(buffer):]
        else:
            data = self.raw.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def with_head(fileobj: BinaryIO, size: int) -> tuple[bytes, BinaryIO]:
    """The first ``size`` bytes of a stream read front to back (a pipe cannot seek back), and a
    stream of it whole again: those bytes, then the rest."""
    head = fileobj.read(size)
    return head, io.BufferedReader(_Prefixed(head, fileobj))


def stream_samples(fileobj: BinaryIO) -> Iterator[TarSample]:
    """The samples of a tar read front to back (a pipe, an object-storage stream, a local file;
    plain or gzip, bzip2 or xz compressed), as :func:`read_samples` gives them. A tar cut short
    or damaged, even at a member boundary where ``tarfile`` stops quietly, raises
    :class:`ShardReadError` after its last whole sample."""
    try:
        head, raw = with_head(fileobj, 10)
        for magic, decompress in _COMPRESSED:
            if magic.match(head):
                raw = decompress(raw)
        stream = _TarStream(raw)
        tar = tarfile.open(fileobj=stream, mode="r|")
    except READ_ERRORS as error:
        raise ShardReadError(f"{type(error).__name__}: {error}") from error
    with tar:
        yield from read_samples(tar, stream.archive_end)


def has_scheme(url: str) -> bool:
    """Whether ``url`` names a protocol (``s3://``, ``pipe:``, ``file://``) rather than a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", url) is not None


def expand_urls(pattern: str, what: str) -> list[str]:
    """The files a training source names: brace patterns (``{00000..00099}``), several joined by
    ``::``, and globs, local or remote (fsspec; ``pipe:`` commands are taken as they are).
    Raises :class:`OpenAlignError` naming local files that do not exist and globs that match
    nothing."""
    urls: list[str] = []
    missing: list[str] = []
    parts = pattern.split("::")
    if not all(part.strip() for part in parts):
        raise OpenAlignError(f"'{pattern}' has an empty part between its '::' separators (a '::' at an end, or two in "
                             "a row): each part names files (in a recipe: data.train.urls)")
    for part in parts:
        for url in brace_expand(part):
            if url.startswith(("pipe:", "http:", "https:")):  # an http '?' starts a query, not a wildcard
                urls.append(url)
            elif not has_scheme(url) and Path(url).expanduser().is_file():  # a name with '[' or '?' included
                urls.append(os.path.expanduser(url))  # what opens it (webdataset's gopen) does not expand '~'
            elif glob.has_magic(url):
                if has_scheme(url):
                    import fsspec

                    filesystem, path = fsspec.core.url_to_fs(check_filesystem(url))
                    matches = sorted(filesystem.unstrip_protocol(match) for match in filesystem.glob(path)
                                     if filesystem.isfile(match))
                else:
                    matches = sorted(match for match in glob.glob(os.path.expanduser(url)) if Path(match).is_file())
                urls.extend(_without_sidecars(matches, url))
                missing.extend([] if matches else [url])
            elif has_scheme(url) and not url.lower().startswith("file:"):
                urls.append(check_filesystem(url))  # remote files are found when read (a check would cost a request)
            elif has_scheme(url) and _local_path(url).is_file():
                urls.append(url)
            else:
                missing.append(url)
    if missing and _local_path(missing[0]).expanduser().is_dir():
        raise OpenAlignError(f"'{missing[0]}' is a directory: name its {what}, e.g. '{missing[0].rstrip('/')}/*.tar' "
                             "or a brace range (in a recipe: data.train.urls)")
    if missing and glob.has_magic(missing[0]):  # a glob that matched nothing: not "1 of the 1 shards"
        part = f" (a part of '{pattern}')" if missing[0] != pattern else ""
        raise OpenAlignError(f"the pattern '{missing[0]}'{part} matches no file: check its folder and extension (in "
                             "a recipe: data.train.urls)")
    if missing:
        raise OpenAlignError(f"{len(missing)} of the {len(urls) + len(missing)} {what} that '{pattern}' names "
                             f"do not exist, e.g. '{missing[0]}' (in a recipe: data.train.urls)")
    return urls


# what img2dataset writes beside its shards (NNNNN.parquet, NNNNN_stats.json), and other files that are no shard
_SIDECARS = (".parquet", ".json", ".jsonl", ".csv", ".tsv", ".txt", ".npy")


def _without_sidecars(matches: list[str], url: str) -> list[str]:
    """The shards of what a glob matched: metadata beside them (``/data/cc3m/*`` of an img2dataset
    folder) is left out, with a warning; where nothing else matched, everything stays (and says
    what it is when read)."""
    shards = [match for match in matches if not match.lower().endswith(_SIDECARS)]
    if not shards or len(shards) == len(matches):
        return matches
    left_out = next(match for match in matches if match.lower().endswith(_SIDECARS))
    log.warning("'%s' also matches %d file(s) that are not shards, left out (e.g. '%s', as img2dataset writes "
                "beside its shards): name the shards alone, e.g. with '*.tar' or '*.tfrecord'", url,
                len(matches) - len(shards), left_out)
    return shards


def _local_path(url: str) -> Path:
    """The local path a path or a ``file:`` URL names (``file:///data/x.tar``, ``file:x.tar``)."""
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(url).path)) if url.lower().startswith("file:") else Path(url)


def check_filesystem(url: str) -> str:
    """``url``, once fsspec is known to read its protocol (``file:`` and ``pipe:`` need nothing);
    else an error that names the package to install, before any worker tries a shard."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("file", "pipe", "http", "https"):
        return url
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:  # fsspec's message names the package: "Install s3fs to access S3"
        raise OpenAlignError(f"cannot read '{url}': {error} (pip install it)") from None
    except ValueError:
        raise OpenAlignError(f"cannot read '{url}': fsspec knows no protocol '{scheme}' (s3://, gs://, az://, hf://, "
                             "pipe: ...)") from None
    return url


def open_url(url: str) -> BinaryIO:
    """A binary stream of a shard: local paths, ``file:``, ``pipe:`` commands and http(s) through
    webdataset's ``gopen``; other URLs (``s3://``, ``gs://``, ``az://``, ``hf://`` ...) through fsspec,
    which needs the filesystem's package (s3fs, gcsfs, adlfs ...)."""
    scheme = url.split(":", 1)[0] if has_scheme(url) else ""
    if scheme == "pipe":
        return _open_command(url.removeprefix("pipe:"))
    if scheme in ("", "file", "http", "https"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    import fsspec

    return fsspec.open(check_filesystem(url), "rb").open()


@contextlib.contextmanager
def opened_shard(url: str) -> Iterator[BinaryIO]:
    """:func:`open_url` for reading a shard front to back. Read to its end, the stream is closed
    there, where a ``pipe:`` command's failing exit status is the shard's error. Left before its end
    (the reader moved on, an error, Ctrl-C), it is closed without a word, its command's session
    ended first: out of the reader's process group the command would run on, and closing waits for it.
    A command that outlives SIGTERM by :data:`COMMAND_GRACE_SECONDS` (one that ignores it) is killed."""
    stream = open_url(url)
    try:
        yield stream
    except BaseException:
        process = getattr(stream, "proc", None)  # a pipe: command (webdataset's Pipe)
        if process is not None and process.poll() is None:
            _end_session(process)
        with contextlib.suppress(Exception):
            stream.close()
        raise
    stream.close()


COMMAND_GRACE_SECONDS = 3.0


def _end_session(process: subprocess.Popen) -> None:
    """SIGTERM to a ``pipe:`` command's session, SIGKILL where it is still running
    :data:`COMMAND_GRACE_SECONDS` later (its shell, or all of it, ignoring SIGTERM)."""
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGTERM)  # its own session's leader: its group is its id
    try:
        process.wait(COMMAND_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)


def _open_command(command: str) -> BinaryIO:
    """The output of a ``pipe:`` shard's shell command, through webdataset's ``Pipe`` (a failing
    exit status is an error when the stream is closed; 141, SIGPIPE, is a reader that stopped early),
    with the command in a session of its own. Schedulers and torchrun send SIGTERM to a rank's whole
    process group; training lets the step under way finish and checkpoints it
    (:mod:`openalign.train.stop`), but a command in the group ended at once, cutting its shard
    short under the batches still to be read. Out of the group, it ends when its reader leaves the
    shard (:func:`opened_shard`) or ends (SIGPIPE at its next write)."""
    from webdataset import utils
    from webdataset.gopen import Pipe

    if utils.enforce_security:  # webdataset's own switch against running commands from URLs
        raise OpenAlignError(f"pipe:{command}: webdataset's enforce_security forbids pipe: URLs")
    return Pipe(command, mode="rb", shell=True, bufsize=8192, ignore_status=[141], start_new_session=True)


def decode_image(data: bytes) -> Any:
    """A decoded RGB PIL image, or None for bytes PIL cannot decode."""
    from PIL import Image

    from .transforms import to_rgb

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except Exception:  # noqa: BLE001 - any decoding failure (corrupt, truncated, bomb) skips the sample
        return None
