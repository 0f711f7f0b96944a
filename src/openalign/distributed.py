"""Process-group setup for ``torchrun`` launches, and the collectives the losses need."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from .errors import OpenAlignError

# gather_with_grad's all_gather warns at every step that it is deprecated for a private successor
# (torch.distributed._functional_collectives); set once here, as a filter set per call would reset
# every module's "warn once" registry
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: its rank among ``world_size`` and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when a GPU is visible, else the CPU) or a device this machine has; any other
    name is an error that says why, before a model is loaded onto it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise OpenAlignError(f"device '{device}' is not a torch device (use 'auto', 'cpu', 'cuda' or 'cuda:N')"
                             ) from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise OpenAlignError(f"device '{device}' is CUDA but no CUDA device is visible; use 'auto' or 'cpu'")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise OpenAlignError(f"device '{device}': only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif target.type != "cpu":
        try:
            torch.empty(0, device=target)
        except RuntimeError as error:
            # torch's first sentence; the rest lists every backend it has
            reason = str(error).strip().split(". ")[0] if str(error).strip() else type(error).__name__
            raise OpenAlignError(f"device '{device}' is not available here: {reason}") from None
    return target


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPU, gloo on CPU).

    A plain ``python`` launch is a world of one and creates no process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    use_cuda = target.type == "cuda"
    if use_cuda:  # each process of a node on its own GPU
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def shutdown() -> None:
    """Destroy the default process group, if there is one. A process that exits with it alive can
    abort in its destructor (gloo: "terminate called without an active exception", exit code -6,
    which torchrun reports as that rank failing, after a run that succeeded)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_info() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated along dim 0, in rank order.

    The backward pass sums the gradients every rank computed for a slice and hands the sum to
    the slice's owner, so a loss on local rows against gathered columns trains as the
    full-batch loss does (shared spec align-coyo-and-hf.md §2, steps 1 and 7).
    """
    _, world_size = world_info()
    if world_size == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (a detached copy); for logging."""
    value = value.detach().clone()
    if world_info()[1] > 1:
        dist.all_reduce(value)
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """The maximum of ``value`` over ranks (a detached copy); for logging."""
    value = value.detach().clone()
    if world_info()[1] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ranks (a detached copy); for logging."""
    return all_reduce_sum(value) / world_info()[1]


def average_buffers(module: torch.nn.Module) -> None:
    """Set ``module``'s floating-point buffers (batch-norm running statistics) to their mean over
    ranks, in place, as Keras reads the moving averages of TPU replicas (ON_READ, MEAN); integer
    buffers (counters) are rank 0's. Running statistics do not enter training-mode forward passes,
    so averaging them before a checkpoint or an evaluation leaves training unchanged. The buffers
    of one dtype travel together, in one collective (a B7 has some 500 of them)."""
    _, world_size = world_info()
    if world_size == 1:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for (dtype, _), buffers in groups.items():
        flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
        if dtype.is_floating_point:
            dist.all_reduce(flat)
            flat.div_(world_size)
        else:
            dist.broadcast(flat, src=0)
        for buffer, part in zip(buffers, flat.split([buffer.numel() for buffer in buffers])):
            buffer.copy_(part.view_as(buffer))


def _backend_device() -> torch.device:
    """Where the process group's collectives take their tensors: the rank's GPU under NCCL."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ranks_agree(flag: bool) -> bool:
    """Whether ``flag`` is true on every rank (every rank must call this); ``flag`` without a process group."""
    _, world_size = world_info()
    if world_size == 1:
        return flag
    value = torch.tensor([int(flag)], device=_backend_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    if world_info()[1] > 1:
        dist.barrier()


class PeerFailure(OpenAlignError):
    """What the other ranks raise when a :func:`fail_together` block failed on some ranks."""


_AGREED = "_openalign_agreement"  # on an error every rank knows of: the number of the agreement
_latest_agreement = 0  # this process's agreements on failures, numbered in order: the latest


# ``extra`` of a log record that every rank makes alike (a setting changed on resume): the command line
# shows it once, rank 0's, not once per rank
RANK_ZERO_ONLY = {"rank_zero_only": True}


@contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Run a block that every rank runs and, when it raises on some ranks, raise on all of them.

    The ranks whose block raised re-raise their own error; the others raise :class:`PeerFailure`,
    naming the ranks that failed. Without this, one rank's clear error (a config check that
    only rank 0 makes, a full disk under rank 0's checkpoint) left the others waiting in the next
    collective: under gloo they died with a "connection closed" traceback; under NCCL they wait
    until the launcher kills them (torchrun does) or the collective times out (minutes, under a
    launcher that does not). The block's exit is a barrier: one collective on every rank,
    whether it failed or not. Every rank must enter the block, and the block may hold no other
    collective than nested ``fail_together`` blocks. An error the ranks agreed on inside the
    block, or one raised in handling it (``raise ConfigError(...) from None`` in an ``except``
    around an inner block), passes through without another collective; an error of a block
    entered after that agreement (a clean-up in a ``finally``) is agreed on afresh.
    ``KeyboardInterrupt`` and ``SystemExit`` pass without agreement: the launcher stops the
    other ranks.
    """
    rank, world_size = world_info()
    if world_size == 1:
        yield
        return
    entered = _latest_agreement
    try:
        yield
    except Exception as error:
        if not _agreed_since(error, entered):
            _failed_ranks(failed=True)
            _mark_agreed(error)
        raise
    if failed := _failed_ranks(failed=False):
        # the failed rank may have failed before this block, in its enclosing one: name no step for it
        which = f"rank {failed[0]} failed (its own error line names what failed)" if len(failed) == 1 else \
            f"ranks {', '.join(map(str, failed))} failed (their own error lines name what failed)"
        error = PeerFailure(f"{which}; rank {rank}, which was {what}, stops too")
        _mark_agreed(error)
        raise error


def _mark_agreed(error: BaseException) -> None:
    global _latest_agreement
    _latest_agreement += 1
    setattr(error, _AGREED, _latest_agreement)


def _agreed_since(error: BaseException, entered: int) -> bool:
    """Whether the ranks agreed, after the block was ``entered``, on ``error`` or on an error it
    was raised in handling (its cause or context, and theirs)."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if getattr(current, _AGREED, 0) > entered:
            return True
        pending += [current.__cause__, current.__context__]
    return False


def _failed_ranks(failed: bool) -> list[int]:
    """The ranks that passed ``failed=True`` (every rank must call this)."""
    rank, world_size = world_info()
    flags = torch.zeros(world_size, dtype=torch.int32, device=_backend_device())
    flags[rank] = int(failed)
    dist.all_reduce(flags)
    return flags.nonzero().flatten().tolist()


def gather_strided_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble rows sharded with ``rows[rank::world_size]`` (uneven counts allowed, even zero
    rows on a rank) into all ``total`` rows in their original order, on every rank.

    Every rank must call this with its ``local`` shard of the same ``total``; the result is on
    ``local``'s device. Without a process group it returns ``local``.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return local
    longest = -(-total // world_size)
    backend_device = _backend_device()
    padded = torch.zeros(longest, *local.shape[1:], dtype=local.dtype, device=backend_device)
    padded[:local.shape[0]] = local
    shards = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(shards, padded)
    rows = torch.empty(total, *local.shape[1:], dtype=local.dtype, device=backend_device)
    for owner, shard in enumerate(shards):
        count = len(range(owner, total, world_size))
        rows[owner::world_size] = shard[:count]
    return rows.to(local.device)
