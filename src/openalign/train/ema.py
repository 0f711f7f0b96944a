"""``train.ema_decay``: an exponential moving average of the weights, evaluated and checkpointed
beside them (timm's ``ModelEma``, the "EMA" of open_clip's training tasks).

The average is a whole second model, so that it evaluates, saves and loads as any model does:
each checkpoint holds it as ``ema/``, an openalign model directory of its own
(``--model runs/NAME/checkpoints/step_N/ema`` wherever a model is named).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..distributed import average_buffers


class WeightAverage:
    """After each optimiser step ``t`` (1, 2, ...), ``average ← d·average + (1 − d)·weights``
    with ``d = decay``, or with ``warmup`` ``d = min(decay, (1 + t) / (10 + t))`` (TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``, timm's ``use_warmup``): early on the
    average follows the weights closely, so that it is not dominated for thousands of steps by the
    random initial ones, which a decay of 0.9999 would otherwise keep at a third after 10,000 steps.

    Trained parameters and floating-point buffers (batch-norm running statistics) are averaged;
    integer buffers (``num_batches_tracked``) are copied, and frozen parameters (``train.freeze``)
    are the model's own tensors, shared rather than copied (they never change: LiT's locked tower
    costs no second copy). Parameters are the same on every rank (DDP), so
    their averages are too; the running statistics, which training keeps per device, are set to
    their mean over ranks before the average is evaluated or saved (:meth:`synchronise`), as the
    model's own are.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), not {decay}")
        self.decay, self.warmup = decay, warmup
        frozen = {id(param): param for param in model.parameters() if not param.requires_grad}
        self.module = copy.deepcopy(model, memo=frozen).eval().requires_grad_(False)  # the memo: shared as they are
        live_parameters, live_buffers = dict(model.named_parameters()), dict(model.named_buffers())
        averaged = [(tensor, live_parameters[name]) for name, tensor in self.module.named_parameters()
                    if live_parameters[name].requires_grad]
        averaged += [(tensor, live_buffers[name]) for name, tensor in self.module.named_buffers()
                     if tensor.is_floating_point()]
        self._averages, self._live = [pair[0] for pair in averaged], [pair[1] for pair in averaged]
        self._copied = [(tensor, live_buffers[name]) for name, tensor in self.module.named_buffers()
                        if not tensor.is_floating_point()]

    @property
    def nbytes(self) -> int:
        """The memory of the average's own tensors (frozen parameters are the model's: not counted)."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self._averages) + sum(
            average.numel() * average.element_size() for average, _ in self._copied)

    def decay_at(self, step: int) -> float:
        """The decay applied after optimiser step ``step`` (counted from 1)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the weights after optimiser step ``step``."""
        torch._foreach_lerp_(self._averages, self._live, 1.0 - self.decay_at(step))
        for average, live in self._copied:
            average.copy_(live)

    def synchronise(self) -> None:
        """Set the averaged running statistics to their mean over ranks (every rank must call this)."""
        average_buffers(self.module)
