"""Optimisers: LAMB as tensorflow-addons implements it, big_vision's Adafactor variant, and AdamW;
parameter groups for all three."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The loss an optimiser's ``step(closure)`` re-evaluates (with gradients on), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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
        loss = _closure_loss(closure)
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


class BigVisionAdafactor(torch.optim.Optimizer):
    """big_vision's ``scale_by_adafactor`` (CLIPPO's optimiser; shared spec clippo.md §4.1), with
    decoupled weight decay in AdamW's form.

    Per parameter w with gradient g, at step t = 0, 1, ...: β₂ = min(``beta2_cap``, 1 − (t+1)^−0.8)
    (0 at the first step); v ← β₂·v + (1−β₂)·(g² + ``eps``), kept factored over the two largest
    dimensions (a row and a column mean, optax's ``scale_by_factored_rms``) when the second largest
    is at least 32, else whole; u = g / √v̂ (no update clipping); m ← ``momentum``·m + (1−momentum)·u,
    an EMA without bias correction, stored in bfloat16, where optax also takes ``momentum``·m, with
    ``momentum`` itself in bfloat16 (0.9 is 0.8984375 there; the sum is float32, and the step uses it
    before its rounding to bfloat16); then
    w ← w − lr·(m + ``weight_decay``·w). big_vision adds wd·w without lr, both scaled by the
    schedule s(t): its wd is lr·``weight_decay`` here, as for AdamW (the CLIPPO recipes say so).

    ``shapes`` maps parameters to the shapes their statistics are factored in, where PyTorch
    fuses what flax keeps apart: an attention's fused q/k/v weight (3·H·Dh, D) is big_vision's
    three (D, H, Dh) kernels, factored per head, so it is viewed as (3, H, Dh, D), and its output
    weight (D, H·Dh) as (D, H, Dh) (:func:`attention_factoring_shapes` finds them).
    """

    DECAY_RATE = 0.8
    MIN_DIM_SIZE_TO_FACTOR = 32

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, beta2_cap: float = 0.999,
                 eps: float = 1e-30, weight_decay: float = 0.0,
                 shapes: Mapping[torch.Tensor, tuple[int, ...]] | None = None) -> None:
        if lr <= 0 or eps < 0 or weight_decay < 0 or not 0 <= momentum < 1 or not 0 < beta2_cap <= 1:
            raise ValueError(f"invalid Adafactor settings: lr={lr}, momentum={momentum}, beta2_cap={beta2_cap}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "beta2_cap": beta2_cap, "eps": eps,
                                  "weight_decay": weight_decay})
        self.shapes = dict(shapes or {})
        for param, shape in self.shapes.items():
            if math.prod(shape) != param.numel():
                raise ValueError(f"a parameter of shape {tuple(param.shape)} cannot be viewed as {shape}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the state keeps its own dtypes: float32 second moments and a bfloat16
        momentum, which torch would cast to the parameters' dtype (bf16 weights: moments rounded;
        fp32 weights: a momentum no longer rounded to bfloat16), so a resumed run would differ."""
        saved = state_dict["state"]
        params = [param for group in self.param_groups for param in group["params"]]
        for index, values in saved.items():
            param = params[int(index)]
            layout = tuple(self.shapes.get(param, param.shape))
            if "momentum" in values and tuple(values["momentum"].shape) != layout:
                from ..errors import OpenAlignError

                raise OpenAlignError(f"the saved Adafactor state of a {tuple(param.shape)} parameter is laid out as "
                                     f"{tuple(values['momentum'].shape)}, not {layout}: it was saved by openalign "
                                     "before attention weights were factored per head")
        super().load_state_dict(state_dict)
        for index, values in saved.items():
            param = params[int(index)]
            for key in ("v", "v_row", "v_col", "momentum"):
                if key in values:
                    self.state[param][key] = values[key].to(device=param.device, copy=True)

    @staticmethod
    def factored_dims(shape: torch.Size) -> tuple[int, int] | None:
        """``(row dim, column dim)``: the second largest and the largest dimension (of equal sizes,
        the later one counts as larger, as numpy's argsort orders a short shape), or None where v
        is kept whole."""
        if len(shape) < 2:
            return None
        order = sorted(range(len(shape)), key=lambda dim: shape[dim])  # stable, as numpy's argsort
        if shape[order[-2]] < BigVisionAdafactor.MIN_DIM_SIZE_TO_FACTOR:
            return None
        return order[-2], order[-1]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad, state = param.grad.float(), self.state[param]
        grad = grad.reshape(self.shapes.get(param, param.shape))  # the second moment's layout
        dims = self.factored_dims(grad.shape)
        if not state:
            state["step"] = torch.tensor(0.0)
            if dims is None:
                state["v"] = torch.zeros_like(grad)
            else:
                state["v_row"] = torch.zeros_like(grad.mean(dim=dims[1]))
                state["v_col"] = torch.zeros_like(grad.mean(dim=dims[0]))
            state["momentum"] = torch.zeros_like(grad, dtype=torch.bfloat16)
        t = float(state["step"]) + 1
        state["step"] += 1
        beta2 = min(group["beta2_cap"], 1 - t ** -self.DECAY_RATE)
        squared = grad.square().add_(group["eps"])
        if dims is None:
            state["v"].mul_(beta2).add_(squared, alpha=1 - beta2)
            update = grad * state["v"].rsqrt()
        else:
            row_dim, col_dim = dims
            state["v_row"].mul_(beta2).add_(squared.mean(dim=col_dim), alpha=1 - beta2)
            state["v_col"].mul_(beta2).add_(squared.mean(dim=row_dim), alpha=1 - beta2)
            v_row, v_col = state["v_row"], state["v_col"]
            # v_row lacks col_dim: row_dim's place in it moves down one when it came after col_dim
            row_factor = (v_row / v_row.mean(dim=row_dim - (row_dim > col_dim), keepdim=True)).rsqrt()
            update = grad * row_factor.unsqueeze(col_dim) * v_col.rsqrt().unsqueeze(row_dim)
        # optax's ema: decay·m is taken in m's bfloat16, the decay too (JAX casts a Python float to the array's
        # dtype: 0.9 is 0.8984375); (1 - decay)·u and the sum in float32
        decay = _in_bfloat16(group["momentum"])
        momentum = (state["momentum"] * decay).float().add_(update, alpha=1 - group["momentum"])
        state["momentum"].copy_(momentum)
        if group["weight_decay"]:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(momentum.view(param.shape).to(param.dtype), alpha=-group["lr"])


@functools.lru_cache(maxsize=8)
def _in_bfloat16(value: float) -> float:
    """``value`` rounded to bfloat16 (0.9 is 0.8984375), as JAX casts a Python float to a bfloat16
    array's dtype; computed once, not a tensor made per parameter and step."""
    return torch.tensor(value, dtype=torch.bfloat16).item()


def attention_factoring_shapes(model: nn.Module) -> dict[torch.Tensor, tuple[int, ...]]:
    """The head-split shapes of ``model``'s fused attention weights (see :class:`BigVisionAdafactor`):
    timm's attention (``qkv``, ``proj``) and attention pooling (``q``, ``kv``, ``proj``: a MAP
    head), and ``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj``), by type: another
    module's weights of those names may be laid out otherwise, and keep their own shapes."""
    from timm.layers import Attention, AttentionPoolLatent

    shapes: dict[torch.Tensor, tuple[int, ...]] = {}

    def split(linear: nn.Module | None, parts: tuple[int, ...], heads: int, head_dim: int, output: bool) -> None:
        if isinstance(linear, nn.Linear):
            if output:  # the heads are its input: (D, H, Dh)
                shapes[linear.weight] = (linear.out_features, heads, head_dim)
            else:  # its output is the heads: (parts..., H, Dh, D)
                shapes[linear.weight] = (*parts, heads, head_dim, linear.in_features)
                if linear.bias is not None:
                    shapes[linear.bias] = (*parts, heads, head_dim)

    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            head_dim = module.embed_dim // module.num_heads
            shapes[module.in_proj_weight] = (3, module.num_heads, head_dim, module.embed_dim)
            if module.in_proj_bias is not None:
                shapes[module.in_proj_bias] = (3, module.num_heads, head_dim)
            split(module.out_proj, (), module.num_heads, head_dim, output=True)
        elif isinstance(module, (Attention, AttentionPoolLatent)) and isinstance(module.proj, nn.Linear):
            heads, head_dim = module.num_heads, module.proj.in_features // module.num_heads
            split(getattr(module, "qkv", None), (3,), heads, head_dim, output=False)  # timm's attention
            split(getattr(module, "q", None), (), heads, head_dim, output=False)  # attention pooling
            split(getattr(module, "kv", None), (2,), heads, head_dim, output=False)
            split(module.proj, (), heads, head_dim, output=True)
    return shapes


def parameter_groups(model: nn.Module, weight_decay: float, optimizer: str,
                     decay_all: bool = False) -> list[dict[str, Any]]:
    """Two groups: parameters with weight decay (and LAMB's trust ratio), and those without.

    Exempt from both: batch-norm weights and biases (tfa's ``exclude_from_weight_decay=['bn/']``,
    which LAMB also applies to layer adaptation) and whatever ``model.no_weight_decay()`` names
    (the log-temperature). AdamW also exempts every other 1-D parameter (biases, LayerNorm),
    the usual CLIP practice, and so does Adafactor (big_vision decays ``*/kernel`` only).
    ``decay_all`` decays every parameter instead (ALIP's one group, shared spec alip.md §5).
    """
    exempt_names = set(getattr(model, "no_weight_decay", set)())
    norm_ids = {id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = not decay_all and (name in exempt_names or id(param) in norm_ids
                                    or (optimizer != "lamb" and param.ndim < 2))
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "lamb":
        groups[0]["trust_ratio"], groups[1]["trust_ratio"] = True, False
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, device: torch.device, decay_all: bool = False) -> torch.optim.Optimizer:
    """LAMB, big_vision's Adafactor (``betas``: its momentum and β₂ cap) or AdamW over
    :func:`parameter_groups`; AdamW uses the fused CUDA kernel on GPU."""
    groups = parameter_groups(model, weight_decay, name, decay_all)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    if name == "adafactor":
        return BigVisionAdafactor(groups, lr=lr, momentum=betas[0], beta2_cap=betas[1], eps=eps,
                                  shapes=attention_factoring_shapes(model))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")
    raise ValueError(f"unknown optimizer '{name}'")
