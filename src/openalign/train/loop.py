"""The training loop: a recipe's model, loss, data and optimiser composed, on one process or many.

Nothing here depends on the method: the model's ``input_fields`` say which batch fields it
takes, its outputs are passed by name to the loss, and evaluation tasks come from the recipe.
Launch several processes with ``torchrun``; each joins the process group, trains on its share
of the global batch, and DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from rich.progress import TextColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import dump_saved, to_dict
from ..data.loader import Collate, DataMonitor, build_loader, move_to_device
from ..data.quality import summarise
from ..data.stream import ResumableStream
from ..distributed import (RANK_ZERO_ONLY, DistributedContext, all_reduce_max, all_reduce_mean, all_reduce_sum,
                           average_buffers, barrier, fail_together, init_distributed, world_info)
from ..errors import ConfigError, OpenAlignError, Terminated
from ..eval.tasks import task_problems
from ..files import held_directory
from ..losses import LossConfig
from ..models import GhostBatchNorm2d
from ..precision import autocast, gradient_scaler, precision_scope
from ..progress import make_progress
from ..recipe import EvalConfig, Recipe
from .accumulate import accumulated_backward, check_accumulable
from .freeze import freeze
from .checkpoint import Checkpointer, check_allowed_changes
from .ema import WeightAverage
from .logger import TrainLogger, import_wandb
from .optim import build_optimizer
from .schedule import build_scheduler
from .stop import StopOnSigterm

log = logging.getLogger("openalign.train")


@dataclass
class TrainResult:
    """Where the run is, its last step, its final metrics, and the skip and conversion counts of
    its data over all ranks (``skipped/<reason>``, ``converted/<mode>``)."""

    output_dir: Path
    step: int
    metrics: dict[str, float]
    data_counts: dict[str, int] = field(default_factory=dict)


def train(recipe: Recipe, resume: str | None = None, show_progress: bool = True,
          allow_changes: Sequence[str] = ()) -> TrainResult:
    """Train ``recipe`` to ``train.steps``, checkpointing and evaluating as it says.

    ``resume`` is ``"latest"`` (the newest checkpoint of this run, if any), a checkpoint
    directory, or a run directory; training then continues exactly where it stopped. The recipe
    must be the checkpoint's, but for the settings ``allow_changes`` names (and those under them),
    which the user vouches leave the run the same: ``["data.train.root"]`` for a dataset moved to
    another path. A second run in the same ``run.output_dir`` while this one runs is refused (it
    would interleave their checkpoints and history).
    """
    if allow_changes and not resume:
        raise OpenAlignError("--allow-change (allow_changes) applies to a resumed run: pass --resume too")
    check_allowed_changes(to_dict(recipe), allow_changes)
    with contextlib.ExitStack() as held:
        return _train(recipe, resume, show_progress, held, allow_changes)


def _train(recipe: Recipe, resume: str | None, show_progress: bool, held: contextlib.ExitStack,
           allow_changes: Sequence[str]) -> TrainResult:
    cfg, ctx = recipe.train, init_distributed(recipe.train.device)
    # checks and reads that may fail on some ranks only (rank 0 generates the demo data; each rank
    # reads its own data position): every rank stops with a clear error, none waits in DDP's set-up
    with fail_together("setting up training"):
        if ctx.is_main and recipe.run.wandb.project is not None:
            import_wandb()  # a missing package: a config error before anything is built or written
        per_rank = _per_rank_batch(cfg.batch_size, ctx.world_size, cfg.accum_steps)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = recipe.model.build().to(ctx.device)
        _check_virtual_batch(model, per_rank // cfg.accum_steps, ctx.world_size)
        if cfg.freeze:
            frozen, total = freeze(model, cfg.freeze)
            log.info("train.freeze: %s of the model's %s parameters are frozen (%s)", f"{frozen:,}", f"{total:,}",
                     ", ".join(cfg.freeze), extra=RANK_ZERO_ONLY)
        if cfg.accum_steps > 1:
            try:
                check_accumulable(model)
            except OpenAlignError as error:
                raise ConfigError(f"is {cfg.accum_steps}, but {error}", "train.accum_steps") from None
        model = model.to(memory_format=torch.channels_last)  # conv towers: faster on GPU and CPU alike
        loss_fn = recipe.loss.build().to(ctx.device)
        _check_loss_takes(loss_fn, recipe.model.output_fields, recipe.loss)
        optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, ctx.device,
                                    cfg.weight_decay_scope == "all")
        scheduler = build_scheduler(optimizer, cfg.schedule, cfg.warmup_steps, cfg.steps, cfg.cooldown_steps,
                                    cfg.rsqrt_timescale)
        output_dir = Path(recipe.run.output_dir)
        # the nearest part of the path that is there must be a directory, or making it fails with a bare OS error
        there = next((path for path in (output_dir, *output_dir.parents) if path.exists() or path.is_symlink()))
        if not there.is_dir():
            kind = "a file" if there.exists() else "a broken symbolic link"
            raise ConfigError(f"is '{output_dir}', but '{there}' is {kind}, where a directory must be: choose another",
                              "run.output_dir")
        if ctx.is_main:  # held until the run ends: checked before the directory's checkpoints are
            held.enter_context(held_directory(output_dir, "run.output_dir"))
        checkpointer = Checkpointer(output_dir / "checkpoints", recipe.run.keep_checkpoints, ctx)
        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # per-rank dropout and drop-connect streams
        recipe_dict = to_dict(recipe)
        start = 0
        scaler = gradient_scaler(ctx.device, cfg.precision, cfg.loss_scale_growth_interval)
        if resume:
            start = checkpointer.resume(resume, model, optimizer, scheduler, loss_fn, recipe_dict, cfg.steps,
                                        allow_changes, scaler)
            # the saved state carries its growth interval: the recipe's (a permitted change, or a
            # checkpoint from before the setting) is the one the warnings say the run uses
            scaler.set_growth_interval(cfg.loss_scale_growth_interval)
        elif existing := checkpointer.checkpoints():
            raise OpenAlignError(f"run.output_dir '{output_dir}' already holds checkpoints of an earlier run (newest: "
                                 f"{existing[-1].name}): pass --resume latest to continue it, or choose "
                                 "another run.output_dir")
        elif saved := [name for name in ("model.safetensors", "config.json") if (output_dir / name).is_file()]:
            raise OpenAlignError(f"run.output_dir '{output_dir}' holds a saved model ({', '.join(saved)}): a run "
                                 "there would replace its config.yaml and break it; choose another run.output_dir "
                                 "(train.init_from can start from that model)")
        if start == 0 and cfg.init_from:  # also under --resume latest before the first checkpoint
            _initialise(model, cfg.init_from)
        average = WeightAverage(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None
        if average is not None:
            checkpointer.resume_average(average.module)
        loader, monitor = _build_loader(recipe, per_rank, ctx, start, _carried_data_state(checkpointer, ctx))
        # found now, not hours in; after the loader, which generates a shapes dataset that is missing (one to
        # evaluate may be the training data)
        if problems := task_problems(recipe.eval.tasks, "eval.tasks", model):
            raise ConfigError(f"cannot run: {'; '.join(problems)}", "eval.tasks")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    forward: nn.Module = model
    if ctx.world_size > 1:
        # batch-norm running statistics stay per device (spec §3.4, never synchronised in training);
        # checkpoints and evaluation use their mean over ranks. torch 2.13 renamed the switch
        # (forward_sync_buffers also syncs once at the start, where every rank holds the same buffers:
        # the same seed, or the same checkpoint).
        keep_buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers"
        forward = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                          **{keep_buffers: False})
    if cfg.compile:
        forward = torch.compile(forward)
    with fail_together("starting the run's logs"):  # a damaged history on rank 0 stops every rank with its error
        if ctx.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "config.yaml").write_text(dump_saved(recipe_dict))
        logger = TrainLogger(output_dir, ctx.is_main, recipe.run.tensorboard, start, reevaluating=start == cfg.steps,
                             wandb=recipe.run.wandb, config=recipe_dict)
    if ctx.is_main:
        log.info("batch %d: %d rank(s) × %d example(s)%s", cfg.batch_size, ctx.world_size, per_rank,
                 f", each in {cfg.accum_steps} micro-batches of {per_rank // cfg.accum_steps}"
                 if cfg.accum_steps > 1 else "")
    step = start
    batches = None
    try:
        progress = make_progress(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} samples/s"),
                                 enabled=show_progress and ctx.is_main)
        with progress, StopOnSigterm() as stop:
            bar = progress.add_task("training", total=cfg.steps, completed=start, loss="-", speed="-")
            # the log window of the checkpoint resumed from: the same on every rank (rank 0 always saves one)
            window = _LogWindow(ctx.device, (checkpointer.data_state(rank=0) or {}).get("log_window"))
            saved = start

            def save(step: int) -> None:
                average_buffers(model)  # what the checkpoint holds: the mean of the ranks' statistics
                if average is not None:
                    average.synchronise()
                checkpointer.save(step, model, optimizer, scheduler, loss_fn, recipe_dict,
                                  {**monitor.state(), "world_size": ctx.world_size,
                                   "num_workers": recipe.data.num_workers, "log_window": window.state()}, scaler,
                                  average.module if average is not None else None)

            batches = iter(loader)
            for step in range(start + 1, cfg.steps + 2):
                # asked before the step's batch: the last step, its evaluation and its checkpoint are whole
                if stop.agreed(wait=step > cfg.steps):
                    _stop_on_request(step - 1, saved, window, checkpointer, save)
                if step > cfg.steps:
                    break
                waited = time.perf_counter()
                batch = monitor.take(next(batches))
                window.data_seconds += time.perf_counter() - waited
                batch = move_to_device(batch, ctx.device, channels_last=True)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                loss = train_step(model, loss_fn, optimizer, scheduler, batch, ctx.device, cfg.precision,
                                  cfg.grad_clip, forward, cfg.accum_steps, scaler)
                if average is not None:
                    average.update(step)
                window.add(loss, getattr(loss_fn, "last_stats", {}))
                progress.advance(bar)
                logs = step % recipe.run.log_every == 0 or step == cfg.steps
                saves = (recipe.run.checkpoint_every and step % recipe.run.checkpoint_every == 0) or step == cfg.steps
                if logs or saves:
                    _stop_if_diverged(window, step, checkpointer)
                if logs:
                    scalars = window.scalars(lr, model, cfg.batch_size, monitor)
                    logger.log(step, scalars)
                    progress.update(bar, loss=f"{scalars['loss']:.4f}", speed=f"{scalars['samples_per_second']:.0f}")
                    log.info("step %d/%d  loss %.4f  lr %.3g  temperature %.4f  %.0f samples/s (%.0f per rank)  "
                             "data wait %.0f%%", step, cfg.steps, scalars["loss"], scalars["lr"],
                             scalars["temperature"], scalars["samples_per_second"],
                             scalars["samples_per_second_per_rank"], 100 * scalars["data/wait_fraction"])
                    window = _LogWindow(ctx.device)
                # evaluated before the checkpoint: a run stopped between the two resumes from the one before
                # and evaluates this step again, where one stopped after the save would never have
                evaluates = bool(recipe.eval.every) and step % recipe.eval.every == 0 and step != cfg.steps
                if (evaluates or saves) and ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)  # the step's own kernels are the step's time
                paused = time.perf_counter()  # evaluating and checkpointing are not the steps' time
                if evaluates:
                    try:
                        evaluated = _evaluate_run(recipe.eval, model, average, ctx, False, cfg.precision)
                    except OpenAlignError:  # a corrupt evaluation image, say: the steps trained are kept
                        if saves:
                            save(step)
                        raise
                    if evaluated:  # no tasks, no record: not a {"step": N} with nothing in it
                        logger.log(step, evaluated)
                if saves:
                    save(step)
                    saved = step
                window.started += time.perf_counter() - paused
            step = min(step, cfg.steps)
        data_counts = _report_data(monitor, ctx, output_dir)
        if start == cfg.steps:
            log.info("the run had already reached step %d: evaluating only", start)
        metrics = _evaluate_run(recipe.eval, model, average, ctx, show_progress, cfg.precision)
        if metrics:
            logger.log(step, metrics)
    except BaseException as error:
        logger.close(failed=True, preempted=isinstance(error, Terminated))  # how W&B marks the run
        _stop_workers(batches)
        raise
    logger.close()
    return TrainResult(output_dir=output_dir, step=step, metrics=metrics, data_counts=data_counts)


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               batch: dict[str, Any], device: torch.device, precision: str = "auto", grad_clip: float | None = None,
               forward: nn.Module | None = None, accum_steps: int = 1,
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One optimiser step on ``batch``; returns the detached loss without synchronising with the device.

    ``forward`` is what runs the model (its DDP or compiled wrapper); ``model.input_fields``
    names the batch fields it takes, and its outputs go to ``loss_fn`` by name. With
    ``accum_steps`` k > 1 the batch is embedded in k micro-batches and the gradient is still
    exactly that of the loss on the whole batch (see :mod:`openalign.train.accumulate`). After
    the step, ``model.constrain_parameters()``, where the model has it, projects parameters back
    into range. The loss returned is NaN where the gradient was NaN or infinite.

    ``scaler`` (:func:`~openalign.precision.gradient_scaler`: enabled in fp16, where none is given
    a disabled one, which passes everything through) scales the loss before the
    backward pass and the gradients back before clipping; a step whose scaled gradient overflowed
    is skipped (the weights stay as they were) and the scale lowered, as ``torch.amp`` does it:
    that is the scaler's search for its scale, not a divergence, so the loss is returned as it was,
    until the scale falls below 1 (17 steps skipped in a row from its start of 2^16, as a gradient
    that is NaN at every step makes it): then the loss is NaN, and the divergence check stops the run.
    """
    missing = [name for name in model.input_fields if name not in batch]
    if missing:
        raise OpenAlignError(f"the model needs batch fields {missing}, which the data source does not provide "
                             f"(it gives {sorted(batch)})")
    inputs = {name: batch[name] for name in model.input_fields}
    forward = model if forward is None else forward  # not `or`: a compiled module's truth value is its len()
    optimizer.zero_grad(set_to_none=True)
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    backward = lambda loss: scaler.scale(loss).backward()  # noqa: E731 - also for each micro-batch
    if accum_steps > 1:
        loss = accumulated_backward(forward, model, loss_fn, inputs, device, precision, accum_steps, backward)
    else:
        with autocast(device, precision):
            outputs = forward(**inputs)
        loss = loss_fn(**outputs)  # outside autocast: logits and softmax in fp32
        backward(loss)
    scaler.unscale_(optimizer)
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    scaler.step(optimizer)  # an enabled scaler skips it where the gradient is not finite
    scaler.update()
    with warnings.catch_warnings():  # a skipped step is the scaler's, not a misordered loop
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()
    if hasattr(model, "constrain_parameters"):  # e.g. the logit-scale cap
        model.constrain_parameters()
    # a finite loss with a NaN or infinite gradient has just made the weights NaN (a skipped step's
    # did not: a scale below 1 tells the scaler's); reported as a NaN loss, the divergence check
    # stops the run before they are checkpointed (the scale's tensor: no synchronisation)
    sound = scaler._get_scale_async() >= 1.0 if scaler.is_enabled() else norm.isfinite()
    return loss.detach().where(sound, torch.nan)


