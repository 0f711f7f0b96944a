"""Read caption datasets in Karpathy's JSON format (``dataset_coco.json``, ``dataset_flickr30k.json``),
or in the per-split annotation files ALBEF and BLIP (and so ALIP) read (``coco_karpathy_test.json``)."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OpenAlignError
from ..files import not_a_file

log = logging.getLogger(__name__)


_ENTRY_KEYS = {"filepath", "filename", "split"}
UNCAPTIONED = "image without a caption"


@dataclass(frozen=True)
class CaptionedImage:
    """An image file, its captions, optional class labels (e.g. {"shape": "circle"}) and any
    other text fields of its entry (e.g. ALIP's synthetic ``caption``), which training samples carry."""

    path: Path
    captions: tuple[str, ...]
    labels: dict[str, str] | None = field(default=None, hash=False, compare=False)
    fields: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


def read_karpathy(json_path: str | Path, split: str, image_root: str | Path | None = None,
                  dropped: Counter[str] | None = None) -> list[CaptionedImage]:
    """The images of one split; paths are ``image_root / filepath / filename``. An entry's other
    string keys (``"caption": "a dog on a beach"``) become the item's ``fields``. Images left
    without a caption are dropped with a warning, and counted in ``dropped`` (by reason).

    ``image_root`` defaults to the JSON's directory. Karpathy's COCO file splits into
    ``train``, ``restval``, ``val`` and ``test``; Flickr30k's into ``train``, ``val``, ``test``.
    ``split`` may join several with ``+``: ``train+restval`` is COCO's 113,287 training images,
    the "Karpathy train split" of most papers (``train`` alone is 82,783).

    ALBEF's and BLIP's annotation files (shared spec alip.md §6.2) are read too: a JSON list of
    ``{"image": path under image_root, "caption": text or list of texts}``, one file per split
    (an image's entries, one per caption in training files, are joined in order). Where the first
    image is not under ``image_root`` but is without its path's first folder, all are read so,
    as ALIP's loader reads them (``val2014/x.jpg`` in an ``image_root`` of val2014's files). A
    file whose name says another split (``..._train.json`` for ``test``) is an error.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise OpenAlignError(f"caption file '{json_path}' {not_a_file(json_path)} (expected a Karpathy-style JSON "
                             "such as dataset_coco.json)")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8-sig"))  # an editor's byte-order mark is no error
        if isinstance(data, list) and data and isinstance(data[0], dict) and "image" in data[0]:
            return _read_annotation_list(json_path, data, split, image_root, dropped)
        entries = data["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise OpenAlignError(f"'{json_path}' is not a Karpathy-style caption file (expected "
                             f"{{\"images\": [{{\"filename\", \"split\", \"sentences\": [{{\"raw\"}}]}}]}}): {error}") from None
    root = Path(image_root) if image_root is not None else json_path.parent
    wanted, found = set(split.split("+")), set()
    items, empty_captions, uncaptioned = [], 0, 0
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise OpenAlignError(f"'{json_path}': images[{number}] is not an object")
        if not isinstance(entry.get("filepath", ""), str):
            raise OpenAlignError(f"'{json_path}': images[{number}] has 'filepath' {entry['filepath']!r}; expected the "
                                 "folder of its file under the image root, as text (or no 'filepath')")
        if entry.get("split") not in wanted:
            continue
        found.add(entry["split"])
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
    if dropped is not None:
        dropped[UNCAPTIONED] += uncaptioned
    if not items or (missing := sorted(wanted - found)):
        splits = sorted({str(e.get("split")) for e in entries})
        raise OpenAlignError(f"'{json_path}' has no images in split '{missing[0] if items else split}'; its splits "
                             f"are: {', '.join(splits)}")
    return items


def _read_annotation_list(json_path: Path, entries: list, split: str, image_root: str | Path | None,
                          dropped: Counter[str] | None) -> list[CaptionedImage]:
    """ALBEF's and BLIP's ``[{"image", "caption"}]`` files (see :func:`read_karpathy`)."""
    named = set(re.findall(r"(?<![a-z])(train|restval|val|test)(?![a-z])", json_path.stem.lower()))
    if named and not named & set(split.split("+")):
        raise OpenAlignError(f"'{json_path}' holds one split, and its name says {', '.join(sorted(named))}, not "
                             f"'{split}': name the {split} file (ALBEF's and BLIP's annotations come one file per "
                             "split)")
    root = Path(image_root) if image_root is not None else json_path.parent
    captions: dict[str, list[str]] = {}
    for number, entry in enumerate(entries):
        given = entry.get("caption") if isinstance(entry, dict) else None
        texts = [given] if isinstance(given, str) else given
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(texts, list) \
                or not all(isinstance(text, str) for text in texts):
            raise OpenAlignError(f"'{json_path}': entry {number} needs an 'image' path and a 'caption' (a text or a "
                                 f"list of texts); it is {str(entry)[:120]}")
        captions.setdefault(entry["image"], []).extend(text.strip() for text in texts)
    first = next(iter(captions), "")
    if "/" in first and not (root / first).exists() and (root / first.split("/", 1)[1]).exists():
        log.info("'%s': the images are in '%s' without their paths' first folder (%s): read so, as ALIP reads them",
                 json_path, root, first.split("/", 1)[0])
        captions = {image.split("/", 1)[-1]: texts for image, texts in captions.items()}
    items = [CaptionedImage(root / image, tuple(text for text in texts if text)) for image, texts in captions.items()]
    empty, uncaptioned = sum(texts.count("") for texts in captions.values()), sum(not i.captions for i in items)
    if empty or uncaptioned:  # an entry's caption may be an empty list: that image is left out too
        log.warning("'%s': skipped %d empty caption(s) and %d image(s) left without a caption", json_path, empty,
                    uncaptioned)
    if dropped is not None:
        dropped[UNCAPTIONED] += uncaptioned
    if not (items := [item for item in items if item.captions]):
        raise OpenAlignError(f"'{json_path}' holds no captioned image")
    return items
