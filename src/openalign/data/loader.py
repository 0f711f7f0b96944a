"""Batches for training: a resumable sample order, collation, and tokenisation in the workers."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..errors import OpenAlignError
from .quality import COUNTS
from .stream import STREAM_KEY
from .transforms import epoch_generator

COUNTS_KEY = "__counts__"


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(epoch, index)`` for one rank, starting at ``start_step``.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; global batch ``s`` is its slice
    ``[s·B, (s+1)·B)`` (remainder dropped) and rank ``r`` of N takes its examples r, r + N,
    r + 2N, ... The whole order is a function of (seed, step), the same for any number of ranks
    sharing the global batch, so resuming at a step needs no other state. Strided, not in
    contiguous parts, because ghost batch norm groups a batch's examples with a stride
    (:class:`~openalign.models.ghost_bn.GhostBatchNorm2d`): so rank r's ghost batch g is one
    process's ghost batch r + N·g, and N ranks train as one process on the whole batch does.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0) -> None:
        self.global_batch = batch_size * world_size
        if num_samples < self.global_batch:
            raise OpenAlignError(f"the training data has {num_samples} samples, fewer than one global batch "
                                 f"of {self.global_batch}: lower train.batch_size or add data")
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.start_step = seed, start_step
        self.steps_per_epoch = num_samples // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, epoch, order = self.start_step, -1, torch.empty(0, dtype=torch.long)
        while True:
            step_epoch, position = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch = step_epoch
                order = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, epoch))
            start = position * self.global_batch
            mine = order[start + self.rank:start + self.global_batch:self.world_size]
            yield [(epoch, index) for index in mine.tolist()]
            step += 1


class Collate:
    """Stack samples into a batch dict: tensors are stacked, strings go through the text processor.

    Text fields (``text``, ``caption`` and the like) become ``{"input_ids", "attention_mask"}``
    dicts; numbers become a tensor; anything else stays a list. With ``fields``, only those are
    kept (a source may carry fields this model does not read: no need to tokenise them).

    Two entries serve :class:`DataMonitor`: ``__stream__``, a stream reader's position after the
    batch's last sample (streams only), and ``__counts__``, ``(worker, this worker's skip and
    conversion counts so far)``.
    """

    def __init__(self, text_processor: Callable[[list[str]], Any], fields: Sequence[str] | None = None) -> None:
        self.text_processor = text_processor
        self.fields = None if fields is None else set(fields)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if STREAM_KEY in samples[-1]:
            batch[STREAM_KEY] = samples[-1][STREAM_KEY]
        worker = torch.utils.data.get_worker_info()
        for key, first in samples[0].items():
            if (self.fields is not None and key not in self.fields) or key == STREAM_KEY:
                continue
            if any(key not in sample for sample in samples):
                raise OpenAlignError(f"some samples of the data source lack the field '{key}' that others have "
                                     "(every sample must carry the fields the model reads)")
            values = [sample[key] for sample in samples]
            if isinstance(first, torch.Tensor):
                batch[key] = _stack(values, worker is not None)
            elif isinstance(first, str):
                batch[key] = self.text_processor(values)
            elif isinstance(first, (int, float)):
                batch[key] = torch.tensor(values)
            else:
                batch[key] = values
        batch[COUNTS_KEY] = (worker.id if worker else -1, dict(COUNTS))  # with what the text processor noted
        return batch


def build_loader(dataset: Dataset | IterableDataset, collate: Collate, batch_size: int, rank: int,
                 world_size: int, seed: int, start_step: int, num_workers: int) -> DataLoader:
    """An endless loader of per-rank batches, resumable at ``start_step`` for map-style datasets.

    The loader draws its worker seeds from its own generator: drawing them from the global RNG
    when the iterator is created would shift the dropout stream of a resumed run.
    """
    options: dict[str, Any] = {"num_workers": num_workers, "collate_fn": collate, "worker_init_fn": _start_worker,
                               "pin_memory": torch.cuda.is_available(), "persistent_workers": num_workers > 0,
                               "generator": torch.Generator().manual_seed(seed * 1_000_003 + rank)}
    if num_workers > 0:
        options["prefetch_factor"] = 4
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, drop_last=True, **options)
    sampler = EpochBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_step)
    return DataLoader(dataset, batch_sampler=sampler, **options)


class DataMonitor:
    """The training process's view of its data: the latest position of every stream reader (what
    a checkpoint saves to resume exactly) and the skip and conversion counts of every worker.

    :meth:`take` strips a batch of the entries :class:`Collate` added for it. ``saved`` is the
    state a checkpoint held (:meth:`state` of the interrupted run): its counts carry on.
    ``reseeds`` are the stream's (:attr:`~openalign.data.stream.ResumableStream.reseeds`): the
    positions are places in the stream they made, so checkpoints keep them too, and its
    ``fingerprint`` (:meth:`~openalign.data.stream.ResumableStream.fingerprint`).
    """

    def __init__(self, saved: dict[str, Any] | None = None, reseeds: Sequence[int] = (), fingerprint: str = "") -> None:
        saved = saved or {}
        self.reseeds, self.fingerprint = list(reseeds), fingerprint
        positions = saved.get("positions", {})
        self.positions: dict[int, Any] = {int(reader): position for reader, position in positions.items()}
        self.base: dict[str, int] = dict(saved.get("counts", {}))
        self.workers: dict[int, dict[str, int]] = {}
        self.in_process = dict(COUNTS)  # with no workers, this process's counts before the run began

    def take(self, batch: dict[str, Any]) -> dict[str, Any]:
        if STREAM_KEY in batch:
            reader, position = batch.pop(STREAM_KEY)
            self.positions[reader] = position
        if COUNTS_KEY in batch:
            worker, counts = batch.pop(COUNTS_KEY)
            if worker < 0:
                counts = {key: count - self.in_process.get(key, 0) for key, count in counts.items()}
            self.workers[worker] = counts
        return batch

    def counts(self) -> dict[str, int]:
        """Skips (``skipped/<reason>``) and conversions (``converted/<mode>``) of this rank so far."""
        total = dict(self.base)
        for counts in self.workers.values():
            for key, count in counts.items():
                total[key] = total.get(key, 0) + count
        return total

    def state(self) -> dict[str, Any]:
        return {"positions": dict(self.positions), "counts": self.counts(), "reseeds": self.reseeds,
                "stream": self.fingerprint}


def _stack(values: list[torch.Tensor], in_worker: bool) -> torch.Tensor:
    """``torch.stack(values)``; in a loader worker, straight into shared memory, as PyTorch's own
    ``default_collate`` does, so the batch is not copied once more to reach the training process."""
    out = None
    if in_worker:
        first = values[0]
        storage = first._typed_storage()._new_shared(first.numel() * len(values), device=first.device)
        out = first.new(storage).resize_(len(values), *first.shape)
    return torch.stack(values, out=out)


def _start_worker(worker_id: int) -> None:
    """A worker counts its own skips, not those of the process it was forked from; and it ends on
    SIGTERM from the process that started it (torch and multiprocessing stop a stuck worker so, and
    then wait for it), or from anyone once that process has gone, but ignores it from anyone else.
    torchrun and schedulers signal a rank's whole process group, workers included, and a worker
    ended so would make its rank fail in the middle of the step that training lets finish before
    it stops (:mod:`openalign.train.stop`). Python's signal handlers cannot tell who sent a signal,
    so the signal is blocked and a thread waits for it with ``sigwaitinfo``; this runs first thing
    in a worker, before it starts threads of its own, which inherit the block. A ``pipe:`` shard's
    command runs in a session of its own, out of the group's reach
    (:func:`~openalign.data.shards.open_url`). Where
    ``sigwaitinfo`` is missing (macOS), SIGTERM ends a worker whoever sends it."""
    COUNTS.clear()
    # not the command line's handler the worker was forked with, which would raise in it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "sigwaitinfo"):
        parent = os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_end_on_parents_sigterm, args=(parent,), name="sigterm", daemon=True).start()


def _end_on_parents_sigterm(parent: int) -> None:
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == parent or os.getppid() != parent:
            break
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.raise_signal(signal.SIGTERM)  # to this thread, which alone does not block it: the default ends the process


def move_to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """``batch`` with every tensor on ``device``; 4-D float tensors in channels_last if asked."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, channels_last) for k, v in batch.items()}
    return batch