def _stop_on_request(step: int, saved: int, window: _LogWindow, checkpointer: Checkpointer,
                     save: Callable[[int], None]) -> NoReturn:
    """SIGTERM came (:mod:`.stop`): checkpoint ``step``, the last step done, unless it is the one
    ``saved`` last, and raise :class:`Terminated` saying so."""
    if step > saved:
        _stop_if_diverged(window, step, checkpointer)
        save(step)
    final = checkpointer.directory / f"step_{step:08d}"
    if not step:
        message = "before its first step, with nothing to checkpoint"
    elif final.is_dir():
        message = f"after step {step}, checkpointed in {final}: --resume latest continues from it"
    else:  # resumed from another run's checkpoint, and stopped before a step of its own
        message = f"after step {step}, the step it resumed from, before any other: resume it as before"
    raise Terminated(message)


def _stop_if_diverged(window: _LogWindow, step: int, checkpointer: Checkpointer) -> None:
    """Stop, on every rank, before a NaN or infinite loss (or gradient) is logged as progress or
    its weights are checkpointed (where pruning would soon delete the last good checkpoint). The window's
    summed loss, over all ranks, is finite exactly when each of its losses is (any earlier
    window passed this check)."""
    if not torch.isfinite(window.summed_loss()):
        newest = checkpointer.checkpoints()
        raise OpenAlignError(f"the loss (or its gradient) was NaN or infinite within the {window.steps} step(s) up to "
                             f"step {step}: training stopped without checkpointing them (newest checkpoint: "
                             f"{newest[-1] if newest else 'none'}). Lower train.lr, set train.grad_clip or check the "
                             "data, and train again (resuming would repeat the same steps)")


