"""Training scalars: a JSONL history, TensorBoard, W&B, and the console log (main rank only)."""

from __future__ import annotations

import json
import logging
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, OpenAlignError, first_line
from ..files import written_whole

if TYPE_CHECKING:
    from ..recipe import WandbSettings

log = logging.getLogger("openalign.train")

HISTORY_FILE = "history.jsonl"
WANDB_ID_FILE = "wandb_id"


def read_history(directory: str | Path) -> list[dict[str, Any]]:
    """The logged records of a run, in order. A last line cut short (the run stopped, or the disk
    filled, while writing it) is dropped with a warning; a damaged line before it is an error
    naming it."""
    path = Path(directory) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise OpenAlignError(f"cannot read the run's history '{path}': {error}") from None
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                raise ValueError("not a record with a step")
        except ValueError as error:
            if position == len(lines) - 1:
                log.warning("%s: line %d is cut short (%s): dropped; it was being written when the run stopped",
                            path, number, error)
                break
            raise OpenAlignError(f"the run's history '{path}' is damaged at line {number} ({error}): delete "
                                 "that line, or the file (checkpoints do not need it; the records it held are "
                                 "lost)") from None
        records.append(record)
    return records


class TrainLogger:
    """Writes ``history.jsonl`` and TensorBoard scalars under ``directory``, and reports them to
    W&B where ``wandb`` names a project (:class:`WandbRun`).

    On resume at ``start_step``, records logged after that step by the interrupted run are
    dropped, so the history reads as one uninterrupted run; a run starting at step 0 replaces
    the records of one that left no checkpoint (with a warning), in TensorBoard too. With
    ``reevaluating`` (a finished run resumed, which evaluates again) the evaluation records of
    ``start_step`` go too: the new ones replace them in the history. ``config`` (the recipe) is
    the W&B run's config; a run starting at step 0 starts a W&B run of its own (:class:`WandbRun`).
    """

    def __init__(self, directory: str | Path, enabled: bool, tensorboard: bool, start_step: int = 0,
                 reevaluating: bool = False, wandb: WandbSettings | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.wandb: WandbRun | None = None
        if not enabled:
            return
        reporting = wandb is not None and wandb.project is not None
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        earlier = read_history(self.directory)
        kept = [record for record in earlier if record["step"] < start_step
                or (record["step"] == start_step and not (reevaluating and "loss" not in record))]
        if len(kept) < len(earlier):
            log.warning("%s: replacing %d logged record(s) after step %d of an earlier run", self.directory,
                        len(earlier) - len(kept), start_step)
        # the kept records replace the file in one rename: a resume stopped here (SIGTERM while it sets
        # up, a lost node) leaves the old history whole, never an emptied one
        with written_whole(self.directory / HISTORY_FILE) as partial:
            partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.file = open(self.directory / HISTORY_FILE, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # the records up to start_step are the checkpoint's own (its eval included): later ones are replaced
            self.writer = SummaryWriter(str(self.directory / "tensorboard"), purge_step=start_step + 1)
        if reporting:
            try:
                self.wandb = WandbRun(self.directory, wandb, config or {}, fresh=start_step == 0)
            except BaseException:
                self.close()
                raise

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, scalars)

    def close(self, failed: bool = False, preempted: bool = False) -> None:
        """Close the outputs; ``failed``: the run raised, which marks its W&B run failed, or with
        ``preempted`` (SIGTERM: checkpointed, to be resumed) preempted."""
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish(failed, preempted)


def import_wandb() -> Any:
    """The ``wandb`` package, an optional dependency (open_clip's too), or a config error saying
    how to install it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("is set, but the wandb package is not installed: pip install 'openalign[wandb]', or "
                          "leave run.wandb.project null", "run.wandb.project") from None
    return wandb


class WandbRun:
    """The W&B run of a run directory: one id, kept in ``wandb_id`` there, so that
    ``--resume latest`` continues the same W&B run (``resume="allow"``), as open_clip's
    ``--resume latest`` does. A run starting at step 0 (``fresh``: a new run, or one resumed before
    its first checkpoint, whose history is replaced) starts a new W&B run, with a new id.

    Each record goes to W&B as history.jsonl has it, ``{"step": step, **scalars}``, with the
    optimiser step as the charts' x-axis (``define_metric("*", step_metric="step")``), not as
    W&B's own ``_step``: W&B drops a record whose ``_step`` is below one already logged
    (wandb-core: "Tried to log to step %d that is less than the current step %d ... this data will
    be ignored"), and a resumed run logs again the steps after its checkpoint that the interrupted
    run had logged, which would be lost. W&B's rewind (``wandb.init(resume_from=f"{id}?_step=N")``)
    would truncate them instead, but it is a server call (not in offline mode), in beta, and only on
    ``_step``. So W&B keeps every record, those of an interrupted stretch twice at the same steps
    (history.jsonl and TensorBoard keep the resumed run's only)."""

    def __init__(self, directory: Path, settings: WandbSettings, config: dict[str, Any], fresh: bool = False) -> None:
        wandb = import_wandb()
        mode = {"mode": settings.mode} if settings.mode is not None else {}  # else W&B's own (WANDB_MODE)
        try:
            self.run = wandb.init(project=settings.project, entity=settings.entity,
                                  name=settings.name or directory.resolve().name, group=settings.group,
                                  tags=list(settings.tags), dir=str(directory), config=config,
                                  id=_wandb_id(directory, fresh), resume="allow", **mode)
        except Exception as error:  # wandb's own (not logged in, server unreachable): said before the first step
            raise ConfigError(f"is set, but W&B could not start the run ({first_line(error)}): log in with "
                              "'wandb login', or set run.wandb.mode=offline", "run.wandb.project") from error
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({"step": step, **scalars})

    def finish(self, failed: bool, preempted: bool = False) -> None:
        """End the W&B run: finished, failed, or (``preempted``, W&B's ``mark_preempting``) preempted."""
        if preempted:
            self.run.mark_preempting()
        self.run.finish(exit_code=1 if failed else 0)


def _wandb_id(directory: Path, fresh: bool = False) -> str:
    """The run directory's W&B run id: the one in its ``wandb_id`` file, or (``fresh``, or none
    there) a new one written there (8 characters of W&B's own alphabet)."""
    path = directory / WANDB_ID_FILE
    if not fresh and path.is_file() and (stored := path.read_text().strip()):
        return stored
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.write_text(new + "\n")
    return new
