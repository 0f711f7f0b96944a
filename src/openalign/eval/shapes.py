"""Evaluation on the built-in shapes dataset: retrieval, zero-shot and 1-NN classification."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..data.karpathy import CaptionedImage, read_karpathy
from ..data.shapes import fix_articles
from ..errors import OpenAlignError
from .classification import class_embeddings, classification_metrics, nearest_neighbour_predict
from .features import embed_captioned, embed_images, embed_texts, eval_mode
from .retrieval import retrieval_metrics



def prompt_templates(attribute: str, classnames: dict[str, list[str]]) -> list[Callable[[str], str]]:
    """Prompts for zero-shot ``attribute``, ensembled over the values of the other attributes.

    Training captions name a shape's colour and shape together, so "a photo of a circle." is
    unlike anything the text tower saw; averaging "a photo of a red circle.", "... a blue
    circle.", ... over every colour keeps the shape direction and cancels the colour (CLIP's
    prompt ensembling, applied to the nuisance attribute).
    """
    phrases = {"shape": "{other} {{}}", "colour": "{{}} {other}"}[attribute]
    others = [name for key, names in classnames.items() if key != attribute for name in names]
    patterns = ("a photo of a {}.", "a {}.", "a drawing of a {} on a plain background.")
    return [partial(_prompt, pattern.format(phrases.format(other=other))) for pattern in patterns for other in others]


def _prompt(template: str, name: str) -> str:
    return fix_articles(template.format(name))
RECALL_KS = (1, 5, 10)


def check_shapes_dataset(root: str | Path, knn_memory_size: int = 5000) -> None:
    """An error unless ``root`` holds a shapes dataset (both its files, readable) with every image
    :func:`evaluate_shapes` reads (the test split's and the kNN memory's) there as a file, as the
    retrieval task checks its images: existence only, none decoded, so that a run stops before
    its first step rather than at its first evaluation."""
    root = Path(root)
    train, test, _ = _read(root)
    images = [item.path for item in [*test, *_knn_memory(train, knn_memory_size)]]
    if missing := [path for path in images if not path.is_file()]:
        raise OpenAlignError(f"{len(missing)} of the {len(images)} images the shapes evaluation reads in '{root}' are "
                             f"missing or not files, e.g. '{missing[0]}': delete the folder and build it again "
                             f"(openalign data shapes --out {root} with its settings, or a training run on it); a "
                             "dataset whose index is there is reused as it is")


def _read(root: Path) -> tuple[list[CaptionedImage], list[CaptionedImage], dict[str, list[str]]]:
    index, names = root / "dataset_shapes.json", root / "classnames.json"
    if not index.is_file() or not names.is_file():
        raise OpenAlignError(f"'{root}' is not a shapes dataset (expected dataset_shapes.json and classnames.json); "
                             f"build one with: openalign data shapes --out {root}")
    return read_karpathy(index, "train"), read_karpathy(index, "test"), json.loads(names.read_text())


def _knn_memory(train: list[CaptionedImage], knn_memory_size: int) -> list[CaptionedImage]:
    """The labelled (single-shape) training images 1-NN classification compares against."""
    return [item for item in train if item.labels][:knn_memory_size]


def evaluate_shapes(model: nn.Module, root: str | Path, device: torch.device, batch_size: int = 256,
                    knn_memory_size: int = 5000, show_progress: bool = True) -> dict[str, float]:
    """Metrics of ``model`` on the test split of the shapes dataset at ``root``.

    Retrieval over the test images and their five captions each (CLIP_benchmark's recall);
    zero-shot shape and colour classification of single-shape test images with the prompt
    ensembles of :func:`prompt_templates`; 1-NN classification against the first ``knn_memory_size``
    single-shape training images. The model is put in eval mode and restored afterwards.
    """
    train, test, classnames = _read(Path(root))
    config = model.config
    tokenizer, transform = config.build_tokenizer(), config.build_transform(train=False)
    with eval_mode(model):
        image_emb, text_emb, text_to_image = embed_captioned(model, test, device, batch_size, show_progress)
        metrics = retrieval_metrics(image_emb, text_emb, text_to_image, ks=RECALL_KS)
        memory = _knn_memory(train, knn_memory_size)
        memory_emb = embed_images(model, transform, [item.path for item in memory], device, batch_size, show_progress,
                                  description="embedding kNN memory")
        labelled = [n for n, item in enumerate(test) if item.labels]
        for attribute, names in classnames.items():
            labels = torch.tensor([names.index(test[n].labels[attribute]) for n in labelled])
            classifier = class_embeddings(
                lambda texts: embed_texts(model, tokenizer, texts, device=device, show_progress=False),
                names, prompt_templates(attribute, classnames))
            zero_shot = classification_metrics(image_emb[labelled] @ classifier.T, labels)
            metrics[f"zeroshot_{attribute}_acc1"] = zero_shot["acc1"]
            memory_labels = torch.tensor([names.index(item.labels[attribute]) for item in memory])
            predicted = nearest_neighbour_predict(memory_emb, memory_labels, image_emb[labelled])
            metrics[f"knn_{attribute}_acc1"] = (predicted == labels).double().mean().item()
    return metrics


def shapes_chance_levels(root: str | Path) -> dict[str, float]:
    """What a random ranking or a uniform random guess scores on each metric of :func:`evaluate_shapes`."""
    _, test, classnames = _read(Path(root))
    num_images = len(test)
    num_texts = sum(len(item.captions) for item in test)
    chance = {}
    for k in RECALL_KS:
        chance[f"image_retrieval_recall@{k}"] = min(1.0, k / num_images)
        misses = sum(math.comb(num_texts - len(item.captions), k) / math.comb(num_texts, k) for item in test)
        chance[f"text_retrieval_recall@{k}"] = 1.0 - misses / num_images
    for attribute, names in classnames.items():
        chance[f"zeroshot_{attribute}_acc1"] = chance[f"knn_{attribute}_acc1"] = 1.0 / len(names)
    return chance