class _LogWindow:
    """The steps between two log lines: their losses (and the loss's own statistics, such as the
    two directions' terms) summed on the device without synchronising, and their wall time.

    A checkpoint saves the steps of the window so far (:meth:`state`) and a resumed run starts
    from them (``carried``), so that its first log line covers the same steps as in a run never
    stopped; its speed counts the steps since the resume only."""

    def __init__(self, device: torch.device, carried: dict[str, Any] | None = None) -> None:
        carried = carried or {"loss": 0.0, "stats": {}, "steps": 0}
        # each rank holds the carried per-rank mean: summed over ranks, then divided by their number, it is
        # the same at any number of ranks
        self.loss = torch.tensor(float(carried["loss"]), device=device)
        self.stats: dict[str, torch.Tensor] = {key: torch.tensor(float(value), device=device)
                                               for key, value in carried["stats"].items()}
        self.steps, self.timed_steps, self.started = int(carried["steps"]), 0, time.perf_counter()
        self.data_seconds = 0.0  # waited for batches in the timed steps
        self._summed: torch.Tensor | None = None

    def state(self) -> dict[str, Any]:
        """The window so far, as means over the ranks (every rank must call this)."""
        world = world_info()[1]
        return {"loss": self.summed_loss().item() / world, "steps": self.steps,
                "stats": {key: all_reduce_mean(value).item() for key, value in sorted(self.stats.items())}}

    def summed_loss(self) -> torch.Tensor:
        """The window's losses summed over all ranks: one collective, shared by the divergence
        check and the log line (every rank must call this)."""
        if self._summed is None:
            self._summed = all_reduce_sum(self.loss)
        return self._summed

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        self.loss += loss
        self._summed = None
        for key, value in stats.items():
            self.stats[key] = self.stats.get(key, 0.0) + value.detach()
        self.steps += 1
        self.timed_steps += 1

    def scalars(self, lr: float, model: nn.Module, batch_size: int, monitor: DataMonitor) -> dict[str, float]:
        """What is logged: means over the window and over all ranks (every rank must call this),
        the samples skipped so far on all ranks, and the time spent waiting for data. Time spent
        evaluating and checkpointing is not the steps' (the loop moves ``started`` past it).

        ``data/wait_seconds`` is the mean time per step a rank waited for its next batch from the
        loader, on the rank that waited longest (the others wait for it at the gradient's
        all-reduce); ``data/wait_fraction`` is that time's share of the steps' wall time: near 0 when
        the data keeps up, near 1 when training is input-bound (more ``data.num_workers``, faster
        storage)."""
        seconds = time.perf_counter() - self.started
        world = world_info()[1]
        skipped = sum(n for key, n in monitor.counts().items() if key.startswith("skipped/"))
        waited = all_reduce_max(torch.tensor(self.data_seconds, dtype=torch.float64, device=self.loss.device)).item()
        scalars = {"loss": (self.summed_loss() / (self.steps * world)).item(), "lr": lr,
                   "temperature": model.temperature.item(),
                   "samples_per_second": batch_size * self.timed_steps / seconds,
                   "samples_per_second_per_rank": batch_size * self.timed_steps / seconds / world,
                   "step_seconds": seconds / self.timed_steps,
                   "data/wait_seconds": waited / self.timed_steps, "data/wait_fraction": min(waited / seconds, 1.0),
                   "data/skipped": all_reduce_sum(torch.tensor(float(skipped), device=self.loss.device)).item()}
        scalars.update({key: all_reduce_mean(value / self.steps).item() for key, value in self.stats.items()})
        return scalars


