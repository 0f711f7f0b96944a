"""Checkpoints: safetensors weights plus optimiser, scheduler, loss, step and per-rank RNG state.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX/`` holding ``model.safetensors``,
``trainer_state.pt``, ``rng_rank{r}.pt``, ``data_rank{r}.json`` (where each of the rank's
stream readers is, and its skip counts) and the resolved recipe ``config.yaml``. It is
written under a temporary name and renamed when complete, so a crash mid-write never leaves
a checkpoint that looks valid. With ``train.ema_decay``, ``ema/`` holds the weight average as a
model directory of its own (its ``model.safetensors`` and the recipe). With several nodes,
``output_dir`` must be on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from torch import nn

from ..config import SAVED_END, cut_short, dump_saved, flatten
from ..distributed import RANK_ZERO_ONLY, DistributedContext, fail_together
from ..errors import OpenAlignError, first_line
from ..files import read_json, read_safetensors, read_torch_file, write_safetensors
from ..models import ModelConfig
from .schedule import load_scheduler_state

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
AVERAGE_DIRECTORY = "ema"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _holding(read: Callable[[Path], Any], *keys: str) -> Callable[[Path], dict[str, Any]]:
    """``read``, checked to give a mapping with ``keys``: a file of another structure is damaged."""
    def checked(path: Path) -> dict[str, Any]:
        value = read(path)
        if not isinstance(value, dict) or any(key not in value for key in keys):
            raise OpenAlignError(f"'{path.name}' does not hold {', '.join(keys)}")
        return value
    return checked


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` (safetensors) into ``model``; any missing, extra or misshapen key is an error."""
    load_state(model, read_safetensors(path), f"checkpoint '{path}'")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str,
               name: Callable[[str], str] = lambda key: key) -> None:
    """Load ``state`` into ``model`` strictly; the error lists the first offending keys of each
    kind, as ``name`` spells them (the file's own names, where it names them otherwise)."""
    expected = model.state_dict()
    check_fits({k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in expected.items()},
               f"{source} does not fit this model", name)
    model.load_state_dict(state)


def check_fits(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], problem: str,
               name: Callable[[str], str] = lambda key: key) -> None:
    """Raise "``problem`` (missing: ...; unexpected: ...; wrong shape: ...)" unless the weights
    ``found`` (name → shape) are exactly those ``expected``, listing the first offending names
    of each kind as ``name`` spells them."""
    missing = [name(k) for k in expected if k not in found]
    unexpected = [name(k) for k in found if k not in expected]
    misshapen = [f"{name(k)} {found[k]} (model: {expected[k]})"
                 for k in expected if k in found and found[k] != expected[k]]
    if missing or unexpected or misshapen:
        problems = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
                    if keys]
        raise OpenAlignError(f"{problem} ({'; '.join(problems)}): was it trained with another architecture?")


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints (``step_<number>`` holding trainer state) in ``directory``, oldest first."""
    return [path for path in step_folders(directory) if (path / STATE_FILE).is_file()]


def step_folders(directory: Path) -> list[Path]:
    """The folders named ``step_<number>`` in ``directory``, by step; any other name (a hand-made
    ``step_00000004.bak``) is no checkpoint, to resume from or to prune."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir()), key=_checkpoint_step)


_STEP_NAME = re.compile(r"step_\d+")


def _checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


# how safetensors and torch.save report a file they could not write (other errors they raise, such
# as a CUDA error while copying a tensor, are not the disk's and pass as they are)
_WRITE_FAILURES = ("I/O error", "unexpected pos", "file write failed", "iostream error")
_DISK_FULL = ("No space left", "Disk quota", "unexpected pos", "file write failed")


