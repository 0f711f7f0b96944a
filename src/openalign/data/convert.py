"""``openalign data convert``: a table of local images and captions → webdataset shards.

The shards have img2dataset's layout, so the ``webdataset`` training source and ``openalign data
inspect`` read them: per sample ``KEY.jpg``, ``KEY.png`` or ``KEY.webp`` (the file's bytes,
unchanged; other formats re-encoded as PNG), ``KEY.txt`` (the caption), a member per extra
column (``KEY.<field>.txt``, ``caption.txt`` for ALIP; ``.cls`` for whole numbers, ``.json``
for other values) and ``KEY.json``; keys are zero-padded row numbers, shards ``00000.tar``,
``00001.tar``, ... with ``samples_per_shard`` samples each, and ``sizes.json`` maps each shard
to its sample count.
Each shard is written under a temporary name and renamed when complete.

For URL lists, download with img2dataset instead (an optional dependency, not vendored)::

    img2dataset --url_list pairs.parquet --input_format parquet --url_col url --caption_col caption \\
        --output_format webdataset --output_folder shards --image_size 384 --resize_mode keep_ratio \\
        --processes_count 16 --thread_count 64 --number_sample_per_shard 10000
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import OpenAlignError
from ..progress import progress_bar
from .sources import TableSourceConfig
from .transforms import to_rgb

_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})  # what PNG stores as it is


def convert_table(table: TableSourceConfig, out: str | Path, samples_per_shard: int = 10000,
                  show_progress: bool = True) -> dict[str, int]:
    """Write ``table``'s usable rows as shards under ``out``; returns ``sizes.json``'s mapping."""
    if samples_per_shard < 1:
        raise OpenAlignError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out = Path(out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise OpenAlignError(f"'{out}' already holds shards: choose an empty output directory")
    out.mkdir(parents=True, exist_ok=True)
    rows = table.rows()
    sizes: dict[str, int] = {}
    with progress_bar("writing shards", len(rows), enabled=show_progress) as advance:
        for shard, start in enumerate(range(0, len(rows), samples_per_shard)):
            name = f"{shard:05d}.tar"
            staging = out / f".{name}.tmp"
            with tarfile.open(staging, "w") as tar:
                for index in range(start, min(start + samples_per_shard, len(rows))):
                    _write_sample(tar, f"{index:09d}", *rows[index])
                    advance()
            os.replace(staging, out / name)
            sizes[name] = min(samples_per_shard, len(rows) - start)
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return sizes


def _write_sample(tar: tarfile.TarFile, key: str, image: Path | bytes, caption: str, extra: dict[str, Any]) -> None:
    extension, data = _member_image(image.read_bytes() if isinstance(image, Path) else image, key)
    source: dict[str, Any] = {"caption": caption, **extra}
    if isinstance(image, Path):
        source["source"] = str(image)
    members = {extension: data, "txt": caption.encode(), **dict(_extra_member(name, value) for name, value in
                                                                extra.items()), "json": json.dumps(source).encode()}
    for suffix, payload in members.items():
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def _extra_member(name: str, value: Any) -> tuple[str, bytes]:
    """An extra column as the member the ``webdataset`` source reads back with its type: text as
    ``NAME.txt``, a whole number as ``NAME.cls``, anything else (floats, lists) as ``NAME.json``."""
    if isinstance(value, str):
        return f"{name}.txt", value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{name}.cls", str(value).encode()
    return f"{name}.json", json.dumps(value).encode()


def _member_image(data: bytes, key: str) -> tuple[str, bytes]:
    """The image member's extension and bytes, by the bytes' format (not the file name): JPEG
    (MPO, a camera's JPEG with extra frames, included), PNG and WebP as they are, which the
    training source reads; other formats (BMP, TIFF, GIF...) re-encoded losslessly as PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format or "").lower()
            if kind in ("jpeg", "mpo", "png", "webp"):
                return {"jpeg": "jpg", "mpo": "jpg"}.get(kind, kind), data
            image.load()
            converted = io.BytesIO()
            (image if image.mode in _PNG_MODES else to_rgb(image)).save(converted, format="PNG")
            return "png", converted.getvalue()
    except Exception:  # noqa: BLE001 - any unreadable bytes
        raise OpenAlignError(f"row {int(key)}: the image is not one PIL can read (or write as PNG)") from None
