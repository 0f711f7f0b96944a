"""Learning-rate schedules: linear warm-up from 0, then linear (ALIGN), cosine or constant."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of the peak learning rate at ``step`` (0-based; 0 at step 0 with warm-up).

    ``linear`` is Keras' PolynomialDecay(power=1) behind COYO-ALIGN's warm-up (spec §3.3):
    step/warmup during warm-up, then 1 - (step - warmup)/(total - warmup), reaching 0 at total.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{schedule}'")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A per-step scheduler: call ``scheduler.step()`` after every ``optimizer.step()``."""
    return LambdaLR(optimizer, partial(lr_factor, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps))
