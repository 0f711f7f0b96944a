"""CLIP_benchmark's webdataset layout for evaluation datasets (its ``wds/<name>`` datasets).

    ROOT/classnames.txt                           one class name per line (classification)
    ROOT/zeroshot_classification_templates.txt    one prompt per line, with {c} for the class
    ROOT/dataset_type.txt                         "retrieval", or absent for classification
    ROOT/<split>/0.tar, 1.tar, ...                samples: KEY.webp|png|jpg + KEY.cls (class index)
                                                  or KEY.txt (captions, one per line)

The images are extracted once to ``ROOT/.openalign/<split>/`` (or another directory), so that
the evaluation reads files like every other task and the embedding cache can key them.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import OpenAlignError

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")


@dataclass
class WdsSplit:
    """One split: image files with either class labels or captions, and the dataset's metadata."""

    paths: list[Path]
    labels: list[int] | None
    captions: list[list[str]] | None
    classnames: list[str] | None
    templates: list[str] | None


def is_clip_benchmark_wds(root: str | Path) -> bool:
    root = Path(root)
    return root.is_dir() and any(root.glob("*/*.tar")) and (
        (root / "classnames.txt").is_file() or (root / "dataset_type.txt").is_file())


def read_split(root: str | Path, split: str = "test", extract_to: str | Path | None = None) -> WdsSplit:
    """Extract (once) and index ``root/<split>/*.tar``; errors say what the layout should be."""
    root = Path(root)
    shards = sorted((root / split).glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    if not shards:
        raise OpenAlignError(f"'{root / split}' holds no .tar shards; expected CLIP_benchmark's webdataset layout "
                             f"({root}/<split>/0.tar ... with classnames.txt or dataset_type.txt beside <split>)")
    kind = (root / "dataset_type.txt").read_text().strip() if (root / "dataset_type.txt").is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise OpenAlignError(f"'{root}' is a '{kind}' dataset; openalign evaluates classification and retrieval")
    target = Path(extract_to) if extract_to is not None else root / ".openalign" / split
    target.mkdir(parents=True, exist_ok=True)
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        try:
            with tarfile.open(shard) as archive:
                for member in archive:
                    if member.isfile() and "." in Path(member.name).name:
                        key, extension = Path(member.name).name.split(".", 1)
                        samples.setdefault(f"{shard.stem}/{key}", {})[extension.lower()] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError) as error:
            raise OpenAlignError(f"cannot read shard '{shard}': {error}") from None
    paths, labels, captions, keys = [], [], [], []
    field = "txt" if kind == "retrieval" else "cls"
    for key, sample in samples.items():
        image_key = next((name for name in IMAGE_KEYS if name in sample), None)
        if image_key is None or field not in sample:
            raise OpenAlignError(f"sample '{key}' of '{root / split}' lacks an image ({'/'.join(IMAGE_KEYS)}) or "
                                 f"its .{field}")
        path = target / f"{key.replace('/', '_')}.{image_key}"
        if not path.is_file() or path.stat().st_size != len(sample[image_key]):
            path.write_bytes(sample[image_key])
        paths.append(path)
        if kind == "retrieval":
            captions.append([line.strip() for line in sample["txt"].decode().splitlines() if line.strip()])
        else:
            labels.append(_label(sample["cls"], key, root / split))
            keys.append(key)
    metadata = [root / "classnames.txt", root / "zeroshot_classification_templates.txt"]
    classnames, templates = (read_lines(path) if path.is_file() else None for path in metadata)
    if classnames is not None:
        for key, label in zip(keys, labels):
            if not 0 <= label < len(classnames):
                raise OpenAlignError(f"sample '{key}' of '{root / split}' has label {label}, outside the "
                                     f"{len(classnames)} classes of {root / 'classnames.txt'}")
    return WdsSplit(paths, None if kind == "retrieval" else labels, captions if kind == "retrieval" else None,
                    classnames, templates)


def _label(data: bytes, key: str, split: Path) -> int:
    try:
        return int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise OpenAlignError(f"sample '{key}' of '{split}' has the label {data[:20]!r}; a .cls holds a class "
                             "index (a whole number)") from None


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
