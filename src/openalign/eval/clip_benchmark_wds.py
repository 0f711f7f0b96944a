"""CLIP_benchmark's webdataset layout for evaluation datasets (its ``wds/<name>`` datasets).

    ROOT/classnames.txt                           one class name per line (classification)
    ROOT/zeroshot_classification_templates.txt    one prompt per line, with {c} for the class
    ROOT/dataset_type.txt                         "retrieval", or absent for classification
    ROOT/<split>/nshards.txt                      n: the split is 0.tar ... (n-1).tar
    ROOT/<split>/0.tar, 1.tar, ...                samples: KEY.webp|png|jpg + KEY.cls (class index)
                                                  or KEY.txt (captions, one per line)

As CLIP_benchmark reads it: ``nshards.txt`` names the shards (others beside them are left out,
with a warning; without it, every ``*.tar``); the type is read in any case; a sample's key is its
path in the tar without the extension. Unlike CLIP_benchmark, blank caption lines are left out and
captions are stripped of surrounding spaces.

The images are extracted once to ``ROOT/.openalign/<split>/`` (or another directory; under
``~/.cache/openalign/wds/`` when ROOT is read-only), so that the evaluation reads files like every
other task and the embedding cache can key them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..data.shards import ends_whole
from ..errors import OpenAlignError
from ..files import written_whole

log = logging.getLogger(__name__)

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
    """Extract (once) and index ``root/<split>/*.tar``; errors say what the layout should be.

    The shards are streamed: images go to files as they are read (each written whole under a
    temporary name, then renamed, so that ranks extracting together never read a half-written
    file), and only labels and captions are kept in memory.
    """
    root = Path(root)
    shards = _shards(root / split)
    kind_file = root / "dataset_type.txt"
    kind = read_text_file(kind_file).strip().lower() if kind_file.is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise OpenAlignError(f"'{root}' is a '{kind}' dataset; openalign evaluates classification and retrieval")
    target = _extraction_dir(root, split, extract_to)
    field = "txt" if kind == "retrieval" else "cls"
    images: dict[str, dict[str, Path]] = {}
    fields: dict[str, bytes] = {}
    owners: dict[str, str] = {}  # extracted file name -> its key
    for shard in shards:
        try:
            shard_mtime = shard.stat().st_mtime_ns
            with tarfile.open(shard) as archive:
                for member in archive:
                    path = PurePosixPath(member.name)
                    if not member.isfile() or "." not in path.name:
                        continue
                    stem, extension = path.name.split(".", 1)  # webdataset's key: the path up to the name's first dot
                    key, extension = f"{shard.stem}/{path.parent / stem}", extension.lower()
                    if extension in IMAGE_KEYS:
                        name = f"{key.replace('/', '_')}.{extension}"
                        if owners.setdefault(name, key) != key:  # a/x.png and a_x.png: the later one's own name
                            name = f"{key.replace('/', '_')}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.{extension}"
                        images.setdefault(key, {})[extension] = _extract(archive, member, target / name, shard_mtime)
                    elif extension == field:
                        fields[key] = archive.extractfile(member).read()
                if not ends_whole(archive):  # tarfile stops quietly at a cut: the rest would be left out unsaid
                    raise OpenAlignError(f"shard '{shard}' is truncated or damaged: no end-of-archive marker at byte "
                                         f"{archive.offset}, where its members end; download or export it again")
        except (tarfile.TarError, OSError) as error:
            raise OpenAlignError(f"cannot read shard '{shard}': {error}") from None
    paths, labels, captions = [], [], []
    keys = list(dict.fromkeys([*images, *fields]))  # in shard order
    for key in keys:
        if key not in images or key not in fields:
            raise OpenAlignError(f"sample '{key}' of '{root / split}' lacks an image ({'/'.join(IMAGE_KEYS)}) or "
                                 f"its .{field}")
        paths.append(next(images[key][name] for name in IMAGE_KEYS if name in images[key]))
        if kind == "retrieval":
            try:
                text = fields[key].decode()
            except UnicodeDecodeError as error:
                raise OpenAlignError(f"the captions of sample '{key}' of '{root / split}' are not UTF-8 ({error})"
                                     ) from None
            captions.append([line.strip() for line in text.splitlines() if line.strip()])
        else:
            labels.append(_label(fields[key], key, root / split))
    metadata = [root / "classnames.txt", root / "zeroshot_classification_templates.txt"]
    classnames, templates = (read_lines(path) if path.is_file() else None for path in metadata)
    if classnames is not None:
        for key, label in zip(keys, labels):
            if not 0 <= label < len(classnames):
                raise OpenAlignError(f"sample '{key}' of '{root / split}' has label {label}, outside the "
                                     f"{len(classnames)} classes of {root / 'classnames.txt'}")
    return WdsSplit(paths, None if kind == "retrieval" else labels, captions if kind == "retrieval" else None,
                    classnames, templates)


def _shards(folder: Path) -> list[Path]:
    """The split's shards: those ``nshards.txt`` names, else every ``*.tar`` in numeric order."""
    found = sorted(folder.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    count_file = folder / "nshards.txt"
    if not count_file.is_file():
        if not found:
            raise OpenAlignError(f"'{folder}' holds no .tar shards; expected CLIP_benchmark's webdataset layout "
                                 f"({folder.parent}/<split>/0.tar ... with classnames.txt or dataset_type.txt beside "
                                 "<split>)")
        return found
    text = read_text_file(count_file).strip()
    if not text.isdigit() or int(text) < 1:
        raise OpenAlignError(f"'{count_file}' holds '{text[:40]}', not the number of the split's shards")
    shards = [folder / f"{index}.tar" for index in range(int(text))]
    if missing := [shard.name for shard in shards if not shard.is_file()]:
        raise OpenAlignError(f"'{folder}' lacks {len(missing)} of the {len(shards)} shards its nshards.txt names "
                             f"(e.g. {missing[0]}): the download is incomplete")
    if extra := sorted(set(found) - set(shards)):
        log.warning("%d .tar file(s) of '%s' are not among the %d shards its nshards.txt names and are left out, "
                    "as CLIP_benchmark leaves them (e.g. %s)", len(extra), folder, len(shards), extra[0].name)
    return shards


def _extraction_dir(root: Path, split: str, extract_to: str | Path | None) -> Path:
    """``extract_to``, else ``root/.openalign/<split>``, else (a read-only root, as shared dataset
    mounts often are) ``~/.cache/openalign/wds/<root's hash>/<split>``."""
    if extract_to is not None:
        candidates = [Path(extract_to)]
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openalign" / "wds"
        digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        candidates = [root / ".openalign" / split, cache / f"{root.name}-{digest}" / split]
    for index, target in enumerate(candidates):
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            problem = error
            continue
        if os.access(target, os.W_OK):
            if index:
                log.info("'%s' is read-only: extracting its images to %s", root, target)
            return target
        problem = PermissionError(f"'{target}' is not writable")
    remedy = "pass a writable directory" if extract_to is not None else "set XDG_CACHE_HOME to a writable directory"
    raise OpenAlignError(f"cannot extract the images of '{root / split}' to {' or '.join(map(str, candidates))}: "
                         f"{problem}; {remedy}") from None


def _extract(archive: tarfile.TarFile, member: tarfile.TarInfo, path: Path, shard_mtime: int) -> Path:
    """``member`` written to ``path``, whole or not at all, unless a file of its size, extracted
    since the shard was last written (``shard_mtime``, ns), is there: a shard made again in
    place may hold another image of the same size under the same key."""
    if path.is_file() and (done := path.stat()).st_size == member.size and done.st_mtime_ns >= shard_mtime:
        return path
    try:
        with written_whole(path) as temporary:  # a name unique across ranks and hosts
            temporary.write_bytes(archive.extractfile(member).read())  # the usual permissions, for shared roots
    except OSError as error:
        raise OpenAlignError(f"cannot write the extracted image '{path}': {error}") from None
    return path


def _label(data: bytes, key: str, split: Path) -> int:
    try:
        return int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise OpenAlignError(f"sample '{key}' of '{split}' has the label {data[:20]!r}; a .cls holds a class "
                             "index (a whole number)") from None


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    return [line.strip() for line in read_text_file(path).splitlines() if line.strip()]


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's content, without a byte-order mark (an editor's; it would become part of
    the first class name); another encoding is an error naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise OpenAlignError(f"'{path}' is not UTF-8 text ({error}): save it as UTF-8") from None