def evaluate(config: EvalConfig, model: nn.Module, ctx: DistributedContext, show_progress: bool = True,
             precision: str = "auto") -> dict[str, float]:
    """Run the recipe's evaluation tasks on every rank at ``precision`` (the run's
    ``train.precision``); metrics are named ``task/metric``.

    Feature extraction is sharded across ranks (each embeds every world_size-th item, all gather
    the rows), and every rank computes the same metrics. Batch-norm running statistics, which
    training keeps per device, are first set to their mean over ranks (as checkpoints save them),
    so that every shard is embedded by the same model.
    """
    if config.tasks:
        average_buffers(model)
    metrics: dict[str, float] = {}
    for task, prefix in zip(config.tasks, config.prefixes()):
        with precision_scope(precision):
            results = task.run(model, ctx.device, config.batch_size, show_progress and ctx.is_main)
        metrics.update({f"{prefix}/{key}": value for key, value in results.items()})
        if ctx.is_main:
            log.info("evaluation %s: %s", prefix, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    barrier()
    return metrics


def _evaluate_run(config: EvalConfig, model: nn.Module, average: WeightAverage | None, ctx: DistributedContext,
                  show_progress: bool, precision: str) -> dict[str, float]:
    """:func:`evaluate` the model and, with ``train.ema_decay``, its weight average (metrics ``ema/task/metric``)."""
    metrics = evaluate(config, model, ctx, show_progress, precision)
    if average is not None and config.tasks:
        if ctx.is_main:
            log.info("evaluating the weight average (train.ema_decay)")
        metrics.update({f"ema/{key}": value for key, value in
                        evaluate(config, average.module, ctx, show_progress, precision).items()})
    return metrics


def _initialise(model: nn.Module, path: str) -> None:
    """``train.init_from``: the model reads the checkpoint (every rank the same file, so the
    ranks stay identical)."""
    init_from = getattr(model, "init_from", None)
    if init_from is None:
        raise ConfigError(f"is set, but {type(model).__name__} cannot be initialised from a checkpoint file; "
                          "to continue an openalign run, pass --resume instead", "train.init_from")
    try:
        init_from(path)
    except OpenAlignError as error:  # a missing path, another architecture: named as the recipe's key
        raise ConfigError(f"cannot initialise this model: {error}", "train.init_from") from None


def _check_loss_takes(loss_fn: nn.Module, outputs: tuple[str, ...], config: LossConfig) -> None:
    """The loss takes exactly the model's outputs (by name), else a config error now rather than
    a TypeError at step 1: ALIP's loss needs a ``caption`` text field, the contrastive loss one only."""
    parameters = inspect.signature(loss_fn.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    needed = [p.name for p in parameters if p.default is inspect.Parameter.empty]
    taken = {p.name for p in parameters}
    if set(needed) <= set(outputs) <= taken:
        return
    raise ConfigError(f"the '{config.tag}' loss takes {', '.join(needed)}, but the model gives "
                      f"{', '.join(outputs)}: set model.text_fields to the text fields the loss reads (ALIP's: "
                      "[text, caption]; the contrastive loss: [text]), or choose the loss that fits the model", "loss")


def _per_rank_batch(batch_size: int, world_size: int, accum_steps: int) -> int:
    if batch_size % (world_size * accum_steps):
        raise ConfigError(f"is {batch_size}, which does not divide evenly between {world_size} rank(s)"
                          f"{f' × {accum_steps} micro-batches (train.accum_steps)' if accum_steps > 1 else ''}",
                          "train.batch_size")
    return batch_size // world_size


def _check_virtual_batch(model: nn.Module, micro_batch: int, world_size: int) -> None:
    sizes = {m.virtual_batch_size for m in model.modules() if isinstance(m, GhostBatchNorm2d) and m.virtual_batch_size}
    for size in sizes:
        if micro_batch % size:
            raise ConfigError(f"gives {micro_batch} examples per device and micro-batch ({world_size} rank"
                              f"{'s' if world_size > 1 else ''}), which "
                              f"is not a multiple of the ghost batch norm's virtual_batch_size={size}: change "
                              "train.batch_size, train.accum_steps or model.image.virtual_batch_size",
                              "train.batch_size")


def _build_loader(recipe: Recipe, per_rank: int, ctx: DistributedContext, start: int,
                  saved: dict[str, Any] | None) -> tuple[torch.utils.data.DataLoader, DataMonitor]:
    """The rank's loader, resumed at ``start``; streams continue from the ``saved`` positions of
    their readers when the run has as many ranks and workers as the one that saved them."""
    text_processor = recipe.model.build_tokenizer(train=True)
    data = recipe.data
    dataset = data.train.build(recipe.model.build_transform(train=True), recipe.train.seed, start, text_processor,
                               data.strict)
    if callable(require := getattr(dataset, "require_fields", None)):  # entries without a field the model reads
        require(recipe.model.input_fields)
    if isinstance(dataset, ResumableStream):
        dataset.check_readers(ctx.world_size * max(data.num_workers, 1), warn=ctx.is_main)
        if saved and (reason := _stream_moved(saved, ctx.world_size, data.num_workers, dataset.fingerprint())):
            log.warning("%s: it reads a fresh random stream, not the exact samples the interrupted run would have read "
                        "next", reason, extra=RANK_ZERO_ONLY)  # every rank's reason is the same
            saved = {"counts": saved.get("counts", {})}
        if start:
            positions = saved.get("positions") if saved else None
            if positions is None and saved is None:
                log.warning("the checkpoint holds no data stream position: the resumed run reads a fresh random "
                            "stream, not the exact samples the interrupted run would have read next")
            dataset.resume(start, {int(reader): position for reader, position in positions.items()}
                           if positions is not None else None, saved.get("reseeds", ()) if saved else ())
    loader = build_loader(dataset, Collate(text_processor, recipe.model.input_fields), per_rank, ctx.rank,
                          ctx.world_size, recipe.train.seed, start, data.num_workers)
    monitor = (DataMonitor(saved, dataset.reseeds, dataset.fingerprint()) if isinstance(dataset, ResumableStream)
               else DataMonitor(saved))
    if saved is None and ctx.is_main:  # what the source dropped reading its index, once (every rank read it)
        for key, count in getattr(dataset, "dropped", {}).items():  # a resumed run's counts hold them already
            monitor.base[key] = monitor.base.get(key, 0) + count
    return loader, monitor


def _stop_workers(batches: Iterator[Any] | None) -> None:
    """End the loader's worker processes now, as the loader does when it is done. Left to the
    interpreter's exit (the error's traceback holds the loader), multiprocessing terminates them,
    and torch's handler reports each as "DataLoader worker (pid N) is killed by signal:
    Terminated" after the run's own error, as if a second failure had followed it."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multiprocessing iterator (private, long-lived)
    if callable(shutdown):
        shutdown()


def _carried_data_state(checkpointer: Checkpointer, ctx: DistributedContext) -> dict[str, Any] | None:
    """This rank's data state from the checkpoint resumed from (None: none). From a checkpoint
    written by another number of ranks, rank 0 carries the skip counts of every rank that wrote
    it and the other ranks none, so that the run's totals go on from the checkpoint's; every rank
    gets the saved layout, by which :func:`_stream_moved` finds a stream's positions do not apply."""
    first = checkpointer.data_state(rank=0)
    if first is None or first.get("world_size") in (None, ctx.world_size):
        return checkpointer.data_state()
    counts: Counter[str] = Counter()
    for rank in range(int(first["world_size"])) if ctx.is_main else ():
        counts.update((checkpointer.data_state(rank=rank) or {}).get("counts") or {})
    mine = checkpointer.data_state() if ctx.rank < int(first["world_size"]) else None
    return {**(mine or first), "counts": dict(counts)}


def _stream_moved(saved: dict[str, Any], world_size: int, num_workers: int, fingerprint: str) -> str | None:
    """Why the checkpoint's stream positions do not apply to this run's stream, or None."""
    # a rank without workers is one reader, as a rank with one worker is
    if (saved.get("world_size"), max(saved.get("num_workers") or 0, 1)) != (world_size, max(num_workers, 1)):
        return (f"the checkpoint's data stream was read by {saved.get('world_size')} rank(s) × "
                f"{saved.get('num_workers')} worker(s), this run has {world_size} × {num_workers}")
    if saved.get("stream", fingerprint) != fingerprint:
        return ("the data source's shards are not those the checkpoint's stream positions refer to (a shard was added "
                "or removed, or the source changed between resampled and epochs)")
    return None


def _report_data(monitor: DataMonitor, ctx: DistributedContext, output_dir: Path) -> dict[str, int]:
    """Log the skip and conversion counts of all ranks, and write them to ``data_summary.json``."""
    counts = monitor.counts()
    if ctx.world_size > 1:
        gathered: list[dict[str, int] | None] = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, counts)
        counts = {}
        for rank_counts in gathered:
            for key, count in (rank_counts or {}).items():
                counts[key] = counts.get(key, 0) + count
    if ctx.is_main:
        log.info("data: %s", summarise(counts))
        (output_dir / "data_summary.json").write_text(json.dumps(dict(sorted(counts.items())), indent=2) + "\n")
    return counts