@contextlib.contextmanager
def _written(what: str, staging: Path) -> Iterator[None]:
    """Writing a checkpoint's files: a failure to write them is an error naming the checkpoint and
    the cause (a full disk), not safetensors' or torch's traceback (``SafetensorError``,
    torch.save's ``RuntimeError`` "unexpected pos ...")."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        if not isinstance(error, OSError) and not any(mark in str(error) for mark in _WRITE_FAILURES):
            raise
        full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
            any(mark in str(error) for mark in _DISK_FULL)
        raise OpenAlignError(f"{what} into {staging.parent} failed ({first_line(error)})"
                             f"{': is the disk full?' if full else ''}; nothing of it was kept") from None


def _fsync_directory(directory: Path) -> None:
    """Flush a directory's files and entries (its folders' too) to disk, so that a rename after it
    publishes complete data."""
    for file in directory.iterdir():
        if file.is_dir() and not file.is_symlink():
            _fsync_directory(file)
        elif file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Checkpointer:
    """Saves and restores training state under ``directory``, keeping the newest ``keep``."""

    def __init__(self, directory: str | Path, keep: int, ctx: DistributedContext) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.ctx = ctx
        self.resumed_from: Path | None = None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.directory)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             loss_fn: nn.Module, recipe: dict[str, Any], data_state: dict[str, Any] | None = None,
             scaler: torch.amp.GradScaler | None = None, average: nn.Module | None = None) -> Path:
        """Write checkpoint ``step``; ``data_state`` (JSON-able) is this rank's data position;
        ``scaler``: fp16 training's loss scale, kept with the optimiser's state; ``average``: the
        weight average (``train.ema_decay``), saved as the model directory ``ema/``."""
        final = self.directory / f"step_{step:08d}"
        staging = self.directory / f".step_{step:08d}.tmp"
        # each phase ends in a barrier at which a rank's error (a full disk) stops every rank
        what = f"saving checkpoint {final.name}"
        with fail_together(what), _written(what, staging):  # a folder that refuses it: named, not a bare OS error
            if self.ctx.is_main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
        try:
            with fail_together(what), _written(what, staging):
                torch.save(_rng_state(), staging / f"rng_rank{self.ctx.rank}.pt")
                if data_state is not None:
                    (staging / f"data_rank{self.ctx.rank}.json").write_text(json.dumps(data_state))
                if self.ctx.is_main:
                    for module, folder in ((model, staging), (average, staging / AVERAGE_DIRECTORY)):
                        if module is not None:
                            folder.mkdir(exist_ok=True)
                            tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
                            write_safetensors(tensors, folder / WEIGHTS_FILE)
                            (folder / CONFIG_FILE).write_text(dump_saved(recipe))
                    state = {"step": step, "world_size": self.ctx.world_size, "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict()}
                    if scaler is not None and scaler.is_enabled():
                        state["scaler"] = scaler.state_dict()
                    torch.save(state, staging / STATE_FILE)
            with fail_together(what), _written(what, staging):  # a full disk or quota may show only here
                if self.ctx.is_main:
                    _fsync_directory(staging)
        except Exception:  # agreed on by every rank (the block's exit): none writes any more; the half goes
            if self.ctx.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        with fail_together(what):
            if self.ctx.is_main:
                self._publish(staging, final)
        return final

    def _publish(self, staging: Path, final: Path) -> None:
        """Rename the complete ``staging`` to ``final`` (replacing a checkpoint of the same step
        without a moment with neither) and prune the oldest checkpoints beyond ``keep``."""
        if final.exists():  # a re-run of the same step: move the old one aside, never leave a gap
            previous = final.with_name(f".{final.name}.old")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
            os.replace(staging, final)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, final)
        _fsync_directory(self.directory)
        # renamed, then deleted: a prune stopped halfway leaves a hidden folder that the next one deletes,
        # not a step folder without its state, which no later prune would see (it lists complete ones)
        for old in self.checkpoints()[:-self.keep]:
            os.replace(old, old.with_name(f".{old.name}.deleting"))
        for leftover in self.directory.glob(".step_*.deleting"):
            shutil.rmtree(leftover, ignore_errors=True)

    def resolve(self, spec: str) -> Path | None:
        """``latest`` (None when there is none yet), a checkpoint directory, or a run directory (its latest)."""
        if spec == "latest":
            found = self.checkpoints()
            # saves and prunes are atomic: only a hand-made or damaged folder, or one an earlier version's
            # interrupted prune left, lacks its state; none is resumed from, pruned or deleted here
            incomplete = [p.name for p in step_folders(self.directory) if not (p / STATE_FILE).is_file()]
            if incomplete:
                log.warning("--resume latest passes over %s in %s: no %s in it (incomplete: damaged, or left by an "
                            "interrupted prune); delete it to free its space", ", ".join(incomplete), self.directory,
                            STATE_FILE, extra=RANK_ZERO_ONLY)
            return found[-1] if found else None
        path = Path(spec)
        if (path / STATE_FILE).is_file():
            return path
        found = complete_checkpoints(path / "checkpoints")
        if found:
            return found[-1]
        if path.name == AVERAGE_DIRECTORY and (path.parent / STATE_FILE).is_file():
            raise OpenAlignError(f"--resume '{spec}' is the weight average of checkpoint '{path.parent}' (a model, "
                                 f"without training state): resume from '{path.parent}', which restores the average "
                                 f"too, or start a new run from the average with train.init_from={spec}")
        raise OpenAlignError(f"--resume '{spec}' is neither 'latest', a checkpoint directory (with {STATE_FILE}) "
                             "nor a run directory holding checkpoints/")

    def resume(self, spec: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               loss_fn: nn.Module, recipe: dict[str, Any], total_steps: int, allow_changes: Sequence[str] = (),
               scaler: torch.amp.GradScaler | None = None) -> int:
        """Restore everything from the checkpoint ``spec`` names; returns its step (0 if none exists yet).

        ``recipe`` (the resolved recipe as a dict) must agree with the checkpoint's on everything
        that shapes the run but ``allow_changes`` (see :func:`check_resumable`); ``total_steps``
        may not be below the checkpoint's step.
        """
        path = self.resolve(spec)
        if path is None:
            log.info("no checkpoint in %s yet: starting from step 0", self.directory)
            return 0
        saved_recipe = self._read(path, CONFIG_FILE, lambda file: _read_recipe(file.parent))
        state = self._read(path, STATE_FILE, _holding(read_torch_file, "step", "optimizer", "scheduler", "loss",
                                                      "world_size"))
        step = int(state["step"])
        if step > total_steps:
            raise OpenAlignError(f"cannot resume from '{path}' (step {step}) with train.steps={total_steps}: "
                                 f"set train.steps to at least {step}")
        check_resumable(saved_recipe, recipe, path, allow_changes)
        self._check_no_later_checkpoints(path, step)
        load_state(model, self._read(path, WEIGHTS_FILE, read_safetensors), f"checkpoint '{path / WEIGHTS_FILE}'")
        # the optimiser's settings are the recipe's, not the checkpoint's: a rate or decay changed under
        # --allow-change applies (loading the state would bring back the old ones), and so does this device's
        # kernel choice (AdamW's fused flag, by which torch places the loaded step counts: given before the
        # load); its moments and step counts are the checkpoint's
        saved = state["optimizer"]
        optimizer.load_state_dict({**saved, "param_groups": [
            {**group, **{key: value for key, value in current.items() if key != "params"}}
            for group, current in zip(saved["param_groups"], optimizer.param_groups)]})
        load_scheduler_state(scheduler, state["scheduler"])
        loss_fn.load_state_dict(state["loss"])
        if scaler is not None and scaler.is_enabled() and "scaler" in state:  # absent: another precision's run
            scaler.load_state_dict(state["scaler"])
        rng_file = path / f"rng_rank{self.ctx.rank}.pt"
        if rng_file.is_file() and state["world_size"] == self.ctx.world_size:
            _set_rng_state(self._read(path, rng_file.name, _holding(read_torch_file, "torch", "python")))
        elif state["world_size"] != self.ctx.world_size:
            log.warning("checkpoint %s was written by %d rank%s, now %d: the dropout RNG starts afresh, and so does "
                        "a streamed source's order (a map-style source keeps its order); skip counts carry over",
                        path, state["world_size"], "s" if state["world_size"] > 1 else "", self.ctx.world_size,
                        extra=RANK_ZERO_ONLY)
        else:  # this rank's file alone: said by this rank
            log.warning("checkpoint %s has no %s: this rank's dropout RNG starts afresh, so the resumed run differs "
                        "from one never stopped", path, rng_file.name)
        log.info("resumed from %s at step %d", path, step)
        self.resumed_from = path
        return step

    def resume_average(self, average: nn.Module) -> None:
        """Load the weight average of the checkpoint resumed from into ``average``. A checkpoint
        without one (``train.ema_decay`` set since, as ``--allow-change`` permits) leaves it as
        it starts, the resumed weights, with a warning."""
        if self.resumed_from is None:
            return
        path = self.resumed_from / AVERAGE_DIRECTORY / WEIGHTS_FILE
        if not path.is_file():
            log.warning("checkpoint %s holds no weight average (%s/): the average (train.ema_decay) starts from its "
                        "weights", self.resumed_from, AVERAGE_DIRECTORY, extra=RANK_ZERO_ONLY)
            return
        name = f"{AVERAGE_DIRECTORY}/{WEIGHTS_FILE}"
        load_state(average, self._read(self.resumed_from, name, read_safetensors), f"checkpoint '{path}'")

    def _read(self, path: Path, name: str, read: Callable[[Path], Any]) -> Any:
        """File ``name`` of checkpoint ``path``; a damaged one is an error naming the checkpoint to fall back on."""
        try:
            return read(path / name)
        except OpenAlignError as error:
            earlier = [found for found in self.checkpoints() if _checkpoint_step(found) < _checkpoint_step(path)]
            remedy = (f"delete {path} to resume from {earlier[-1]}" if earlier else
                      "no earlier checkpoint is left: start the run again in a new run.output_dir")
            raise OpenAlignError(f"checkpoint '{path}' is damaged: {error}; {remedy}") from None

    def _check_no_later_checkpoints(self, path: Path, step: int) -> None:
        """Refuse to continue from ``path`` into a directory holding later checkpoints: they would
        outlive the new ones in pruning and be what ``--resume latest`` picks, though they belong
        to another history. From another directory's checkpoint, any checkpoint here is another
        run's (and its history.jsonl records would be kept as the new run's first steps)."""
        later = [found.name for found in self.checkpoints() if _checkpoint_step(found) > step]
        if later:
            raise OpenAlignError(f"cannot resume from '{path}' (step {step}) into '{self.directory}', which holds "
                                 f"later checkpoints ({', '.join(later[:3])}{' ...' if len(later) > 3 else ''}) of "
                                 "another history: choose another run.output_dir, or delete them to roll back")
        if path.resolve().parent != self.directory.resolve() and (here := self.checkpoints()):
            raise OpenAlignError(f"cannot resume from '{path}' into '{self.directory}', which holds checkpoints of "
                                 f"another run ({', '.join(found.name for found in here[-3:])}): choose another "
                                 "run.output_dir")

    def data_state(self, rank: int | None = None) -> dict[str, Any] | None:
        """This rank's (or ``rank``'s) data state in the checkpoint resumed from (None: none, or
        none saved)."""
        name = f"data_rank{self.ctx.rank if rank is None else rank}.json"
        if self.resumed_from is None or not (self.resumed_from / name).is_file():
            return None
        return self._read(self.resumed_from, name, _holding(read_json, "counts"))


# Settings a resumed run may change: where it runs, how it logs, evaluates and reads data; and the
# weights a fresh run starts from, which a resumed one does not read (its checkpoint holds its weights)
RESUMABLE_CHANGES = ("train.device", "train.compile", "train.accum_steps", "train.grad_checkpointing",
                     "train.init_from", "data.num_workers", "run.", "eval.")


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path,
                    allowed: Sequence[str] = ()) -> None:
    """Refuse to resume ``saved`` (a checkpoint's recipe) with a ``current`` recipe that differs in
    the model, loss, data or optimisation: the optimiser state would silently override a new
    ``train.lr``, and any other change breaks the promise that resuming equals never stopping.
    ``train.steps`` may change (to extend a run) with a warning: the schedule is then stretched.
    ``allowed`` keys (and the keys under them; :func:`check_allowed_changes` checks that they name
    settings) may change too, with a warning: the user's say-so that a change keeps the run the
    same (a dataset moved to another path, say). A setting the
    checkpoint's recipe lacks (added to openalign since it was written, such as
    ``model.min_logit_scale``) takes the current recipe's value, with a warning."""
    old, new = flatten(saved), flatten(current)
    # a recipe from before train.freeze froze nothing; a setting neither recipe names did not change
    before, after = ({key: recipe.get(key, [] if key == "train.freeze" else other.get(key))
                      for key in OPTIMISER_SHAPING} for recipe, other in ((old, new), (new, old)))
    if fixed := sorted(key for key in OPTIMISER_SHAPING if before[key] != after[key]):
        raise OpenAlignError(f"cannot resume from '{path}' with {fixed[0]} changed ({_shown(before[fixed[0]])} -> "
                             f"{_shown(after[fixed[0]])}): it decides which parameters the optimiser holds and "
                             "how, and the saved optimiser state fits no other; start a new run (another "
                             f"run.output_dir) with train.init_from={path}: its weights, a fresh optimiser")
    # a setting of an allowed section may also be one only either recipe has (data.train's type switched)
    permitted = sorted(key for key in old.keys() | new.keys()
                       if old.get(key) != new.get(key) and any(_under(key, name) for name in allowed))
    changed = sorted(key for key in old.keys() | new.keys()
                     if key in old and old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
                     and key != "train.steps" and key not in permitted)
    if changed:
        details = "; ".join(f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}" for key in changed[:6])
        allow = changed[0] if changed[0] in new else changed[0].rsplit(".", 1)[0]  # gone with a type: its section
        raise OpenAlignError(f"cannot resume from '{path}': the recipe differs from the one it was trained with "
                             f"({details}{' ...' if len(changed) > 6 else ''}). Resume with the same settings; for a "
                             f"change that leaves the run the same (a dataset moved to another path), pass "
                             f"--allow-change {allow}; or start a new run (another run.output_dir) initialised "
                             f"from these weights with a fresh optimiser: train.init_from={path} (a model.* change "
                             "that alters weight shapes fits neither).")
    if permitted:  # warned of once the resume is sure to go on
        log.warning("resuming with %s, as --allow-change permits: the run continues as one never stopped only if "
                    "the change leaves what it trains on and how the same", "; ".join(
                        f"{key} changed from {_shown(old.get(key))} to {_shown(new.get(key))}" for key in permitted),
                    extra=RANK_ZERO_ONLY)
    if added := sorted(key for key in new.keys() - old.keys() - set(permitted)
                       if not key.startswith(RESUMABLE_CHANGES)):
        log.warning("checkpoint '%s' predates the setting(s) %s: the resumed run uses %s", path, ", ".join(added),
                    ", ".join(f"{key}={_shown(new[key])}" for key in added), extra=RANK_ZERO_ONLY)
    if old.get("train.steps") != new.get("train.steps"):
        log.warning("train.steps changed from %s to %s: the learning-rate schedule continues on the new length, so "
                    "the run differs from one that used it from the start", old.get("train.steps"),
                    new.get("train.steps"), extra=RANK_ZERO_ONLY)


