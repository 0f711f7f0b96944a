"""Mixed precision: bf16 autocast on GPU, fp32 on CPU, unless the settings say otherwise; fp16
autocast (with a gradient scaler in training) for GPUs without bf16 (V100, T4)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported where used: the command line's parser reads PRECISIONS without it
    import torch

Precision = Literal["auto", "bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")

_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("openalign_precision", default="auto")


def autocast(device: torch.device | str, precision: str | None = None) -> torch.autocast:
    """An autocast context: bf16 for ``precision="bf16"``, or for ``"auto"`` on CUDA; fp16 for
    ``"fp16"``; fp32 otherwise.

    ``None`` is the precision a :func:`precision_scope` around the call sets (``"auto"`` outside one).
    """
    import torch

    dtype = autocast_dtype(device, precision)
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def autocast_dtype(device: torch.device | str, precision: str | None = None) -> torch.dtype | None:
    """The dtype :func:`autocast` computes in on ``device`` (bf16 or fp16), or None where it is fp32."""
    import torch

    device = torch.device(device)  # "cuda" as well as torch.device("cuda"), as torch takes them

    precision = precision or _PRECISION.get()
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None


def precision_name(device: torch.device, precision: str | None = None) -> str:
    """What :func:`autocast` computes in on ``device``, by name (``auto`` resolved): bf16, fp16 or fp32."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[autocast_dtype(device, precision)]


def gradient_scaler(device: torch.device, precision: str, growth_interval: int = 2000) -> torch.amp.GradScaler:
    """The loss scaler of training at ``precision``: enabled in fp16 (whose gradients underflow
    without one), else disabled, passing losses, gradients and steps through unchanged. The scale
    doubles after ``growth_interval`` steps without an overflow."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, precision) == torch.float16,
                                growth_interval=growth_interval)


@contextlib.contextmanager
def precision_scope(precision: str) -> Iterator[None]:
    """Run the code inside (evaluation tasks, which call :func:`autocast` without a precision) at
    ``precision``: evaluation during training uses the run's ``train.precision``."""
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)
