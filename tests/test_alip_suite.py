"""ALIP's zero-shot suite (shared spec alip.md §6.1): the shipped class-name and template lists
(counts, label order, known entries, checked against CLIP's ``data/prompts.md`` and ALIP's
``label.json``) and ``configs/suites/alip.yaml``."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any
from pathlib import Path

import pytest
import torch
from PIL import Image

import openalign
from openalign.eval.datasets import class_names, read_lines_or_json
from openalign.eval.prompts import shipped_lines, shipped_names
from openalign.eval.suite import load_suite
from openalign.eval.tasks import ZeroShotEvalConfig

# key: (classes, templates), the spec's table; ImageNet's lists are the imagenet1k_* ones
COUNTS = {"cifar10": (10, 18), "cifar100": (100, 18), "food101": (101, 1), "pets": (37, 1), "flowers": (102, 1),
          "sun397": (397, 2), "cars": (196, 8), "dtd": (47, 8), "caltech101": (101, 34), "aircraft": (100, 2),
          "imagenet1k": (1000, 80)}
# metrics the paper reports: mean per-class recall for these, top-1 for the rest (spec §6.1)
MEAN_PER_CLASS = {"pets", "flowers", "caltech101", "aircraft"}

# (index, name) pairs read off CLIP's data/prompts.md and ALIP's label.json
KNOWN_NAMES = {
    "cifar10": [(0, "airplane"), (1, "automobile"), (9, "truck")],
    "cifar100": [(0, "apple"), (1, "aquarium fish"), (47, "maple tree"), (99, "worm")],
    "food101": [(0, "apple pie"), (29, "cup cakes"), (100, "waffles")],
    "pets": [(0, "Abyssinian"), (1, "American Bulldog"), (5, "Bengal"), (36, "Yorkshire Terrier")],
    "flowers": [(0, "pink primrose"), (11, "colt's foot"), (101, "blackberry lily")],
    "sun397": [(0, "abbey"), (8, "apartment building outdoor"), (396, "youth hostel")],
    "cars": [(0, "AM General Hummer SUV 2000"), (5, "Acura Integra Type R 2001"),
             (38, "Bentley Continental Supersports Conv. Convertible 2012"), (195, "smart fortwo Convertible 2012")],
    "dtd": [(0, "banded"), (30, "polka-dotted"), (46, "zigzagged")],
    "caltech101": [(0, "off-center face"), (1, "centered face"), (2, "leopard"), (3, "motorbike"), (4, "accordion"),
                   (19, "side of a car"), (29, "head of a  crocodile"), (100, "yin and yang symbol")],
    "aircraft": [(0, "707-320"), (21, "A300B4"), (72, "F-16A/B"), (73, "F/A-18"), (99, "Yak-42")],
    "imagenet1k": [(0, "tench"), (999, "toilet paper")],
}
KNOWN_TEMPLATES = {
    "cifar10": ["a photo of a {}.", "a photo of the big {}."],
    "cifar100": ["a photo of a {}.", "a photo of the big {}."],
    "food101": ["a photo of {}, a type of food."],
    "pets": ["a photo of a {}, a type of pet."],
    "flowers": ["a photo of a {}, a type of flower."],
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "cars": ["a photo of a {}.", "i love my {}!", "a photo of my old {}."],
    "dtd": ["a photo of a {} texture.", "a photo of the {} object."],
    "caltech101": ["a photo of a {}.", "a {} in a video game.", "a doodle of the {}."],
    "aircraft": ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."],
    "imagenet1k": ["a photo of a {}.", "a origami {}."],
}
PROMPTS = Path(openalign.eval.prompts.__file__).parent


@pytest.mark.parametrize("key", COUNTS)
def test_each_shipped_list_has_the_spec_count_one_clean_entry_a_line(key):
    for kind, count in zip(("classnames", "templates"), COUNTS[key]):
        name = f"{key}_{kind}"
        assert name in shipped_names()
        lines = shipped_lines(name)
        assert len(lines) == count, name
        assert (PROMPTS / f"{name}.txt").read_text().splitlines() == lines, f"{name} has blank lines"
        assert all(line == line.strip() and "\t" not in line for line in lines), name


@pytest.mark.parametrize("key", COUNTS)
def test_templates_hold_the_class_name_slot_once(key):
    templates = shipped_lines(f"{key}_templates")
    assert all(template.count("{}") == 1 and "{c}" not in template for template in templates)
    assert len(set(templates)) == len(templates)
    assert set(KNOWN_TEMPLATES[key]) <= set(templates)
    assert [template.format("x") for template in templates]  # str.format accepts every one


@pytest.mark.parametrize("key", COUNTS)
def test_class_names_match_the_sources_at_known_positions(key):
    names = shipped_lines(f"{key}_classnames")
    for index, name in KNOWN_NAMES[key]:
        assert names[index] == name, (key, index)
    assert all("{" not in name and "}" not in name for name in names)


def test_only_imagenet_repeats_names_as_clip_does():
    for key in COUNTS:
        names = shipped_lines(f"{key}_classnames")
        repeated = sorted({name for name in names if names.count(name) > 1})
        assert repeated == (["missile", "sunglasses"] if key == "imagenet1k" else []), key


def test_imagenet_zero_shot_takes_clips_names_with_their_repeats(tmp_path):
    """The papers, open_clip and CLIP_benchmark evaluate ImageNet with these names, repeats and all:
    the task must accept them, given or by default for the WordNet-id folders."""
    for index in range(1000):
        (tmp_path / f"n{index:08d}").mkdir()
        Image.new("RGB", (1, 1)).save(tmp_path / f"n{index:08d}" / "0.png")
    ZeroShotEvalConfig(root=str(tmp_path), classnames="imagenet1k_classnames",
                       templates_file="imagenet1k_templates").check_data()
    ZeroShotEvalConfig(root=str(tmp_path)).check_data()


@pytest.mark.parametrize("key", ["cifar10", "cifar100", "food101", "sun397", "dtd", "aircraft"])
def test_alphabetical_label_orders_are_sorted(key):
    """These datasets number their classes in (case-sensitive) sorted name order."""
    names = shipped_lines(f"{key}_classnames")
    assert names == sorted(names)


@pytest.mark.parametrize("key", ["cifar10", "cifar100", "food101", "sun397", "dtd"])
def test_native_folder_names_sort_into_label_order(key):
    """With ``_`` for spaces (the datasets' own folder names) the order holds, as the suite's comment
    says; not for aircraft (BAE 146-200 / BAE-125), which must use index-named folders."""
    folders = [name.replace(" ", "_") for name in shipped_lines(f"{key}_classnames")]
    assert folders == sorted(folders)


def test_pets_follow_the_class_id_order_not_clips_case_sensitive_one():
    names = shipped_lines("pets_classnames")
    assert names == sorted(names, key=str.lower)
    # CLIP's prompts.md sorts case-sensitively with lower-case dog names, putting the 12 cats first
    assert names[:6] == ["Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle",
                         "Bengal"]


def test_caltech101_follows_the_case_sensitive_folder_order_without_background():
    names = shipped_lines("caltech101_classnames")
    assert "background" not in names
    folders = ["Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor"]
    assert sorted(folders, key=str.lower) != folders == sorted(folders)
    assert names[:7] == ["off-center face", "centered face", "leopard", "motorbike", "accordion", "airplane",
                         "anchor"]


def test_alip_suite_lists_the_eleven_zeroshot_tasks_with_resolvable_lists_and_the_two_retrievals():
    suite = load_suite("alip")
    assert len(suite.tasks) == 13 and len(suite.names) == 13
    assert [(task.name, task.caption_prefix) for task in suite.tasks[11:]] == [("retrieval", "a photo of ")] * 2
    assert suite.names[11:] == ["coco", "flickr30k"]
    assert set(suite.names[:11]) == {key for key in COUNTS if key != "imagenet1k"} | {"imagenet"}
    assert len(MEAN_PER_CLASS & set(suite.names)) == 4
    for name, task in zip(suite.names[:11], suite.tasks[:11]):
        assert isinstance(task, ZeroShotEvalConfig), name
        key = "imagenet1k" if name == "imagenet" else name
        assert task.classnames == f"{key}_classnames" and task.templates_file == f"{key}_templates"
        assert Path(task.root).parts[:2] == ("data", name)
        classes, templates = read_lines_or_json(task.classnames, "class names"), read_lines_or_json(
            task.templates_file, "templates")
        assert (len(classes), len(templates)) == COUNTS[key], name
        # ImageNet alone through ALIP's DALI loader: shorter side 256, crop 224 (spec §6.1)
        expected = {"resize_mode": "shortest", "resize_size": 256, "image_size": 224, "interpolation": "bilinear",
                    "antialias": None}
        preprocess = asdict(task.preprocess) if task.preprocess else None
        assert preprocess == ({**expected, "center_crop": None} if key == "imagenet1k" else None), name


def test_alips_caltech101_split_has_a_folder_of_its_own():
    """ALIP's random split overlaps TFDS's Caltech-101 train images, which CLIPPO's probe draws its
    shots from: the two suites must not read one folder as both test splits."""
    alip = next(task.root for name, task in zip(load_suite("alip").names, load_suite("alip").tasks)
                if name == "caltech101")
    assert alip == "data/caltech101/alip_test"
    for task in load_suite("clippo-fewshot").tasks:
        assert alip not in (task.train_root, task.val_root)


def test_the_recipes_imagenet_zeroshot_during_training_is_the_suites():
    from openalign.recipe import load_recipe

    suite = load_suite("alip")
    (during_training,) = load_recipe("alip-vit-b32-yfcc15m").eval.tasks
    assert during_training == suite.tasks[suite.names.index("imagenet")]


def test_index_named_folders_take_the_shipped_names_in_label_order():
    names = read_lines_or_json("flowers_classnames", "class names")
    folders = sorted(f"{index:03d}" for index in range(102))
    assert class_names(folders, names) == names


def test_a_suite_task_runs_on_index_named_class_folders(tmp_path):
    """The cifar10 task of the suite, pointed at 10 index-named folders of one image each, gives the
    three metrics with every class's prompts built from the shipped lists."""
    for index in range(10):
        (tmp_path / f"{index:03d}").mkdir()
        Image.new("RGB", (32, 32), (25 * index, 0, 255 - 25 * index)).save(tmp_path / f"{index:03d}" / "0.png")
    task = replace(load_suite("alip").tasks[0], root=str(tmp_path))
    torch.manual_seed(0)
    model = openalign.create_model("align-test").eval()
    metrics = task.run(model, torch.device("cpu"), batch_size=16, show_progress=False)
    assert {"acc1", "acc5", "mean_per_class_recall"} <= set(metrics)
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("acc1", "acc5", "mean_per_class_recall"))


