"""Streaming shards robustly: every good sample once per epoch despite bad neighbours, exact
resume across loader workers, no hang on too few shards, strict mode, JPEG draft mode, and
shards read from pipes and object storage."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import openalign
from conftest import train_until_preempted, write_members, write_tar_shard
from openalign import get_tokenizer
from openalign.data import ImageTransform, WebDatasetSourceConfig
from openalign.data.loader import Collate, DataMonitor, build_loader
from openalign.data.quality import COUNTS, SkipSample
from openalign.data.shards import ShardReadError, open_url, opened_shard, read_samples, stream_samples
from openalign.data.sources import MixtureDataset, TableSourceConfig
from openalign.data.stream import STREAM_KEY
from openalign.data.transforms import PreprocessConfig
from openalign.errors import OpenAlignError

TRANSFORM = ImageTransform(PreprocessConfig(image_size=8, resize_size=10), train=True)


def encode(mode: str, size: tuple[int, int], fmt: str = "JPEG", colour: int = 90) -> bytes:
    buffer = io.BytesIO()
    fill = {"L": colour, "CMYK": (colour, 20, 30, 0), "RGBA": (colour, 20, 30, 128), "P": colour}.get(
        mode, (colour, 20, 30))
    Image.new(mode, size, fill).save(buffer, format=fmt)
    return buffer.getvalue()


def dirty_shard(path: Path, shard: int, good: int = 6, padding: int = 0) -> list[str]:
    """A shard of ``good`` usable samples (RGB, grayscale, CMYK, alpha, palette, large JPEGs: all
    converted or decoded) between one sample of every kind that must be skipped; returns the
    good captions. ``padding`` bytes of metadata make each good sample that much bigger."""
    kinds = [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP")]
    bad = [
        {"jpg": b"not an image", "txt": b"corrupt"},
        {"jpg": encode("RGB", (64, 64))[:300], "txt": b"truncated jpeg"},
        {"jpg": encode("RGB", (32, 32))},
        {"jpg": encode("RGB", (32, 32)), "txt": b""},
        {"jpg": encode("RGB", (32, 32)), "txt": b" \n\t "},
        {"jpg": encode("RGB", (32, 32)), "txt": b"\xff\xfe latin-1"},
        {"jpg": encode("RGB", (4, 4)), "txt": b"a tracking pixel"},
        {"txt": b"no image at all"},
        {"jpg": encode("RGB", (1100, 1000)), "txt": b"a decompression bomb (over the test's pixel limit)"},
    ]
    samples, captions = [], []
    for index in range(max(good, len(bad))):
        if index < good:
            mode, fmt = kinds[index % len(kinds)]
            size = (700, 500) if index % 3 == 0 else (40, 30)
            caption = f"shard {shard} good {index}"
            samples.append((f"{shard:03d}_{index:03d}", {fmt.lower().replace("jpeg", "jpg"): encode(mode, size, fmt),
                                                        "txt": caption.encode(),
                                                        "json": b"{}" + b" " * padding}))
            captions.append(caption)
        if index < len(bad):
            samples.append((f"{shard:03d}_bad{index:03d}", bad[index]))
    write_tar_shard(path, samples)
    return captions


@pytest.fixture
def small_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 1100x1000 images are "bombs" here


def read_epochs(dataset, reader: int, readers: int, epochs: int) -> list[list[str]]:
    """The captions ``reader`` yields in each of its first ``epochs`` epochs."""
    result: list[list[str]] = [[] for _ in range(epochs)]
    for sample, position in dataset.iterate(reader, readers, None):
        if position.epoch >= epochs:
            return result
        result[position.epoch].append(sample["text"])


def test_every_good_sample_arrives_exactly_once_per_epoch_despite_bad_neighbours(tmp_path, small_bomb_limit):
    shards = tmp_path / "shards"
    shards.mkdir()
    good = [caption for shard in range(5) for caption in dirty_shard(shards / f"{shard:05d}.tar", shard)]
    write_tar_shard(shards / "00005.tar", [])  # an empty shard
    dirty_shard(tmp_path / "whole.tar", 6)
    whole = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        image = next(member for member in tar.getmembers() if member.name.startswith("006_003."))
        cut = image.offset_data + 100  # inside the 4th good sample's image
    (shards / "00006.tar").write_bytes(whole[:cut])
    good += ["shard 6 good 0", "shard 6 good 1", "shard 6 good 2"]  # the whole samples before the cut

    config = WebDatasetSourceConfig(urls=str(shards / "{00000..00006}.tar"), image_keys="jpg;png;webp",
                                    resampled=False, open_shards=2, shuffle_buffer=6)
    dataset = config.build(TRANSFORM, seed=3)
    before = Counter(COUNTS)
    readers = [read_epochs(dataset, reader, 3, epochs=3) for reader in range(3)]  # 3 ranks × 1 worker, or 1 × 3
    for epoch in range(3):  # each good sample exactly once per epoch, over all readers
        assert sorted(text for epochs in readers for text in epochs[epoch]) == sorted(good)
    assert readers[0][0] != readers[0][1]  # the shards are dealt and the samples shuffled afresh each epoch
    counted = Counter(COUNTS) - before
    for reason in ("undecodable image", "no caption", "empty caption", "caption not UTF-8", "image too small",
                   "no image", "image too large (decompression bomb)", "truncated or corrupt shard", "empty shard"):
        assert counted[f"skipped/{reason}"] >= 1, reason
    assert counted["skipped/undecodable image"] >= 2 * 5  # corrupt and truncated, in every whole shard
    assert {"converted/L", "converted/CMYK", "converted/RGBA", "converted/P"} <= set(counted)


def test_a_stream_reseeded_by_many_resumes_still_reads(tmp_path, small_bomb_limit):
    """Each resume on another number of ranks or workers reseeds the stream (seed × 1,000,003 +
    step), and checkpoints replay every earlier reseed: the pass orders must not overflow."""
    for shard in range(2):
        dirty_shard(tmp_path / f"{shard:05d}.tar", shard, good=2)
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{00000..00001}.tar"), image_keys="jpg;png;webp",
                                    resampled=False, open_shards=1, shuffle_buffer=1)
    dataset = config.build(TRANSFORM, seed=1234)
    dataset.resume(61_000, None, [5_000, 12_000, 30_000, 45_000])
    assert dataset.seed > 2**63
    assert len(read_epochs(dataset, 0, 1, epochs=2)[1]) == 4


def test_a_loader_worker_started_by_spawn_reads_for_the_rank_its_stream_was_built_on(tmp_path, monkeypatch):
    """A spawned (or forkserver) worker has no process group: it must still read as reader
    r·W + w, not as rank 0 (every rank would then train on the same samples)."""
    from openalign.data import stream as stream_module

    for shard in range(4):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=2)
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{0..3}.tar"), image_keys="jpg;png;webp", open_shards=1,
                                    shuffle_buffer=1)
    monkeypatch.setattr(stream_module, "world_info", lambda: (1, 2))  # built on rank 1 of 2
    dataset = config.build(TRANSFORM, seed=0)
    monkeypatch.undo()
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, multiprocessing_context="spawn",
                                         collate_fn=Collate(get_tokenizer("align-test")))
    readers = {batch[STREAM_KEY][0] for _, batch in zip(range(2), loader)}
    assert readers == {1}  # rank 1's only reader of 2, not rank 0's


def test_strict_mode_makes_the_first_bad_sample_an_error(tmp_path):
    dirty_shard(tmp_path / "00000.tar", 0, good=1)
    config = WebDatasetSourceConfig(urls=str(tmp_path / "00000.tar"), shuffle_buffer=1, open_shards=1)
    stream = iter(config.build(TRANSFORM, seed=0, strict=True))
    next(stream)
    with pytest.raises(OpenAlignError, match="undecodable image.*data.strict is true") as raised:
        next(stream)
    assert f"({tmp_path / '00000.tar'}, sample 2)" in str(raised.value)  # which shard, which sample: to look at it


def test_too_few_shards_for_the_readers_is_a_clear_error_and_resampling_needs_none(tmp_path, caplog):
    for shard in range(3):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=2)
    urls = str(tmp_path / "{0..2}.tar")
    epochs = WebDatasetSourceConfig(urls=urls, resampled=False).build(TRANSFORM, seed=0)
    with pytest.raises(OpenAlignError, match="3 shard.* for 4 readers .*Lower data.num_workers"):
        epochs.check_readers(4)
    with pytest.raises(OpenAlignError, match="3 shard.* for 4 readers"):
        next(epochs.iterate(3, 4, None))  # a worker started directly fails the same way, never hangs
    with caplog.at_level("WARNING"):
        epochs.check_readers(2)
    assert "do not split evenly" in caplog.text
    resampled = WebDatasetSourceConfig(urls=urls).build(TRANSFORM, seed=0)
    resampled.check_readers(16)
    assert next(resampled.iterate(15, 16, None))[0]["text"].startswith("shard")


def loader_batches(dataset, workers: int, start: int, steps: int, saved=None):
    """Batches ``start+1 .. steps`` of a 2-sample-per-step loader (and the monitor's state after
    each), resumed from a ``saved`` monitor state as the trainer resumes."""
    if start:
        dataset.resume(start, saved and saved["positions"], saved.get("reseeds", ()) if saved else ())
    loader = build_loader(dataset, Collate(get_tokenizer("align-test")), 2, 0, 1, seed=0, start_step=start,
                          num_workers=workers)
    monitor, batches = DataMonitor(saved, dataset.reseeds), []
    for _, batch in zip(range(start, steps), loader):
        batch = monitor.take(batch)
        batches.append((batch, monitor.state()))
    return batches


@pytest.mark.parametrize("resampled", [True, False])
def test_a_resumed_stream_yields_exactly_the_batches_of_an_uninterrupted_one(tmp_path, resampled):
    for shard in range(4):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=5)
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{0..3}.tar"), resampled=resampled, open_shards=2,
                                    shuffle_buffer=4)
    straight = loader_batches(config.build(TRANSFORM, seed=1), workers=2, start=0, steps=14)
    for stop in (3, 8):  # resume after an odd and an even step: the workers' turns rotate
        resumed = loader_batches(config.build(TRANSFORM, seed=1), 2, stop, 14, straight[stop - 1][1])
        assert len(resumed) == 14 - stop
        for (expected, _), (actual, _) in zip(straight[stop:], resumed):
            assert torch.equal(expected["text"]["input_ids"], actual["text"]["input_ids"])
            assert torch.equal(expected["image"], actual["image"])  # the random crops and flips too


def test_a_resumed_mixture_of_a_stream_and_a_table_is_exact(tmp_path):
    for shard in range(2):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=4)
    (tmp_path / "img.png").write_bytes(encode("RGB", (20, 20), "PNG"))
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"img.png,table row {i}\n" for i in range(7)))
    children = [WebDatasetSourceConfig(urls=str(tmp_path / "{0..1}.tar"), open_shards=1, shuffle_buffer=3),
                TableSourceConfig(path=str(tmp_path / "pairs.csv"))]

    def mixture():
        return MixtureDataset([child.build(TRANSFORM, seed) for seed, child in enumerate(children)], [1, 1], seed=4)

    straight = loader_batches(mixture(), workers=0, start=0, steps=12)
    texts = [text for batch, _ in straight for text in batch["text"]["input_ids"].tolist()]
    assert len(texts) == 24
    resumed = loader_batches(mixture(), 0, 5, 12, straight[4][1])
    for (expected, _), (actual, _) in zip(straight[5:], resumed):
        assert torch.equal(expected["text"]["input_ids"], actual["text"]["input_ids"])
        assert torch.equal(expected["image"], actual["image"])


def same_batches(expected, actual) -> bool:
    return len(expected) == len(actual) and all(
        torch.equal(a["text"]["input_ids"], b["text"]["input_ids"]) and torch.equal(a["image"], b["image"])
        for (a, _), (b, _) in zip(expected, actual))


def test_a_stream_drawn_afresh_on_resume_resumes_again_in_that_stream(tmp_path):
    for shard in range(4):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=5)
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{0..3}.tar"), resampled=False, open_shards=2,
                                    shuffle_buffer=4)
    # resumed at step 2 with no positions (another geometry, say): a fresh stream, reseeded
    fresh = loader_batches(config.build(TRANSFORM, seed=1), workers=0, start=2, steps=14)
    checkpoint = fresh[3][1]  # after step 6
    assert checkpoint["reseeds"] == [2]
    again = loader_batches(config.build(TRANSFORM, seed=1), 0, 6, 14, checkpoint)
    assert same_batches(fresh[4:], again)  # steps 7..14, as the reseeded run read them
    forgetful = loader_batches(config.build(TRANSFORM, seed=1), 0, 6, 14, {**checkpoint, "reseeds": []})
    assert not same_batches(fresh[4:], forgetful)  # the positions alone point into another stream


def test_a_reader_with_fewer_shards_than_slots_still_shuffles_a_full_pool(tmp_path):
    for shard in range(2):
        write_tar_shard(tmp_path / f"{shard}.tar", [(f"{shard}_{i}", {"png": encode("RGB", (12, 12), "PNG"),
                                                                       "txt": f"shard {shard} sample {i}".encode()})
                                                    for i in range(10)])
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{0..1}.tar"), resampled=False, open_shards=8,
                                    shuffle_buffer=16)
    dataset = config.build(TRANSFORM, seed=0)
    rounds: Counter = Counter()
    texts = []
    for sample, position in dataset.iterate(0, 1, None):
        if position.epoch:
            break
        rounds[position.round] += 1
        texts.append(sample["text"])
    # 2 shards in 8 slots: the open ones are read on until the pool holds shuffle_buffer samples
    assert sorted(rounds.values()) == [4, 16]
    assert sorted(texts) == sorted(f"shard {s} sample {i}" for s in range(2) for i in range(10))
    straight = loader_batches(config.build(TRANSFORM, seed=0), workers=0, start=0, steps=12)
    for stop in (3, 9):  # inside the full round, and inside the next epoch's
        resumed = loader_batches(config.build(TRANSFORM, seed=0), 0, stop, 12, straight[stop - 1][1])
        assert same_batches(straight[stop:], resumed), stop


def test_shard_skips_are_counted_once_across_a_resume(tmp_path):
    for shard in range(8):  # every other shard is empty: a skip in most rounds
        samples = [] if shard % 2 else [(f"{shard}_{i}", {"png": encode("RGB", (20, 20), "PNG"), "txt": b"cap"})
                                        for i in range(3)]
        write_tar_shard(tmp_path / f"{shard}.tar", samples)
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{0..7}.tar"), resampled=False, open_shards=2,
                                    shuffle_buffer=2)
    straight = loader_batches(config.build(TRANSFORM, seed=0), workers=0, start=0, steps=24)
    assert straight[-1][1]["counts"]["skipped/empty shard"] >= 8
    for stop in (5, 6, 10, 11):
        resumed = loader_batches(config.build(TRANSFORM, seed=0), 0, stop, 24, straight[stop - 1][1])
        assert resumed[-1][1]["counts"] == straight[-1][1]["counts"], stop


def test_persistent_workers_do_not_grow_host_memory_over_epochs(tmp_path):
    for shard in range(4):  # 12 MB of raw samples an epoch: holding on to them would show
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=24, padding=128 * 1024)
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{0..3}.tar"), resampled=False, open_shards=2,
                                    shuffle_buffer=16)
    loader = build_loader(config.build(TRANSFORM, seed=0), Collate(get_tokenizer("align-test")), 8, 0, 1, seed=0,
                          start_step=0, num_workers=2)
    batches = iter(loader)
    per_epoch = 4 * 24 // 8

    def workers_rss_kib() -> int:
        return sum(int(line.split()[1]) for worker in batches._workers
                   for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines() if line.startswith("VmRSS"))

    samples = []
    for _ in range(8):
        for _ in range(per_epoch):
            next(batches)
        samples.append(workers_rss_kib())
    growth = samples[-1] - samples[2]  # after warm-up: allocator pools and imports settle in the first epochs
    assert growth < 8 * 1024, f"workers' RSS grew {growth} KiB over 5 epochs: {samples}"


def test_a_tar_cut_at_a_member_boundary_is_reported_not_silently_short(tmp_path):
    write_tar_shard(tmp_path / "whole.tar", [(f"{i}", {"txt": b"x" * 600}) for i in range(3)])
    whole = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        boundary = tar.getmember("2.txt").offset  # where the third member's header starts
    assert [s.key for s in stream_samples(io.BytesIO(whole))] == ["0", "1", "2"]
    read = []
    with pytest.raises(ShardReadError, match="truncated"):
        for sample in stream_samples(io.BytesIO(whole[:boundary])):
            read.append(sample.key)
    assert read == ["0", "1"]  # the whole samples before the cut still arrive


@pytest.mark.parametrize("cut_before, kept", [("2.txt", ["caption 0", "caption 1"]),  # inside sample 2
                                              ("3.jpg", ["caption 0", "caption 1", "caption 2"])])  # after it
def test_the_sample_a_cut_shard_ends_in_is_used_if_whole_and_else_skipped_as_cut_short(tmp_path, capsys, cut_before,
                                                                                        kept):
    """Before, a cut between a sample's image and its caption skipped the sample as "no caption"
    (and ``data inspect`` reported it so), as if the data had none."""
    from openalign.cli import main
    from openalign.data.sources import FieldsDecoder, read_tar_shard

    write_tar_shard(tmp_path / "whole.tar", [(f"{i}", {"jpg": encode("RGB", (20, 20)), "txt": f"caption {i}".encode()})
                                             for i in range(4)])
    with tarfile.open(tmp_path / "whole.tar") as tar:
        cut = tar.getmember(cut_before).offset
    (tmp_path / "cut.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:cut])
    decode, captions, skips = FieldsDecoder(("jpg",), "txt", {}, TRANSFORM), [], []
    with pytest.raises(ShardReadError, match="truncated"):
        for fields in read_tar_shard(str(tmp_path / "cut.tar")):
            try:
                captions.append(decode(fields)["text"])
            except SkipSample as skip:
                skips.append(str(skip))
    assert captions == kept
    assert skips == ([] if len(kept) == 3 else ["sample cut short by its shard's end: the shard ends after its jpg "
                                                "member(s)"])
    assert main(["data", "inspect", str(tmp_path / "cut.tar"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["usable"], summary["skipped"]) == (len(kept), {} if len(kept) == 3 else
                                                        {"sample cut short by its shard's end": 1})


def test_a_pipe_shard_left_before_its_end_closes_quietly_and_one_that_fails_at_its_end_is_an_error(tmp_path):
    """A run stopping (or a reader moving on) left pipe: shards unfinished, whose generators then printed
    'Exception ignored ... exit -15' tracebacks as they were collected; the command's exit status
    says nothing of a shard left early, but a failure at its end still does."""
    from openalign.data.sources import read_tar_shard

    # samples larger than a pipe's buffer: the command is still writing when the first one is read
    write_tar_shard(tmp_path / "0.tar", [(f"s{i}", {"txt": b"caption", "bin": bytes(1 << 20)}) for i in range(4)])
    command = f"pipe:cat {tmp_path / '0.tar'}; exit 3"
    samples = read_tar_shard(command)
    assert next(samples)["txt"] == b"caption"
    samples.close()  # raised the command's exit status
    with pytest.raises(Exception, match="exit 3"):
        list(read_tar_shard(command))


def test_a_pipe_shards_command_outlives_a_sigterm_to_the_readers_process_group(tmp_path, monkeypatch):
    """Schedulers and torchrun send SIGTERM to a rank's whole process group, and training finishes
    the step under way (openalign.train.stop): a pipe: command in the group died at once and cut
    its shard short under the batches still to be read. In a session of its own, it writes on."""
    import subprocess
    import sys

    write_tar_shard(tmp_path / "0.tar", [(f"s{i}", {"txt": b"caption %d" % i, "bin": bytes(4096)}) for i in range(8)])
    shard = tmp_path / "0.tar"
    command = f"pipe:head -c 12000 {shard}; sleep 1; tail -c +12001 {shard}"  # still running at the signal
    reader = (
        "import os, signal, sys\n"
        "from openalign.data.sources import read_tar_shard\n"
        "signal.signal(signal.SIGTERM, lambda *args: print('signalled'))  # as training's: the reader reads on\n"
        "samples = read_tar_shard(sys.argv[1])\n"
        "first = next(samples)\n"
        "os.killpg(0, signal.SIGTERM)\n"
        "print(len([first, *samples]))\n")
    result = subprocess.run([sys.executable, "-c", reader, command], capture_output=True, text=True, timeout=60,
                            start_new_session=True)
    assert result.returncode == 0 and result.stdout.split() == ["signalled", "8"], result.stderr[-2000:]
    # out of the group, a command is ended by its reader leaving the shard early (Ctrl-C, or moving on),
    # which would otherwise wait for it to finish by itself; one that ignores SIGTERM (its shell and its
    # children) is killed after a grace period
    from openalign.data import shards
    from openalign.data.sources import read_tar_shard

    monkeypatch.setattr(shards, "COMMAND_GRACE_SECONDS", 0.2)
    for command in (f"pipe:cat {shard}; sleep 120", f"pipe:trap '' TERM; cat {shard}; sleep 120"):
        started = time.monotonic()
        samples = read_tar_shard(command)
        next(samples)
        samples.close()
        assert time.monotonic() - started < 10, command


def test_tar_members_group_into_samples_as_webdataset_groups_them(tmp_path):
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from openalign.data.sources import read_tar_shard

    png = encode("RGB", (20, 20), "PNG")
    members = [("d/", None), ("d/a.png", png), ("d/sub/", None), ("d/a.txt", b"cap a"),  # a folder's tar
               ("b.png", png), ("README", b"no dot: not a field"), ("b.txt", b"cap b"),
               ("c.x.png", png), ("__index__", b"metadata"), ("c.x.txt", b"cap c"), ("D.PNG", png), ("D.TXT", b"d")]
    write_members(tmp_path / "0.tar", members)
    with open(tmp_path / "0.tar", "rb") as stream:
        reference = [{k: v for k, v in sample.items() if not k.startswith("__")}
                     for sample in group_by_keys(tar_file_expander([{"url": "0.tar", "stream": stream}]))]
    assert list(read_tar_shard(str(tmp_path / "0.tar"))) == reference  # webdataset's own grouping
    assert [sorted(sample) for sample in reference] == [["png", "txt"], ["png", "txt"], ["x.png", "x.txt"],
                                                        ["png", "txt"]]
    # a field twice, which webdataset refuses: that sample is skipped and counted, its neighbours arrive
    write_members(tmp_path / "1.tar", [("a.png", png), ("a.PNG", png), ("a.txt", b"twice"),
                                       ("b.png", png), ("b.txt", b"once")])
    config = WebDatasetSourceConfig(urls=str(tmp_path / "1.tar"), resampled=False, open_shards=1, shuffle_buffer=4)
    before = Counter(COUNTS)
    assert read_epochs(config.build(TRANSFORM, seed=0), 0, 1, 1)[0] == ["once"]
    assert (Counter(COUNTS) - before)["skipped/repeated field"] == 1


def test_a_damaged_header_or_compressed_shards_are_read_to_their_true_end(tmp_path):
    samples = [(f"{i}", {"txt": f"caption {i}".encode()}) for i in range(10)]
    write_tar_shard(tmp_path / "whole.tar", samples)
    whole = bytearray((tmp_path / "whole.tar").read_bytes())
    with tarfile.open(tmp_path / "whole.tar") as tar:
        damaged = tar.getmember("4.txt").offset
    whole[damaged + 10] ^= 1  # one bit of a header mid-shard: tarfile itself stops there quietly
    (tmp_path / "damaged.tar").write_bytes(bytes(whole))
    for read in (lambda: stream_samples(io.BytesIO(bytes(whole))),
                 lambda: read_samples(tarfile.open(tmp_path / "damaged.tar"))):  # streamed and seeked
        keys = []
        with pytest.raises(ShardReadError, match="no end-of-archive marker"):
            keys.extend(sample.key for sample in read())
        assert keys == ["0", "1", "2", "3"]

    for suffix, mode in ((".tar.gz", "w:gz"), (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz")):
        write_members(tmp_path / f"s{suffix}", [(f"{i}.txt", f"caption {i}".encode()) for i in range(10)], mode)
        data = (tmp_path / f"s{suffix}").read_bytes()
        assert [s.key for s in stream_samples(io.BytesIO(data))] == [str(i) for i in range(10)], suffix
        with pytest.raises(ShardReadError):  # a compressed shard cut short
            list(stream_samples(io.BytesIO(data[: len(data) // 2])))
    write_members(tmp_path / "BZh.tar", [(f"BZh2024_{i}.txt", b"c") for i in range(3)])  # plain, named like bzip2
    assert [s.key for s in stream_samples(io.BytesIO((tmp_path / "BZh.tar").read_bytes()))] == [
        f"BZh2024_{i}" for i in range(3)]
    png = encode("RGB", (20, 20), "PNG")
    write_members(tmp_path / "train.tar.gz", [m for i in range(6) for m in ((f"{i}.png", png), (f"{i}.txt", b"c"))],
                  "w:gz")  # as `openalign data caption` writes them
    config = WebDatasetSourceConfig(urls=str(tmp_path / "train.tar.gz"), resampled=False, open_shards=1,
                                    shuffle_buffer=4)
    assert [len(epoch) for epoch in read_epochs(config.build(TRANSFORM, seed=0, strict=True), 0, 1, 2)] == [6, 6]


def test_a_vanished_shard_and_a_number_for_a_caption_are_skipped_for_what_they_are(tmp_path, small_bomb_limit):
    from openalign.data.quality import SkipSample, caption_text

    with pytest.raises(SkipSample, match="caption not text: a int"):
        caption_text(12)  # a TFRecord int64 feature where the caption should be: not 12 NUL characters
    for shard in range(2):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=2)
    dataset = WebDatasetSourceConfig(urls=str(tmp_path / "{0..1}.tar"), resampled=False, open_shards=1,
                                     shuffle_buffer=2).build(TRANSFORM, seed=0)
    (tmp_path / "1.tar").unlink()  # gone after the run started (a deleted object, a dead URL)
    before = Counter(COUNTS)
    assert sorted(read_epochs(dataset, 0, 1, 1)[0]) == ["shard 0 good 0", "shard 0 good 1"]
    counted = Counter(COUNTS) - before
    assert counted["skipped/unreadable shard"] >= 1 and counted["skipped/truncated or corrupt shard"] == 0


def test_shards_stream_from_pipes_and_fsspec_urls(tmp_path, capsys):
    import json

    import fsspec

    from openalign.cli import main

    dirty_shard(tmp_path / "0.tar", 0, good=2)
    data = (tmp_path / "0.tar").read_bytes()
    with fsspec.open("memory://bucket/cc3m/00000.tar", "wb") as handle:
        handle.write(data)
    for url in (f"pipe:cat {tmp_path / '0.tar'}", "memory://bucket/cc3m/00000.tar", f"file://{tmp_path / '0.tar'}"):
        with open_url(url) as stream:
            assert stream.read() == data, url
    config = WebDatasetSourceConfig(urls="memory://bucket/cc3m/{00000..00000}.tar", open_shards=1, shuffle_buffer=1)
    assert next(iter(config.build(TRANSFORM, seed=0)))["text"] == "shard 0 good 0"
    assert main(["data", "inspect", "memory://bucket/cc3m/*.tar", "--json"]) == 0  # inspect reads what training reads
    summary = json.loads(capsys.readouterr().out)
    assert summary["usable"] == 3 and summary["skipped"]["image too small"] == 1  # the 1100 px "bomb" is fine here


def test_shard_urls_are_expanded_into_what_opens(tmp_path, monkeypatch):
    import fsspec

    from openalign.data.shards import expand_shards, expand_urls

    monkeypatch.setenv("HOME", str(tmp_path))
    for shard in range(2):
        (tmp_path / f"{shard:05d}.tar").write_bytes(b"")
    assert expand_urls("~/{00000..00001}.tar", "shards") == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    signed = "https://host/cc3m/00000.tar?X-Amz-Signature=abc&download=true"  # '?' is a query, not a glob
    assert expand_urls(signed, "shards") == [signed]
    for name in ("00000.tar", "sub.tar/inner"):
        with fsspec.open(f"memory://bucket/dirs/{name}", "wb") as handle:
            handle.write(b"x")
    matched = expand_urls("memory://bucket/dirs/*.tar", "shards")  # a folder named *.tar is not a shard
    assert len(matched) == 1 and matched[0].endswith("/bucket/dirs/00000.tar")
    (tmp_path / "crawl[1]").mkdir()  # an existing file whose name holds glob characters is that file
    (tmp_path / "crawl[1]" / "0.tar").write_bytes(b"")
    assert expand_urls(str(tmp_path / "crawl[1]" / "0.tar"), "shards") == [str(tmp_path / "crawl[1]" / "0.tar")]
    assert expand_shards([tmp_path / "crawl[1]" / "0.tar"]) == [tmp_path / "crawl[1]" / "0.tar"]
    # object storage without its fsspec package (no s3fs here): one clear line, before any worker starts
    for url in ("s3://bucket/{00000..00001}.tar", "s3://bucket/*.tar"):
        with pytest.raises(OpenAlignError, match="cannot read 's3://bucket/.*': Install s3fs"):
            expand_urls(url, "shards")
    with pytest.raises(OpenAlignError, match="fsspec knows no protocol 'nosuch'"):
        expand_urls("nosuch://bucket/0.tar", "shards")
    # an img2dataset folder named whole: its metadata beside the shards is left out, with a warning
    (tmp_path / "cc3m").mkdir()
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar"):
        (tmp_path / "cc3m" / name).write_bytes(b"")
    assert expand_urls(str(tmp_path / "cc3m" / "*"), "shards") == [str(tmp_path / "cc3m" / name)
                                                                    for name in ("00000.tar", "00001.tar")]
    assert expand_urls(str(tmp_path / "cc3m" / "*.parquet"), "shards") == [str(tmp_path / "cc3m" / "00000.parquet")]
    assert len(expand_urls(str(tmp_path / "cc3m" / "*"), "TFRecord files")) == 2  # COYO's TFRecords alike
    # file: URLs are local files: a missing one is an error before training, as a plain path's is
    assert expand_urls(f"file://{tmp_path}/{{00000..00001}}.tar", "shards") == [
        f"file://{tmp_path}/00000.tar", f"file://{tmp_path}/00001.tar"]
    with pytest.raises(OpenAlignError, match=r"1 of the 3 shards that .* do not exist, e.g. 'file://.*/00002.tar'"):
        expand_urls(f"file://{tmp_path}/{{00000..00002}}.tar", "shards")
    with pytest.raises(OpenAlignError, match=r"'file://.*cc3m' is a directory: name its shards"):
        expand_urls(f"file://{tmp_path}/cc3m", "shards")


def test_jpeg_draft_mode_decodes_large_images_faster_and_changes_only_resampling_noise():
    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.random((1, 3, 12, 16))).float(), size=(768, 1024),
                                             mode="bicubic", align_corners=False)
    pixels = (smooth.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    transform = ImageTransform(PreprocessConfig(image_size=289, resize_size=346, random_flip=False,
                                                antialias="always"), train=True)
    drafted = Image.open(io.BytesIO(buffer.getvalue()))
    full = Image.open(io.BytesIO(buffer.getvalue()))
    full.load()  # decoded already: draft mode no longer applies
    out_draft = transform(drafted, torch.Generator().manual_seed(0))
    assert drafted.size == (512, 384)  # decoded at 1/2 scale: still at least 346 on each side
    out_full = transform(full, torch.Generator().manual_seed(0))
    assert (out_draft - out_full).abs().mean() < 0.01  # on a [-1, 1] scale
    evaluation = ImageTransform(transform.config, train=False)
    untouched = Image.open(io.BytesIO(buffer.getvalue()))
    evaluation(untouched)
    assert untouched.size == (1024, 768)  # evaluation decodes in full, as AlignProcessor does


@pytest.mark.parametrize("model, jpeg_draft, drafts, interpolation", [
    ("align-test", None, False, None), ("clippo-test", None, False, None), ("alip-vit-b32", None, True, None),
    ("align-test", True, True, None), ("alip-vit-b32", False, False, None),
    ("alip-vit-b32", None, False, "nearest")])  # nearest does not antialias, whatever antialias says
def test_jpeg_draft_mode_is_used_by_default_only_before_a_resize_that_antialiases(model, jpeg_draft, drafts,
                                                                                   interpolation):
    """Scaled decoding averages pixels: before ALIGN's and CLIPPO's training resize, which do not
    antialias, it would blur what their reference training aliases (a 1024 × 768 JPEG of noise:
    a mean change of 22 grey levels), so they decode in full unless ``jpeg_draft`` says otherwise."""
    import dataclasses

    preprocess = openalign.model_config(model).preprocess
    preprocess = dataclasses.replace(preprocess, jpeg_draft=jpeg_draft,
                                     train_interpolation=interpolation or preprocess.train_interpolation)
    buffer = io.BytesIO()
    side = 4 * preprocess.resize_size
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    ImageTransform(preprocess, train=True)(image, torch.Generator().manual_seed(0), encoded=buffer.getvalue())
    assert (image.size != (side, side)) == drafts


def test_a_table_row_whose_image_is_corrupt_is_skipped_and_counted(tmp_path):
    (tmp_path / "good.png").write_bytes(encode("RGB", (20, 20), "PNG"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "pairs.csv").write_text("image,caption\ngood.png,a good row\nbad.png,a bad row\ngood.png,another\n")
    before = Counter(COUNTS)
    dataset = TableSourceConfig(path=str(tmp_path / "pairs.csv")).build(TRANSFORM, 0)
    assert dataset[(0, 1)]["text"] == "another"  # the next row stands in for the unreadable one
    assert Counter(COUNTS) - before == {"skipped/undecodable image": 1}
    strict = TableSourceConfig(path=str(tmp_path / "pairs.csv")).build(TRANSFORM, 0, strict=True)
    with pytest.raises(OpenAlignError, match="undecodable image.*bad.png"):
        strict[(0, 1)]


def test_the_monitor_strips_its_entries_and_adds_counts_over_workers_and_resumes():
    monitor = DataMonitor({"positions": {"0": [1]}, "counts": {"skipped/empty caption": 2}})
    batch = monitor.take({"image": 1, STREAM_KEY: (1, "p"), "__counts__": (0, {"skipped/empty caption": 3})})
    monitor.take({"__counts__": (1, {"skipped/no image": 1})})
    monitor.take({"__counts__": (0, {"skipped/empty caption": 4})})  # cumulative per worker: the latest wins
    assert batch == {"image": 1}
    assert monitor.counts() == {"skipped/empty caption": 6, "skipped/no image": 1}
    assert monitor.state()["positions"] == {0: [1], 1: "p"}  # as JSON gives them back, and as readers number


def test_training_on_dirty_shards_resumes_exactly_and_reports_skips(tmp_path, shapes_root, monkeypatch, caplog):
    import json

    from openalign.recipe import load_recipe
    from openalign.train import read_history, train
    from openalign.train.checkpoint import WEIGHTS_FILE
    from safetensors.torch import load_file

    for shard in range(3):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=6)

    def recipe(output: Path, workers: int = 2):
        return load_recipe("demo", [
            "model.name=align-test", f"data.num_workers={workers}", "train.steps=6", "train.batch_size=8",
            "train.warmup_steps=1", "eval.tasks=[]", f"run.output_dir={output}", "run.log_every=1",
            "run.checkpoint_every=3", "run.tensorboard=false", "model.text.hidden_dropout_prob=0.2",
            "data.train={type: webdataset, urls: '" + str(tmp_path / "{0..2}.tar") + "', open_shards: 2, "
            "shuffle_buffer: 6, image_keys: 'jpg;png;webp'}"])

    straight = train(recipe(tmp_path / "straight"), show_progress=False)
    train_until_preempted(recipe(tmp_path / "resumed"), 3, monkeypatch)
    saved = json.loads((tmp_path / "resumed" / "checkpoints" / "step_00000003" / "data_rank0.json").read_text())
    assert set(saved) == {"positions", "counts", "reseeds", "stream", "world_size", "num_workers", "log_window"}
    assert len(saved["positions"]) == 2 and saved["reseeds"] == []
    resumed = train(recipe(tmp_path / "resumed"), resume="latest", show_progress=False)

    weights = [load_file(str(run / "checkpoints" / "step_00000006" / WEIGHTS_FILE))
               for run in (tmp_path / "straight", tmp_path / "resumed")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    losses = [[r["loss"] for r in read_history(run) if "loss" in r]
              for run in (tmp_path / "straight", tmp_path / "resumed")]
    assert losses[0] == losses[1]
    # 48 samples drawn from shards where 9 of every 15 samples are bad: skips are counted, by reason
    assert straight.data_counts["skipped/undecodable image"] >= 2 and straight.data_counts["converted/CMYK"] >= 1
    assert resumed.data_counts == straight.data_counts  # the resumed run carries the counts on
    summary = json.loads((tmp_path / "straight" / "data_summary.json").read_text())
    assert summary == straight.data_counts
    assert read_history(tmp_path / "straight")[-1]["data/skipped"] == sum(
        n for key, n in straight.data_counts.items() if key.startswith("skipped/"))
    # other loader workers: the positions do not apply; the run says so and reads a fresh stream
    with caplog.at_level("WARNING", logger="openalign"):
        other = train(recipe(tmp_path / "other", workers=1), show_progress=False,
                      resume=str(tmp_path / "straight" / "checkpoints" / "step_00000003"))
    assert other.step == 6 and "2 worker(s), this run has 1 × 1" in " ".join(caplog.text.split())


def test_saved_positions_apply_only_to_the_same_readers_and_the_same_shards(tmp_path, caplog):
    """A rank without workers is the one reader a rank with one worker is: its positions apply. A
    shard added to the glob since (img2dataset still writing) renumbers the shards the positions
    name: the run says so and reads a fresh stream rather than repeat some samples and skip others."""
    from openalign.distributed import DistributedContext
    from openalign.recipe import load_recipe
    from openalign.train.loop import _build_loader

    for shard in range(2):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=6)
    recipe = load_recipe("demo", ["model.name=align-test", "data.num_workers=0", "eval.tasks=[]",
                                  "data.train={type: webdataset, resampled: false, open_shards: 1, urls: '"
                                  + str(tmp_path / "*.tar") + "'}"])
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    fingerprint = _build_loader(recipe, 8, ctx, 0, None)[1].fingerprint
    position = [2, 0, 1, [[0, 4]], 3]
    saved = {"positions": {"0": position}, "counts": {}, "reseeds": [], "world_size": 1, "num_workers": 1,
             "stream": fingerprint}
    with caplog.at_level("WARNING", logger="openalign"):
        assert _build_loader(recipe, 8, ctx, 3, saved)[0].dataset.positions == {0: position}
        assert "fresh random stream" not in caplog.text
        dirty_shard(tmp_path / "2.tar", 2, good=6)
        loader, monitor = _build_loader(recipe, 8, ctx, 3, saved)
    assert loader.dataset.positions == {} and monitor.fingerprint != fingerprint
    assert "shards are not those the checkpoint's stream positions refer to" in caplog.text

    # the same shards moved to another folder (another mount) are the same stream; in a mixture, a
    # shard added to one source changes the mixture's fingerprint
    from openalign.data.sources import MixtureDataset
    from openalign.data.stream import ShardStream

    def stream(urls):
        return ShardStream(urls, read_shard=None, decode=None, policy=None, seed=0, resampled=False)

    moved = [stream(["/data/cc3m/00000.tar", "/data/cc3m/00001.tar"]), stream(["/mnt/cc3m/00000.tar",
                                                                             "/mnt/cc3m/00001.tar"])]
    assert moved[0].fingerprint() == moved[1].fingerprint()
    grown = stream(["/mnt/cc3m/00000.tar", "/mnt/cc3m/00001.tar", "/mnt/cc3m/00002.tar"])
    mixtures = [MixtureDataset([child, stream(["/b/0.tar"])], [0.5, 0.5], seed=0) for child in (moved[1], grown)]
    assert mixtures[0].fingerprint() != mixtures[1].fingerprint() and mixtures[0].fingerprint()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decoding_jpeg_bytes_with_torchvision_gives_pils_pixels_bit_for_bit(mode, monkeypatch):
    rng = np.random.default_rng(1)
    shape = (300, 420, 3) if mode == "RGB" else (300, 420)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    for train in (True, False):
        transform = ImageTransform(PreprocessConfig(image_size=289, resize_size=346), train=train)
        assert transform._torchvision_decodes(Image.open(io.BytesIO(data)), data)
        outputs = [transform(Image.open(io.BytesIO(data)), torch.Generator().manual_seed(5), encoded)
                   for encoded in (data, None)]
        assert torch.equal(outputs[0], outputs[1])
    # a torchvision without image decoding (deprecated since 0.29 for TorchCodec): PIL decodes, the same pixels
    monkeypatch.setattr("openalign.data.transforms._jpeg_decoder", lambda: None)
    transform = ImageTransform(PreprocessConfig(image_size=289, resize_size=346), train=False)
    assert not transform._torchvision_decodes(Image.open(io.BytesIO(data)), data)
    assert torch.equal(transform(Image.open(io.BytesIO(data)), encoded=data), outputs[0])


def test_extra_fields_keep_their_kind_text_label_or_json_through_collate(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar_shard(tmp_path / "0.tar", [(f"{i}", {"jpg": encode("RGB", (20, 20)), "txt": f"caption {i}".encode(),
                                             "cls": str(i % 3).encode(), "concepts.json": b'["dog", "frisbee"]',
                                             "caption.txt": b"a synthetic caption"}) for i in range(4)])
    config = WebDatasetSourceConfig(urls=str(tmp_path / "0.tar"), open_shards=1, shuffle_buffer=1,
                                    extra_keys={"label": "cls", "concepts": "concepts.json", "caption": "caption.txt"})
    stream = iter(config.build(TRANSFORM, seed=0))
    batch = Collate(get_tokenizer("align-test"))([next(stream) for _ in range(4)])
    assert batch["label"].tolist() == [0, 1, 2, 0]
    assert batch["concepts"] == [["dog", "frisbee"]] * 4
    assert set(batch["caption"]) == {"input_ids", "attention_mask"}  # text: tokenised
    (tmp_path / "img.png").write_bytes(encode("RGB", (20, 20), "PNG"))
    pq.write_table(pa.table({"image": ["img.png"] * 2, "caption": ["a", "b"], "class_id": [7, 8]}),
                   tmp_path / "t.parquet")
    table = TableSourceConfig(path=str(tmp_path / "t.parquet"), extra_columns={"label": "class_id"}).build(TRANSFORM, 0)
    assert table[(0, 1)]["label"] == 8


def test_a_null_json_field_and_a_sample_without_an_image_are_counted_skips_that_say_why():
    from openalign.data.quality import SkipSample
    from openalign.data.sources import FieldsDecoder

    decode = FieldsDecoder(("jpg",), "txt", {"concepts": "concepts.json"}, TRANSFORM)
    image = encode("RGB", (20, 20))
    assert decode({"jpg": image, "txt": b"a", "concepts.json": b'["dog"]'})["concepts"] == ["dog"]
    with pytest.raises(SkipSample, match="no concepts.json") as null:  # not a None for Collate to choke on
        decode({"jpg": image, "txt": b"a", "concepts.json": b"null"})
    assert null.value.detail == "null"
    with pytest.raises(SkipSample) as no_image:  # a dotted key: the image went under 'b.jpg'
        decode({"b.jpg": image, "txt": b"a", "concepts.json": b"[]"})
    assert no_image.value.detail == "none of the fields jpg; it has b.jpg, concepts.json, txt"


def test_a_dead_stream_stops_training_with_one_clear_line_not_a_worker_traceback(tmp_path, capsys):
    from openalign.cli import main

    (tmp_path / "0.tar").write_bytes(b"this is not a tar file" * 100)
    code = main(["train", "demo", "model.name=align-test", "data.num_workers=1", "train.steps=2", "train.batch_size=8",
                 "train.warmup_steps=1",
                 "eval.tasks=[]", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false",
                 "data.train={type: webdataset, urls: '" + str(tmp_path / "0.tar") + "', max_consecutive_errors: 3}"])
    output = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert code == 2
    assert "3 consecutive samples or shards" in output and "corrupt shard" in output
    assert "Traceback" not in output and "DataLoader worker" not in output


def test_tfrecords_stream_from_any_url_with_crcs_checked(tmp_path):
    import fsspec
    from tfrecord.writer import TFRecordWriter

    from openalign.data import TFRecordSourceConfig
    from openalign.data.tfrecords import CorruptRecord, read_records

    path = tmp_path / "part-0.tfrecord"
    writer = TFRecordWriter(str(path))
    for index in range(3):
        writer.write({"jpg": (encode("RGB", (20, 20)), "byte"), "txt": (f"record {index}".encode(), "byte"),
                      "label": (index, "int")})
    writer.close()
    data = bytearray(path.read_bytes())
    records = list(read_records(io.BytesIO(bytes(data))))
    assert len(records) == 3 and all(isinstance(record, bytes) for record in records)
    second = 12 + len(records[0]) + 4  # where the second record starts
    data[second + 12 + 30] ^= 0xFF  # one flipped byte in its data: that record alone fails its CRC
    flipped = list(read_records(io.BytesIO(bytes(data))))
    assert [isinstance(record, CorruptRecord) for record in flipped] == [False, True, False]
    with pytest.raises(ShardReadError, match="truncated"):
        list(read_records(io.BytesIO(bytes(data[:-3]))))
    for name in ("a", "b"):
        with fsspec.open(f"memory://bucket/coyo/{name}.tfrecord", "wb") as handle:
            handle.write(bytes(data))
    config = TFRecordSourceConfig(urls="memory://bucket/coyo/*.tfrecord", resampled=False, open_shards=1,
                                  shuffle_buffer=1, extra_keys={"label": "label"})
    assert [url.replace(":///", "://") for url in config.files()] == ["memory://bucket/coyo/a.tfrecord",
                                                                       "memory://bucket/coyo/b.tfrecord"]
    before = Counter(COUNTS)
    stream = iter(config.build(TRANSFORM, seed=0))
    samples = [next(stream) for _ in range(4)]
    assert sorted((s["text"], s["label"]) for s in samples) == [("record 0", 0), ("record 0", 0), ("record 2", 2),
                                                                ("record 2", 2)]
    assert (Counter(COUNTS) - before)["skipped/undecodable record"] == 2
    pipe = TFRecordSourceConfig(urls=f"pipe:cat {path}", open_shards=1, shuffle_buffer=1)
    assert next(iter(pipe.build(TRANSFORM, seed=0)))["text"] == "record 0"
    import gzip  # TensorFlow's GZIP option: the same records, read through gzip

    compressed = gzip.compress(path.read_bytes())
    assert list(read_records(io.BytesIO(compressed))) == records
    with pytest.raises(ShardReadError, match="the compressed file cannot be read"):
        list(read_records(io.BytesIO(compressed[:len(compressed) // 2])))


def test_inspect_reads_tfrecord_files_with_the_training_reasons(tmp_path, capsys):
    import json

    from tfrecord.writer import TFRecordWriter

    from openalign.cli import main

    writer = TFRecordWriter(str(tmp_path / "part-0.tfrecord"))
    for jpg, txt in ((encode("RGB", (20, 20)), b"good"), (b"junk", b"corrupt image"), (encode("L", (20, 20)), b" ")):
        writer.write({"jpg": (jpg, "byte"), "txt": (txt, "byte")})
    writer.close()
    data = (tmp_path / "part-0.tfrecord").read_bytes()
    (tmp_path / "part-1.tfrecord").write_bytes(data[:-5])
    assert main(["data", "inspect", str(tmp_path / "part-*.tfrecord"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["shards"], summary["samples"], summary["usable"]) == (2, 5, 2)
    assert summary["skipped"] == {"undecodable image": 2, "empty caption": 1}
    assert list(summary["failed_shards"]) == [str(tmp_path / "part-1.tfrecord")]


def test_shards_cut_inside_their_first_sample_count_as_failed_shards(tmp_path, monkeypatch):
    """Such a shard yields its first sample, cut short, then fails: the guard against dead shards
    (max_consecutive_errors in a row) must still trip after that many, not after a shuffle
    buffer's worth of them (a round of 2,000 by default)."""
    write_tar_shard(tmp_path / "whole.tar", [("k", {"jpg": encode("RGB", (20, 20)), "txt": b"a caption"})])
    with tarfile.open(tmp_path / "whole.tar") as tar:
        cut = tar.getmember("k.txt").offset + 100  # inside the caption's header
    for index in range(60):
        (tmp_path / f"{index}.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:cut])
    from openalign.data import sources

    opened: list[str] = []
    monkeypatch.setattr(sources, "opened_shard", lambda url: opened.append(url) or opened_shard(url))
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{0..59}.tar"), resampled=False, open_shards=1,
                                    shuffle_buffer=60, max_consecutive_errors=5)
    with pytest.raises(OpenAlignError, match="5 consecutive samples or shards .* failed"):
        next(iter(config.build(TRANSFORM, seed=0)))
    assert len(opened) == 5  # before: all 60 of the round


