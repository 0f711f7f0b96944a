"""Evaluation splits that papers drew at random from a whole dataset, rebuilt as class folders.

ALIP evaluates Caltech-101 on a random 5,677 of its 8,677 images (spec alip.md §6.1):
``torch.utils.data.random_split(Caltech101(root), [3000, 5677], generator=Generator().manual_seed(3072))``
over torchvision's ``Caltech101``, whose items are its categories in sorted order (without
``BACKGROUND_Google``), each category's images ``image_0001.jpg`` to ``image_<n>.jpg`` where
``n`` counts the category folder's files. :func:`caltech101_split` draws the same permutation
(``torch.randperm`` with that generator, as ``random_split`` does) over the same items and
writes the chosen split as class folders, named by category: their sorted order is torchvision's
label order, which the shipped ``caltech101_classnames`` follow. The split is the paper's as
long as this torch's ``randperm`` draws the permutation the torch ALIP ran drew (which cannot be
checked here); a test pins torch 2.14's, so that a torch that draws otherwise is noticed.

ALIP's SUN397 split cannot be rebuilt: its seed adds ``hash("sun397")``, random per process
(spec alip.md §8 item 14), and torchvision lists SUN397's images in the file system's order.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..errors import OpenAlignError
from ..files import not_a_file

log = logging.getLogger(__name__)

CALTECH101_LENGTHS = {"train": 3000, "test": 5677}  # ALIP's random_split, in this order
CALTECH101_SEED = 3072
CALTECH101_BACKGROUND = "BACKGROUND_Google"


def caltech101_items(root: str | Path) -> list[tuple[str, Path]]:
    """``(category, image path)`` of each item of torchvision's ``Caltech101`` at ``root`` (the
    folder holding ``101_ObjectCategories``, or torchvision's root above its ``caltech101``
    folder), in its order."""
    categories_dir = _categories_dir(Path(root).expanduser())
    categories = sorted(os.listdir(categories_dir))
    if CALTECH101_BACKGROUND in categories:
        categories.remove(CALTECH101_BACKGROUND)
    items = []
    for category in categories:
        count = len(os.listdir(categories_dir / category))
        items += [(category, categories_dir / category / f"image_{index:04d}.jpg") for index in range(1, count + 1)]
    return items


def random_split_indices(size: int, lengths: list[int], seed: int) -> list[list[int]]:
    """The indices each part of ``torch.utils.data.random_split(range(size), lengths,
    generator=torch.Generator().manual_seed(seed))`` holds, in its order."""
    if sum(lengths) != size:
        raise OpenAlignError(f"the split's parts hold {sum(lengths)} items ({' + '.join(map(str, lengths))}), "
                             f"the dataset {size}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    starts = [sum(lengths[:part]) for part in range(len(lengths))]
    return [order[start:start + length] for start, length in zip(starts, lengths)]


def caltech101_split(root: str | Path, out: str | Path, split: str = "test", seed: int = CALTECH101_SEED,
                     copy: bool = False) -> int:
    """Write ALIP's Caltech-101 ``split`` (``test``: 5,677 images; ``train``: 3,000) of the
    dataset at ``root`` to ``out/<category>/`` as links to the images (``copy``: copies); the
    number of images written. ``out`` must not exist yet, or be empty."""
    if split not in CALTECH101_LENGTHS:
        raise OpenAlignError(f"split '{split}': ALIP's Caltech-101 splits are {', '.join(CALTECH101_LENGTHS)}")
    items = caltech101_items(root)
    if len(items) != sum(CALTECH101_LENGTHS.values()):
        raise OpenAlignError(f"'{root}' holds {len(items)} Caltech-101 images, not 8,677 (101 categories without "
                             f"{CALTECH101_BACKGROUND}): ALIP's split is drawn over the whole dataset as released")
    parts = dict(zip(CALTECH101_LENGTHS, random_split_indices(len(items), list(CALTECH101_LENGTHS.values()), seed)))
    chosen = [items[index] for index in parts[split]]
    if missing := [str(path) for _, path in chosen if not path.is_file()]:
        raise OpenAlignError(f"{len(missing)} of the split's images are not files, e.g. '{missing[0]}': torchvision "
                             "names a category's images image_0001.jpg to image_<n>.jpg, n its file count")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OpenAlignError(f"--out '{out}' {'is not a directory' if not out.is_dir() else 'is not empty'}: "
                             "give a new folder for the split")
    # written beside it, then renamed: an interrupted job leaves no part of a split to be evaluated as a whole one
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex}.partial")
    try:
        for category, path in chosen:
            target = partial / category / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                shutil.copy2(path, target)
            else:
                target.symlink_to(path.resolve())
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("Caltech-101 %s split (seed %d): %d images in %d class folders under %s", split, seed, len(chosen),
             len({category for category, _ in chosen}), out)
    return len(chosen)


def _categories_dir(root: Path) -> Path:
    for candidate in (root, root / "101_ObjectCategories", root / "caltech101" / "101_ObjectCategories"):
        if candidate.name == "101_ObjectCategories" and candidate.is_dir():
            return candidate
    raise OpenAlignError(f"'{root}' {not_a_file(root) if not root.is_dir() else 'holds no 101_ObjectCategories'}: "
                         "give the folder of 101_ObjectCategories (or torchvision's root, which holds "
                         "caltech101/101_ObjectCategories)")