def _lay_out(task: Any, base: Path) -> None:
    """Under ``base``, the data a shipped suite task names, as the suite's comments lay it out:
    class folders named by zero-padded label index (one 1-pixel image each, as many as the task's
    class names), Karpathy JSONs with their images."""
    import json

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (1, 1)).save(path)

    if isinstance(task, ZeroShotEvalConfig) or hasattr(task, "train_root"):
        count = len(read_lines_or_json(task.classnames, "class names")) if getattr(task, "classnames", None) else 1000
        for root in [getattr(task, key, None) for key in ("root", "train_root", "val_root", "sweep_root")]:
            for index in range(count) if root else ():
                image(base / root / f"{index:04d}" / "0.png")
    else:  # retrieval: a Karpathy JSON of two test images
        root = base / (task.image_root or Path(task.json).parent)
        entries = [{"filepath": "test2014", "filename": f"{index}.jpg", "split": "test",
                    "sentences": [{"raw": f"picture {index}"}]} for index in range(2)]
        for entry in entries:
            image(root / entry["filepath"] / entry["filename"])
        (base / task.json).parent.mkdir(parents=True, exist_ok=True)
        (base / task.json).write_text(json.dumps({"images": entries}))


@pytest.mark.parametrize("name", ["align", "alip", "clippo", "clippo-fewshot"])
def test_every_shipped_suite_accepts_data_laid_out_as_it_says(name, tmp_path, monkeypatch):
    """What a suite checks before its first task (names, prompts, class folders, caption files)
    passes on data laid out as the suite's comments say, with its own class-name lists: CLIP's
    ImageNet names, repeats and all, were once refused, so no shipped suite with ImageNet ran."""
    from openalign.eval.tasks import task_problems

    suite = load_suite(name)
    monkeypatch.chdir(tmp_path)  # the suites name data/... relative to where they run
    for task in suite.tasks:
        _lay_out(task, tmp_path)
    assert task_problems(suite.tasks, "tasks") == []
