"""Evaluation on real dataset layouts: Karpathy-split retrieval, and zero-shot and kNN
classification on folders of class subfolders (ImageNet's ``train/<wnid>/*.JPEG``, ``val/...``).

Each function embeds with the model in eval mode (restoring its mode afterwards) and returns
metrics named as CLIP_benchmark names them.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..data.karpathy import CaptionedImage, read_karpathy
from ..errors import OpenAlignError
from ..files import not_a_file
from .clip_benchmark_wds import is_clip_benchmark_wds, read_lines, read_split, read_text_file
from .classification import (canonicalize_prompt, class_embeddings, class_prompts, classification_metrics,
                             knn_classify)
from .probe import (adamw_linear_probe, clip_benchmark_probe_rows, fewshot_indices, logistic_regression_probe,
                    ridge_accuracy)
from .prompts import shipped_lines, shipped_names
from .features import (IMAGE_EXTENSIONS, Transform, embed_captioned, embed_images, embed_texts, eval_mode,
                       eval_transform)
from .retrieval import contrastive_metrics, retrieval_metrics

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def evaluate_retrieval(model: nn.Module, json_path: str | Path, device: torch.device, split: str = "test",
                       image_root: str | Path | None = None, batch_size: int = 256,
                       show_progress: bool = True, caption_prefix: str = "",
                       transform: Transform | None = None, recall_k: Sequence[int] = (1, 5, 10),
                       contrastive_batch: int | None = None) -> dict[str, float]:
    """Image→text and text→image R@k (``recall_k``: 1, 5, 10) and ranks on one split of a Karpathy-style JSON
    (``dataset_coco.json``: test = 5,000 images / ~25k captions; ``dataset_flickr30k.json``: 1,000 / 5,000),
    or of a CLIP_benchmark webdataset directory (``wds_mscoco_captions``...). ``caption_prefix``
    is put before every caption (ALIP's evaluation: ``"a photo of "``). ``transform`` (as in
    every ``evaluate_*``): the images' preprocessing, by default the model's. With
    ``contrastive_batch``, also the contrastive loss and in-batch accuracy of each image with its
    first caption (as big_vision's contrastive evaluation pairs them), in batches of that size, in
    the split's order (:func:`~openalign.eval.retrieval.contrastive_metrics`)."""
    items = retrieval_items(json_path, split, image_root)
    if caption_prefix:
        items = [CaptionedImage(item.path, tuple(caption_prefix + c for c in item.captions), item.labels, item.fields)
                 for item in items]
    with eval_mode(model):
        image_emb, text_emb, text_to_image = embed_captioned(model, items, device, batch_size, show_progress, transform)
        metrics = retrieval_metrics(image_emb, text_emb, text_to_image, ks=recall_k)
        if contrastive_batch is not None:
            first = torch.tensor([0, *[len(item.captions) for item in items[:-1]]]).cumsum(0)
            metrics.update(contrastive_metrics(image_emb, text_emb[first], model.logit_scale.item(),
                                               contrastive_batch))
    return metrics


def retrieval_items(json_path: str | Path, split: str = "test", image_root: str | Path | None = None) -> list[CaptionedImage]:
    """The captioned images of one split of a Karpathy-style JSON or of a CLIP_benchmark webdataset
    retrieval directory; every image must exist."""
    if is_clip_benchmark_wds(json_path):
        wds = read_split(json_path, split)
        if wds.captions is None:
            raise OpenAlignError(f"'{json_path}' is a classification dataset (no dataset_type.txt saying retrieval)")
        items = [CaptionedImage(path, tuple(captions)) for path, captions in zip(wds.paths, wds.captions) if captions]
        if uncaptioned := len(wds.paths) - len(items):
            log.warning("%d of the %d images of '%s' have no caption and are left out of retrieval", uncaptioned,
                        len(wds.paths), json_path)
    else:
        items = read_karpathy(json_path, split, image_root)
    missing = [item.path for item in items if not item.path.is_file()]
    if missing:
        raise OpenAlignError(f"{len(missing)} of the {len(items)} '{split}' images of '{json_path}' are missing, e.g. "
                             f"'{missing[0]}': pass the image root (the folder holding the JSON's filepath/filename)")
    repeated = [path for path, count in Counter(item.path for item in items).items() if count > 1]
    if repeated and _first_time((str(Path(json_path).resolve()), split, str(image_root))):
        log.warning("%d image(s) of '%s' split '%s' appear more than once (e.g. '%s'): each copy is a separate image "
                    "that competes with the others for its captions, lowering recall", len(repeated), json_path,
                    split, repeated[0])
    return items


_SAID: set[tuple[str, ...]] = set()


def _first_time(key: tuple[str, ...]) -> bool:
    """Whether this process has not said ``key``'s warning yet: a task checks its data before the
    run, reads it again to run and again to draw examples, and one warning is enough."""
    if key in _SAID:
        return False
    _SAID.add(key)
    return True


def read_class_folders(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[Path], torch.Tensor, list[str]]:
    """``(image paths, labels, class folder names)`` of ``root/<class>/<image>``, classes in sorted
    order (or the given order, which another split's folders must then match)."""
    root = Path(root)
    classes = class_folders(root, classes)
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        folder = root / name
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths += images
        labels += [label] * len(images)
        if folder.is_dir() and not images:
            empty.append(name)
    if not paths:
        raise OpenAlignError(f"no images under '{root}' (extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if empty:
        log.warning("%d class folder(s) of '%s' hold no images (%s%s): they remain classes to predict, with no "
                    "examples", len(empty), root, ", ".join(empty[:5]), ", ..." if len(empty) > 5 else "")
    return paths, torch.tensor(labels), classes


def class_folders(root: str | Path, classes: Sequence[str] | None = None) -> list[str]:
    """The class folders of ``root`` in sorted order (or the given order, whose classes must hold
    all of ``root``'s); a cheap check of a class-folder dataset, its images not listed. Folders all
    named by numbers (``0`` to ``999``: ImageNet-V2's, or label indices unpadded) sort by their
    value, as CLIP_benchmark orders ImageNet-V2's: as text, ``10`` would come before ``2``."""
    root = Path(root)
    if not root.is_dir():
        raise OpenAlignError(f"'{root}' is not a directory; expected class subfolders, e.g. val/n01440764/*.JPEG")
    # hidden folders (.ipynb_checkpoints) are no classes
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if found and all(name.isdigit() and name.isascii() for name in found):
        found.sort(key=int)
    if not found:
        raise OpenAlignError(f"'{root}' has no class subfolders; expected <root>/<class>/<image> (ImageNet: "
                             "val/n01440764/ILSVRC2012_val_00000293.JPEG)")
    unknown = sorted(set(found) - set(classes)) if classes is not None else []
    if unknown:
        raise OpenAlignError(f"'{root}' has class folders that the other split lacks: {', '.join(unknown[:5])}")
    return list(classes) if classes is not None else found


def read_lines_or_json(path: str | Path | None, what: str) -> list[str] | dict[str, str] | None:
    """A text file of one entry per line, a JSON list or object, or the name of a list that
    openalign ships (:mod:`openalign.eval.prompts`); None passes through."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        if (shipped := shipped_lines(str(path))) is not None:
            return shipped
        raise OpenAlignError(f"{what} file '{path}' {not_a_file(path)} (nor is it one of the shipped lists: "
                             f"{', '.join(shipped_names())})")
    try:
        entries = json.loads(read_text_file(path)) if path.suffix == ".json" else read_lines(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OpenAlignError(f"cannot read {what} file '{path}': {error}") from None
    if not isinstance(entries, (list, dict)) or not entries:  # an empty file would fall back to the defaults
        raise OpenAlignError(f"{what} file '{path}' holds no {what}; expected one per line, or a JSON list or object")
    return entries


def class_names(folders: Sequence[str], names: list[str] | dict[str, str] | None) -> list[str]:
    """Readable names of class folders: a list in folder order (CLIP_benchmark's classnames.txt), a
    mapping folder → name, or by default the folder name with ``_`` as space."""
    if names is None:
        return [folder.replace("_", " ") for folder in folders]
    if isinstance(names, dict):
        missing = [folder for folder in folders if folder not in names]
        if missing:
            raise OpenAlignError(f"the class names have no entry for folders {', '.join(missing[:5])}")
        return _checked_names([names[folder] for folder in folders])
    if len(names) != len(folders):
        raise OpenAlignError(f"{len(names)} class names for {len(folders)} class folders: give one per folder, "
                             "in sorted folder order (folders all named by numbers: by value)")
    return _checked_names(list(names))


_REPEATS_LOGGED: set[tuple[str, ...]] = set()


def _checked_names(names: list[object]) -> list[str]:
    """``names``, checked to be non-empty strings (a number or null is no prompt at all). A repeated
    name is logged, not refused: CLIP's ImageNet names, which the papers, open_clip and CLIP_benchmark
    evaluate with, name two classes 'missile' and two 'sunglasses'; such classes get one embedding,
    and a tie between them goes to one of them, as in those references."""
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise OpenAlignError(f"class name {name!r} is not a non-empty string: give each class a name")
    repeated = tuple(sorted(name for name, count in Counter(names).items() if count > 1))
    if repeated and repeated not in _REPEATS_LOGGED:  # once a process, not at every evaluation
        _REPEATS_LOGGED.add(repeated)
        log.warning("class names repeat (%s%s): the classes of one name cannot be told apart by a prompt (as in "
                    "CLIP's ImageNet names, which the papers evaluate with)", ", ".join(map(repr, repeated[:5])),
                    ", ..." if len(repeated) > 5 else "")
    return names


def evaluate_zeroshot(model: nn.Module, root: str | Path, device: torch.device,
                      templates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                      names: list[str] | dict[str, str] | None = None, batch_size: int = 256,
                      show_progress: bool = True, split: str | None = None, transform: Transform | None = None,
                      canonicalize: bool = False) -> dict[str, float]:
    """Zero-shot classification of the images in ``root``'s class folders, or of ``split`` of a
    CLIP_benchmark webdataset directory (its classnames.txt and templates unless given):
    ``acc1``, ``acc5``, ``mean_per_class_recall``. Class embedding = renormalised mean of its
    prompts' embeddings; templates default to ``a photo of a {}.``; a mapping of class name →
    prompts gives each class its own (CuPL's JSON). ``canonicalize``: big_vision's evaluator as
    CLIPPO ran it (spec clippo.md §5.1): a class's first name only (``"tench, Tinca tinca"`` is
    ``tench``; ``first_class_name_only``), names and templates canonicalised
    (:func:`canonicalize_prompt`).

    Logits stay float and every image counts once. ALIP's code (spec alip.md §8, items 12 and 13)
    stores its logits as integers, breaking top-1 ties by order, and counts the zero rows padding
    its last ImageNet batches as class 0; neither is reproduced."""
    paths, labels, readable, templates = zeroshot_inputs(root, templates, names, split, canonicalize)
    with eval_mode(model):
        classifier = _classifier(model, readable, templates, device, batch_size, show_progress)
        image_emb = embed_images(model, transform or eval_transform(model), paths, device, batch_size, show_progress)
    return classification_metrics(image_emb @ classifier.T, labels)


def _classifier(model: nn.Module, names: list[str], templates: list[str] | dict[str, list[str]],
                device: torch.device, batch_size: int, show_progress: bool) -> torch.Tensor:
    """The class embeddings of the zero-shot evaluations, through the model's text processor
    (sharded across ranks and cached, as :func:`embed_texts`)."""
    tokenizer = model.config.build_tokenizer()
    return class_embeddings(
        lambda texts: embed_texts(model, tokenizer, texts, device, batch_size, show_progress, "embedding prompts"),
        names, templates)


def zeroshot_inputs(root: str | Path, templates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                    names: list[str] | dict[str, str] | None = None, split: str | None = None,
                    canonicalize: bool = False
                    ) -> tuple[list[Path], torch.Tensor, list[str], list[str] | dict[str, list[str]]]:
    """``(image paths, labels, class names, templates)`` as :func:`evaluate_zeroshot` uses them:
    everything it reads and checks before embedding, so that bad class names or prompts are found
    before a training run's first step. ``split`` (default ``test``) is a CLIP_benchmark
    directory's; class folders have none (their root is the split's folder), so another is an error."""
    if is_clip_benchmark_wds(root):
        wds = read_split(root, split or "test")
        if wds.labels is None or wds.classnames is None:
            raise OpenAlignError(f"'{root}' is not a classification dataset with classnames.txt")
        paths, labels = wds.paths, torch.tensor(wds.labels)
        readable = class_names(wds.classnames, names if names is not None else wds.classnames)
        templates = templates or [t.replace("{c}", "{}") for t in wds.templates or ()]
    else:
        if split not in (None, "test"):  # "test": the default of earlier versions, which saved recipes spell out
            raise OpenAlignError(f"split '{split}' is a CLIP_benchmark webdataset directory's, but '{root}' holds "
                                 "class folders: name the split's own folder as the root, without a split")
        paths, labels, folders = read_class_folders(root)
        readable = class_names(folders, names if names is not None else _imagenet_names(folders, root))
    readable, templates = _prompt_inputs(readable, templates, canonicalize)
    return paths, labels, readable, templates


def _prompt_inputs(readable: list[str], templates: Sequence[str] | Mapping[str, Sequence[str]] | None,
                   canonicalize: bool) -> tuple[list[str], list[str] | dict[str, list[str]]]:
    """Class names and templates checked (each template holds ``{}``; per-class prompts are lists)
    and, with ``canonicalize``, as big_vision writes them."""
    if isinstance(templates, Mapping):  # CuPL: each class's own prompts, keyed by its name
        if not all(isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)
                   for prompts in templates.values()):
            raise OpenAlignError("per-class prompts must map each class name to a non-empty list of prompts")
        if canonicalize:  # keyed by the whole names: their prompts name the class themselves, and two classes
            # may share a first name ("crane, bird" and "crane, machine")
            templates = {canonicalize_prompt(name, ","): [canonicalize_prompt(prompt) for prompt in prompts]
                         for name, prompts in templates.items()}
            whole = [canonicalize_prompt(name, ",") for name in readable]
            for key, name in zip(whole, readable):  # prompts keyed by the first name alone serve too
                if key not in templates and (first := _big_vision_name(name)) in templates:
                    templates[key] = templates[first]
            readable = whole
    else:
        templates = list(templates or DEFAULT_TEMPLATES)
        if any(not isinstance(template, str) or "{}" not in template for template in templates):
            raise OpenAlignError(f"templates must each hold '{{}}' for the class name, got {templates[:3]} (per-class "
                                 "prompts are a JSON object of class name to its prompts)")
        if canonicalize:
            templates = [canonicalize_prompt(template, "{}") for template in templates]
            readable = _checked_names([_big_vision_name(name) for name in readable])  # first names may repeat
    class_prompts(readable, templates)
    return readable, templates


def _big_vision_name(name: str) -> str:
    """A class name as big_vision's zero-shot evaluator prompts with it by default: the first of
    its comma-separated names (``first_class_name_only``), canonicalised."""
    return canonicalize_prompt(name.split(",")[0], ",")


def evaluate_zeroshot_sentences(model: nn.Module, path: str | Path, device: torch.device,
                                templates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                                names: list[str] | dict[str, str] | None = None, batch_size: int = 256,
                                show_progress: bool = True, canonicalize: bool = False) -> dict[str, float]:
    """Zero-shot classification of the sentences of a GLUE-style file (``sentence``, ``label``:
    :func:`~openalign.eval.sentence_pairs.read_sentence_pairs`): ``acc1``, ``acc5``,
    ``mean_per_class_recall``. A sentence is embedded as the model embeds text (CLIPPO: rendered,
    through its one tower, as CLIPPO's colab classifies SST-2's reviews, shared spec clippo.md
    §5.1) and scored against class embeddings made as :func:`evaluate_zeroshot` makes them: the
    renormalised mean of the prompts' embeddings (the colab's CIFAR-100 variant leaves the mean
    unnormalised; how its SST-2 one does is not known).
    ``names``: one per label in the labels' sorted order (SST-2's 0, 1: negative, positive), or
    a mapping; by default the labels themselves."""
    sentences, labels, readable, templates = zeroshot_sentence_inputs(path, templates, names, canonicalize)
    with eval_mode(model):
        classifier = _classifier(model, readable, templates, device, batch_size, show_progress)
        sentence_emb = embed_texts(model, model.config.build_tokenizer(), sentences, device, batch_size,
                                   show_progress, "embedding sentences")
    return classification_metrics(sentence_emb @ classifier.T, labels)


def zeroshot_sentence_inputs(path: str | Path, templates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                             names: list[str] | dict[str, str] | None = None, canonicalize: bool = False
                             ) -> tuple[list[str], torch.Tensor, list[str], list[str] | dict[str, list[str]]]:
    """``(sentences, labels, class names, templates)`` as :func:`evaluate_zeroshot_sentences` uses them."""
    from .sentence_pairs import read_sentence_pairs

    sentences, second, labels, label_names = read_sentence_pairs(path)
    if second is not None:
        raise OpenAlignError(f"'{path}' holds sentence pairs (sentence2): zero-shot classification takes single "
                             "sentences (fine-tune on pairs with 'eval sentence_pairs')")
    if isinstance(names, list) and len(names) != len(label_names):
        raise OpenAlignError(f"{len(names)} class names for the {len(label_names)} labels of '{path}': give one per "
                             f"label, in the labels' sorted order ({', '.join(label_names[:10])})")
    readable, templates = _prompt_inputs(class_names(label_names, names if names is not None else label_names),
                                         templates, canonicalize)
    return sentences, torch.tensor(labels), readable, templates


def _imagenet_names(folders: Sequence[str], root: str | Path) -> list[str] | None:
    """CLIP's ImageNet class names for ImageNet's 1,000 WordNet-id folders (``n01440764``, ...), which
    prompts cannot use; other WordNet-id folders get a warning (None: folder names as they are)."""
    if not folders or not all(re.fullmatch(r"n\d{8}", folder) for folder in folders):
        return None
    if len(folders) == 1000:
        log.info("'%s' has ImageNet's 1,000 WordNet-id folders: prompting with CLIP's class names "
                 "(imagenet1k_classnames)", root)
        return shipped_lines("imagenet1k_classnames")
    log.warning("the class folders of '%s' are WordNet ids (%s, ...): the prompts name them so, which no text encoder "
                "reads; pass class names (--classnames / classnames)", root, folders[0])
    return None


def evaluate_knn(model: nn.Module, train_root: str | Path, val_root: str | Path, device: torch.device, k: int = 1,
                 temperature: float = 0.07, batch_size: int = 256, show_progress: bool = True,
                 transform: Transform | None = None) -> dict[str, float]:
    """kNN classification as COYO-ALIGN's ImageNet kNN: the train split's image embeddings are the
    memory, the validation images the queries; cosine 1-NN by default, weighted voting for k > 1."""
    memory_paths, memory_labels, classes = read_class_folders(train_root)
    query_paths, query_labels, _ = read_class_folders(val_root, classes)
    transform = transform or eval_transform(model)
    with eval_mode(model):
        memory = embed_images(model, transform, memory_paths, device, batch_size, show_progress,
                              description="embedding the kNN memory")
        queries = embed_images(model, transform, query_paths, device, batch_size, show_progress)
    votes = knn_classify(memory, memory_labels, queries, len(classes), k=k, temperature=temperature)
    # top-5 counts only classes among the k neighbours (as DINO): with k < 5 the rest are not ranked
    return classification_metrics(votes.masked_fill(votes == 0, float("-inf")), query_labels)


def evaluate_fewshot(model: nn.Module, train_root: str | Path, val_root: str | Path, device: torch.device,
                     shots: int = 10, seeds: Sequence[int] = (0, 1, 2), l2: float = 1024.0, batch_size: int = 256,
                     show_progress: bool = True, transform: Transform | None = None) -> dict[str, float]:
    """CLIPPO's few-shot linear probe (:func:`~openalign.eval.probe.ridge_fewshot_probe`) on the
    image tower's pre-projection features of ``train_root`` (sampled) and ``val_root`` (scored).
    Only the sampled training images are embedded (ImageNet 10-shot: at most 30,000 of 1.28M)."""
    train_paths, train_labels, classes = read_class_folders(train_root)
    val_paths, val_labels, _ = read_class_folders(val_root, classes)
    chosen = {seed: fewshot_indices(train_labels, len(classes), shots, seed, classes) for seed in seeds}
    needed = sorted({int(index) for indices in chosen.values() for index in indices})
    row = {index: position for position, index in enumerate(needed)}
    transform = transform or eval_transform(model)
    with eval_mode(model):
        train = embed_images(model, transform, [train_paths[index] for index in needed], device, batch_size,
                             show_progress, description="embedding the few-shot samples", pre_projection=True)
        val = embed_images(model, transform, val_paths, device, batch_size, show_progress, pre_projection=True)
    accuracies = [ridge_accuracy(train[[row[int(index)] for index in chosen[seed]]], train_labels[chosen[seed]], val,
                                 val_labels, len(classes), l2) for seed in seeds]
    metrics = {f"{shots}shot_acc1": sum(accuracies) / len(accuracies)}
    metrics.update({f"{shots}shot_acc1_seed{seed}": value for seed, value in zip(seeds, accuracies)})
    return metrics


def evaluate_linear_probe(model: nn.Module, train_root: str | Path, val_root: str | Path, device: torch.device,
                          c: float | None = None, batch_size: int = 256, show_progress: bool = True,
                          transform: Transform | None = None, standardize: bool = False) -> dict[str, float]:
    """The full-data linear probe: logistic regression
    (:func:`~openalign.eval.probe.logistic_regression_probe`) on the pre-projection features of all
    of ``train_root``, scored on ``val_root``; ``c=None`` chooses C on held-out training images, as CLIP."""
    train, train_labels, val, val_labels, num_classes = _probe_features(model, train_root, val_root, device,
                                                                        batch_size, show_progress, transform)
    return logistic_regression_probe(train, train_labels, val, val_labels, num_classes, c, standardize=standardize)


def evaluate_clip_benchmark_probe(model: nn.Module, train_root: str | Path, val_root: str | Path,
                                  device: torch.device, sweep_root: str | Path | None = None,
                                  sweep_proportion: float | None = None, fewshot_k: int = -1, lr: float = 0.1,
                                  epochs: int = 10, probe_batch_size: int = 64, seed: int = 0,
                                  batch_size: int = 256, show_progress: bool = True,
                                  transform: Transform | None = None) -> dict[str, float]:
    """CLIP_benchmark's ``linear_probe`` (:func:`~openalign.eval.probe.adamw_linear_probe`) on the
    L2-normalised image embeddings of ``train_root`` (fit) and ``val_root`` (scored: CLIP_benchmark's
    test split). The weight decay is chosen on ``sweep_root`` (its ``--val_split``) or on a random
    ``sweep_proportion`` of ``train_root`` (its ``--val_proportion``); with neither it is 0. Only the
    images the probe uses are embedded (``fewshot_k`` of each class, where set)."""
    if sweep_root is not None and sweep_proportion is not None:
        raise OpenAlignError("give sweep_root or sweep_proportion, not both (CLIP_benchmark's --val_split and "
                             "--val_proportion exclude each other too)")
    train_paths, train_labels, classes = read_class_folders(train_root)
    val_paths, val_labels, _ = read_class_folders(val_root, classes)
    try:
        rows, held_out = clip_benchmark_probe_rows(train_labels, len(classes), fewshot_k, seed, sweep_proportion,
                                                   classes)
    except OpenAlignError as error:
        raise OpenAlignError(f"'{train_root}': {error}") from None
    sweep_paths, sweep_labels = None, None
    if sweep_root is not None:
        sweep_paths, sweep_labels, _ = read_class_folders(sweep_root, classes)
    elif held_out is not None:
        sweep_paths, sweep_labels = [train_paths[int(row)] for row in held_out], train_labels[held_out]
    transform = transform or eval_transform(model)
    with eval_mode(model):
        train = embed_images(model, transform, [train_paths[int(row)] for row in rows], device, batch_size,
                             show_progress, description="embedding probe training images")
        sweep = None if sweep_paths is None else embed_images(
            model, transform, sweep_paths, device, batch_size, show_progress,
            description="embedding the weight-decay sweep's images")
        val = embed_images(model, transform, val_paths, device, batch_size, show_progress)
    return adamw_linear_probe(train, train_labels[rows], val, val_labels, len(classes), sweep, sweep_labels,
                              fewshot_k, lr, epochs, probe_batch_size, seed, device)


def _probe_features(model: nn.Module, train_root: str | Path, val_root: str | Path, device: torch.device,
                    batch_size: int, show_progress: bool, transform: Transform | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pre-projection image features and labels of two class-folder splits that share classes."""
    train_paths, train_labels, classes = read_class_folders(train_root)
    val_paths, val_labels, _ = read_class_folders(val_root, classes)
    transform = transform or eval_transform(model)
    with eval_mode(model):
        train = embed_images(model, transform, train_paths, device, batch_size, show_progress,
                             description="embedding probe training images", pre_projection=True)
        val = embed_images(model, transform, val_paths, device, batch_size, show_progress, pre_projection=True)
    return train, train_labels, val, val_labels, len(classes)
