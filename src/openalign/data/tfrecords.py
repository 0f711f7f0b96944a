"""Reading TFRecord files from any stream (local, ``gs://`` through fsspec, ``pipe:`` commands),
with their CRCs checked, without TensorFlow.

A TFRecord file is a sequence of records, each ``length`` (uint64, little-endian),
``masked_crc32c(length)`` (uint32), ``data``, ``masked_crc32c(data)`` (uint32). A record whose
data CRC fails is yielded as a :class:`CorruptRecord` (the framing still holds, so the records
after it are read); a length CRC that fails, or a file that ends inside a record, ends the file
with :class:`~openalign.data.shards.ShardReadError`. A file written with TensorFlow's ``GZIP``
compression (``.tfrecord.gz``) is read through gzip, told by its magic bytes where the first record
does not frame.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from .shards import ShardReadError, with_head

_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant (mod 2³²)."""
    import crc32c  # installed with the tfrecord package

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class CorruptRecord:
    """A record whose data does not match its CRC: skipped when decoded."""

    def __init__(self, detail: str) -> None:
        self.detail = detail


def read_records(stream: BinaryIO) -> Iterator[bytes | CorruptRecord]:
    """The records of a TFRecord stream, in order; see the module docstring for errors."""
    head, stream = with_head(stream, 12)
    frames = len(head) == 12 and masked_crc(head[:8]) == struct.unpack("<I", head[8:])[0]
    if head.startswith(b"\x1f\x8b") and not frames:  # TFRecordOptions(compression_type="GZIP")
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    number = 0
    while True:
        header = _read_exactly(stream, 12, number, allow_end=True)
        if header is None:
            return
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc(header[:8]) != length_crc:
            raise ShardReadError(f"record {number}: its length field fails its CRC, so the rest cannot be framed")
        data = _read_exactly(stream, length, number)
        (data_crc,) = struct.unpack("<I", _read_exactly(stream, 4, number))
        yield data if masked_crc(data) == data_crc else CorruptRecord(f"record {number}: data fails its CRC")
        number += 1


def _read_exactly(stream: BinaryIO, size: int, number: int, allow_end: bool = False) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        try:
            chunk = stream.read(remaining)
        except (EOFError, zlib.error, gzip.BadGzipFile) as error:  # a cut or damaged compressed file
            raise ShardReadError(f"record {number}: the compressed file cannot be read ({error})") from error
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    data = b"".join(chunks)
    if allow_end and not data:
        return None
    if len(data) < size:
        raise ShardReadError(f"the file ends inside record {number}: it is truncated")
    return data