@pytest.mark.parametrize("resampled", [True, False])
def test_shards_that_hold_nothing_stop_the_run_with_an_error_instead_of_a_silent_stall(tmp_path, resampled):
    write_tar_shard(tmp_path / "0.tar", [])
    write_tar_shard(tmp_path / "1.tar", [("a", {"txt": b"a caption without its image"})])
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{0..1}.tar"), resampled=resampled, max_consecutive_errors=20)
    with pytest.raises(OpenAlignError, match="20 consecutive samples or shards .* failed"):
        next(iter(config.build(TRANSFORM, seed=0)))


def test_empty_shards_among_good_ones_in_one_round_do_not_count_as_a_run_of_failures(tmp_path):
    """A round reads many small shards before its samples are decoded: the skips of its empty
    shards were counted back-to-back, as if in a row, and a run of mostly good small shards
    stopped with 'consecutive ... failed' (CLI review)."""
    good = [(f"k{i}", {"jpg": encode("RGB", (20, 20)), "txt": b"a caption"}) for i in range(3)]
    empty = {0, 1, 3}
    for index in range(9):
        write_tar_shard(tmp_path / f"{index}.tar", [] if index in empty else good)
    config = WebDatasetSourceConfig(urls=str(tmp_path / "{0..8}.tar"), resampled=False, open_shards=1,
                                    shuffle_buffer=50, max_consecutive_errors=3)
    stream = config.build(TRANSFORM, seed=0)
    order = [int(Path(stream._shard(draw, 0, 1)).stem) for draw in range(9)]  # no three empty ones in a row
    assert not any(all(shard in empty for shard in order[i:i + 3]) for i in range(7)), order
    samples = list(itertools.islice(iter(stream), 10))
    assert len(samples) == 10


