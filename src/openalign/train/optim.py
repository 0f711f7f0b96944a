"""Optimisers: LAMB as tensorflow-addons implements it, and AdamW; parameter groups for both."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class Lamb(torch.optim.Optimizer):
    """LAMB exactly as ``tfa.optimizers.LAMB`` 0.12 (shared spec align-coyo-and-hf.md §3.2).

    Per parameter w with gradient g, at step t:
    m ← β1·m + (1-β1)·g; v ← β2·v + (1-β2)·g²; u = (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε) + wd·w;
    with layer adaptation, r = ‖w‖ / ‖u‖ (1 if either norm is 0), else r = 1; w ← w - lr·r·u.
    A param group's ``weight_decay`` and ``trust_ratio`` (layer adaptation on/off) are per
    group, so batch-norm parameters can be excluded from both, as COYO-ALIGN does.
    Updates use multi-tensor (foreach) kernels.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, trust_ratio: bool = True) -> None:
        if lr <= 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid LAMB settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "trust_ratio": trust_ratio})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        states = [self._state(p) for p in params]
        steps = [int(state["step"]) for state in states]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        grads = [p.grad for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denominators = torch._foreach_div(exp_avg_sqs, [1 - beta2**t for t in steps])
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(exp_avgs, [1 - beta1**t for t in steps])
        torch._foreach_div_(updates, denominators)
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        if group["trust_ratio"]:
            weight_norms = torch.stack(torch._foreach_norm(params))
            update_norms = torch.stack(torch._foreach_norm(updates))
            ratios = torch.where((weight_norms > 0) & (update_norms > 0), weight_norms / update_norms, 1.0)
            torch._foreach_mul_(updates, list(ratios.unbind()))
        torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _state(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        return state


def parameter_groups(model: nn.Module, weight_decay: float, optimizer: str,
                     decay_all: bool = False) -> list[dict[str, Any]]:
    """Two groups: parameters with weight decay (and LAMB's trust ratio), and those without.

    Exempt from both: batch-norm weights and biases (tfa's ``exclude_from_weight_decay=['bn/']``,
    which LAMB also applies to layer adaptation) and whatever ``model.no_weight_decay()`` names
    (the log-temperature). AdamW also exempts every other 1-D parameter (biases, LayerNorm),
    the usual CLIP practice. ``decay_all`` decays every parameter instead (ALIP's one group,
    shared spec alip.md §5).
    """
    exempt_names = set(getattr(model, "no_weight_decay", set)())
    norm_ids = {id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = not decay_all and (name in exempt_names or id(param) in norm_ids
                                    or (optimizer == "adamw" and param.ndim < 2))
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "lamb":
        groups[0]["trust_ratio"], groups[1]["trust_ratio"] = True, False
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, device: torch.device, decay_all: bool = False) -> torch.optim.Optimizer:
    """LAMB or AdamW over :func:`parameter_groups`; AdamW uses the fused CUDA kernel on GPU."""
    groups = parameter_groups(model, weight_decay, name, decay_all)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")
    raise ValueError(f"unknown optimizer '{name}'")
