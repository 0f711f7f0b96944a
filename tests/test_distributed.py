"""Two gloo processes under torchrun train exactly as one process on the whole batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openalign.losses import ContrastiveLoss
from openalign.train import read_history

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker  # noqa: E402
from conftest import needs_unifont  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"


def torchrun(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    torchrun(str(WORKER), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def one_process_reference() -> dict:
    """The same model and data on one process, the whole batch ordered so its ghost batches match the ranks'."""
    model = distributed_worker.build_model()
    batch = distributed_worker.global_batch()
    loss = ContrastiveLoss(label_smoothing=0.1)(**model(**batch))
    loss.backward()
    return {"loss": loss.detach(), "grads": {name: p.grad.clone() for name, p in model.named_parameters()}}


def test_loss_equals_single_process_full_batch(two_rank_results, one_process_reference):
    mean_of_ranks = (two_rank_results[0]["loss"] + two_rank_results[1]["loss"]) / 2
    torch.testing.assert_close(mean_of_ranks, one_process_reference["loss"], rtol=1e-6, atol=1e-6)
    assert two_rank_results[0]["loss"] != two_rank_results[1]["loss"]  # each rank has its own rows


@pytest.mark.parametrize("run", ["grads", "accumulated_grads", "checkpointed_grads"])
def test_every_gradient_equals_single_process_full_batch(two_rank_results, one_process_reference, run):
    """Also when each rank accumulates two micro-batches (train.accum_steps: 2), whose negatives are the
    whole global batch, and with activation checkpointing (train.grad_checkpointing). Tolerance scales
    with each tensor's largest gradient: summation order differs between the runs, and some gradients
    are analytically zero (a BN bias followed by another batch norm), so they hold only rounding noise
    of about 1e-8."""
    reference = one_process_reference["grads"]
    for rank in two_rank_results:
        assert rank[run].keys() == reference.keys()
        for name, grad in reference.items():
            scale = max(grad.abs().max().item(), 1e-3)
            torch.testing.assert_close(rank[run][name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)
    assert reference["log_temperature"].abs() > 0
    assert reference["image_tower.embeddings.convolution.weight"].abs().sum() > 0


def test_accumulating_ranks_report_their_own_loss_and_all_reduce_each_bucket_once(two_rank_results):
    """DDP synchronises gradients in the last micro-batch only (no_sync before it)."""
    for rank in two_rank_results:
        torch.testing.assert_close(rank["accumulated_loss"], rank["loss"], rtol=1e-6, atol=1e-6)
        buckets = rank["all_reduced_buckets"]
        assert buckets and sorted(buckets) == list(range(len(buckets)))


def test_the_gathering_loss_warns_of_nothing(two_rank_results):
    assert [rank["warnings"] for rank in two_rank_results] == [[], []]


def test_checkpoints_and_evaluation_get_the_mean_of_the_ranks_batch_norm_statistics(two_rank_results):
    """Keras reads TPU replicas' moving averages as their mean: so do checkpoints and evaluation."""
    own = [rank["buffers"] for rank in two_rank_results]
    running = [name for name in own[0] if name.endswith("running_mean")]
    assert running and not torch.equal(own[0][running[0]], own[1][running[0]])  # each rank saw its own data
    for name, value in own[0].items():
        expected = (value + own[1][name]) / 2 if value.is_floating_point() else value
        for rank in two_rank_results:
            torch.testing.assert_close(rank["averaged"][name], expected, rtol=1e-6, atol=1e-7, msg=name)
    for rank in two_rank_results:  # with activation checkpointing, each rank's statistics move once, as without
        for name, value in rank["buffers"].items():
            torch.testing.assert_close(rank["checkpointed_buffers"][name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_strided_shards_form_the_single_process_ghost_batches():
    """The premise of the comparison: rank r's ghost batch g is the single process's ghost batch 2g + r."""
    batch = distributed_worker.global_batch()["image"]
    size = 4  # align-test's virtual_batch_size
    single = batch.view(size, -1, *batch.shape[1:])  # ghost batch j = single[:, j]
    for rank in range(2):
        mine = distributed_worker.shard({"image": batch, "text": {}}, rank, 2)["image"]
        ghosts = mine.view(size, -1, *mine.shape[1:])
        for g in range(ghosts.shape[1]):
            torch.testing.assert_close(ghosts[:, g], single[:, 2 * g + rank])


def test_the_trainer_runs_under_torchrun_and_resumes(tmp_path, shapes_root):
    """`torchrun -m openalign train` end to end on 2 gloo ranks: per-rank batches, checkpoints with
    each rank's RNG state, evaluation on rank 0 while the other waits, then `--resume latest`; with
    a weight average (train.ema_decay), evaluated and checkpointed beside the model. Its losses are
    one process's on the same global batch: each rank's examples are strided over the batch, so
    its ghost batches are the single process's."""
    from conftest import tiny_recipe_overrides

    from openalign.recipe import load_recipe
    from openalign.train import train

    overrides = tiny_recipe_overrides(shapes_root, tmp_path / "run", steps=4) + ["train.device=cpu",
                                                                                 "train.ema_decay=0.9"]
    single = tiny_recipe_overrides(shapes_root, tmp_path / "single", steps=4) + ["train.device=cpu", "eval.tasks=[]"]
    train(load_recipe("demo", single), show_progress=False)
    torchrun("-m", "openalign", "train", "demo", *overrides, "train.steps=2")
    first = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in first.iterdir()) == [
        "config.yaml", "data_rank0.json", "data_rank1.json", "ema", "model.safetensors", "rng_rank0.pt", "rng_rank1.pt",
        "trainer_state.pt"]
    assert sorted(p.name for p in (first / "ema").iterdir()) == ["config.yaml", "model.safetensors"]
    result = torchrun("-m", "openalign", "train", "demo", *overrides, "--resume", "latest")
    assert "resumed from" in result.stdout + result.stderr
    assert result.stdout.count('"shapes/knn_colour_acc1"') == 1  # the final metrics, printed by rank 0 only
    assert "FutureWarning" not in result.stderr  # DDP's renamed buffer switch
    history = [r for r in read_history(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    one_process = [r["loss"] for r in read_history(tmp_path / "single") if "loss" in r]
    assert [r["loss"] for r in history] == pytest.approx(one_process, rel=1e-5)
    assert all(r["samples_per_second_per_rank"] == pytest.approx(r["samples_per_second"] / 2) for r in history)
    assert all(0 <= r["data/wait_seconds"] <= r["step_seconds"] for r in history)  # the reduction ran on both
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    metrics = [r for r in read_history(tmp_path / "run") if "shapes/knn_colour_acc1" in r]
    assert len(metrics) == 2  # evaluated at the end of each invocation, by rank 0 only
    assert all("ema/shapes/knn_colour_acc1" in r for r in metrics)


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_with_its_checkpoint(tmp_path, shapes_root):
    """One rank preempted: the ranks agree on the step to stop after (rank 1 received SIGTERM during
    step 2; the agreement, read a step later, stops both after step 3), checkpoint it with every
    rank's state, and a resumed run goes on from there."""
    from conftest import tiny_recipe_overrides

    overrides = tiny_recipe_overrides(shapes_root, tmp_path / "run", steps=6) + [
        "train.device=cpu", "run.checkpoint_every=100", "eval.tasks=[]"]
    result = torchrun(str(Path(__file__).parent / "sigterm_worker.py"), "train", "demo", *overrides, check=False)
    output = " ".join((result.stdout + result.stderr).split())
    # the ranks stopped as asked (143); torchrun then reports the first to exit as failed, with its own traceback
    assert result.returncode != 0 and "exitcode : 143" in output and "error:" not in output, output[-3000:]
    assert output.count("terminated (SIGTERM) after step 3, checkpointed in") == 1, output[-3000:]  # rank 0's
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000003"]
    assert {"data_rank0.json", "data_rank1.json"} <= {p.name for p in (tmp_path / "run" / "checkpoints" /
                                                                        "step_00000003").iterdir()}
    torchrun("-m", "openalign", "train", "demo", *overrides, "--resume", "latest")
    assert [r["step"] for r in read_history(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_an_error_on_some_ranks_stops_every_rank_with_a_clear_error(tmp_path):
    """fail_together: the failing rank raises its own error, the other names it; nested blocks
    pass an agreed error on without another collective, so the ranks' collectives stay paired."""
    torchrun(str(Path(__file__).parent / "fail_together_worker.py"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [[rank[name]["paired"] for name in rank] for rank in ranks] == [[0, 2, 4, 6, 8, 10, 12, 14]] * 2
    errors = {name: [rank[name]["error"] for rank in ranks] for name in ranks[0]}
    assert errors == {
        "none fails": [None, None],
        "rank 1 fails before an inner block": ["PeerFailure: rank 1 failed (its own error line names what failed); "
                                               "rank 0, which was inner, stops too", "ValueError: rank 1's own error"],
        "rank 0 fails inside an inner block": ["ValueError: rank 0's own error", "PeerFailure: rank 0 failed (its "
                                               "own error line names what failed); rank 1, which was inner, stops too"],
        "both fail": ["ValueError: rank 0's own error", "ValueError: rank 1's own error"],
        "an agreed error raised again as another": ["RuntimeError: wrapped", "ValueError: rank 1's own error"],
        "a clean-up block after an agreed error fails on the other rank": [
            "PeerFailure: rank 1 failed (its own error line names what failed); rank 0, which was clean-up, stops "
            "too",
            "OSError: rank 1's clean-up error"],
        "a checkpoint save fails on rank 1": ["PeerFailure: rank 1 failed (its own error line names what failed); "
                                              "rank 0, which was saving checkpoint step_00000001, stops too",
                                              "TypeError: Object of type object is not JSON serializable"],
        "an evaluation image only rank 1 reads is unreadable": [
            "PeerFailure: rank 1 failed (its own error line names what failed); rank 0, which was embedding "
            "images, stops too",
            f"OpenAlignError: cannot read evaluation image '{tmp_path / 'images1' / '1.png'}': cannot identify "
            f"image file '{tmp_path / 'images1' / '1.png'}'"],
    }
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()  # never published


def test_a_check_that_fails_on_rank_0_only_stops_the_trainer_on_every_rank_cleanly(tmp_path, shapes_root):
    """Rank 0 alone generates the shapes data; a folder holding another size fails there. Rank 1
    used to wait in a barrier and die with gloo's "connection closed" traceback."""
    from conftest import tiny_recipe_overrides

    overrides = tiny_recipe_overrides(shapes_root, tmp_path / "run") + ["train.device=cpu", "data.train.num_train=200"]
    result = torchrun("-m", "openalign", "train", "demo", *overrides, check=False)
    output = " ".join((result.stdout + result.stderr).split())  # the console wraps lines
    assert result.returncode != 0
    assert "already holds a shapes dataset" in output
    assert ("error: rank 0 failed (its own error line names what failed); rank 1, which was generating the shapes "
            "dataset, stops too") in output
    assert "[rank1]: Traceback" not in output and "Connection closed" not in output


def test_alip_loss_and_gradients_on_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    """ALIP's gates and adaptive loss over the gathered global batch, on ALIGN's towers with
    ``text_fields: [text, caption]``: two steps' losses (the running averages move), the
    buffers, the gate statistics and every gradient equal one process's."""
    import alip_worker
    from openalign.losses import ALIPLoss

    torchrun(str(Path(__file__).parent / "alip_worker.py"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = alip_worker.build_model()
    reference = alip_worker.run(ALIPLoss(), model, model, alip_worker.global_batch())
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, reference["losses"], rtol=1e-5, atol=1e-6)
    for rank in ranks:
        for name, value in {**reference["buffers"], **reference["stats"]}.items():
            if not name.startswith("loss_"):  # the loss terms are per rank; the gates are global
                torch.testing.assert_close(rank["buffers"].get(name, rank["stats"].get(name)), value, rtol=1e-5,
                                           atol=1e-6, msg=name)
        for name, grad in reference["grads"].items():
            scale = max(grad.abs().max().item(), 1e-3)
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)
    assert reference["buffers"]["history_text_caption"] < 1.0
    assert reference["grads"]["text_tower.bert.embeddings.word_embeddings.weight"].abs().sum() > 0


def test_alip_trains_under_torchrun(tmp_path, shapes_root):
    overrides = [f"data.train.root={tmp_path / 'data'}", "data.train.num_train=128", "data.train.num_test=24",
                 "data.num_workers=0", "train.steps=4", "train.batch_size=16", "train.warmup_steps=2",
                 "train.device=cpu", f"eval.tasks.0.root={tmp_path / 'data'}", "eval.tasks.0.knn_memory_size=64",
                 f"run.output_dir={tmp_path / 'run'}", "run.log_every=1"]
    torchrun("-m", "openalign", "train", "alip-shapes", *overrides)
    history = [r for r in read_history(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in history] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in history)
    assert all(0 < r["weight_sample"] <= 1 for r in history)


@needs_unifont
def test_clippo_trains_under_torchrun(tmp_path, shapes_root):
    """CLIPPO's recipe on 2 gloo ranks: the rendered-text batches, the shared tower under DDP."""
    overrides = ["model.name=clippo-test", f"data.train.root={shapes_root}", "data.train.num_train=256",
                 "data.train.num_test=24", "data.train.image_size=32", "data.num_workers=0", "train.steps=2",
                 "train.batch_size=16", "train.warmup_steps=1", "train.cooldown_steps=1", "train.device=cpu",
                 f"eval.tasks.0.root={shapes_root}", "eval.tasks.0.knn_memory_size=64",
                 f"run.output_dir={tmp_path / 'run'}", "run.log_every=1"]
    torchrun("-m", "openalign", "train", "clippo-shapes", *overrides)
    history = [r for r in read_history(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in history] == [1, 2] and all(math.isfinite(r["loss"]) for r in history)
    assert any("shapes/text_retrieval_recall@1" in r for r in read_history(tmp_path / "run"))


def test_the_demo_runs_under_torchrun(tmp_path):
    """`torchrun -m openalign demo`: rank 0 holds and clears --out while the other rank waits, and
    rank 0 alone writes and prints the report."""
    out = tmp_path / "demo"
    (out / "checkpoints" / "step_00000003").mkdir(parents=True)  # an earlier demo's, which rank 0 deletes
    (out / ".openalign-demo").write_text("made by 'openalign demo'\n")
    result = torchrun("-m", "openalign", "demo", "--out", str(out), "model.name=align-test", "data.train.num_train=256",
                      "data.train.num_test=24", "data.train.image_size=32", "data.num_workers=0", "train.steps=2",
                      "train.batch_size=16", "train.warmup_steps=1", "eval.tasks.0.knn_memory_size=64", "run.log_every=1")
    assert result.stderr.count("openalign demo: align-test") == 1 and (out / "report.md").is_file()
    assert [r["step"] for r in read_history(out) if "loss" in r] == [1, 2]


def test_sharded_evaluation_on_two_ranks_equals_one_process(tmp_path, shapes_root):
    """Each rank embeds every other item (33 kNN memory images: 17 and 16), all gather; every rank
    must then report exactly the single-process metrics."""
    import json

    import eval_worker
    from openalign.eval import evaluate_shapes

    torchrun(str(Path(__file__).parent / "eval_worker.py"), str(shapes_root), str(tmp_path))
    expected = evaluate_shapes(eval_worker.build_model(), shapes_root, torch.device("cpu"), batch_size=8,
                               knn_memory_size=eval_worker.KNN_MEMORY, show_progress=False)
    for name in ("rank0", "rank1", "rank0-cached", "rank1-cached"):
        metrics = json.loads((tmp_path / f"{name}.json").read_text())
        assert metrics.keys() == expected.keys()
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), (name, key)
    assert list((tmp_path / "cache0").glob("*.safetensors")) and not (tmp_path / "cache1").exists()


def test_two_ranks_resume_a_shard_stream_exactly(tmp_path):
    """2 gloo ranks × 2 loader workers on webdataset shards: 2 steps, then ``--resume`` to 4,
    end with the weights of 4 uninterrupted steps (every rank's readers pick up where they were)."""
    from safetensors.torch import load_file
    from test_stream import dirty_shard

    from openalign.train.checkpoint import WEIGHTS_FILE

    for shard in range(3):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=6)
    source = ("data.train={type: webdataset, urls: '" + str(tmp_path / "{0..2}.tar") +
              "', open_shards: 2, shuffle_buffer: 6, image_keys: 'jpg;png;webp'}")

    def run(output: str, steps: int, *extra: str) -> None:
        torchrun("-m", "openalign", "train", "demo", "model.name=align-test", "data.num_workers=2", "train.device=cpu",
                 f"train.steps={steps}", "train.batch_size=8", "train.schedule=constant", "train.warmup_steps=0",
                 "eval.tasks=[]", f"run.output_dir={tmp_path / output}", "run.checkpoint_every=2",
                 "run.tensorboard=false", source, *extra)

    run("straight", 4)
    run("resumed", 2)
    run("resumed", 4, "--resume", "latest")
    weights = [load_file(str(tmp_path / run / "checkpoints" / "step_00000004" / WEIGHTS_FILE))
               for run in ("straight", "resumed")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_a_data_error_on_one_rank_mid_run_is_that_ranks_message_and_no_traceback_on_the_other(tmp_path):
    """Rank 1's shards fail (its storage, say) after set-up: its error is printed with its rank, and
    rank 0, whose next collective loses rank 1, says so instead of gloo's "connection closed" traceback."""
    from test_stream import dirty_shard

    for shard in range(2):
        dirty_shard(tmp_path / f"{shard}.tar", shard, good=6)
    # a pipe that serves the shard to rank 0 and garbage to rank 1
    fetch = tmp_path / "fetch.sh"
    fetch.write_text(f'#!/bin/sh\nif [ "$RANK" = 1 ]; then head -c 2048 /dev/urandom; else cat {tmp_path}/$1.tar; fi\n')
    fetch.chmod(0o755)
    source = "data.train={type: webdataset, urls: 'pipe:" + str(fetch) + " {0..1}', open_shards: 1, shuffle_buffer: 4}"
    # the launcher stops every rank once one has exited: checking every 5 s, it lets rank 0 reach its collective
    result = torchrun("--monitor-interval", "5", "-m", "openalign", "train", "demo", "model.name=align-test",
                      "data.num_workers=0", "train.device=cpu", "train.steps=3", "train.batch_size=8",
                      "train.warmup_steps=0", "eval.tasks=[]", f"run.output_dir={tmp_path / 'run'}",
                      "run.tensorboard=false", source, check=False)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "error: rank 1: " in output and "failed (raise max_consecutive_errors" in output
    assert "error: rank 0: another rank stopped while this one waited for it in a collective" in output
    assert "[rank0]: Traceback" not in output and "[rank0]: RuntimeError" not in output