# the settings a resume can never change, --allow-change or not: the saved optimiser state fits no other
OPTIMISER_SHAPING = ("train.freeze", "train.optimizer", "train.weight_decay_scope")


def check_allowed_changes(recipe: dict[str, Any], allowed: Sequence[str]) -> None:
    """Each of ``allowed`` names a setting of ``recipe`` (or a section of them), else an error: a
    misspelt name would otherwise permit nothing, found only when the resumed run is refused."""
    keys = flatten(recipe).keys()
    if unknown := [name for name in allowed if not any(_under(key, name) for key in keys)]:
        raise OpenAlignError(f"--allow-change {', '.join(map(repr, unknown))} names no setting of this recipe (see "
                             "'openalign config RECIPE'; e.g. data.train.root)")


def _shown(value: Any) -> str:
    """A setting's value as a recipe or an override writes it (null, true, "a/path", [a, b]), not Python's repr."""
    return json.dumps(value, default=str)


def _under(key: str, name: str) -> bool:
    """Whether the flattened ``key`` is the setting ``name`` or one under it."""
    return key == name or key.startswith(name + ".")


def _read_recipe(path: Path) -> dict[str, Any]:
    try:
        text = (path / CONFIG_FILE).read_text(encoding="utf-8")
        if cut_short(text):
            raise OpenAlignError(f"'{path / CONFIG_FILE}' is cut short: its last line, '{SAVED_END.strip()}', is "
                                 "missing (an interrupted copy or save)")
        recipe = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        mark = getattr(error, "problem_mark", None)  # a YAML error's own text spans several lines
        reason = (f"{error.problem} at line {mark.line + 1}" if mark is not None and getattr(error, "problem", None)
                  else str(error).strip().splitlines()[0])
        raise OpenAlignError(f"'{path / CONFIG_FILE}' (the recipe the checkpoint was trained with) is unreadable: "
                             f"{reason}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict):
        raise OpenAlignError(f"'{path / CONFIG_FILE}' is not an openalign recipe (it has no 'model' section)")
    return recipe


def load_checkpoint_model(path: str | Path) -> nn.Module:
    """The model of an openalign model directory, a checkpoint directory, or a run directory (its
    latest checkpoint), in eval mode.

    The model is built from the saved config with ``text.pretrained`` cleared: the config
    already records the architecture, and the weights come from the checkpoint, so no
    pretrained BERT is read or downloaded again.
    """
    path = checkpoint_directory(path)
    model = checkpoint_model_config(path).build()
    load_weights(model, path / WEIGHTS_FILE)
    return model.eval()


def checkpoint_model_config(path: str | Path) -> ModelConfig:
    """The model config saved in an openalign model, checkpoint or run directory (its latest checkpoint's)."""
    from ..pretrained import model_config_from_dict

    path = checkpoint_directory(path)
    return model_config_from_dict(_read_recipe(path)["model"], path)


def checkpoint_directory(path: str | Path) -> Path:
    """``path`` itself when it holds a model's weights (a model or checkpoint directory), else the
    latest complete checkpoint of the run directory ``path``."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    found = complete_checkpoints(path / "checkpoints")
    if not found:
        raise OpenAlignError(f"'{path}' holds no openalign checkpoint (expected {WEIGHTS_FILE} and {CONFIG_FILE}, "
                             "or a run directory with checkpoints/step_*)")
    return found[-1]
