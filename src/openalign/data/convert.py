"""``openalign data convert``: a table of local images and captions → webdataset shards.

The shards have img2dataset's layout, so the ``webdataset`` training source and ``openalign data
inspect`` read them: per sample ``KEY.jpg``, ``KEY.png`` or ``KEY.webp`` (the file's bytes,
unchanged; other formats re-encoded as PNG), ``KEY.txt`` (the caption), a member per extra
column (``KEY.<field>.txt``, ``caption.txt`` for ALIP; ``.cls`` for whole numbers, ``.json``
for other values) and ``KEY.json`` (``caption``, the extra fields under ``extra``, where a column
named like ``caption`` cannot take the raw caption's place, and where the sample came from:
``source``, its image file, and ``table_row``); keys number the samples written
(``000000000``, ``000000001``, ...), shards ``00000.tar``, ``00001.tar``, ... with
``samples_per_shard`` samples each, and ``sizes.json`` maps each shard to its sample count.
Each shard is written under a temporary name and renamed when complete. Rows whose image cannot
be read (PIL cannot decode it, or the file system refuses it) are skipped, counted and logged by
table row.

For URL lists, download with img2dataset instead (an optional dependency, not vendored)::

    img2dataset --url_list pairs.parquet --input_format parquet --url_col url --caption_col caption \\
        --output_format webdataset --output_folder shards --image_size 384 --resize_mode keep_ratio \\
        --processes_count 16 --thread_count 64 --number_sample_per_shard 10000
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

from ..errors import OpenAlignError
from ..files import printable
from ..progress import progress_bar
from .quality import UNDECODABLE_IMAGE, SkipSample, open_image
from .sources import StreamOptions, TableSourceConfig
from .transforms import to_rgb

log = logging.getLogger(__name__)

_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})  # what PNG stores as it is


def convert_table(table: TableSourceConfig, out: str | Path, samples_per_shard: int = 10000,
                  show_progress: bool = True) -> dict[str, int]:
    """Write ``table``'s usable rows as shards under ``out``; returns ``sizes.json``'s mapping.

    A row whose image cannot be read is skipped, counted and logged (as training skips such
    samples), so one bad file does not lose the job; every shard but the last is full.
    """
    if samples_per_shard < 1:
        raise OpenAlignError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out = Path(out)
    if out.is_dir() and (any(out.glob("*.tar")) or (out / "sizes.json").exists()):
        raise OpenAlignError(f"'{out}' already holds shards or a sizes.json: choose a directory without them")
    out.mkdir(parents=True, exist_ok=True)
    rows = table.located_rows()
    writer = _ShardWriter(out, samples_per_shard)
    unreadable: list[str] = []
    small: list[str] = []  # readable, under the webdataset source's default min_image_side
    try:
        with progress_bar("writing shards", len(rows), enabled=show_progress) as advance:
            for origin, (image, caption, extra) in rows:
                name = printable(image.name) if isinstance(image, Path) else "image bytes"  # for the log
                try:
                    members, side = _sample_members(image, caption, extra, origin)
                except OSError as error:  # permissions, an I/O error: this row's, not the job's
                    unreadable.append(f"{origin}: {error.strerror or error}")
                except SkipSample as skip:  # the reason training would give: undecodable, a decompression bomb
                    unreadable.append(f"{origin} ({name}): {skip}")
                else:
                    writer.add(f"{writer.written:09d}", members)
                    if side < StreamOptions.min_image_side:
                        small.append(f"{origin} ({name}, {side} px)")
                advance()
        writer.close()
    finally:
        writer.discard()
    if unreadable:
        log.warning("skipped %d of %d rows whose image cannot be read: %s%s", len(unreadable), len(rows),
                    "; ".join(unreadable[:5]), " ..." if len(unreadable) > 5 else "")
    if small:  # written (a table source trains on them), but a webdataset source skips them by default
        log.warning("wrote %d image(s) whose shorter side is under %d px, which the webdataset source skips unless "
                    "its min_image_side is lowered: %s%s", len(small), StreamOptions.min_image_side,
                    "; ".join(small[:5]), " ..." if len(small) > 5 else "")
    if not writer.sizes:
        raise OpenAlignError(f"none of the {len(rows)} rows of the table has an image that can be read (first: "
                             f"{'; '.join(unreadable[:3])}): no shard written; check image_column and image_root")
    (out / "sizes.json").write_text(json.dumps(writer.sizes, indent=1))
    return writer.sizes


class _ShardWriter:
    """Samples into ``00000.tar``, ``00001.tar``, ... of ``per_shard`` each, each written under a
    temporary name and renamed when complete."""

    def __init__(self, out: Path, per_shard: int) -> None:
        self.out, self.per_shard = out, per_shard
        self.sizes: dict[str, int] = {}
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.written = 0  # samples added, in all shards

    @property
    def name(self) -> str:
        return f"{len(self.sizes):05d}.tar"

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.tar is None:
            self.tar, self.count = tarfile.open(self.out / f".{self.name}.tmp", "w"), 0
        for suffix, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(payload)
            self.tar.addfile(info, io.BytesIO(payload))
        self.count += 1
        self.written += 1
        if self.count == self.per_shard:
            self.close()

    def close(self) -> None:
        """Finish the open shard, if any."""
        if self.tar is not None:
            self.tar.close()
            self.tar = None
            os.replace(self.out / f".{self.name}.tmp", self.out / self.name)
            self.sizes[self.name] = self.count

    def discard(self) -> None:
        """Remove an unfinished shard (after an error)."""
        if self.tar is not None:
            self.tar.close()
            self.tar = None
            (self.out / f".{self.name}.tmp").unlink(missing_ok=True)


def _sample_members(image: Path | bytes, caption: str, extra: dict[str, Any], origin: str
                    ) -> tuple[dict[str, bytes], int]:
    """A sample's members by suffix, and its image's shorter side; ``origin``, its table row, goes
    in its JSON (and its image file, if it has one). Raises OSError when the file cannot be read,
    :class:`SkipSample` when its image cannot be used (as training would skip it)."""
    extension, data, side = _member_image(image.read_bytes() if isinstance(image, Path) else image)
    source: dict[str, Any] = {"caption": caption, **({"extra": extra} if extra else {}), "table_row": origin}
    if isinstance(image, Path):
        source["source"] = str(image)
    return {extension: data, "txt": caption.encode(), **dict(_extra_member(name, value) for name, value in
                                                            extra.items()),
            "json": json.dumps(source, default=str).encode()}, side


def _extra_member(name: str, value: Any) -> tuple[str, bytes]:
    """An extra column as the member the ``webdataset`` source reads back with its type: text as
    ``NAME.txt``, a whole number as ``NAME.cls``, anything else (floats, lists) as ``NAME.json``
    (what JSON has no type for, a timestamp say, as its text)."""
    if isinstance(value, str):
        return f"{name}.txt", value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{name}.cls", str(value).encode()
    return f"{name}.json", json.dumps(value, default=str).encode()


def _member_image(data: bytes) -> tuple[str, bytes, int]:
    """The image member's extension and bytes, by the bytes' format (not the file name), and the
    image's shorter side: JPEG (MPO, a camera's JPEG with extra frames, included), PNG and WebP as
    they are, which the training source reads; other formats (BMP, TIFF, GIF...) re-encoded
    losslessly as PNG. Raises :class:`SkipSample` for bytes training could not use: not an image,
    a decompression bomb (over PIL's ``MAX_IMAGE_PIXELS``), truncated or corrupt image data."""
    with open_image(data) as image:
        kind = (image.format or "").lower()
        try:
            image.load()  # decoded whole: a truncated file opens, and training would skip it
        except Exception as error:  # noqa: BLE001 - any undecodable image data
            raise SkipSample(UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}") from None
        if kind in ("jpeg", "mpo", "png", "webp"):
            return {"jpeg": "jpg", "mpo": "jpg"}.get(kind, kind), data, min(image.size)
        converted = io.BytesIO()
        (image if image.mode in _PNG_MODES else to_rgb(image)).save(converted, format="PNG")
        return "png", converted.getvalue(), min(image.size)
