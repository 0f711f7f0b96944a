"""Rich progress bars for long work (training, feature extraction, data generation)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def make_progress(*extra_columns: TextColumn, enabled: bool = True) -> Progress:
    """A progress display on stderr; silent when disabled or when stderr is not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra_columns,
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        disable=not enabled or not sys.stderr.isatty(), transient=False,
    )


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar of ``total`` steps; yields ``advance(n=1)``."""
    with make_progress(enabled=enabled) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
