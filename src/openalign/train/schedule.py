"""Learning-rate schedules: linear warm-up from 0, then linear (ALIGN), cosine, inverse square root
(big_vision, CLIPPO) or constant, optionally with a linear cool-down to 0 over the last steps;
and PyTorch's one-cycle policy (ALIP)."""

from __future__ import annotations

import math
import warnings
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, cooldown_steps: int = 0,
              timescale: int | None = None) -> float:
    """The multiplier of the peak learning rate at ``step`` (0-based; 0 at step 0 with warm-up).

    ``linear`` is Keras' PolynomialDecay(power=1) behind COYO-ALIGN's warm-up (spec §3.3):
    step/warmup during warm-up, then 1 - (step - warmup)/(total - warmup), reaching 0 at total.
    ``rsqrt`` is big_vision's (shared spec clippo.md §4.1): 1/√((step + timescale − warmup) /
    timescale) after warm-up (``timescale`` defaults to the warm-up length, giving √(warmup/step)).
    With ``cooldown_steps``, any schedule is also multiplied by min(1, (total − step)/cooldown).
    """
    factor = _shape(step, schedule, warmup_steps, total_steps, timescale or max(1, warmup_steps))
    if cooldown_steps:
        factor *= min(1.0, (total_steps - step) / cooldown_steps)
    return factor


def _shape(step: int, schedule: str, warmup_steps: int, total_steps: int, timescale: int) -> float:
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "rsqrt":
        return 1.0 / math.sqrt((step + timescale - warmup_steps) / timescale)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{schedule}'")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                    cooldown_steps: int = 0, timescale: int | None = None) -> LRScheduler:
    """A per-step scheduler: call ``scheduler.step()`` after every ``optimizer.step()``.

    ``onecycle`` is PyTorch's ``OneCycleLR`` with its defaults, as ALIP trains (shared spec
    alip.md §5): a cosine warm-up over ``warmup_steps`` from lr/25, cosine annealing to lr/25e4,
    and Adam's β1 cycled 0.95 → 0.85 → 0.95 (which overrides ``train.betas[0]``).
    """
    if schedule == "onecycle":
        if cooldown_steps:
            raise ValueError("the onecycle schedule has its own annealing: set cooldown_steps to 0")
        return OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total_steps,
                          pct_start=warmup_steps / total_steps, anneal_strategy="cos", cycle_momentum=True)
    return LambdaLR(optimizer, partial(lr_factor, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps,
                                       cooldown_steps=cooldown_steps, timescale=timescale))


def load_scheduler_state(scheduler: LRScheduler, state: dict) -> None:
    """Restore ``scheduler``'s position from a checkpoint's ``state``, keeping the length it was
    built with: a resumed run may extend ``train.steps``, and ``OneCycleLR`` would otherwise take
    back the old length with its state (and refuse to step past it).

    The optimiser's rate (and OneCycle's momentum), restored with the optimiser, is the old
    schedule's: it is taken again at the same position on this one, so that the first step after
    resuming a longer run already follows the new schedule (on the same length, nothing changes).
    The peak rate is the optimiser's groups' ``initial_lr`` (the recipe's ``train.lr``), not the one
    the state saved: a rate changed on resume applies from the next step.
    """
    if isinstance(scheduler, OneCycleLR):
        state = {key: value for key, value in state.items() if key not in ("total_steps", "_schedule_phases")}
    scheduler.load_state_dict(state)
    scheduler.base_lrs = [group["initial_lr"] for group in scheduler.optimizer.param_groups]
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():  # a checkpoint taken before any step: no step is skipped here
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()
