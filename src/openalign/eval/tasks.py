"""Evaluation tasks that a recipe lists; each runs on a model and returns named metrics."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..config import Variants, require_at_least
from ..data.transforms import PreprocessConfig
from ..errors import ConfigError, OpenAlignError
from .clip_benchmark_wds import is_clip_benchmark_wds
from .datasets import (class_folders, evaluate_clip_benchmark_probe, evaluate_fewshot, evaluate_knn,
                       evaluate_linear_probe, evaluate_retrieval, evaluate_zeroshot, evaluate_zeroshot_sentences,
                       read_lines_or_json, retrieval_items, zeroshot_inputs, zeroshot_sentence_inputs)
from .features import Transform
from .sentence_pairs import finetune_sentence_pairs, read_sentence_pairs, text_renderer
from .shapes import check_shapes_dataset, evaluate_shapes


@dataclass
class EvalPreprocess:
    """A task's own image preprocessing, where a paper evaluates otherwise than the model
    preprocesses (CLIPPO's few-shot probe: squash to 256, centre crop 224; ALIP's ImageNet:
    shorter side 256, centre crop 224; COYO-ALIGN's evaluation: a resize that does not
    antialias). Unset fields keep the model's; the mean and std always do (they belong to the
    weights)."""

    image_size: int | None = None
    resize_size: int | None = None
    resize_mode: Literal["squash", "shortest"] | None = None
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = None
    center_crop: Literal["round", "floor"] | None = None
    antialias: Literal["eval", "never", "always"] | None = None

    def transform(self, model: nn.Module) -> Transform:
        """``model``'s evaluation preprocessing with these settings in place of its own."""
        config = model.config
        changes = {name: value for name, value in dataclasses.asdict(self).items() if value is not None}
        if not isinstance(getattr(config, "preprocess", None), PreprocessConfig):
            raise ConfigError(f"is set, but {type(model).__name__} has no image preprocessing settings to change",
                              "preprocess")
        own = config.preprocess.image_size
        try:  # the model's config checks the new size against its image tower
            config = dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, **changes))
        except ConfigError as error:
            if (error.key or "").endswith("image_size") and self.image_size is not None and self.image_size != own:
                raise ConfigError(f"is {self.image_size}, but this model takes {own} px images: a task's "
                                  "preprocessing changes how images are resized and cropped, not the size the model "
                                  "takes (an evaluation written for a larger model; use a copy without it)",
                                  "preprocess.image_size") from None
            raise ConfigError(error.message, f"preprocess.{(error.key or '').removeprefix('preprocess.')}",
                              error.unknown) from None
        return config.build_transform(train=False)


