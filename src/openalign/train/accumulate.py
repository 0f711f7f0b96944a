"""Gradient accumulation for contrastive losses, by caching features (``train.accum_steps``).

Splitting a batch into micro-batches and adding their gradients would change a contrastive
objective: each micro-batch would only see its own examples as negatives. Instead, as open_clip's
``--accum-freq`` does (shared spec anchors §2.3), every micro-batch is first embedded without
gradient; then each micro-batch in turn is embedded again with gradient, its live outputs take
the place of its cached ones, the loss of the **whole** batch is computed, and backpropagated.
The k backward passes together give exactly the whole batch's gradient, at the cost of one more
forward pass per example; activations are held for one micro-batch at a time.

Where open_clip's version is inexact, this one is not (each point has a test):

- the loss is not divided by k: backward j differentiates the whole-batch loss through micro-batch
  j only, so the k gradients add up to the whole batch's;
- outputs that are not per example (0-dimensional, such as ``logit_scale``) are live in all k
  losses; their gradient is divided by k, where open_clip sums it k times;
- the random state (dropout, drop-connect) is set back before each re-embedding to what it was
  when that micro-batch was first embedded, so the cached and live outputs are the same function
  and the gradient is exact with dropout too;
- batch-norm running statistics end the step as the whole batch leaves them: every micro-batch's
  forward pass starts from the step's buffers, and the float buffers are then set to the mean of
  what the micro-batches left (an update that is linear in the batch's statistics, as batch
  norm's is, comes out exact), the integer ones (counters) to what one pass leaves; the loss's
  buffers (ALIP's running averages) are set back before each repeated loss, so they advance once
  per step, on the whole batch;
- DDP synchronises gradients only in the last backward pass (``no_sync`` before it).

Micro-batch j holds examples j, j + k, j + 2k, ...: ghost batch norm groups examples with the
same stride, so each micro-batch holds whole ghost batches and every example is normalised with
exactly the examples it would be in the whole batch. Standard batch norm in training mode, which
would normalise each micro-batch with its own statistics, is refused.

Per step this costs one more forward pass per example, k losses on the whole batch (and, on
several ranks, their all-gathers), and memory for one micro-batch's activations at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import OpenAlignError
from ..models import GhostBatchNorm2d
from ..precision import autocast


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` (tensors, possibly in dicts) as ``parts`` micro-batches; micro-batch j holds
    examples j, j + parts, j + 2·parts, ... of every tensor (strided views: no copy)."""
    if isinstance(batch, dict):
        split = {name: split_batch(value, parts) for name, value in batch.items()}
        return [{name: pieces[j] for name, pieces in split.items()} for j in range(parts)]
    if not isinstance(batch, torch.Tensor) or batch.ndim == 0:
        what = "a 0-dimensional tensor" if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise OpenAlignError(f"train.accum_steps splits the batch's tensors along their first dimension, but the "
                             f"batch holds {what}")
    if batch.shape[0] % parts:
        raise OpenAlignError(f"a batch of {batch.shape[0]} examples does not split into train.accum_steps={parts} "
                             "equal micro-batches")
    return [batch[j::parts] for j in range(parts)]


def accumulated_backward(forward: nn.Module, model: nn.Module, loss_fn: Any, inputs: dict[str, Any],
                         device: torch.device, precision: str, steps: int,
                         backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward) -> torch.Tensor:
    """Backpropagate the loss of ``inputs`` (the model's batch fields) in ``steps`` micro-batches,
    adding to the parameters' gradients; returns the loss of the whole batch (detached).

    ``forward`` is what runs ``model`` (its DDP or compiled wrapper); ``backward`` backpropagates a
    loss (fp16 training's scales it first)."""
    check_accumulable(model)
    micro = split_batch(inputs, steps)
    random_states, cached = [], []
    buffers, loss_buffers = _snapshot(model), _snapshot(loss_fn)
    with torch.no_grad():
        for part in micro:
            random_states.append(_random_state(device))
            with autocast(device, precision):
                cached.append(_check_outputs(forward(**_packed(part)), part))
    left: list[dict[str, torch.Tensor]] = []
    for j, part in enumerate(micro):
        _set_random_state(device, random_states[j])
        _restore(model, buffers)
        with _gradient_sync(forward, enabled=j == steps - 1):
            with autocast(device, precision):
                live = forward(**_packed(part))
            left.append(_snapshot(model))
            _restore(loss_fn, loss_buffers)
            loss = loss_fn(**_with_live(cached, j, live, steps))  # outside autocast, as train_step
            backward(loss)
    _set_to_mean(model, left)
    return loss.detach()


