"""An experiment as one typed file: model, loss, data, training, evaluation and run settings.

A recipe YAML names a registered model (``model: align-b3-mini``, or ``model: {name:
align-b3-mini, image: {drop_connect_rate: 0.1}}``) and sets the other sections; command-line
overrides (``train.lr=1e-3``) are applied before validation. The resolved recipe, with the
whole model config inlined, is saved with every checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import apply_overrides, from_dict, load_yaml, parse_override, require_at_least
from .data import SourceConfig
from .distributed import RANK_ZERO_ONLY
from .errors import ConfigError
from .precision import Precision
from .eval.tasks import EvalTaskConfig
from .losses import ContrastiveLossConfig, LossConfig
from .models import ModelConfig
from .registry import find_config, resolve_model_dict

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Training data: a source, and how many loader worker processes per rank read it.

    Unusable samples (corrupt images, empty captions, truncated shards ...) are skipped and
    counted by reason in the training log and ``data_summary.json``; ``strict: true`` makes
    the first one an error instead.
    """

    train: SourceConfig
    num_workers: int = 4
    strict: bool = False

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError("must be 0 (load in the training process) or more", "num_workers")


@dataclass
class TrainConfig:
    """The optimisation: steps, global batch, optimiser, schedule, precision.

    ``batch_size`` is global (all ranks together) and must divide evenly between ranks.
    ``optimizer: lamb`` is tensorflow-addons' LAMB as COYO-ALIGN uses it; ``adafactor`` is
    big_vision's (CLIPPO's), whose ``betas`` are its momentum and its β₂ cap; ``schedule: linear``
    warms up linearly from 0 then decays linearly to 0 at ``steps`` (spec §3.3); ``rsqrt`` is
    big_vision's inverse square root with time scale ``rsqrt_timescale`` (default: the warm-up);
    ``cooldown_steps`` ramps any schedule linearly to 0 over the last steps.
    ``precision: auto`` is bf16 autocast on GPU and fp32 on CPU (``fp16``: fp16 autocast with a
    gradient scaler, for GPUs without bf16, whose scale doubles after ``loss_scale_growth_interval``
    steps without an overflow: torch's 2000, ALIP's 200); evaluation during the run uses the same.
    ``init_from`` initialises a fresh run from weights: anything :func:`load_pretrained` reads
    (ALIGN, ALIP; ALIP's released file), or a checkpoint the model knows how to read (CLIPPO: an
    openalign CLIPPO directory or a released big_vision ``.npz`` for the whole model, a timm ViT
    checkpoint for the encoder).
    ``schedule: onecycle`` is PyTorch's OneCycleLR (ALIP), warming up over ``warmup_steps``.
    ``weight_decay_scope: all`` decays every parameter (ALIP), not only weight matrices.
    ``accum_steps`` k > 1 embeds each rank's share of the batch in k micro-batches, caching
    features, so that a batch k times larger than fits in memory trains exactly as the whole
    batch would (every example a negative for every other), for one extra forward pass.
    ``grad_checkpointing`` recomputes each tower block in the backward pass instead of keeping
    its activations (``model.set_grad_checkpointing``): the same step, for less memory and one
    more forward pass; with ``accum_steps``, larger micro-batches fit.
    ``freeze`` lists parameter-name prefixes that training leaves as they are (``[image_tower]``:
    LiT's locked image tower, with its batch-norm statistics; see :mod:`openalign.train.freeze`).
    ``ema_decay`` (e.g. 0.9999) keeps an exponential moving average of the weights, evaluated
    beside them (metrics ``ema/...``) and saved in each checkpoint as ``ema/``, a model directory
    of its own; ``ema_warmup`` ramps its decay up from 0.18 as (1 + t) / (10 + t) (see
    :mod:`openalign.train.ema`).
    """

    steps: int
    batch_size: int
    optimizer: Literal["lamb", "adamw", "adafactor"] = "lamb"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    schedule: Literal["linear", "cosine", "rsqrt", "constant", "onecycle"] = "linear"
    warmup_steps: int = 0
    cooldown_steps: int = 0
    rsqrt_timescale: int | None = None
    init_from: str | None = None
    weight_decay_scope: Literal["default", "all"] = "default"
    grad_clip: float | None = None
    precision: Precision = "auto"
    loss_scale_growth_interval: int = 2000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    accum_steps: int = 1
    grad_checkpointing: bool = False
    freeze: tuple[str, ...] = ()
    ema_decay: float | None = None
    ema_warmup: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "steps", "batch_size", "accum_steps", "loss_scale_growth_interval")
        for key in ("lr", "weight_decay", "eps", "grad_clip", "ema_decay"):  # YAML refuses these; Python callers too
            if getattr(self, key) is not None and not math.isfinite(getattr(self, key)):
                raise ConfigError("must be a finite number", key)
        if self.lr <= 0:
            raise ConfigError("must be a positive number", "lr")
        if self.weight_decay < 0:
            raise ConfigError("must be a number >= 0", "weight_decay")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError("must be two numbers in [0, 1), e.g. [0.9, 0.999]", "betas")
        if self.optimizer == "adafactor" and self.betas[1] == 0:
            raise ConfigError("[1] is Adafactor's cap on β₂, which must be positive (big_vision's: 0.999)", "betas")
        if self.optimizer == "adafactor" and self.eps > 1e-10:
            raise ConfigError(f"is {self.eps:g}, LAMB's and AdamW's kind of epsilon (added to √v); Adafactor adds it "
                              "to the squared gradient, where big_vision's is 1e-30: set train.eps=1e-30", "eps")
        if self.eps < 0:
            raise ConfigError("must be a number >= 0", "eps")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"is {self.warmup_steps}, which must be between 0 and train.steps ({self.steps}): lower "
                              f"train.warmup_steps, or raise train.steps", "warmup_steps")
        if not 0 <= self.cooldown_steps <= self.steps:
            raise ConfigError(f"is {self.cooldown_steps}, which must be between 0 and train.steps ({self.steps}): "
                              "lower train.cooldown_steps, or raise train.steps", "cooldown_steps")
        if self.rsqrt_timescale is not None and self.rsqrt_timescale < 1:
            raise ConfigError("must be at least 1, or null for the warm-up length", "rsqrt_timescale")
        if self.rsqrt_timescale is not None and self.schedule != "rsqrt":  # a recipe's, its schedule overridden
            log.warning("train.rsqrt_timescale=%d has no effect: it is the time scale of schedule rsqrt, and "
                        "train.schedule is %s", self.rsqrt_timescale, self.schedule, extra=RANK_ZERO_ONLY)
        if self.schedule == "rsqrt" and self.rsqrt_timescale is None and self.warmup_steps == 0:
            raise ConfigError("is null, which means the warm-up length, but train.warmup_steps is 0: give the time "
                              "scale in steps (big_vision's default: 10000)", "rsqrt_timescale")
        if self.schedule == "onecycle" and (self.cooldown_steps or not 2 <= self.warmup_steps < self.steps - 1):
            raise ConfigError("is onecycle, which needs 2 <= train.warmup_steps < train.steps - 1 and no "
                              "cooldown_steps (it anneals by itself)", "schedule")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError("must be positive, or null for no clipping", "grad_clip")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError("must be in (0, 1), e.g. 0.9999, or null for no weight average", "ema_decay")


