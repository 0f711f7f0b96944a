"""ALIP's Caltech-101 split, against torchvision's own Caltech101 and torch's random_split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openalign.cli import main
from openalign.data.splits import caltech101_items, caltech101_split, random_split_indices
from openalign.errors import OpenAlignError


def _caltech_tree(root: Path, sizes: dict[str, int]) -> Path:
    """torchvision's layout, root/caltech101/101_ObjectCategories/<category>/image_NNNN.jpg, with empty files."""
    categories = root / "caltech101" / "101_ObjectCategories"
    for category, count in sizes.items():
        (categories / category).mkdir(parents=True)
        for index in range(1, count + 1):
            (categories / category / f"image_{index:04d}.jpg").write_bytes(b"")
    return root


def test_random_split_indices_are_torchs_random_split():
    for size, lengths, seed in ((10, [3, 7], 0), (8677, [3000, 5677], 3072), (50, [20, 20, 10], 5)):
        parts = torch.utils.data.random_split(range(size), lengths, generator=torch.Generator().manual_seed(seed))
        assert random_split_indices(size, lengths, seed) == [list(part.indices) for part in parts]
    # ALIP's test split's first images as torch 2.14 draws them: a torch that draws otherwise draws another split
    # than the one these were checked with
    assert random_split_indices(8677, [3000, 5677], 3072)[1][:8] == [6136, 2717, 5458, 491, 4181, 1509, 1256, 6509]
    with pytest.raises(OpenAlignError, match="the split's parts hold 9 items"):
        random_split_indices(10, [3, 6], 0)


def test_caltech101_items_are_in_torchvisions_order(tmp_path):
    from torchvision.datasets import Caltech101

    sizes = {"accordion": 3, "Faces": 2, "BACKGROUND_Google": 4, "Leopards": 1, "anchor": 2, "Faces_easy": 2}
    root = _caltech_tree(tmp_path, sizes)
    reference = Caltech101(str(root))
    expected = [(reference.categories[label], index) for index, label in zip(reference.index, reference.y)]
    items = caltech101_items(root)
    assert [(category, int(path.stem.split("_")[1])) for category, path in items] == expected
    assert caltech101_items(root / "caltech101" / "101_ObjectCategories") == items  # its own folder works too
    with pytest.raises(OpenAlignError, match="holds no 101_ObjectCategories"):
        caltech101_items(tmp_path / "caltech101" / "101_ObjectCategories" / "Faces")


def test_the_cli_writes_alips_test_split_as_class_folders(tmp_path, capsys, monkeypatch):
    from torchvision.datasets import Caltech101

    sizes = {f"category_{index:03d}": 85 + (index < 92) for index in range(101)}  # 8,677 images
    sizes["BACKGROUND_Google"] = 5
    root = _caltech_tree(tmp_path / "data", sizes)
    reference = Caltech101(str(root))
    _, test = torch.utils.data.random_split(reference, [3000, 5677], generator=torch.Generator().manual_seed(3072))
    expected = sorted(f"{reference.categories[reference.y[i]]}/image_{reference.index[i]:04d}.jpg"
                      for i in test.indices)

    out = tmp_path / "caltech101" / "test"
    assert main(["data", "caltech101", "--root", str(root), "--out", str(out)]) == 0
    assert "ALIP's Caltech-101 test split, 5677 images" in capsys.readouterr().out
    written = sorted(str(path.relative_to(out)) for path in out.glob("*/*.jpg"))
    assert written == expected and all((out / name).is_symlink() for name in written[:10])
    assert main(["data", "caltech101", "--root", str(root), "--out", str(out)]) == 2  # never into a written split
    assert "is not empty: give a new folder" in " ".join(capsys.readouterr().err.split())
    assert caltech101_split(root, tmp_path / "train", split="train", copy=True) == 3000
    assert not any(path.is_symlink() for path in (tmp_path / "train").glob("*/*.jpg"))
    (tmp_path / "empty").mkdir()  # an empty folder given: the split takes its place
    assert caltech101_split(root, tmp_path / "empty") == 5677 and len(list((tmp_path / "empty").glob("*/*"))) == 5677

    import openalign.data.splits as splits

    def interrupted(source, target):
        if len(list(target.parent.parent.glob("*/*"))) == 100:
            raise KeyboardInterrupt
        Path(target).write_bytes(b"")

    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(splits.shutil, "copy2", interrupted)
        caltech101_split(root, tmp_path / "cut", copy=True)
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob(".cut.*"))  # nothing to be taken for a split

    (root / "caltech101" / "101_ObjectCategories" / "category_000" / "image_0086.jpg").unlink()
    with pytest.raises(OpenAlignError, match="holds 8676 Caltech-101 images, not 8,677"):
        caltech101_split(root, tmp_path / "other")
