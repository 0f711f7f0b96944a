"""Read caption datasets in Karpathy's JSON format (``dataset_coco.json``, ``dataset_flickr30k.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OpenAlignError


@dataclass(frozen=True)
class CaptionedImage:
    """An image file, its captions, and optional class labels (e.g. {"shape": "circle"})."""

    path: Path
    captions: tuple[str, ...]
    labels: dict[str, str] | None = field(default=None, hash=False, compare=False)


def read_karpathy(json_path: str | Path, split: str, image_root: str | Path | None = None) -> list[CaptionedImage]:
    """The images of one split; paths are ``image_root / filepath / filename``.

    ``image_root`` defaults to the JSON's directory. Karpathy's COCO file splits into
    ``train``, ``restval``, ``val`` and ``test``; Flickr30k's into ``train``, ``val``, ``test``.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise OpenAlignError(f"caption file '{json_path}' does not exist (expected a Karpathy-style JSON "
                             "such as dataset_coco.json)")
    try:
        data = json.loads(json_path.read_text())
        entries = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise OpenAlignError(f"'{json_path}' is not a Karpathy-style caption file (expected "
                             f"{{\"images\": [{{\"filename\", \"split\", \"sentences\": [{{\"raw\"}}]}}]}}): {error}") from None
    root = Path(image_root) if image_root is not None else json_path.parent
    items = []
    for entry in entries:
        if entry.get("split") != split:
            continue
        captions = tuple(s["raw"] for s in entry.get("sentences", ()))
        if not captions:
            raise OpenAlignError(f"'{json_path}': image '{entry.get('filename')}' has no captions")
        items.append(CaptionedImage(root / entry.get("filepath", "") / entry["filename"], captions, entry.get("labels")))
    if not items:
        splits = sorted({str(e.get("split")) for e in entries})
        raise OpenAlignError(f"'{json_path}' has no images in split '{split}'; its splits are: {', '.join(splits)}")
    return items