def test_an_uncaptioned_sample_with_a_corrupt_image_is_counted_for_its_image():
    """`data caption` copies a sample whose image it cannot decode without a caption: training counts
    it as an undecodable image, its cause, not as a sample without caption.txt."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "0.tar"
        write_tar_shard(path, [("a", {"jpg": encode("RGB", (64, 64))[:300], "txt": b"raw"}),
                               ("d", {"jpg": encode("RGB", (64, 64))[:300]}),  # no caption: that reason, as inspect's
                               ("b", {"jpg": encode("RGB", (32, 32)), "txt": b"raw"}),
                               ("c", {"jpg": encode("RGB", (32, 32)), "txt": b"raw", "caption.txt": b"synthetic"}),
                               ("e", {"jpg": encode("RGB", (32, 32)), "txt": b"raw", "caption.txt": b"synthetic"})])
        config = WebDatasetSourceConfig(urls=str(path), extra_keys={"caption": "caption.txt"}, shuffle_buffer=1,
                                        resampled=False)
        before = Counter(COUNTS)
        stream = iter(config.build(TRANSFORM, seed=0))
        assert [next(stream)["caption"] for _ in range(2)] == ["synthetic"] * 2  # the skips before them handed over
        counted = Counter(COUNTS) - before
        reasons = ("skipped/undecodable image", "skipped/no caption.txt", "skipped/no caption")
        assert [counted[reason] for reason in reasons] == [1, 1, 1]
    from openalign.data.quality import SkipSample
    from openalign.data.sources import FieldsDecoder

    # an extra field named as the caption's reason ('no caption'): a missing caption is still that
    with pytest.raises(SkipSample, match="no caption"):
        FieldsDecoder(("jpg",), "txt", {"caption": "caption"}, TRANSFORM)({"jpg": encode("RGB", (64, 64))[:300]})
