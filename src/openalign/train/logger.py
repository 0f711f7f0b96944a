"""Training scalars: a JSONL history, TensorBoard, and the console log (main rank only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import OpenAlignError

log = logging.getLogger("openalign.train")

HISTORY_FILE = "history.jsonl"


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
    """Writes ``history.jsonl`` and TensorBoard scalars under ``directory``.

    On resume at ``start_step``, records logged after that step by the interrupted run are
    dropped, so the history reads as one uninterrupted run; a run starting at step 0 replaces
    the records of one that left no checkpoint (with a warning), in TensorBoard too. With
    ``reevaluating`` (a finished run resumed, which evaluates again) the evaluation records of
    ``start_step`` go too: the new ones replace them in the history.
    """

    def __init__(self, directory: str | Path, enabled: bool, tensorboard: bool, start_step: int = 0,
                 reevaluating: bool = False) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        earlier = read_history(self.directory)
        kept = [record for record in earlier if record["step"] < start_step
                or (record["step"] == start_step and not (reevaluating and "loss" not in record))]
        if len(kept) < len(earlier):
            log.warning("%s: replacing %d logged record(s) after step %d of an earlier run", self.directory,
                        len(earlier) - len(kept), start_step)
        self.file = open(self.directory / HISTORY_FILE, "w")
        for record in kept:
            self.file.write(json.dumps(record) + "\n")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # the records up to start_step are the checkpoint's own (its eval included): later ones are replaced
            self.writer = SummaryWriter(str(self.directory / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