@dataclass
class WandbSettings:
    """Weights & Biases reporting of the logged scalars, off unless ``project`` is set (it needs
    ``pip install 'openalign[wandb]'``). ``name`` defaults to the run directory's name; ``mode``
    is W&B's own: ``offline`` writes the run under ``run.output_dir/wandb`` for ``wandb sync``,
    ``disabled`` logs nothing; null (the default) leaves it to W&B (``WANDB_MODE``, else online)."""

    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None

    def __post_init__(self) -> None:
        if self.project is not None and not self.project.strip():
            raise ConfigError("is empty: name the W&B project, or leave it null for no W&B reporting", "project")


@dataclass
class RunSettings:
    """Where outputs go and how often to log and checkpoint (0: only at the end), and where
    besides the history the scalars go (TensorBoard, W&B)."""

    output_dir: str = "runs/default"
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    tensorboard: bool = True
    wandb: WandbSettings = field(default_factory=WandbSettings)

    def __post_init__(self) -> None:
        require_at_least(self, 1, "log_every", "keep_checkpoints")
        if not self.output_dir.strip():
            raise ConfigError("is empty: name the run's folder (an empty path would be the working directory)",
                              "output_dir")
        if self.checkpoint_every < 0:
            raise ConfigError("must be 0 (only at the end) or more", "checkpoint_every")