@dataclass
class EvalTaskConfig(Variants):
    """One evaluation; ``task`` picks the member. ``name`` prefixes its metrics in logs and reports.
    ``preprocess`` (:class:`EvalPreprocess`) changes the images' preprocessing for this task."""

    tag_key: ClassVar[str] = "task"
    fine_tunes: ClassVar[bool] = False  # trains a copy of the model: needs it trainable (not inference-optimised)
    preprocess: EvalPreprocess | None = field(default=None, kw_only=True)

    @property
    def name(self) -> str:
        return str(self.tag)

    @property
    def dataset(self) -> str:
        """The dataset a result record names, from the data's path: the folder holding the
        evaluation split (``imagenet`` for ``data/imagenet/val``), by default."""
        for key in ("val_root", "val"):
            if isinstance(value := getattr(self, key, None), str):
                return Path(value).resolve().parent.name
        return self.name

    def transform(self, model: nn.Module) -> Transform | None:
        """The task's image preprocessing; None for the model's own."""
        return self.preprocess.transform(model) if self.preprocess else None

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        raise NotImplementedError

    data_paths: ClassVar[tuple[str, ...]] = ()  # the settings that name files or folders the task reads
    # the settings naming a list file (class names, prompts) or a shipped list: records hold their contents' hash
    list_files: ClassVar[tuple[str, ...]] = ()
    # the settings that name class-folder datasets: the first one's classes, which the others' must be among
    class_roots: ClassVar[tuple[str, ...]] = ()

    def take_training_data(self, train: Variants) -> None:
        """Fill the settings a recipe leaves to its training data ``train`` (``data.train``); by
        default there are none. Raises :class:`ConfigError` of the task's own key."""

    def missing_data(self) -> list[str]:
        """``key: path`` of each file or folder the task reads that does not exist."""
        return [f"{key}: {value}" for key in self.data_paths
                if (value := getattr(self, key)) is not None and not Path(value).expanduser().exists()]

    def check_data(self) -> None:
        """Read what the task reads before embedding anything (class names, prompts, caption lists,
        class folders, sentence files) and raise :class:`OpenAlignError` for what it cannot use.
        By default: the class folders of ``class_roots`` (not their images)."""
        roots = [value for key in self.class_roots if (value := getattr(self, key)) is not None]
        if roots:
            classes = class_folders(roots[0])
            for root in roots[1:]:
                class_folders(root, classes)

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`OpenAlignError` if the task cannot evaluate ``model`` (by default: its
        ``preprocess`` does not fit the model), before any embedding."""
        self.transform(model)

    def write_examples(self, model: nn.Module, device: torch.device, output: Path, batch_size: int) -> Path | None:
        """A picture of the task's results for a quick visual check (a PNG at ``output``), where the
        task has one; None otherwise."""
        return None


def task_problems(tasks: Sequence[EvalTaskConfig], prefix: str, model: nn.Module | None = None) -> list[str]:
    """What each task cannot use, by ``<prefix>[<index>]``: the paths that do not exist, for a task
    whose paths all exist :meth:`~EvalTaskConfig.check_data`'s error, and with ``model``
    :meth:`~EvalTaskConfig.check_model`'s. A training run and a suite check this before their first
    step, not at their first evaluation (or, in a suite, at the task that fails, hours in)."""
    problems = []
    for index, task in enumerate(tasks):
        if missing := task.missing_data():
            problems += [f"{prefix}[{index}].{path} does not exist" for path in missing]
        else:
            try:
                task.check_data()
            except OpenAlignError as error:
                problems.append(f"{prefix}[{index}] ({task.name}): {error}")
        if model is not None:
            try:
                task.check_model(model)
            except OpenAlignError as error:
                problems.append(f"{prefix}[{index}] ({task.name}): {error}")
    return problems


@dataclass
class ShapesEvalConfig(EvalTaskConfig, tag="shapes"):
    """The built-in dataset at ``root``: retrieval R@1/5/10, zero-shot and 1-NN shape and colour
    accuracy. In a recipe whose training data is a shapes dataset, ``root`` defaults to it."""

    root: str | None = None
    knn_memory_size: int = 5000

    def __post_init__(self) -> None:
        require_at_least(self, 1, "knn_memory_size")
        if self.preprocess:
            raise ConfigError("is set, but the shapes task evaluates with the model's own preprocessing", "preprocess")

    def take_training_data(self, train: Variants) -> None:
        if self.root is None:
            if train.tag != "shapes":
                raise ConfigError("is not set, and data.train is no shapes dataset to evaluate: name one, with "
                                  "'eval.tasks=[{task: shapes, root: DIR}]' (or no evaluation: 'eval.tasks=[]')", "root")
            self.root = train.root  # type: ignore[attr-defined]

    def check_data(self) -> None:
        check_shapes_dataset(self._root(), self.knn_memory_size)

    def _root(self) -> str:
        if self.root is None:
            raise OpenAlignError("root is not set: name the shapes dataset to evaluate")
        return self.root

    @property
    def dataset(self) -> str:
        return "shapes"

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        return evaluate_shapes(model, self._root(), device, batch_size, self.knn_memory_size, show_progress)


@dataclass
class RetrievalEvalConfig(EvalTaskConfig, tag="retrieval"):
    """Zero-shot retrieval on a split of a Karpathy-style JSON (COCO: ``dataset_coco.json``, Flickr30k:
    ``dataset_flickr30k.json``; ``image_root`` defaults to the JSON's folder) or, with ``json`` naming
    a directory, of a CLIP_benchmark webdataset retrieval dataset. ``caption_prefix`` goes before
    every caption (ALIP evaluates with ``"a photo of "``). ``recall_k``: the k of the recall@k
    metrics (CLIP_benchmark's ``--recall_k``). ``contrastive_batch``: also the contrastive loss and
    in-batch accuracy in batches of this many images with their first captions (open_clip's
    validation loss, big_vision's contrastive evaluation; see
    :func:`~openalign.eval.retrieval.contrastive_metrics`): on a held-out split of the training
    data, the loss to watch for overfitting."""

    data_paths: ClassVar[tuple[str, ...]] = ("json", "image_root")

    json: str
    split: str = "test"
    image_root: str | None = None
    caption_prefix: str = ""
    recall_k: tuple[int, ...] = (1, 5, 10)
    contrastive_batch: int | None = None

    def __post_init__(self) -> None:
        if not self.recall_k or any(k < 1 for k in self.recall_k):
            raise ConfigError(f"must be one or more k of at least 1, got {list(self.recall_k)}", "recall_k")
        if self.contrastive_batch is not None and self.contrastive_batch < 2:
            raise ConfigError("must be at least 2: each image is told from the other texts of its batch",
                              "contrastive_batch")

    @property
    def dataset(self) -> str:
        """``flickr30k`` for ``dataset_flickr30k.json``; a CLIP_benchmark webdataset by its folder."""
        return Path(self.json).stem.removeprefix("dataset_")

    def check_data(self) -> None:
        retrieval_items(self.json, self.split, self.image_root)

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        return evaluate_retrieval(model, self.json, device, self.split, self.image_root, batch_size, show_progress,
                                  self.caption_prefix, self.transform(model), self.recall_k, self.contrastive_batch)

    def write_examples(self, model: nn.Module, device: torch.device, output: Path, batch_size: int) -> Path:
        """Six captions and their top-5 images (:func:`~openalign.eval.examples.retrieval_examples`)."""
        from .examples import retrieval_examples

        retrieval_examples(model, self.json, device, output, self.split, self.image_root, batch_size=batch_size,
                           caption_prefix=self.caption_prefix, transform=self.transform(model))
        return output


def _one_template_source(templates: Sequence[str] | None, templates_file: str | None) -> None:
    """Prompts inline or from a file, not both: one would be used and the record would name both."""
    if templates and templates_file:
        raise ConfigError(f"is '{templates_file}', and templates are given too ({list(templates)[:3]}): the prompts "
                          "come from one or the other; give one (--template or --templates-file)", "templates_file")


@dataclass
class ZeroShotEvalConfig(EvalTaskConfig, tag="zeroshot"):
    """Zero-shot classification of ``root``'s class folders, or of ``split`` (default ``test``) of a
    CLIP_benchmark webdataset directory. ``classnames``: a text file (one name per folder, sorted
    folder order; folders all named by numbers by value) or a JSON list or folder→name mapping;
    ``templates``: prompts with ``{}``, inline or (``templates_file``) one per line or a JSON list,
    or a JSON object of each class name's own prompts (CuPL's); by default the dataset's own, else
    ``a photo of a {}.``.
    ``canonicalize``: big_vision's evaluator (CLIPPO): a class's first name only, prompts without
    punctuation, in lower case."""

    data_paths: ClassVar[tuple[str, ...]] = ("root",)
    list_files: ClassVar[tuple[str, ...]] = ("classnames", "templates_file")

    root: str
    classnames: str | None = None
    templates: tuple[str, ...] | None = None
    templates_file: str | None = None
    split: str | None = None
    canonicalize: bool = False

    def __post_init__(self) -> None:
        _one_template_source(self.templates, self.templates_file)

    @property
    def dataset(self) -> str:
        """A CLIP_benchmark webdataset by its own folder, a split's class folders by their parent's."""
        root = Path(self.root).resolve()
        return root.name if is_clip_benchmark_wds(root) else root.parent.name or root.name

    def check_data(self) -> None:
        zeroshot_inputs(self.root, self._templates(), read_lines_or_json(self.classnames, "class names"), self.split,
                        self.canonicalize)

    def _templates(self) -> tuple[str, ...] | list[str] | dict[str, str] | None:
        return read_lines_or_json(self.templates_file, "templates") or self.templates

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        return evaluate_zeroshot(model, self.root, device, self._templates(),
                                 read_lines_or_json(self.classnames, "class names"), batch_size, show_progress,
                                 self.split, self.transform(model), self.canonicalize)


@dataclass
class SentenceZeroShotEvalConfig(EvalTaskConfig, tag="zeroshot_sentences"):
    """Zero-shot classification of the sentences of ``val`` (TSV with a header, or JSONL:
    ``sentence``, ``label``), embedded as the model embeds text (CLIPPO renders them: its colab's
    SST-2, shared spec clippo.md §5.1). ``classnames``: one per label in the labels' sorted
    order, as a file, JSON list or mapping, or a shipped list (``sst2_classnames``); by default the
    labels. ``templates`` / ``templates_file`` / ``canonicalize`` as for ``zeroshot``
    (``sst2_templates``: the colab's five review prompts)."""

    data_paths: ClassVar[tuple[str, ...]] = ("val",)
    list_files: ClassVar[tuple[str, ...]] = ("classnames", "templates_file")

    val: str
    classnames: str | None = None
    templates: tuple[str, ...] | None = None
    templates_file: str | None = None
    canonicalize: bool = False

    def __post_init__(self) -> None:
        if self.preprocess:
            raise ConfigError("is set, but sentences are text, not preprocessed images", "preprocess")
        _one_template_source(self.templates, self.templates_file)

    def _inputs(self) -> dict[str, Any]:
        return {"templates": read_lines_or_json(self.templates_file, "templates") or self.templates,
                "names": read_lines_or_json(self.classnames, "class names"), "canonicalize": self.canonicalize}

    def check_data(self) -> None:
        zeroshot_sentence_inputs(self.val, **self._inputs())

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        return evaluate_zeroshot_sentences(model, self.val, device, batch_size=batch_size, show_progress=show_progress,
                                           **self._inputs())


@dataclass
class KnnEvalConfig(EvalTaskConfig, tag="knn"):
    """kNN classification: ``train_root``'s class folders are the memory, ``val_root``'s the queries."""

    data_paths: ClassVar[tuple[str, ...]] = ("train_root", "val_root")
    class_roots: ClassVar[tuple[str, ...]] = ("train_root", "val_root")

    train_root: str
    val_root: str
    k: int = 1
    temperature: float = 0.07

    def __post_init__(self) -> None:
        require_at_least(self, 1, "k")
        if not 0 < self.temperature < math.inf:  # NaN too
            raise ConfigError("must be positive and finite", "temperature")

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        return evaluate_knn(model, self.train_root, self.val_root, device, self.k, self.temperature, batch_size,
                            show_progress, self.transform(model))


@dataclass
class FewShotEvalConfig(EvalTaskConfig, tag="fewshot"):
    """CLIPPO's few-shot ridge probe: ``shots`` training images per class from ``train_root``'s class
    folders (one draw per seed), scored on ``val_root``; pre-projection image features, λ = ``l2``.
    big_vision draws ImageNet's shots from TFDS's ``train[:65000]``, an order class folders do not
    have: here they are drawn from all of ``train_root`` (uniform per class either way)."""

    data_paths: ClassVar[tuple[str, ...]] = ("train_root", "val_root")
    class_roots: ClassVar[tuple[str, ...]] = ("train_root", "val_root")

    train_root: str
    val_root: str
    shots: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    l2: float = 1024.0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "shots")
        if not self.seeds:
            raise ConfigError("must list at least one seed", "seeds")

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        return evaluate_fewshot(model, self.train_root, self.val_root, device, self.shots, self.seeds, self.l2,
                                batch_size, show_progress, self.transform(model))


@dataclass
class LinearProbeEvalConfig(EvalTaskConfig, tag="linear_probe"):
    """The full-data logistic-regression probe on pre-projection features: fit on ``train_root``'s
    class folders, scored on ``val_root``; ``c`` is the inverse L2 strength (scikit-learn's C),
    by default (null) chosen on a held-out 20% of the training images, as CLIP chose it. The
    features are used as they are, as CLIP's; ``standardize`` standardises them first."""

    data_paths: ClassVar[tuple[str, ...]] = ("train_root", "val_root")
    class_roots: ClassVar[tuple[str, ...]] = ("train_root", "val_root")

    train_root: str
    val_root: str
    c: float | None = None
    standardize: bool = False

    def __post_init__(self) -> None:
        if self.c is not None and not 0 < self.c < math.inf:  # NaN too
            raise ConfigError("must be positive and finite, or null to choose it on held-out training images", "c")

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        return evaluate_linear_probe(model, self.train_root, self.val_root, device, self.c, batch_size, show_progress,
                                     self.transform(model), self.standardize)


@dataclass
class ClipBenchmarkProbeEvalConfig(EvalTaskConfig, tag="clip_benchmark_probe"):
    """CLIP_benchmark's ``linear_probe`` (its records' name too): a linear layer trained with AdamW
    on the L2-normalised image embeddings of ``train_root``'s class folders, scored on
    ``val_root``'s (:func:`~openalign.eval.probe.adamw_linear_probe`). The weight decay is chosen on
    ``sweep_root`` (CLIP_benchmark's ``--val_split``) or a random ``sweep_proportion`` of the
    training images (``--val_proportion``); with neither it is 0. ``fewshot_k``: images per class
    (-1: all), ``lr``, ``epochs``, ``batch_size`` (the probe's): CLIP_benchmark's ``--fewshot_*``
    and ``--batch_size`` defaults. The embedding batch is the evaluation's."""

    data_paths: ClassVar[tuple[str, ...]] = ("train_root", "val_root", "sweep_root")
    class_roots: ClassVar[tuple[str, ...]] = ("train_root", "val_root", "sweep_root")

    train_root: str
    val_root: str
    sweep_root: str | None = None
    sweep_proportion: float | None = None
    fewshot_k: int = -1
    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sweep_root is not None and self.sweep_proportion is not None:
            raise ConfigError("is set with sweep_root: choose the weight decay on one or the other",
                              "sweep_proportion")
        if self.sweep_proportion is not None and not 0 < self.sweep_proportion < 1:
            raise ConfigError("must lie between 0 and 1 (a share of the training images), or be null",
                              "sweep_proportion")
        if self.fewshot_k == 0 or self.fewshot_k < -1:
            raise ConfigError("must be at least 1 (images per class), or -1 for all of them", "fewshot_k")
        if not 0 < self.lr < math.inf:  # NaN too
            raise ConfigError("must be positive and finite", "lr")
        require_at_least(self, 1, "epochs", "batch_size")

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True
            ) -> dict[str, float]:
        return evaluate_clip_benchmark_probe(model, self.train_root, self.val_root, device, self.sweep_root,
                                             self.sweep_proportion, self.fewshot_k, self.lr, self.epochs,
                                             self.batch_size, self.seed, batch_size, show_progress,
                                             self.transform(model))


