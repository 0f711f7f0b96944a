"""Read caption datasets in Karpathy's JSON format (``dataset_coco.json``, ``dataset_flickr30k.json``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OpenAlignError
from ..files import not_a_file

log = logging.getLogger(__name__)


_ENTRY_KEYS = {"filepath", "filename", "split"}


@dataclass(frozen=True)
class CaptionedImage:
    """An image file, its captions, optional class labels (e.g. {"shape": "circle"}) and any
    other text fields of its entry (e.g. ALIP's synthetic ``caption``), which training samples carry."""

    path: Path
    captions: tuple[str, ...]
    labels: dict[str, str] | None = field(default=None, hash=False, compare=False)
    fields: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


def read_karpathy(json_path: str | Path, split: str, image_root: str | Path | None = None) -> list[CaptionedImage]:
    """The images of one split; paths are ``image_root / filepath / filename``. An entry's other
    string keys (``"caption": "a dog on a beach"``) become the item's ``fields``.

    ``image_root`` defaults to the JSON's directory. Karpathy's COCO file splits into
    ``train``, ``restval``, ``val`` and ``test``; Flickr30k's into ``train``, ``val``, ``test``.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise OpenAlignError(f"caption file '{json_path}' {not_a_file(json_path)} (expected a Karpathy-style JSON "
                             "such as dataset_coco.json)")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8-sig"))  # an editor's byte-order mark is no error
        entries = data["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise OpenAlignError(f"'{json_path}' is not a Karpathy-style caption file (expected "
                             f"{{\"images\": [{{\"filename\", \"split\", \"sentences\": [{{\"raw\"}}]}}]}}): {error}") from None
    root = Path(image_root) if image_root is not None else json_path.parent
    items, empty_captions, uncaptioned = [], 0, 0
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise OpenAlignError(f"'{json_path}': images[{number}] is not an object")
        if entry.get("split") != split:
            continue
        name = entry.get("filename")
        sentences = entry.get("sentences")
        if not isinstance(name, str) or not name or not isinstance(sentences, list):
            raise OpenAlignError(f"'{json_path}': images[{number}] needs a 'filename' and a list of 'sentences' "
                                 f"(it has keys {sorted(entry)})")
        raw = [s.get("raw") if isinstance(s, dict) else None for s in sentences]
        if any(not isinstance(r, str) for r in raw):
            raise OpenAlignError(f"'{json_path}': a sentence of image '{name}' has no 'raw' text")
        captions = tuple(r.strip() for r in raw if r.strip())
        empty_captions += len(raw) - len(captions)
        if not captions:
            uncaptioned += 1
            continue
        extra = {key: value.strip() for key, value in entry.items() if isinstance(value, str) and key not in _ENTRY_KEYS}
        items.append(CaptionedImage(root / entry.get("filepath", "") / name, captions, entry.get("labels"), extra))
    if empty_captions or uncaptioned:
        log.warning("'%s' split '%s': skipped %d empty caption(s) and %d image(s) left without a caption",
                    json_path, split, empty_captions, uncaptioned)
    if not items:
        splits = sorted({str(e.get("split")) for e in entries})
        raise OpenAlignError(f"'{json_path}' has no images in split '{split}'; its splits are: {', '.join(splits)}")
    return items