@dataclass
class EvalConfig:
    """Evaluation tasks run every ``every`` steps during training (0: only at the end). Each
    task's metrics are named ``<prefix>/<metric>``, the prefix being its type (``retrieval``) or,
    with ``names``, its name there: tasks of one type need names, or one's metrics would replace
    the other's (a test and a val split's retrieval)."""

    tasks: list[EvalTaskConfig] = field(default_factory=list)
    every: int = 0
    batch_size: int = 256
    names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError("must be 0 (only at the end) or more", "every")
        require_at_least(self, 1, "batch_size")
        if self.names is not None and len(self.names) != len(self.tasks):
            raise ConfigError(f"gives {len(self.names)} names for {len(self.tasks)} tasks: one per task, in order",
                              "names")
        if self.names is not None and (bad := [name for name in self.names if not name.strip() or "/" in name]):
            raise ConfigError(f"has {bad[0]!r}: a name prefixes its task's metrics, so it must be non-blank and "
                              "without '/'", "names")
        if repeated := sorted(name for name, count in Counter(self.prefixes()).items() if count > 1):
            example = ", ".join(f"{task.name}_{number}" for number, task in enumerate(self.tasks, start=1))
            raise ConfigError(f"has several tasks named {repeated[0]!r}, whose metrics would replace each other's: "
                              f"name each task's metrics with eval.names (e.g. [{example}])", "names"
                              if self.names is not None else "tasks")

    def prefixes(self) -> list[str]:
        """Each task's metric prefix, in order."""
        return list(self.names) if self.names is not None else [task.name for task in self.tasks]


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    loss: LossConfig = field(default_factory=ContrastiveLossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        for index, task in enumerate(self.eval.tasks):  # a shapes task without a root evaluates the training data
            try:
                task.take_training_data(self.data.train)
            except ConfigError as error:
                raise ConfigError(error.message, f"eval.tasks[{index}].{error.key}", error.unknown) from None


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A validated recipe from the registry or a YAML path, with ``key.path=value`` overrides applied."""
    raw = load_yaml(find_config("recipes", name_or_path))
    return recipe_from_dict(raw, overrides)


def recipe_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A validated recipe from its mapping and overrides. ``model.name=OTHER`` over a resolved model
    (a recipe printed by ``openalign config``, a checkpoint's ``config.yaml``: every setting
    inlined) selects the registry's OTHER, as ``model=OTHER`` does, rather than relabel the
    inlined settings (its name alone may have been edited); the overrides after it apply to OTHER."""
    raw = _model_as_mapping(raw)
    overridden: set[tuple[str, ...]] = set()  # what the overrides set so far: a change of type keeps it
    renamed = None  # the model named by model.name=OTHER over the recipe's own settings of its model
    for number, text in enumerate(overrides):
        keys, value = parse_override(text)
        model = raw.get("model")
        if keys == ["model", "name"] and isinstance(model, dict) and "architecture" in model:
            if dropped := [earlier for earlier in overrides[:number] if earlier.startswith("model.")]:
                log.warning("%s replaces the recipe's resolved model, and with it the earlier override(s) %s: give "
                            "them after it", text, ", ".join(dropped), extra=RANK_ZERO_ONLY)
            raw = {**raw, "model": {"name": value}}
        else:
            raw = _model_as_mapping(apply_overrides(raw, [text], overridden))
            renamed = value if keys == ["model", "name"] else renamed
    if "model" not in raw:
        raise ConfigError("is required: name a registered model, e.g. 'model: align-b3-mini'", "model")
    try:
        raw["model"] = resolve_model_dict(raw["model"])
        return from_dict(Recipe, raw)
    except ConfigError as error:
        key = (error.key or "").split(".")
        if renamed is None or key[0] != "model" or tuple(key) in overridden or not error.unknown:
            raise
        # the recipe's settings of its own model (the demo's image.batch_norm_momentum), refused by another family's
        raise ConfigError(f"{error.message}. The recipe sets it for its own model, and model.name={renamed} keeps the "
                          f"recipe's other model settings: to train {renamed} without them, replace the whole model "
                          f"section, model={renamed}", error.key) from None


def _model_as_mapping(raw: dict) -> dict:
    """``raw`` with a model given by name (in the file, or ``model=NAME``) as ``{name: NAME}``, which
    later ``model.*`` overrides refine."""
    return {**raw, "model": {"name": raw["model"]}} if isinstance(raw.get("model"), str) else raw
