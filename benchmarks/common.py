"""What the benchmark scripts share: the environment record, and printing a table plus writing JSON."""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table


def add_output(parser: argparse.ArgumentParser, name: str) -> None:
    """``--output``: by default a scratch file under ``runs/benchmarks/`` (relative to the working directory), so
    that a trial run never replaces a measurement that docs/benchmarks.md cites; those are in
    ``benchmarks/results/`` and are written only when named, as the docs' commands do."""
    parser.add_argument("--output", type=Path, default=Path("runs") / "benchmarks" / f"{name}.json",
                        help=f"where the JSON goes (default runs/benchmarks/{name}.json; the recorded measurements "
                             f"are benchmarks/results/*.json, written only when named here)")


def environment(device: torch.device, **extra: Any) -> dict[str, Any]:
    """The device's name, torch version and thread count, plus ``extra``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), **extra}


def report(title: str, columns: Sequence[str], cells: Sequence[Sequence[str]], left: int,
           payload: dict[str, Any], output: Path) -> None:
    """Print a table (the first ``left`` columns left-aligned) and write ``payload`` as JSON to ``output``."""
    table = Table(title=title)
    for position, column in enumerate(columns):
        table.add_column(column, justify="left" if position < left else "right")
    for row in cells:
        table.add_row(*row)
    Console().print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2))
    print(f"wrote {output}")