def check_accumulable(model: nn.Module) -> None:
    """Refuse batch norm that would normalise each micro-batch with its own statistics: standard
    batch norm in training mode (ghost batch norm with a ``virtual_batch_size`` is fine, and so is
    a frozen one, which runs on its running statistics: :mod:`openalign.train.freeze`)."""
    from .freeze import is_frozen

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and not is_frozen(module) and not (
                isinstance(module, GhostBatchNorm2d) and module.virtual_batch_size):
            raise OpenAlignError(f"train.accum_steps > 1 needs batch norm whose statistics do not depend on how the "
                                 f"batch is split, but '{name}' is standard batch norm ({type(module).__name__}), "
                                 "which would normalise each micro-batch with its own statistics: set the model's "
                                 "virtual_batch_size (ghost batch norm) or train.accum_steps to 1")


def _check_outputs(outputs: dict[str, Any], part: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's outputs must be tensors: per example (first dimension the micro-batch's size) or
    0-dimensional (shared by the batch, as ``logit_scale``). A per-example output must depend on
    its own example only (as embeddings do); that cannot be checked from its shape."""
    size = next(_tensors(part)).shape[0]
    for name, value in outputs.items():
        if not isinstance(value, torch.Tensor) or (value.ndim and value.shape[0] != size):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise OpenAlignError(f"train.accum_steps needs model outputs that are per example or 0-dimensional, but "
                                 f"output '{name}' is {shape} for a micro-batch of {size}: set train.accum_steps to 1")
    return outputs


def _with_live(cached: list[dict[str, torch.Tensor]], j: int, live: dict[str, torch.Tensor],
               steps: int) -> dict[str, torch.Tensor]:
    """The whole batch's outputs with micro-batch j's live: per-example outputs concatenated in
    micro-batch order; 0-dimensional ones live, with 1/steps of their gradient (each of the
    ``steps`` losses holds them whole)."""
    merged = {}
    for name, value in live.items():
        if value.ndim == 0:
            merged[name] = value.detach() + (value - value.detach()) / steps
        else:
            merged[name] = torch.cat([value if i == j else outputs[name] for i, outputs in enumerate(cached)])
    return merged


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    else:
        yield tree


def _packed(part: Any) -> Any:
    """A micro-batch's strided views as dense tensors (in their memory format), one micro-batch at a time."""
    if isinstance(part, dict):
        return {name: _packed(value) for name, value in part.items()}
    return part.clone(memory_format=torch.preserve_format)


def _snapshot(module: Any) -> dict[str, torch.Tensor]:
    if not isinstance(module, nn.Module):  # a loss given as a plain function
        return {}
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


@torch.no_grad()
def _set_to_mean(module: nn.Module, left: list[dict[str, torch.Tensor]]) -> None:
    """Floating-point buffers: the mean of what each micro-batch's pass left; others: the last's."""
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point():
            buffer.copy_(torch.stack([state[name] for state in left]).mean(dim=0))
        else:
            buffer.copy_(left[-1][name])


@torch.no_grad()
def _restore(module: Any, saved: dict[str, torch.Tensor]) -> None:
    if saved:
        for name, buffer in module.named_buffers():
            buffer.copy_(saved[name])


def _random_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_random_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _gradient_sync(forward: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` unless ``enabled`` (the last backward pass all-reduces the sum); a module
    without it (one process) always adds locally."""
    no_sync = getattr(forward, "no_sync", None)
    return contextlib.nullcontext() if enabled or no_sync is None else no_sync()
