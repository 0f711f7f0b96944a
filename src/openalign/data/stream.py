"""Streams that resume exactly: after ``--resume``, training sees the batches it would have seen.

A stream is read by *readers*: every loader worker of every rank is one (``num_workers: 0``:
the rank itself). The DataLoader takes a rank's batches from its workers in turn, so batch
``s`` of a rank comes from worker ``s mod W``. Every sample a reader yields carries the
reader's position after it; :class:`~openalign.data.loader.Collate` keeps the position after a
batch's last sample, the training process keeps the latest one of each reader, and checkpoints
save them (``data_rank{r}.json``, with the stream's reseeds). On resume at step ``S``, worker
``w`` plays reader ``(w + S) mod W``, so the next batch comes from the reader whose turn it is,
and each reader starts where its last consumed batch ended. Nothing is replayed from the start
of the stream.

:class:`ShardStream` streams the samples of shard files (webdataset tars, TFRecord files). A
reader keeps ``open_shards`` shards open; each *round* it reads the next
``shuffle_buffer / open_shards`` raw samples of each (opening its next shard when one ends; where
no next shard is left, as for a reader with fewer shards than slots or at an epoch's end, it
reads on from the shards still open, so the pool keeps ``shuffle_buffer`` samples while it can),
and yields the decoded pool in a seeded random order (a thread reads the next round meanwhile).
Its position is the round's start
(which shard each slot reads, and how far in) plus the number of pool entries taken: resuming
re-reads one round of raw bytes, skipping what was taken without decoding it.

Shards are drawn either ``resampled`` (with replacement, seeded per reader and draw: for very
large datasets, training length in steps) or in epochs: each epoch a seeded permutation of
the shards is split between readers (``shards[reader::readers]``), every sample of a reader's
shards is read exactly once, and a round never mixes two epochs. Readers with one shard fewer
than others simply begin their next epoch earlier: no reader ever runs dry, so no rank waits
on another.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset

from ..distributed import world_info
from ..errors import OpenAlignError
from .quality import CUT_SHORT, EMPTY_SHARD, TRUNCATED_SHARD, UNREADABLE_SHARD, SkipPolicy, SkipSample
from .shards import ShardReadError
from .transforms import epoch_generator, sample_generator

log = logging.getLogger("openalign.data")

STREAM_KEY = "__stream__"  # a sample's (reader, position after it)


def reader_geometry(start_step: int = 0, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(this process's reader, number of readers)``: rank ``r``'s worker ``w`` of ``W`` is reader
    ``r·W + (w + start_step) mod W``, so that a run resumed at ``start_step`` asks each reader for
    its next batch in the order the interrupted run would have. ``rank`` and ``world_size``
    default to the process group's: a loader worker started by spawn or forkserver (Python
    3.14's default on Linux, macOS's) has none, so a stream passes the ones it was built under."""
    worker = torch.utils.data.get_worker_info()
    worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
    if rank is None or world_size is None:
        rank, world_size = world_info()
    return rank * num_workers + (worker_id + start_step) % num_workers, world_size * num_workers