@dataclass
class SentencePairEvalConfig(EvalTaskConfig, tag="sentence_pairs"):
    """GLUE-style sentence(-pair) classification: fine-tune a copy of a pixel model (CLIPPO) with a
    linear head on ``train`` and score ``val`` (TSV with a header, or JSONL: ``sentence1``/``sentence``,
    optional ``sentence2``, ``label``); sentence A is rendered into the top half of the image and B
    into the bottom half (:mod:`~openalign.eval.sentence_pairs`; shared spec clippo.md §5.4, layout
    unverified against the paper). ``batch_size``: the training batch; None uses the evaluation's.
    ``regression``: the labels are scores (STS-B), scored by Pearson's and Spearman's correlation."""

    data_paths: ClassVar[tuple[str, ...]] = ("train", "val")

    fine_tunes: ClassVar[bool] = True
    train: str
    val: str
    epochs: int = 3
    lr: float = 1e-4
    head_lr: float = 1e-3
    seed: int = 0
    batch_size: int | None = None
    regression: bool = False

    def __post_init__(self) -> None:
        require_at_least(self, 1, "epochs")
        for key in ("lr", "head_lr"):
            if not 0 < getattr(self, key) < math.inf:  # NaN too
                raise ConfigError("must be positive and finite", key)
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("must be at least 1 (or null: the evaluation batch size)", "batch_size")
        if self.preprocess:
            raise ConfigError("is set, but sentence pairs are rendered text, not preprocessed images", "preprocess")

    def check_data(self) -> None:
        self._splits()

    def check_model(self, model: nn.Module) -> None:
        text_renderer(model)

    def run(self, model: nn.Module, device: torch.device, batch_size: int, show_progress: bool = True) -> dict[str, float]:
        train, val, names = self._splits()
        return finetune_sentence_pairs(model, train, val, len(names), device, self.epochs, self.lr,
                                       self.head_lr, batch_size=self.batch_size or batch_size, seed=self.seed,
                                       show_progress=show_progress, regression=self.regression)

    def _splits(self) -> tuple[tuple, tuple, list[str]]:
        """``(train, val, label names)``, the val labels mapped as the train split's."""
        *train, names = read_sentence_pairs(self.train, regression=self.regression)
        *val, _ = read_sentence_pairs(self.val, names or None, regression=self.regression)
        return tuple(train), tuple(val), names
