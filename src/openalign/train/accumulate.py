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
- the model's buffers (batch-norm running statistics) are set back after the caching pass, so
  they advance once per micro-batch, not twice; the loss's buffers (ALIP's running averages) are
  set back before each repeated loss, so they advance once per step, on the whole batch;
- DDP synchronises gradients only in the last backward pass (``no_sync`` before it).

Micro-batch j holds examples j, j + k, j + 2k, ...: ghost batch norm groups examples with the
same stride, so each micro-batch holds whole ghost batches and every example is normalised with
exactly the examples it would be in the whole batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import OpenAlignError
from ..precision import autocast


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` (tensors, possibly in dicts) as ``parts`` micro-batches; micro-batch j holds
    examples j, j + parts, j + 2·parts, ... of every tensor (in its memory format)."""
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
    return [batch[j::parts].clone(memory_format=torch.preserve_format) for j in range(parts)]


def accumulated_backward(forward: nn.Module, model: nn.Module, loss_fn: Any, inputs: dict[str, Any],
                         device: torch.device, precision: str, steps: int) -> torch.Tensor:
    """Backpropagate the loss of ``inputs`` (the model's batch fields) in ``steps`` micro-batches,
    adding to the parameters' gradients; returns the loss of the whole batch (detached).

    ``forward`` is what runs ``model`` (its DDP or compiled wrapper)."""
    micro = split_batch(inputs, steps)
    random_states, cached = [], []
    buffers = _snapshot(model)
    with torch.no_grad():
        for part in micro:
            random_states.append(_random_state(device))
            with autocast(device, precision):
                cached.append(_check_outputs(forward(**part), part))
    _restore(model, buffers)
    loss_buffers = _snapshot(loss_fn) if isinstance(loss_fn, nn.Module) else {}
    for j, part in enumerate(micro):
        _set_random_state(device, random_states[j])
        with _gradient_sync(forward, enabled=j == steps - 1):
            with autocast(device, precision):
                live = forward(**part)
            _restore(loss_fn, loss_buffers)
            loss = loss_fn(**_with_live(cached, j, live, steps))  # outside autocast, as train_step
            loss.backward()
    return loss.detach()


def _check_outputs(outputs: dict[str, Any], part: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's outputs must be tensors: per example (first dimension the micro-batch's size) or
    0-dimensional (shared by the batch, as ``logit_scale``)."""
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


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


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