class ResumableStream(IterableDataset):
    """An endless stream whose readers each start from a saved position.

    Subclasses implement :meth:`iterate`, yielding ``(sample, position after it)``;
    ``__iter__`` adds the position to the sample under :data:`STREAM_KEY`.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rank, self.world_size = world_info()  # the building process's: its loader workers may have no group
        self.start_step = 0
        self.positions: dict[int, Any] = {}
        self.reseeds: list[int] = []  # the salts of every reseed so far: checkpoints save them

    def resume(self, start_step: int, positions: dict[int, Any] | None, reseeds: Sequence[int] = ()) -> None:
        """Continue at ``start_step`` from the readers' saved ``positions``, in the stream that the
        saved ``reseeds`` made of this one; with no positions (a checkpoint without them, or
        another number of ranks or workers), draw a fresh stream instead."""
        self.start_step = start_step
        for salt in reseeds:  # positions are places in the stream that was being read, not the recipe's
            self.reseed(salt)
        if positions is None:
            self.reseed(start_step)
        else:
            self.positions = dict(positions)

    def reseed(self, salt: int) -> None:
        self.seed = self.seed * 1_000_003 + salt
        self.reseeds.append(salt)

    def check_readers(self, num_readers: int, warn: bool = True) -> None:
        """Raise a clear error if ``num_readers`` readers cannot share the stream (and, ``warn``,
        log what is uneven); before the loader starts, so no worker fails mid-run."""

    def fingerprint(self) -> str:
        """What saved positions are places in (checkpoints keep it): a stream with another
        fingerprint must not resume from them."""
        return ""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, num_readers = reader_geometry(self.start_step, self.rank, self.world_size)
        for sample, position in self.iterate(reader, num_readers, self.positions.get(reader)):
            sample[STREAM_KEY] = (reader, position)
            yield sample

    def iterate(self, reader: int, num_readers: int, position: Any) -> Iterator[tuple[dict[str, Any], Any]]:
        raise NotImplementedError


class ShardPosition(NamedTuple):
    """Where a reader of a :class:`ShardStream` is: ``round`` and ``epoch`` (0 when resampled),
    the next shard draw, each slot's ``(draw, raw samples read)`` at the round's start (None:
    no shard open), and how many of the round's pool entries were already taken. A tuple, so
    checkpoints keep it as JSON; :meth:`parse` reads it back."""

    round: int
    epoch: int
    next_draw: int
    slots: tuple[tuple[int, int] | None, ...]
    taken: int

    @classmethod
    def parse(cls, saved: Sequence[Any]) -> ShardPosition:
        round_, epoch, next_draw, slots, taken = saved
        return cls(round_, epoch, next_draw, tuple(tuple(slot) if slot else None for slot in slots), taken)


class ShardStream(ResumableStream):
    """The samples of ``shards``, shuffled and split between readers, exactly resumable.

    ``read_shard(url)`` yields a shard's raw samples (any objects: they never leave the reader);
    it raises :class:`~openalign.data.shards.ShardReadError` (or any error) where the
    shard cannot be read further. ``decode(raw, generator)`` makes a training sample (its random
    augmentation drawn from ``generator``, seeded by the sample's place in the stream) or raises
    :class:`~openalign.data.quality.SkipSample`. Skips go to ``policy``.
    """

    def __init__(self, shards: list[str], read_shard: Callable[[str], Iterable[Any]],
                 decode: Callable[[Any, torch.Generator], dict[str, Any]], policy: SkipPolicy, seed: int,
                 resampled: bool = True, open_shards: int = 8, shuffle_buffer: int = 2000) -> None:
        super().__init__(seed)
        if not shards:
            raise OpenAlignError(f"data source '{policy.source}' has no shards")
        if open_shards < 1 or shuffle_buffer < 1:
            raise OpenAlignError("open_shards and shuffle_buffer must be at least 1")
        self.shards, self.read_shard, self.decode, self.policy = shards, read_shard, decode, policy
        self.resampled, self.open_shards = resampled, open_shards
        self.chunk = -(-shuffle_buffer // open_shards)

    def check_readers(self, num_readers: int, warn: bool = True) -> None:
        """In epochs, every reader needs a shard: too few is an error, an uneven split a warning."""
        if self.resampled:
            return
        if len(self.shards) < num_readers:
            raise OpenAlignError(
                f"data source '{self.policy.source}' has {len(self.shards)} shard(s) for {num_readers} readers "
                "(ranks × data.num_workers): in epochs each reader needs at least one. Lower data.num_workers, "
                "split the data into more shards, or set resampled: true")
        if len(self.shards) % num_readers and warn:
            log.warning("data source '%s': %d shards do not split evenly between %d readers (ranks × workers): "
                        "some read one shard more per epoch, and the others begin their next epoch earlier",
                        self.policy.source, len(self.shards), num_readers)

    def fingerprint(self) -> str:
        """The shard list and how it is drawn: positions name shards by their index in the list, so
        a shard added or removed since (img2dataset still writing, a bad shard deleted) would make
        a resumed run read some samples twice and others never."""
        common = os.path.commonprefix(self.shards)
        common = common[:common.rfind("/") + 1]  # the folder they share is left out: the fingerprint is the list itself
        digest = hashlib.sha256(f"{len(self.shards)} resampled={self.resampled}".encode())
        for url in self.shards:
            digest.update(b"\0" + url[len(common):].encode("utf-8", "surrogatepass"))
        return digest.hexdigest()[:16]

    def _shard(self, draw: int, reader: int, num_readers: int) -> str:
        if self.resampled:
            return self.shards[random.Random(f"{self.seed}/{reader}/{draw}").randrange(len(self.shards))]
        per_epoch = len(range(reader, len(self.shards), num_readers))
        epoch, index = divmod(draw, per_epoch)
        order = torch.randperm(len(self.shards), generator=epoch_generator(self.seed, epoch))
        return self.shards[int(order[reader::num_readers][index])]

    def _in_epoch(self, draw: int, epoch: int, reader: int, num_readers: int) -> bool:
        return self.resampled or draw // len(range(reader, len(self.shards), num_readers)) == epoch

    def iterate(self, reader: int, num_readers: int, position: Sequence[Any] | None
                ) -> Iterator[tuple[dict[str, Any], ShardPosition]]:
        self.check_readers(num_readers, warn=False)
        resumed = position is not None
        position = ShardPosition.parse(position) if resumed else ShardPosition(0, 0, 0, (None,) * self.open_shards, 0)
        if len(position.slots) != self.open_shards:
            raise OpenAlignError(f"the saved stream position has {len(position.slots)} open shards, the source "
                                 f"{self.open_shards}: resume with the run's own open_shards")
        readers: dict[int, Iterator[Any]] = {}
        # the next round is read in a thread while this one is decoded: reads from pipes and
        # object storage wait on the network, not on the CPU (two rounds of raw bytes in memory)
        prefetch = ThreadPoolExecutor(1, thread_name_prefix="openalign-shards")
        try:
            pending = prefetch.submit(self._fill, position, readers, reader, num_readers)
            # a resumed round that was partly taken was begun (and its shard skips counted) before
            count = not (resumed and position.taken)
            while True:
                pool, after, skips = pending.result()
                if count:  # here, not in the reading thread: counts then match the positions
                    for skip, url, after_reads in skips:
                        if after_reads:  # a shard read fine since the skip before: the run of failures ended
                            self.policy.success()
                        self.policy.skip(skip, url)
                count = True
                pending = prefetch.submit(self._fill, after, readers, reader, num_readers)
                order = list(range(len(pool)))
                random.Random(f"{self.seed}/{reader}/{position.round}").shuffle(order)
                for taken in range(position.taken, len(pool)):
                    (raw, url, number), pool[order[taken]] = pool[order[taken]], None
                    generator = sample_generator(self.seed, reader, position.round * 1_000_003 + taken)
                    try:  # the augmentation's RNG is a function of the position too
                        sample = self.decode(raw, generator)
                    except SkipSample as skip:
                        self.policy.skip(skip, f"{url}, sample {number}")
                        continue
                    self.policy.success()
                    yield sample, position._replace(taken=taken + 1)  # its epoch is the sample's epoch
                position = after
        finally:
            prefetch.shutdown(wait=True, cancel_futures=True)  # the reading thread is done with the shards
            for opened in readers.values():
                getattr(opened, "close", lambda: None)()

    def _fill(self, start: ShardPosition, readers: dict[int, Iterator[Any]], reader: int, num_readers: int
              ) -> tuple[list[Any], ShardPosition, list[tuple[SkipSample, str, bool]]]:
        """The raw pool of the round that begins at ``start``, the next round's start, and the
        shards skipped (for the caller to count when it begins the round). After the policy's
        ``max_consecutive`` failed shards in a row it stops early: the caller's count then raises
        (resampling would otherwise draw dead shards forever)."""
        fill = _Round(list(start.slots), start.next_draw)
        target, share = self.chunk * self.open_shards, self.chunk
        while share:  # a pass per round, and more while shards ended early (a reader with fewer
            before = len(fill.pool)  # shards than slots, an epoch's end): the pool keeps its size
            for slot in range(self.open_shards):
                self._read_slot(fill, slot, min(share, target - len(fill.pool)), start.epoch, readers, reader,
                                num_readers)
            live = sum(slot is not None for slot in fill.slots)
            share = -(-(target - len(fill.pool)) // live) if live and before < len(fill.pool) < target else 0
        epoch = start.epoch
        if all(slot is None for slot in fill.slots) and not self._in_epoch(fill.next_draw, epoch, reader, num_readers):
            epoch += 1
        return fill.pool, ShardPosition(start.round + 1, epoch, fill.next_draw, tuple(fill.slots), 0), fill.skips

    def _read_slot(self, fill: _Round, slot: int, wanted: int, epoch: int, readers: dict[int, Iterator[Any]],
                   reader: int, num_readers: int) -> None:
        """Up to ``wanted`` raw samples from ``slot`` into ``fill.pool``, opening the slot's next
        shard of ``epoch`` whenever one ends."""
        while wanted and fill.failures < self.policy.max_consecutive:
            if fill.slots[slot] is None:
                if not self._in_epoch(fill.next_draw, epoch, reader, num_readers):
                    return
                fill.slots[slot], fill.next_draw = (fill.next_draw, 0), fill.next_draw + 1
            draw, offset = fill.slots[slot]
            url = self._shard(draw, reader, num_readers)
            if slot not in readers:
                readers[slot] = self._open(url, offset)
            try:
                raw = next(readers[slot], None)
            except SkipSample as skip:
                raw = None
                fill.skip(skip, url)
            else:
                if raw is None and offset == 0:
                    fill.skip(SkipSample(EMPTY_SHARD), url)
            if raw is None:
                getattr(readers.pop(slot), "close", lambda: None)()
                fill.slots[slot] = None
                # a shard that ends after samples is fine; one cut inside its first has failed all the same
                failed = offset == 0 or (draw, slot) in fill.cut_first
                fill.failures = fill.failures + 1 if failed else 0
                continue
            if offset == 0 and isinstance(raw, dict) and CUT_SHORT in raw:
                fill.cut_first.add((draw, slot))
            else:
                fill.failures, fill.read_since_skip = 0, True
            fill.pool.append((raw, url, offset + 1))  # where it is, to name it if it is skipped
            fill.slots[slot] = (draw, offset + 1)
            wanted -= 1

    def _open(self, url: str, skip: int) -> Iterator[Any]:
        """The raw samples of ``url`` after the first ``skip``; read errors end it with a
        :class:`SkipSample` (counted by the caller)."""
        try:
            samples = iter(self.read_shard(url))
            for _ in range(skip):
                next(samples)
        except StopIteration:
            raise OpenAlignError(f"shard '{url}' has fewer than the {skip} samples the saved stream position "
                                 "says were read: did the shard change since the checkpoint?") from None
        except SkipSample:
            raise
        except Exception as error:  # noqa: BLE001 - a missing file, a dead URL: skip the shard
            return _raising(SkipSample(UNREADABLE_SHARD, f"{type(error).__name__}: {error}"))
        return _guarded(samples, started=skip > 0)


@dataclass
class _Round:
    """A round being read: its slots (``(draw, samples read)`` or None), the next shard draw, the
    raw pool, the shard skips (each with whether a sample was read since the skip before: the
    caller ends the policy's run of failures there), the failed shards in a row, and the shards
    whose first sample was cut short (the shard ends in it: it failed, though it yielded a sample)."""

    slots: list[tuple[int, int] | None]
    next_draw: int
    pool: list[Any] = field(default_factory=list)
    skips: list[tuple[SkipSample, str, bool]] = field(default_factory=list)
    failures: int = 0
    cut_first: set[tuple[int, int]] = field(default_factory=set)  # (draw, slot): cut inside its first sample
    read_since_skip: bool = False

    def skip(self, skip: SkipSample, url: str) -> None:
        self.skips.append((skip, url, self.read_since_skip))
        self.read_since_skip = False


def _raising(skip: SkipSample) -> Iterator[Any]:
    raise skip
    yield  # pragma: no cover - makes this a generator


def _guarded(samples: Iterator[Any], started: bool) -> Iterator[Any]:
    """``samples``, with a read error turned into a :class:`SkipSample` of the shard's rest: a
    truncated or corrupt shard for what its contents raise (:class:`ShardReadError`) or for a
    read failing after its first sample; an unreadable shard for a failure before (a shard
    reader is a generator, so a missing file or a dead URL surfaces at the first ``next``)."""
    try:
        for sample in samples:
            started = True
            yield sample
    except SkipSample:
        raise
    except Exception as error:  # noqa: BLE001 - truncated, corrupt, connection lost
        reason = TRUNCATED_SHARD if started or isinstance(error, ShardReadError) else UNREADABLE_SHARD
        raise SkipSample(reason, f"{type(error).__name__}: {error}") from None
