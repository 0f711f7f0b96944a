"""The training loop: outputs, exact resume, checkpoint handling, and configuration errors."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import openalign
from conftest import tiny_recipe_overrides, train_until_preempted
from openalign.config import from_dict
from openalign.distributed import DistributedContext
from openalign.errors import ConfigError, OpenAlignError
from openalign.recipe import load_recipe
from openalign.train import (Checkpointer, load_checkpoint_model, load_weights, read_history, train,
                             train_step)
from openalign.train.checkpoint import WEIGHTS_FILE
from openalign.train.schedule import build_scheduler, load_scheduler_state

# dropout and drop-connect on, so that resuming must restore the RNG too
STOCHASTIC = ["model.image.drop_connect_rate=0.3", "model.text.hidden_dropout_prob=0.2"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shapes_root) -> tuple[Path, object]:
    from conftest import tiny_recipe_overrides

    output = tmp_path_factory.mktemp("run")
    result = train(load_recipe("demo", tiny_recipe_overrides(shapes_root, output)), show_progress=False)
    return output, result


def test_a_run_writes_checkpoints_history_tensorboard_and_metrics(trained_run):
    output, result = trained_run
    assert result.step == 4
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    for name in ("model.safetensors", "trainer_state.pt", "rng_rank0.pt", "config.yaml"):
        assert (output / "checkpoints" / "step_00000004" / name).is_file()
    history = read_history(output)
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]
    assert {"loss", "lr", "temperature", "samples_per_second", "loss_i2t", "loss_t2i"} <= set(history[0])
    for record in history[:4]:  # one rank: its throughput is the run's; waiting for data is part of a step
        assert record["samples_per_second_per_rank"] == record["samples_per_second"]
        assert 0 <= record["data/wait_seconds"] <= record["step_seconds"] and 0 <= record["data/wait_fraction"] <= 1
    assert history[0]["lr"] == 0.0  # linear warm-up starts at 0 (spec §3.3)
    assert "shapes/image_retrieval_recall@1" in history[-1] and set(result.metrics) == set(history[-1]) - {"step"}
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    assert (output / "config.yaml").is_file()


def test_the_log_says_how_long_training_waited_for_data(tmp_path, shapes_root, monkeypatch, caplog):
    """An input-bound run (a loader that takes 0.3 s a batch) shows it: the time waited per step and
    its share of the step, in the history and the log line."""
    from openalign.data.loader import DataMonitor

    take = DataMonitor.take
    monkeypatch.setattr(DataMonitor, "take", lambda self, batch: (time.sleep(0.3), take(self, batch))[1])
    overrides = tiny_recipe_overrides(shapes_root, tmp_path, steps=2) + ["eval.tasks=[]"]
    with caplog.at_level("INFO", logger="openalign.train"):
        train(load_recipe("demo", overrides), show_progress=False)
    records = [r for r in read_history(tmp_path) if "loss" in r]
    assert len(records) == 2 and all(0.3 <= r["data/wait_seconds"] <= r["step_seconds"] for r in records)
    assert all(r["data/wait_fraction"] == pytest.approx(r["data/wait_seconds"] / r["step_seconds"]) for r in records)
    assert re.search(r"samples/s \(\d+ per rank\)  data wait \d+%", caplog.text)


def test_a_frozen_tower_keeps_its_weights_and_batch_norm_statistics(tmp_path, shapes_root):
    """train.freeze=[image_tower]: LiT's locked image tower (open_clip's --lock-image with its BN
    statistics), from a trained model (train.init_from); the rest trains."""
    torch.manual_seed(1)
    start = openalign.create_model("align-test").save_pretrained(tmp_path / "start")
    initial = load_file(str(start / WEIGHTS_FILE))
    overrides = tiny_recipe_overrides(shapes_root, tmp_path / "run", steps=2) + [
        "train.ema_decay=0.5", "train.ema_warmup=false", "run.checkpoint_every=1", "model.name=align-test",
        f"train.init_from={start}", "train.freeze=[image_tower]", "eval.tasks=[]"]
    train(load_recipe("demo", overrides), show_progress=False)
    trained = _state(tmp_path / "run")
    image = [key for key in initial if key.startswith("image_tower.")]
    assert any("running_var" in key for key in image)  # ghost batch norm's statistics, which training would move
    assert all(torch.equal(trained[key], initial[key]) for key in image)
    # the weight average of a locked tower (its parameters shared with the model's, its statistics averaged) too
    average = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000002" / "ema" / WEIGHTS_FILE))
    assert all(torch.equal(average[key], initial[key]) for key in image)
    # the rest of the average starts from the init_from weights: 0.25·initial + 0.25·step 1's + 0.5·step 2's
    first = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000001" / WEIGHTS_FILE))
    for key, value in average.items():
        if value.is_floating_point() and key not in image:
            torch.testing.assert_close(value, 0.25 * initial[key] + 0.25 * first[key] + 0.5 * trained[key],
                                       rtol=1e-5, atol=1e-6, msg=key)
    for part in ("text_tower.", "image_projection."):
        assert any(not torch.equal(trained[key], initial[key]) for key in initial if key.startswith(part)), part
    with pytest.raises(ConfigError, match=r"'train.freeze' names 'image_towr', which no parameter is or is under; "
                                          r"the model's parts: image_projection, image_tower, log_temperature, "
                                          r"text_projection, text_tower \(e.g. train.freeze=\[image_tower\]\)"):
        train(load_recipe("demo", tiny_recipe_overrides(shapes_root, tmp_path / "bad", steps=1) + [
            "train.freeze=[image_towr]"]), show_progress=False)
    # unlocking on resume would load an optimiser state for other parameters: refused, whatever is allowed
    more = load_recipe("demo", overrides[:-3] + [f"train.init_from={start}", "eval.tasks=[]", "train.steps=3"])
    with pytest.raises(OpenAlignError, match=r"with train.freeze changed \(\[\"image_tower\"\] -> \[\]\): it decides "
                                             r"which parameters the optimiser holds .* train.init_from="):
        train(more, resume="latest", show_progress=False, allow_changes=["train"])


def test_settings_that_shape_the_optimiser_state_never_change_on_resume(tmp_path):
    from openalign.train.checkpoint import check_resumable

    saved = {"train": {"steps": 2, "optimizer": "adamw"}}  # from before train.freeze: nothing frozen
    check_resumable(saved, {"train": {"steps": 2, "optimizer": "adamw", "freeze": []}}, tmp_path)
    check_resumable({"train": {"steps": 2}}, {"train": {"steps": 2}}, tmp_path)  # named by neither
    for changed in ({"optimizer": "adamw", "freeze": ["image_tower"]}, {"optimizer": "lamb"}):
        with pytest.raises(OpenAlignError, match="it decides which parameters the optimiser holds"):
            check_resumable(saved, {"train": {"steps": 2, **changed}}, tmp_path, allowed=["train"])


def test_a_frozen_module_runs_as_at_inference_and_accumulates_with_standard_batch_norm():
    """A locked tower is the function it was (no drop-connect, running statistics), in training
    too; its standard batch norm no longer depends on how a batch is split."""
    from openalign.train.accumulate import check_accumulable
    from openalign.train.freeze import freeze

    torch.manual_seed(0)
    model = openalign.create_model("align-test", image={"virtual_batch_size": None, "drop_connect_rate": 0.5})
    with pytest.raises(OpenAlignError, match="standard batch norm"):
        check_accumulable(model)
    freeze(model, ["image_tower"])
    check_accumulable(model)
    model.train()
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, second = model.image_tower(pixels), model.image_tower(pixels)
    assert torch.equal(first, second) and not model.image_tower.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.image_tower(pixels), first)
    with pytest.raises(ConfigError, match="freezes every parameter"):
        freeze(openalign.create_model("align-test"), ["image_tower", "text_tower", "image_projection",
                                                      "text_projection", "log_temperature"])


def test_evaluating_and_checkpointing_are_not_counted_as_step_time(tmp_path, shapes_root, monkeypatch):
    from openalign.train import loop

    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: time.sleep(1.0) or {})  # a 1 s evaluation
    overrides = tiny_recipe_overrides(shapes_root, tmp_path, steps=4) + ["run.log_every=2", "eval.every=1"]
    train(load_recipe("demo", overrides), show_progress=False)
    second = [r for r in read_history(tmp_path) if "loss" in r][1]  # steps 3 and 4, after evaluations at 2 and 3
    assert second["step"] == 4 and second["step_seconds"] < 1.0


def test_evaluating_every_n_steps_without_tasks_logs_no_empty_records(tmp_path, shapes_root):
    overrides = tiny_recipe_overrides(shapes_root, tmp_path, steps=2) + ["eval.tasks=[]", "eval.every=1"]
    train(load_recipe("demo", overrides), show_progress=False)
    history = read_history(tmp_path)
    assert [record["step"] for record in history] == [1, 2] and all("loss" in record for record in history)


def test_an_evaluation_that_fails_on_a_corrupt_image_keeps_the_steps_trained(tmp_path, shapes_root):
    """A corrupt evaluation image (found only when read) stops the run at that evaluation, but the
    step's checkpoint is written first: the steps since the last one are not lost."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_root, data)
    victim = sorted((data / "images" / "test").iterdir())[0]
    victim.write_bytes(b"not a png")
    overrides = tiny_recipe_overrides(shapes_root, tmp_path / "run", steps=4) + [
        "eval.every=2", f"eval.tasks=[{{task: retrieval, json: {data / 'dataset_shapes.json'}, "
        f"image_root: {data}}}]"]
    with pytest.raises(OpenAlignError, match="cannot read evaluation image"):
        train(load_recipe("demo", overrides), show_progress=False)
    assert [path.name for path in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000002"]


def test_checkpoint_loads_back_into_a_model(trained_run):
    output, _ = trained_run
    model = load_checkpoint_model(output)  # a run directory means its latest checkpoint
    saved = load_file(str(output / "checkpoints" / "step_00000004" / WEIGHTS_FILE))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])
    assert not model.training
    # readable as the run's other files are (safetensors makes its files 0600): a colleague can load it
    weights, config = (output / "checkpoints" / "step_00000004" / name for name in (WEIGHTS_FILE, "config.yaml"))
    assert weights.stat().st_mode & 0o777 == config.stat().st_mode & 0o777


def _state(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((directory / "checkpoints").glob("step_*"))[-1] / WEIGHTS_FILE))


@pytest.mark.parametrize("accum_steps, optimizer, precision", [(1, "adamw", "fp32"), (2, "adamw", "fp32"),
                                                               (1, "adafactor", "fp32"), (2, "adamw", "fp16")])
def test_resume_continues_exactly(tmp_path, shapes_root, tiny_overrides, monkeypatch, accum_steps, optimizer,
                                  precision):
    """Also with gradient accumulation, whose re-embedding replays the random draws; with
    Adafactor, whose momentum is kept in bfloat16 (which loading an optimiser's state turns to
    float32); and in fp16, whose gradient scaler's state is checkpointed."""
    settings = STOCHASTIC + [f"train.accum_steps={accum_steps}", f"train.optimizer={optimizer}",
                             f"train.precision={precision}", f"train.eps={1e-30 if optimizer == 'adafactor' else 1e-6}"]
    if precision == "fp16":  # a scale that changes every step: a resume that lost it would end on another
        settings.append("train.loss_scale_growth_interval=1")
    straight = tmp_path / "straight"
    train(load_recipe("demo", tiny_overrides(shapes_root, straight, steps=6) + settings), show_progress=False)

    interrupted = tmp_path / "interrupted"
    recipe = load_recipe("demo", tiny_overrides(shapes_root, interrupted, steps=6) + settings)
    train_until_preempted(recipe, 4, monkeypatch)
    result = train(recipe, resume="latest", show_progress=False)

    assert result.step == 6
    expected, actual = _state(straight), _state(interrupted)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    losses = [[r["loss"] for r in read_history(d) if "loss" in r] for d in (straight, interrupted)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    if precision == "fp16":
        scalers = [torch.load(d / "checkpoints" / "step_00000006" / "trainer_state.pt")["scaler"]
                   for d in (straight, interrupted)]
        assert scalers[0] == scalers[1] and scalers[0]["growth_interval"] == 1, scalers


def test_a_run_stopped_at_a_checkpoint_keeps_the_evaluation_of_that_step(tmp_path, shapes_root, tiny_overrides,
                                                                          monkeypatch):
    """An evaluation due at a checkpoint step is in the history of a run preempted right after
    that checkpoint, as in one never stopped."""
    settings = ["eval.every=2", "run.checkpoint_every=2"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(load_recipe("demo", tiny_overrides(shapes_root, straight, steps=6) + settings), show_progress=False)
    recipe = load_recipe("demo", tiny_overrides(shapes_root, interrupted, steps=6) + settings)
    train_until_preempted(recipe, 4, monkeypatch)
    train(recipe, resume="latest", show_progress=False)
    evaluations = [[(r["step"], r) for r in read_history(d) if "loss" not in r] for d in (straight, interrupted)]
    assert [step for step, _ in evaluations[0]] == [2, 4, 6]
    assert [step for step, _ in evaluations[1]] == [2, 4, 6]
    for (_, expected), (_, actual) in zip(*evaluations):
        assert {k: v for k, v in expected.items() if k != "time"} == pytest.approx(
            {k: v for k, v in actual.items() if k != "time"})


def test_the_log_line_after_a_resume_covers_the_steps_of_a_run_never_stopped(tmp_path, shapes_root, tiny_overrides,
                                                                              monkeypatch):
    """Logs every 3 steps, checkpoints every 2: the resumed run's line at step 6 averages steps
    4 to 6, as the straight run's, not 5 and 6 only."""
    settings = ["run.log_every=3", "run.checkpoint_every=2", "eval.tasks=[]"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(load_recipe("demo", tiny_overrides(shapes_root, straight, steps=6) + settings), show_progress=False)
    recipe = load_recipe("demo", tiny_overrides(shapes_root, interrupted, steps=6) + settings)
    train_until_preempted(recipe, 4, monkeypatch)
    train(recipe, resume="latest", show_progress=False)
    timings = {"samples_per_second", "samples_per_second_per_rank", "step_seconds", "data/wait_seconds",
               "data/wait_fraction"}
    lines = [[{k: v for k, v in r.items() if k not in timings} for r in read_history(d) if "loss" in r]
             for d in (straight, interrupted)]
    assert [r["step"] for r in lines[0]] == [3, 6] and lines[0] == lines[1]


def _sigterm_at(steps: set[int], monkeypatch: pytest.MonkeyPatch, times: int = 1) -> None:
    """Send this process SIGTERM ``times`` times during each of ``steps``, as a scheduler does."""
    import os
    import signal

    from openalign.train import loop

    done = []
    original = loop.train_step

    def step_then_signal(*args, **kwargs):
        loss = original(*args, **kwargs)
        done.append(1)
        if len(done) in steps:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(loop, "train_step", step_then_signal)


def test_sigterm_checkpoints_the_step_it_stops_after_and_the_run_resumes_exactly(tmp_path, shapes_root,
                                                                                  tiny_overrides, monkeypatch):
    """A preempted run lost every step since its last periodic checkpoint (up to run.checkpoint_every,
    hours at scale): SIGTERM now lets the step finish, checkpoints it, and raises Terminated."""
    import signal

    from openalign.errors import Terminated

    settings = STOCHASTIC + ["run.checkpoint_every=4", "eval.tasks=[]"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(load_recipe("demo", tiny_overrides(shapes_root, straight, steps=6) + settings), show_progress=False)
    recipe = load_recipe("demo", tiny_overrides(shapes_root, interrupted, steps=6) + settings)
    before = signal.getsignal(signal.SIGTERM)
    _sigterm_at({3}, monkeypatch)
    with pytest.raises(Terminated, match=r"^after step 3, checkpointed in .*step_00000003: --resume latest continues"):
        train(recipe, show_progress=False)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler only while the loop runs
    from openalign.cli import main

    assert main(["train", "no-such-recipe"]) == 2  # a later command's error is its own, not 'terminated'
    assert [p.name for p in (interrupted / "checkpoints").iterdir()] == ["step_00000003"]
    monkeypatch.undo()
    result = train(recipe, resume="latest", show_progress=False)
    assert result.step == 6
    expected, actual = _state(straight), _state(interrupted)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    losses = [[r["loss"] for r in read_history(d) if "loss" in r] for d in (straight, interrupted)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_sigterm_at_the_last_step_twice_after_it_or_before_an_error_stops_as_asked(tmp_path, shapes_root,
                                                                                    tiny_overrides, monkeypatch,
                                                                                    capsys):
    """At the last step: its checkpoint, and no final evaluation (a resume evaluates only). Twice (under
    Slurm and torchrun each rank gets the scheduler's copy and torchrun's): one stop, as for one; a
    second had stopped at once, without a checkpoint. After the last agreement: passed on to the
    handler that was there before (the command line's raises), as during the final evaluation.
    Before an error: the error (a diverged loss), not 'terminated', which hid it."""
    import signal

    from openalign.cli import main
    from openalign.errors import Terminated
    from openalign.train.stop import StopOnSigterm

    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path / "last", steps=4))
    _sigterm_at({4}, monkeypatch)
    with pytest.raises(Terminated, match="after step 4, checkpointed in"):
        train(recipe, show_progress=False)
    assert not any("shapes/" in key for record in read_history(tmp_path / "last") for key in record)
    monkeypatch.undo()
    assert train(recipe, resume="latest", show_progress=False).metrics  # the evaluation it stopped before

    _sigterm_at({3}, monkeypatch, times=2)
    with pytest.raises(Terminated, match="after step 3, checkpointed in"):
        train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path / "twice", steps=4)), show_progress=False)
    monkeypatch.undo()

    class AtOnce(Exception):
        pass

    def at_once(signum, frame):
        raise AtOnce()

    agreed = StopOnSigterm.agreed

    def signalled_after_the_last(self, wait=False):
        stop = agreed(self, wait)
        if wait:
            os.kill(os.getpid(), signal.SIGTERM)
        return stop

    monkeypatch.setattr(StopOnSigterm, "agreed", signalled_after_the_last)
    before = signal.signal(signal.SIGTERM, at_once)
    try:
        with pytest.raises(AtOnce):
            train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path / "after", steps=2)), show_progress=False)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not any("shapes/" in key for record in read_history(tmp_path / "after") for key in record)
    monkeypatch.undo()

    _sigterm_at({3}, monkeypatch)
    settings = ["train.lr=1e8", "run.log_every=1000", "run.checkpoint_every=1000"]  # found at the stop's check only
    assert main(["train", "demo", *tiny_overrides(shapes_root, tmp_path / "nan", steps=6), *settings]) == 2
    assert "NaN or infinite within the 3 step(s) up to step 3" in " ".join(capsys.readouterr().err.split())


def test_sigterm_to_the_whole_process_group_with_loader_workers_still_checkpoints(tmp_path, shapes_root,
                                                                                  tiny_overrides):
    """torchrun and schedulers signal a rank's whole process group: its loader workers, which SIGTERM
    used to end, then made the rank fail in the middle of the step it was to finish. They now end
    only when their own process says so."""
    import os
    import signal
    import subprocess
    import sys

    output = tmp_path / "run"
    overrides = tiny_overrides(shapes_root, output, steps=100000) + [
        "data.num_workers=2", "run.checkpoint_every=100000", "eval.tasks=[]"]
    process = subprocess.Popen([sys.executable, "-m", "openalign", "train", "demo", *overrides], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "COLUMNS": "300"})
    try:
        deadline = time.monotonic() + 300
        while len(read_history(output)) < 3:  # some steps done: the workers are running
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stopped = re.search(r"terminated \(SIGTERM\) after step (\d+), checkpointed in (\S+): --resume latest", err)
    assert process.returncode == 143 and stopped and "Traceback" not in err, err
    checkpoint = Path(stopped[2])
    assert checkpoint.name == f"step_{int(stopped[1]):08d}" and checkpoint.parent == output / "checkpoints"
    assert (checkpoint / "trainer_state.pt").is_file() and (checkpoint / "data_rank0.json").is_file()


def test_resume_latest_without_checkpoints_starts_from_scratch(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", 3, DistributedContext(0, 1, 0, torch.device("cpu")))
    assert checkpointer.resolve("latest") is None
    with pytest.raises(OpenAlignError, match="neither 'latest', a checkpoint directory"):
        checkpointer.resolve(str(tmp_path / "nowhere"))


def test_incomplete_checkpoints_are_ignored_with_a_warning_and_old_ones_pruned(tmp_path, caplog):
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    checkpointer = Checkpointer(tmp_path, keep=2, ctx=ctx)
    model = openalign.create_model("align-test")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = openalign.losses.ContrastiveLoss()
    for step in (1, 2, 3):
        checkpointer.save(step, model, optimizer, scheduler, loss, {"note": "test"})
    (tmp_path / ".step_00000009.tmp").mkdir()  # a save that crashed half-way
    (tmp_path / "step_00000010").mkdir()  # a directory without trainer state
    assert [p.name for p in checkpointer.checkpoints()] == ["step_00000002", "step_00000003"]
    with caplog.at_level("WARNING"):
        assert checkpointer.resolve("latest").name == "step_00000003"
    assert "passes over step_00000010" in caplog.text and "(incomplete: damaged" in caplog.text
    shutil.copytree(tmp_path / "step_00000003", tmp_path / "step_00000003.bak")  # an operator's backup copy
    shutil.copytree(tmp_path / "step_00000002", tmp_path / "step_100000000")  # a step past 8 digits
    assert checkpointer.resolve("latest").name == "step_100000000"  # by number, not by name; the copy is no step
    checkpointer.save(4, model, optimizer, scheduler, loss, {"note": "test"})
    assert [p.name for p in checkpointer.checkpoints()] == ["step_00000004", "step_100000000"]
    assert (tmp_path / "step_00000003.bak").is_dir()  # not pruned either
    # a prune stopped halfway through deleting a checkpoint: it had been renamed first, so the next prune
    # finishes it, where a step folder left without its state would never have been pruned
    (tmp_path / ".step_00000001.deleting").mkdir()
    (tmp_path / ".step_00000001.deleting" / "model.safetensors").write_bytes(b"weights")
    checkpointer.save(5, model, optimizer, scheduler, loss, {"note": "test"})
    assert [p.name for p in checkpointer.checkpoints()] == ["step_00000005", "step_100000000"]
    assert not list(tmp_path.glob(".*.deleting")) and not (tmp_path / "step_00000004").exists()


def test_loading_weights_of_another_architecture_lists_the_offending_keys(trained_run):
    output, _ = trained_run
    with pytest.raises(OpenAlignError, match=r"does not fit this model \(.*wrong shape: .*another architecture"):
        load_weights(openalign.create_model("align-tiny"), output / "checkpoints" / "step_00000004" / WEIGHTS_FILE)


def test_a_run_starts_from_the_trained_model_train_init_from_names(trained_run, shapes_root, tmp_path, caplog):
    output, _ = trained_run
    source = load_checkpoint_model(output)
    recipe = load_recipe("demo", tiny_recipe_overrides(shapes_root, tmp_path / "tuned", steps=1) + [
        f"train.init_from={output}", "train.lr=1e-12", "eval.tasks=[]"])
    with caplog.at_level(logging.INFO, logger="openalign"):
        train(recipe, show_progress=False)
    assert f"from {output / 'checkpoints' / 'step_00000004' / WEIGHTS_FILE}" in caplog.text  # the run's latest
    tuned = load_checkpoint_model(tmp_path / "tuned")
    fresh = openalign.create_model("align-test")
    for (name, param), start in zip(tuned.named_parameters(), source.parameters()):
        torch.testing.assert_close(param, start, atol=1e-8, rtol=0, msg=name)  # one step at lr 1e-12
    assert not torch.allclose(fresh.text_projection.weight, source.text_projection.weight)
    other = load_recipe("demo", tiny_recipe_overrides(shapes_root, tmp_path / "other", steps=1) + [
        f"train.init_from={output}", "model.embed_dim=48", "eval.tasks=[]"])
    with pytest.raises(ConfigError, match=r"train.init_from' cannot initialise this model: .* does not fit this "
                                          r"model \(wrong shape: image_projection.weight \(32, 80\) \(model: \(48, "):
        train(other, show_progress=False)


def test_init_from_reads_weights_into_the_model_without_building_a_second_one(trained_run, tmp_path, monkeypatch):
    """From a Hugging Face AlignModel directory and from an openalign run. A second model would
    cost an L2-large run gigabytes of host memory on every rank, and its random start-up."""
    from openalign.models.dual_encoder import DualEncoder

    output, _ = trained_run
    torch.manual_seed(0)
    source = openalign.create_model("align-test", image_projection=False, embed_dim=80).eval()
    source.save_pretrained(tmp_path / "hf", format="hf")
    models = [openalign.create_model("align-test", image_projection=False, embed_dim=80),
              openalign.create_model("align-test")]
    real_init, built = DualEncoder.__init__, []
    monkeypatch.setattr(DualEncoder, "__init__", lambda self, config: built.append(config) or real_init(self, config))
    models[0].init_from(tmp_path / "hf")
    models[1].init_from(output)
    assert built == []
    for (name, value), expected in zip(models[0].state_dict().items(), source.state_dict().values()):
        torch.testing.assert_close(value, expected, msg=name)
    torch.testing.assert_close(models[1].text_projection.weight, load_checkpoint_model(output).text_projection.weight)
    with pytest.raises(OpenAlignError, match=r"'.*hf' does not fit this model \(missing: image_projection.weight"):
        models[1].init_from(tmp_path / "hf")


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model.safetensors", "rng_rank0.pt", "config.yaml",
                                     "data_rank0.json"])
def test_resuming_a_damaged_checkpoint_names_it_and_the_one_to_fall_back_on(trained_run, tmp_path, shapes_root,
                                                                           damaged):
    import shutil

    output, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(output, run)
    file = run / "checkpoints" / "step_00000004" / damaged
    data = file.read_bytes()
    file.write_bytes(b"model: {unclosed" if damaged.endswith(".yaml") else data[:min(100, len(data) // 2)])  # cut short
    recipe = load_recipe("demo", tiny_recipe_overrides(shapes_root, run))
    with pytest.raises(OpenAlignError, match=rf"checkpoint '.*step_00000004' is damaged: .*{damaged}.*; delete "
                                             r".*step_00000004 to resume from .*step_00000002"):
        train(recipe, resume="latest", show_progress=False)


def test_a_checkpoint_without_this_ranks_rng_file_resumes_and_says_which_file(trained_run, tmp_path, shapes_root,
                                                                                caplog):
    """The warning blamed a change in the number of ranks that did not happen."""
    output, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(output, run)
    (run / "checkpoints" / "step_00000004" / "rng_rank0.pt").unlink()
    with caplog.at_level("WARNING"):
        result = train(load_recipe("demo", tiny_recipe_overrides(shapes_root, run, steps=5)), resume="latest",
                       show_progress=False)
    assert result.step == 5 and "has no rng_rank0.pt: this rank's dropout RNG starts afresh" in caplog.text
    assert "was written by" not in caplog.text


def test_a_saved_config_cut_at_a_line_break_is_damaged_not_filled_with_defaults(trained_run, tmp_path, shapes_root):
    """YAML cut at a line break is still YAML: without its closing line, a checkpoint's recipe or a
    model directory's config would load with the missing settings at their defaults."""
    output, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(output, run)
    for step in ("step_00000002", "step_00000004"):
        config = run / "checkpoints" / step / "config.yaml"
        lines = config.read_text().splitlines(keepends=True)
        assert lines[-1] == "# end\n" and len(lines) > 20
        config.write_text("".join(lines[:len(lines) // 2]))
    recipe = load_recipe("demo", tiny_recipe_overrides(shapes_root, run))
    with pytest.raises(OpenAlignError, match=r"checkpoint '.*step_00000004' is damaged: .*config.yaml' is cut short: "
                                             r"its last line, '# end', is missing"):
        train(recipe, resume="latest", show_progress=False)
    model_dir = tmp_path / "model"
    openalign.load_pretrained(str(output))[0].save_pretrained(model_dir, format="openalign")
    lines = (model_dir / "config.yaml").read_text().splitlines(keepends=True)
    (model_dir / "config.yaml").write_text("".join(lines[:-3]))
    with pytest.raises(OpenAlignError, match="config.yaml' is cut short"):
        openalign.load_pretrained(str(model_dir))
    (model_dir / "config.yaml").write_text("".join(lines[1:-3]))  # no opening line: hand-written, read as it is
    openalign.load_pretrained(str(model_dir))
    (model_dir / "config.yaml").write_text("".join(lines) + "# a note added after the end\n")
    openalign.load_pretrained(str(model_dir))


@pytest.mark.parametrize("damaged, content", [("trainer_state.pt", {"foo": 1}), ("rng_rank0.pt", [1, 2]),
                                              ("data_rank0.json", []), ("data_rank0.json", {"foo": 1})])
def test_resuming_a_checkpoint_file_of_another_structure_names_it(trained_run, tmp_path, shapes_root, damaged,
                                                                   content):
    import json
    import shutil

    output, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(output, run)
    file = run / "checkpoints" / "step_00000004" / damaged
    if damaged.endswith(".json"):
        file.write_text(json.dumps(content))
    else:
        torch.save(content, file)  # a valid torch file, but no trainer state: KeyError/TypeError deep in resume before
    recipe = load_recipe("demo", tiny_recipe_overrides(shapes_root, run))
    with pytest.raises(OpenAlignError, match=rf"checkpoint '.*step_00000004' is damaged: '{damaged}' does not hold"):
        train(recipe, resume="latest", show_progress=False)


def test_a_run_restarted_from_step_0_replaces_the_abandoned_history_with_a_warning(tmp_path, caplog):
    from openalign.train.logger import TrainLogger

    earlier = TrainLogger(tmp_path, enabled=True, tensorboard=False)  # killed before its first checkpoint
    earlier.log(1, {"loss": 1.0})
    earlier.log(2, {"loss": 1.0})
    earlier.close()
    restarted = TrainLogger(tmp_path, enabled=True, tensorboard=False, start_step=0)
    restarted.log(1, {"loss": 0.5})
    restarted.close()
    assert read_history(tmp_path) == [{"step": 1, "loss": 0.5}]
    assert "replacing 2 logged record(s) after step 0 of an earlier run" in caplog.text


def test_a_resume_stopped_while_it_rewrites_the_history_leaves_the_old_one_whole(tmp_path, monkeypatch):
    """The kept records were written into the history opened for writing, which emptied it first: a
    SIGTERM in that window (a resume setting up) lost every logged record."""
    from openalign.train import logger
    from openalign.train.logger import HISTORY_FILE, TrainLogger

    earlier = TrainLogger(tmp_path, enabled=True, tensorboard=False)
    for step in (1, 2, 3):
        earlier.log(step, {"loss": 1.0 / step})
    earlier.close()
    before = (tmp_path / HISTORY_FILE).read_bytes()
    dumps, calls = logger.json.dumps, []

    def stopped(record, *args, **kwargs):
        calls.append(record)
        if len(calls) == 2:  # the second kept record: a SIGTERM arrives
            raise KeyboardInterrupt
        return dumps(record, *args, **kwargs)

    monkeypatch.setattr(logger.json, "dumps", stopped)
    with pytest.raises(KeyboardInterrupt):
        TrainLogger(tmp_path, enabled=True, tensorboard=False, start_step=2)
    monkeypatch.undo()
    assert (tmp_path / HISTORY_FILE).read_bytes() == before and len(calls) == 2
    assert [path.name for path in tmp_path.iterdir()] == [HISTORY_FILE]  # no temporary file left behind
    resumed = TrainLogger(tmp_path, enabled=True, tensorboard=False, start_step=2)
    resumed.log(3, {"loss": 0.25})
    resumed.close()
    assert read_history(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]


def test_tensorboard_after_a_resume_reads_as_one_run_keeping_the_checkpoint_steps_records(tmp_path):
    """Resumed from a checkpoint at step 2, the run replaces steps 3 and on; step 2's loss and the
    evaluation logged at it belong to the checkpoint and stay, in TensorBoard as in the history."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from openalign.train.logger import TrainLogger

    first = TrainLogger(tmp_path, enabled=True, tensorboard=True)
    for step in range(1, 5):
        first.log(step, {"loss": float(step)})
    first.log(2, {"eval/acc1": 0.5})
    first.close()
    # a resumed run starts later, in another process: TensorBoard orders event files by name, whose
    # time is in seconds and whose per-process counter sorts as text (writer 10 before writer 9)
    time.sleep(1.1)
    resumed = TrainLogger(tmp_path, enabled=True, tensorboard=True, start_step=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/acc1")] == [(2, 0.5)]


def test_evaluation_data_that_does_not_exist_is_an_error_before_the_first_step(tmp_path, shapes_root,
                                                                                tiny_overrides):
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + [
        f"eval.tasks=[{{task: shapes, root: '{shapes_root}'}}, {{task: knn, train_root: '{shapes_root}', "
        f"val_root: '{tmp_path / 'no' / 'val'}'}}, {{task: retrieval, json: '{tmp_path / 'coco.json'}'}}]"])
    with pytest.raises(ConfigError, match=r"eval.tasks' cannot run: eval.tasks\[1\].val_root: "
                                          r".*no/val does not exist; eval.tasks\[2\].json: .*coco.json does not exist$"):
        train(recipe, show_progress=False)
    assert not (tmp_path / "checkpoints").exists()
    # a task the model cannot take is found now too (sentence pairs need rendered text), not at the first evaluation
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + [
        f"eval.tasks=[{{task: sentence_pairs, train: '{tmp_path}/sst.tsv', val: '{tmp_path}/sst.tsv'}}]"])
    with pytest.raises(ConfigError, match=r"cannot run: eval.tasks\[0\] \(sentence_pairs\): sentence-pair fine-tuning "
                                          r"needs a model that reads rendered text"):
        train(recipe, show_progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_evaluation_data_that_cannot_be_used_is_an_error_before_the_first_step(tmp_path, shapes_root,
                                                                                tiny_overrides):
    """Class names, prompts, caption lists and class folders are read at the start, not at the first evaluation."""
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "bird"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    (tmp_path / "names.txt").write_text("a cat\na dog\na bird\n")  # three names for two folders
    (tmp_path / "prompts.txt").write_text("a photo\n")  # no {} for the class name
    (tmp_path / "coco.json").write_text('{"images": "none"}')
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + [
        f"eval.tasks=[{{task: shapes, root: '{shapes_root}'}}, "
        f"{{task: zeroshot, root: '{tmp_path / 'train'}', classnames: '{tmp_path / 'names.txt'}'}}, "
        f"{{task: zeroshot, root: '{tmp_path / 'train'}', templates_file: '{tmp_path / 'prompts.txt'}'}}, "
        f"{{task: knn, train_root: '{tmp_path / 'train'}', val_root: '{tmp_path / 'val'}'}}, "
        f"{{task: retrieval, json: '{tmp_path / 'coco.json'}'}}, {{task: shapes, root: '{tmp_path / 'train'}'}}]",
        "eval.names=[shapes, zeroshot_1, zeroshot_2, knn, retrieval, shapes_2]"])
    with pytest.raises(ConfigError) as raised:
        train(recipe, show_progress=False)
    problems = re.split(r"; (?=eval\.tasks\[)", str(raised.value))
    assert len(problems) == 5
    assert problems[4].startswith("eval.tasks[5] (shapes): ") and "is not a shapes dataset" in problems[4]
    assert "eval.tasks[1] (zeroshot): " in problems[0] and "3 class names" in problems[0]
    assert problems[1].startswith("eval.tasks[2] (zeroshot): templates must each hold '{}'")
    assert problems[2].startswith("eval.tasks[3] (knn): ") and "other split lacks: bird" in problems[2]
    assert problems[3].startswith("eval.tasks[4] (retrieval): ")
    assert not (tmp_path / "checkpoints").exists()


def test_batch_that_does_not_fill_ghost_batches_is_a_config_error(tmp_path, shapes_root, tiny_overrides):
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + ["train.batch_size=10"])
    with pytest.raises(ConfigError, match="not a multiple of the ghost batch norm's virtual_batch_size=4"):
        train(recipe, show_progress=False)


def test_adamw_with_cosine_schedule_logs_the_rate_each_step_used(tmp_path, shapes_root, tiny_overrides):
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=4) + [
        "train.optimizer=adamw", "train.lr=0.01", "train.schedule=cosine", "train.warmup_steps=1",
        "train.grad_clip=1.0", "eval.tasks=[]"])
    result = train(recipe, show_progress=False)
    assert result.step == 4 and result.metrics == {}
    logged = [r["lr"] for r in read_history(tmp_path) if "loss" in r]
    # warm-up 1 step from 0, then cosine over the remaining 3: 0.01 · (1 + cos(π·t/3)) / 2 at t = 0, 1, 2
    assert logged == pytest.approx([0.0, 0.01, 0.0075, 0.0025])


def test_grad_clip_bounds_the_global_gradient_norm():
    torch.manual_seed(0)
    model = openalign.create_model("align-test", image={"virtual_batch_size": None})
    tokens = openalign.get_tokenizer("align-test")(["a red circle", "a blue square", "a star", "a cross"])
    batch = {"image": torch.randn(4, 3, 32, 32), "text": tokens}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)
    train_step(model, openalign.losses.ContrastiveLoss(), sgd, scheduler, batch, torch.device("cpu"), "fp32",
               grad_clip=1e-3)
    moved = torch.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in model.named_parameters()))
    assert moved == pytest.approx(1e-3, rel=1e-3)  # plain SGD at lr 1 moves by exactly the clipped norm


def test_fp16_scales_the_loss_and_skips_a_step_whose_scaled_gradient_overflows():
    """fp16 training (GPUs without bf16): the loss is scaled for the backward pass and the gradient
    unscaled before clipping, so the step is the same; at a scale where the gradient overflows,
    the weights stay, the scale halves and the loss is returned as it was (not a divergence)."""
    from openalign.precision import autocast_dtype, gradient_scaler

    cpu = torch.device("cpu")
    assert not gradient_scaler(cpu, "bf16").is_enabled() and autocast_dtype(cpu, "fp16") == torch.float16
    torch.manual_seed(0)
    model = openalign.create_model("align-test", image={"virtual_batch_size": None})
    tokens = openalign.get_tokenizer("align-test")(["a red circle", "a blue square", "a star", "a cross"])
    batch = {"image": torch.randn(4, 3, 32, 32), "text": tokens}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def step(scale: float | None, grad_clip: float | None = 1e-3) -> tuple[torch.Tensor, object]:
        model.load_state_dict(before, strict=False)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        loss = train_step(model, openalign.losses.ContrastiveLoss(), sgd, scheduler, batch, cpu, "fp16",
                          grad_clip=grad_clip, scaler=scaler)
        return loss, scaler

    step(None)  # fp16 autocast without a scaler: the reference step
    unscaled = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss, scaler = step(2.0 ** 10)
    for name, p in model.named_parameters():  # the same step: the scale is undone before clipping
        torch.testing.assert_close(p.detach(), unscaled[name], rtol=1e-4, atol=1e-6)
    assert scaler.get_scale() == 2.0 ** 10 and torch.isfinite(loss)
    loss, scaler = step(2.0 ** 127, grad_clip=None)  # 2^127 × the loss's gradient overflows float32
    assert all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
    assert scaler.get_scale() == 2.0 ** 126 and torch.isfinite(loss)
    # a gradient NaN at every step: skipped steps halve the scale; below 1, the loss reads NaN (a divergence)
    model.load_state_dict(before, strict=False)
    model.text_projection.weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    losses = [train_step(model, openalign.losses.ContrastiveLoss(), sgd, scheduler, batch, cpu, "fp16", scaler=scaler)
              for _ in range(3)]
    assert [bool(torch.isnan(loss)) for loss in losses] == [False, False, True] and scaler.get_scale() == 0.5


def test_the_logit_scale_cap_holds_the_parameter_and_lets_the_loss_lower_the_scale():
    import math

    torch.manual_seed(0)
    model = openalign.create_model("align-test", image={"virtual_batch_size": None}, temperature_init=0.1,
                                   max_logit_scale=20.0)
    tokens = openalign.get_tokenizer("align-test")(["a red circle", "a blue square"])
    batch = {"image": torch.randn(2, 3, 32, 32), "text": tokens}
    adam = torch.optim.Adam([model.log_temperature], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adam, lambda step: 1.0)

    def step(sign: float) -> None:
        train_step(model, lambda logit_scale, **_: sign * logit_scale, adam, scheduler, batch,
                   torch.device("cpu"), "fp32")

    for _ in range(5):  # raising the scale from 10 by ~0.5 in log per step: the parameter stops at the cap
        step(-1.0)
        assert model.log_temperature.item() >= -math.log(20.0) - 1e-6
    assert model.logit_scale.item() == pytest.approx(20.0)
    for _ in range(20):  # against Adam's upward momentum, a loss that lowers the scale moves it off the cap
        step(+1.0)
    assert model.logit_scale.item() < 19.0
    floored = openalign.create_model("alip-tiny")  # ALIP, as open_clip, keeps the scale within [1, 100]
    assert (floored.config.min_logit_scale, floored.config.max_logit_scale) == (1.0, 100.0)
    with torch.no_grad():
        floored.log_temperature.fill_(0.5)  # a scale of 0.61
    floored.constrain_parameters()
    assert floored.logit_scale.item() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="min_logit_scale' must be positive and at most 1 / temperature_init"):
        openalign.create_model("alip-tiny", min_logit_scale=20.0)


def test_a_second_run_in_a_run_directory_in_use_is_refused(tmp_path, shapes_root, tiny_overrides):
    """Two runs in one run.output_dir would interleave their checkpoints and history lines; a demo
    started where one runs would delete its checkpoints. A refused run leaves no folder behind."""
    import subprocess
    import sys

    from openalign.demo import DEMO_MARKER, run_demo
    from openalign.files import LOCK_FILE

    holder = subprocess.Popen(  # another process running in the directory
        [sys.executable, "-c", "import time; from pathlib import Path; from openalign.files import held_directory\n"
         f"with held_directory(Path({str(tmp_path / 'run')!r}), 'run.output_dir'):\n"
         "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "run" / "checkpoints" / "step_00000005").mkdir(parents=True)  # the other run's
        recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path / "run", steps=2) + ["eval.tasks=[]"])
        with pytest.raises(OpenAlignError, match=r"run.output_dir '.*run' is in use by another openalign run "
                                                 rf"\(process {holder.pid} on .*\): wait for it to finish"):
            train(recipe, resume="latest", show_progress=False)
        (tmp_path / "run" / DEMO_MARKER).write_text("")  # a demo's folder: a second demo would start it afresh
        with pytest.raises(OpenAlignError, match="--out '.*run' is in use by another openalign run"):
            run_demo(tmp_path / "run", ("model.name=align-test",), show_progress=False)
        assert (tmp_path / "run" / "checkpoints" / "step_00000005").is_dir()  # not deleted by the demo
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "run" / "checkpoints" / "step_00000005").rmdir()
    assert train(recipe, show_progress=False).step == 2  # released with the process that held it
    # a refused run (a --resume that names nothing) leaves no new folder behind
    with pytest.raises(OpenAlignError, match="neither 'latest'"):
        train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path / "new")), resume=str(tmp_path / "nothing"),
              show_progress=False)
    assert not (tmp_path / "new").exists() and (tmp_path / "run" / LOCK_FILE).is_file()


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from openalign.files import held_directory

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre without flock, some FUSE mounts

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with held_directory(tmp_path / "run", "run.output_dir"):
        pass
    assert "cannot lock" in caplog.text and "nothing stops a second run from using run.output_dir" in caplog.text


def test_a_run_that_raised_holds_its_directory_no_longer_though_its_loader_workers_live(tmp_path, shapes_root,
                                                                                       tiny_overrides, monkeypatch):
    """The lock is the process's: DataLoader workers forked during the run, which a kept traceback
    keeps alive, do not hold it (an flock, shared with them, stayed held)."""
    import subprocess
    import sys

    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path / "run") + ["data.num_workers=2",
                                                                                  "eval.tasks=[]"])
    def save_then_fail(*args):
        raise OpenAlignError("a full disk, say")

    monkeypatch.setattr(Checkpointer, "save", save_then_fail)
    with pytest.raises(OpenAlignError) as stopped:  # its traceback, kept, keeps the loader and its workers alive
        train(recipe, show_progress=False)
    probe = subprocess.run(
        [sys.executable, "-c", "from pathlib import Path; from openalign.files import held_directory\n"
         f"with held_directory(Path({str(tmp_path / 'run')!r}), 'run.output_dir'): print('held')"],
        capture_output=True, text=True)
    assert probe.stdout.strip() == "held", probe.stderr[-2000:]
    del stopped


def test_a_history_line_cut_short_is_dropped_on_resume_and_a_damaged_one_named(trained_run, tmp_path, shapes_root,
                                                                             tiny_overrides, caplog):
    output, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(output, run)
    history = (run / "history.jsonl").read_text()
    (run / "history.jsonl").write_text(history[:-30])  # the last record, cut by a full disk or a stop
    assert len(read_history(run)) == len(history.splitlines()) - 1 and "is cut short" in caplog.text
    (run / "history.jsonl").write_text("{not json\n" + history)
    with pytest.raises(OpenAlignError, match=r"history.jsonl' is damaged at line 1 .*delete that line, or the file"):
        train(load_recipe("demo", tiny_overrides(shapes_root, run, steps=5)), resume="latest", show_progress=False)


def test_resuming_with_fewer_ranks_carries_every_ranks_skip_counts(trained_run, tmp_path, shapes_root, tiny_overrides,
                                                                   caplog):
    """A checkpoint of two ranks resumed by one: the totals go on from both ranks' counts (rank 1's
    were dropped), and the warning says what starts afresh."""
    import json

    output, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(output, run)
    checkpoint = run / "checkpoints" / "step_00000004"
    state = json.loads((checkpoint / "data_rank0.json").read_text())
    for rank, skipped in ((0, 3), (1, 4)):
        (checkpoint / f"data_rank{rank}.json").write_text(json.dumps(
            {**state, "world_size": 2, "counts": {"skipped/undecodable image": skipped}}))
    trainer_state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    torch.save({**trainer_state, "world_size": 2}, checkpoint / "trainer_state.pt")
    result = train(load_recipe("demo", tiny_overrides(shapes_root, run, steps=5)), resume="latest", show_progress=False)
    assert result.data_counts.get("skipped/undecodable image") == 7
    assert "was written by 2 ranks, now 1: the dropout RNG starts afresh" in caplog.text


def test_a_fresh_run_refuses_an_output_dir_holding_checkpoints(trained_run, shapes_root, tiny_overrides):
    output, _ = trained_run
    with pytest.raises(OpenAlignError, match=r"already holds checkpoints .*step_00000004.*--resume latest"):
        train(load_recipe("demo", tiny_overrides(shapes_root, output)), show_progress=False)


def test_a_run_refuses_an_output_dir_holding_a_saved_model(tmp_path, shapes_root, tiny_overrides):
    saved = openalign.create_model("align-tiny").save_pretrained(tmp_path / "saved")
    before = (saved / "config.yaml").read_text()
    with pytest.raises(OpenAlignError, match=r"holds a saved model \(model.safetensors\).*replace its config.yaml"):
        train(load_recipe("demo", tiny_overrides(shapes_root, saved)), show_progress=False)
    assert (saved / "config.yaml").read_text() == before
    # a file on the way is a config error naming the key, not the OS's 'File exists'
    (tmp_path / "picture.jpg").write_bytes(b"")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for output, blocking in (("picture.jpg", "a file"), ("picture.jpg/run", "a file"), ("gone", "a broken symbolic")):
        with pytest.raises(ConfigError, match=f"'run.output_dir' is '.*{output}', but '.*' is {blocking}"):
            train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path / output)), show_progress=False)


def test_a_resume_takes_the_recipes_loss_scale_growth_interval(tmp_path, shapes_root, tiny_overrides):
    """The scaler's saved state holds its growth interval: a permitted change (or a checkpoint from
    before the setting) must not leave the run on the checkpoint's, while saying it uses the new one."""
    fp16 = ["eval.tasks=[]", "train.precision=fp16"]
    train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=1) + fp16), show_progress=False)
    more = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=2) + fp16 + [
        "train.loss_scale_growth_interval=1"])
    train(more, resume="latest", show_progress=False, allow_changes=["train.loss_scale_growth_interval"])
    saved = torch.load(tmp_path / "checkpoints" / "step_00000002" / "trainer_state.pt")["scaler"]
    assert saved["growth_interval"] == 1


def test_resume_refuses_a_changed_recipe_but_allows_more_steps(tmp_path, shapes_root, tiny_overrides, caplog):
    train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=2) + ["eval.tasks=[]"]), show_progress=False)
    changed = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=2) + ["eval.tasks=[]", "train.lr=0.5"])
    with pytest.raises(OpenAlignError, match=r"recipe differs .*train.lr: [0-9.e-]+ -> 0.5"):
        train(changed, resume="latest", show_progress=False)
    # values as a recipe writes them, not Python's reprs (None)
    ema = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=2) + ["eval.tasks=[]", "train.ema_decay=0.9"])
    with pytest.raises(OpenAlignError, match=r"recipe differs .*train.ema_decay: null -> 0.9\)"):
        train(ema, resume="latest", show_progress=False)
    with caplog.at_level("WARNING"), pytest.raises(OpenAlignError, match=r"recipe differs .*train.lr"):
        train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=2) + [
            "eval.tasks=[]", "train.lr=0.5", "train.weight_decay=0.5"]), resume="latest", show_progress=False,
            allow_changes=["train.weight_decay"])
    assert "resuming with" not in caplog.text  # no word of a change allowed, for a resume refused
    # the weights a fresh run starts from, which a resume does not read, may change (a path moved, say)
    longer = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=3) + [
        "eval.tasks=[]", "run.log_every=3", f"train.init_from={tmp_path / 'elsewhere'}"])
    with caplog.at_level("WARNING"):
        assert train(longer, resume="latest", show_progress=False).step == 3
    assert "train.steps changed from 2 to 3" in caplog.text
    shorter = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=2) + ["eval.tasks=[]"])
    with pytest.raises(OpenAlignError, match=r"\(step 3\) with train.steps=2: set train.steps to at least 3"):
        train(shorter, resume="latest", show_progress=False)


def test_a_dataset_moved_to_another_path_resumes_exactly_when_the_change_is_allowed(tmp_path, shapes_root,
                                                                                    tiny_overrides, monkeypatch,
                                                                                    caplog):
    """A job that stages its data to a per-job scratch path was refused on resume (data.train.root
    changed), and init_from, the only way on, loses the optimiser and the schedule; --allow-change
    data.train.root resumes it, exactly, with a warning."""
    from openalign.cli import main

    settings = ["eval.tasks=[]", "run.checkpoint_every=2"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(load_recipe("demo", tiny_overrides(shapes_root, straight, steps=4) + settings), show_progress=False)
    train_until_preempted(load_recipe("demo", tiny_overrides(shapes_root, interrupted, steps=4) + settings), 2,
                          monkeypatch)
    moved = tmp_path / "scratch" / "shapes"
    shutil.copytree(shapes_root, moved)
    recipe = load_recipe("demo", tiny_overrides(moved, interrupted, steps=4) + settings)
    with pytest.raises(OpenAlignError, match=r"data.train.root: .* -> .*scratch/shapes\".*pass --allow-change "
                                             r"data.train.root;.*train.init_from=.*step_00000002 "):
        train(recipe, resume="latest", show_progress=False)
    with pytest.raises(OpenAlignError, match=r"--allow-change 'data.train.rot' names no setting of this recipe"):
        train(recipe, resume="latest", show_progress=False, allow_changes=["data.train.rot"])
    with pytest.raises(OpenAlignError, match="applies to a resumed run: pass --resume too"):
        train(recipe, show_progress=False, allow_changes=["data.train.root"])
    with caplog.at_level("WARNING"):
        assert main(["train", "demo", *tiny_overrides(moved, interrupted, steps=4), *settings, "--resume", "latest",
                     "--allow-change", "data.train"]) == 0
    assert "resuming with data.train.root changed from" in caplog.text
    for key, value in _state(straight).items():
        assert torch.equal(value, _state(interrupted)[key]), key
    assert [r["loss"] for r in read_history(straight)] == [r["loss"] for r in read_history(interrupted)]


@pytest.mark.parametrize("optimizer, schedule", [("lamb", "linear"), ("adamw", "onecycle")])
def test_a_learning_rate_and_weight_decay_changed_on_resume_apply_from_the_next_step(tmp_path, shapes_root,
                                                                                    tiny_overrides, optimizer,
                                                                                    schedule, monkeypatch):
    """--allow-change train.lr was accepted, then the optimiser state brought the old rate back
    (and the old weight decay): the new ones now apply, on the schedule's same position."""
    from openalign.train.schedule import lr_factor

    settings = ["eval.tasks=[]", "run.checkpoint_every=2", f"train.optimizer={optimizer}", f"train.schedule={schedule}",
                "train.warmup_steps=2"]
    run = tmp_path / "run"
    train_until_preempted(load_recipe("demo", tiny_overrides(shapes_root, run, steps=6) + settings), 2, monkeypatch)
    changed = ["train.lr=0.1", "train.weight_decay=0.5"]
    result = train(load_recipe("demo", tiny_overrides(shapes_root, run, steps=6) + settings + changed),
                   resume="latest", show_progress=False, allow_changes=["train.lr", "train.weight_decay"])
    assert result.step == 6
    logged = {r["step"]: r["lr"] for r in read_history(run) if "lr" in r}
    state = torch.load(run / "checkpoints" / "step_00000006" / "trainer_state.pt", weights_only=False)
    decays = sorted({group["weight_decay"] for group in state["optimizer"]["param_groups"]})
    assert decays == [0.0, 0.5]  # the decayed parameters' and the others'
    # the reference: the schedule on one parameter (torch's own OneCycleLR), at the old peak (the demo's 0.002)
    # for the steps before the checkpoint and at the new one after it
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    if schedule == "onecycle":
        assert max(group["max_lr"] for group in state["optimizer"]["param_groups"]) == 0.1
        scheduler = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.1, total_steps=6, pct_start=2 / 6)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(reference, lambda step: lr_factor(step, "linear", 2, 6))
    for step in range(1, 7):
        expected = reference.param_groups[0]["lr"] * (0.002 / 0.1 if step <= 2 else 1)
        assert logged[step] == pytest.approx(expected, rel=1e-6), (step, logged)
        reference.step()
        scheduler.step()


def test_a_checkpoint_older_than_a_setting_resumes_with_its_current_value(caplog):
    """An ALIP run checkpointed before model.min_logit_scale existed resumes with the floor, warned of;
    a setting that differs is still refused."""
    from openalign.train.checkpoint import check_resumable

    current = {"model": {"name": "alip-tiny", "min_logit_scale": 1.0, "max_logit_scale": 100.0}, "train": {"lr": 1.0}}
    saved = {"model": {"name": "alip-tiny", "max_logit_scale": 100.0}, "train": {"lr": 1.0}}
    with caplog.at_level("WARNING"):
        check_resumable(saved, current, Path("step_4"))
    assert "checkpoint 'step_4' predates the setting(s) model.min_logit_scale: the resumed run uses " \
           "model.min_logit_scale=1.0" in caplog.text
    with pytest.raises(OpenAlignError, match=r"model.max_logit_scale: 100.0 -> 50.0"):
        check_resumable(saved, {**current, "model": {**current["model"], "max_logit_scale": 50.0}}, Path("step_4"))


def test_an_allowed_section_permits_a_change_of_its_type(caplog):
    """--allow-change data.train vouches for the whole source: the old type's settings, which the new
    recipe no longer has, included (a table converted to shards mid-run); other sections stay checked."""
    from openalign.train.checkpoint import check_resumable

    saved = {"data": {"train": {"type": "shapes", "root": "/data/shapes"}}, "train": {"lr": 1.0}}
    current = {"data": {"train": {"type": "webdataset", "urls": "/data/{0..9}.tar"}}, "train": {"lr": 1.0}}
    with pytest.raises(OpenAlignError, match=r"data.train.root: \"/data/shapes\" -> null.*--allow-change data.train;"):
        check_resumable(saved, current, Path("step_4"))
    with caplog.at_level("WARNING"):
        check_resumable(saved, current, Path("step_4"), allowed=["data.train"])
    assert 'data.train.root changed from "/data/shapes" to null' in caplog.text and "predates" not in caplog.text
    with pytest.raises(OpenAlignError, match=r"train.lr: 1.0 -> 2.0"):
        check_resumable(saved, {**current, "train": {"lr": 2.0}}, Path("step_4"), allowed=["data.train"])


def test_a_diverged_loss_stops_training_before_it_is_checkpointed(tmp_path, shapes_root, tiny_overrides,
                                                                   monkeypatch):
    import openalign.train.loop as loop

    real_step, calls = loop.train_step, []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(loop, "train_step", diverging)
    # NaN from step 3; step 4 checkpoints without logging (log_every 5): the check runs there
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=6) + ["run.log_every=5", "eval.tasks=[]"])
    with pytest.raises(OpenAlignError, match=r"NaN or infinite within the 4 step\(s\) up to step 4: .*newest "
                                             r"checkpoint: .*step_00000002"):
        train(recipe, show_progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000002"]


@pytest.mark.parametrize("recipe, overrides, needed", [
    ("demo", ["loss={type: alip}"], "image_emb, text_emb, caption_emb, logit_scale"),
    ("alip-shapes", ["model.text_fields=[text]"], "image_emb, text_emb, caption_emb, logit_scale"),
    ("demo", ["model.text_fields=[text, caption]"], "image_emb, text_emb, logit_scale")])
def test_a_loss_that_does_not_take_the_models_outputs_is_a_config_error_before_training(
        tmp_path, recipe, overrides, needed):
    with pytest.raises(ConfigError, match=rf"'loss' the '\w+' loss takes {needed}, but the model gives .* set "
                                          r"model.text_fields"):
        train(load_recipe(recipe, [f"run.output_dir={tmp_path}", *overrides]), show_progress=False)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_an_infinite_gradient_under_a_finite_loss_stops_training_before_it_is_checkpointed(
        tmp_path, shapes_root, tiny_overrides, monkeypatch, grad_clip):
    """The update of a NaN or infinite gradient makes the weights NaN while the loss, computed
    before it, is finite: the run stops before checkpointing them, as for a NaN loss."""
    import openalign.train.loop as loop

    real_step, calls = loop.train_step, []

    def infinite_gradient(model, *args, **kwargs):
        calls.append(1)
        hook = model.text_projection.weight.register_hook(lambda grad: grad * float("inf")) if len(calls) == 3 \
            else None
        try:
            return real_step(model, *args, **kwargs)
        finally:
            if hook is not None:
                hook.remove()

    monkeypatch.setattr(loop, "train_step", infinite_gradient)
    overrides = ["run.log_every=5", "eval.tasks=[]", f"train.grad_clip={'null' if grad_clip is None else grad_clip}"]
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=6) + overrides)
    with pytest.raises(OpenAlignError, match=r"the loss \(or its gradient\) was NaN or infinite within the 4 step\(s\) "
                                             r"up to step 4: .*newest checkpoint: .*step_00000002"):
        train(recipe, show_progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000002"]


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "linear"])
def test_a_schedule_resumes_onto_a_longer_run(schedule):
    def scheduler(total: int) -> torch.optim.lr_scheduler.LRScheduler:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return build_scheduler(optimizer, schedule, 3, total)

    short, longer, fresh = scheduler(10), scheduler(20), scheduler(20)
    for _ in range(6):
        short.optimizer.step(), short.step(), fresh.optimizer.step(), fresh.step()
    longer.optimizer.load_state_dict(short.optimizer.state_dict())  # as a checkpoint restores them
    load_scheduler_state(longer, short.state_dict())
    for _ in range(14):  # past the old length, on the new one: as if built with 20 steps from the start
        # the rate and momentum each step uses, the first one after resuming included
        assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.optimizer.param_groups[0]["lr"])
        assert longer.optimizer.param_groups[0]["betas"] == pytest.approx(fresh.optimizer.param_groups[0]["betas"])
        for each in (longer, fresh):
            each.optimizer.step(), each.step()


def test_resuming_an_earlier_checkpoint_refuses_a_directory_with_later_ones(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=3, ctx=DistributedContext(0, 1, 0, torch.device("cpu")))
    model = openalign.create_model("align-test")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss, recipe = openalign.losses.ContrastiveLoss(), {"model": {"note": "test"}}
    for step in (2, 4):
        checkpointer.save(step, model, optimizer, scheduler, loss, recipe)
    with pytest.raises(OpenAlignError, match=r"holds later checkpoints \(step_00000004\) of another history"):
        checkpointer.resume(str(tmp_path / "step_00000002"), model, optimizer, scheduler, loss, recipe, 10)
    assert checkpointer.resume(str(tmp_path / "step_00000004"), model, optimizer, scheduler, loss, recipe, 10) == 4


def test_resuming_another_directorys_checkpoint_refuses_a_directory_with_checkpoints_of_its_own(tmp_path):
    """Its earlier checkpoints and history would be kept as the resumed run's: two runs mixed."""
    context = DistributedContext(0, 1, 0, torch.device("cpu"))
    model = openalign.create_model("align-test")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss, recipe = openalign.losses.ContrastiveLoss(), {"model": {"note": "test"}}
    other, here = Checkpointer(tmp_path / "other", 3, context), Checkpointer(tmp_path / "here", 3, context)
    other.save(4, model, optimizer, scheduler, loss, recipe)
    here.save(2, model, optimizer, scheduler, loss, recipe)
    with pytest.raises(OpenAlignError, match=r"holds checkpoints of another run \(step_00000002\)"):
        here.resume(str(tmp_path / "other" / "step_00000004"), model, optimizer, scheduler, loss, recipe, 10)
    fresh = Checkpointer(tmp_path / "fresh", 3, context)
    assert fresh.resume(str(tmp_path / "other" / "step_00000004"), model, optimizer, scheduler, loss, recipe, 10) == 4


def test_loading_a_directory_that_is_not_an_openalign_checkpoint_is_a_clear_error(tmp_path, trained_run):
    with pytest.raises(OpenAlignError, match="holds no openalign checkpoint"):
        load_checkpoint_model(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / WEIGHTS_FILE).write_bytes((trained_run[0] / "checkpoints" / "step_00000004" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(OpenAlignError, match=r"config.yaml' \(the recipe the checkpoint was trained with\) is "
                                             r"unreadable: .*No such file"):
        load_checkpoint_model(foreign)
    (foreign / "config.yaml").write_text("architectures: [AlignModel]\n")
    with pytest.raises(OpenAlignError, match="is not an openalign recipe"):
        load_checkpoint_model(foreign)


def _report_autocast(self, model, device, batch_size, show_progress):
    """An evaluation task's ``run`` that reports whether bf16 autocast is on where tasks open it."""
    from openalign.precision import autocast

    with autocast(device):
        return {"bf16": float(torch.is_autocast_enabled(device.type))}


def test_evaluation_runs_at_the_runs_precision_also_when_resuming_a_finished_run(tmp_path, shapes_root, tiny_overrides,
                                                                                 caplog, monkeypatch):
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=2) + ["train.precision=bf16",
                                                                                    "eval.every=1"])
    recipe.eval.tasks = recipe.eval.tasks[:1]
    monkeypatch.setattr(type(recipe.eval.tasks[0]), "run", _report_autocast)
    key = f"{recipe.eval.tasks[0].name}/bf16"
    assert train(recipe, show_progress=False).metrics == {key: 1.0}
    assert [r[key] for r in read_history(tmp_path) if key in r] == [1.0, 1.0]  # during training and at the end
    with caplog.at_level("INFO"):
        assert train(recipe, resume="latest", show_progress=False).metrics == {key: 1.0}
    assert "had already reached step 2: evaluating only" in caplog.text
    # the new final evaluation replaces the earlier one: the history reads as one run
    assert [(r["step"], "loss" in r) for r in read_history(tmp_path)] == [(1, True), (1, False), (2, True),
                                                                           (2, False)]


def test_evaluation_metrics_are_named_by_eval_names(shapes_root):
    """Two tasks of one type, a name each: neither's metrics replace the other's."""
    from openalign.recipe import EvalConfig
    from openalign.train.loop import evaluate

    task = {"task": "shapes", "root": str(shapes_root), "knn_memory_size": 8}
    config = from_dict(EvalConfig, {"tasks": [task, {**task, "knn_memory_size": 16}], "names": ["few", "more"]})
    metrics = evaluate(config, openalign.create_model("align-test"), DistributedContext(0, 1, 0, torch.device("cpu")),
                       show_progress=False)
    assert {"few/knn_shape_acc1", "more/knn_shape_acc1"} <= set(metrics)
    assert not any(key.startswith("shapes/") for key in metrics)


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_leaves_no_half(tmp_path, shapes_root, monkeypatch):
    """A full disk surfaced as safetensors' or torch.save's own traceback (exit 1), and the staging
    folder stayed on the full disk until a later run saved that same step."""
    from safetensors import SafetensorError

    from openalign.train import checkpoint

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    recipe = load_recipe("demo", tiny_recipe_overrides(shapes_root, tmp_path / "run") + ["eval.tasks=[]"])
    monkeypatch.setattr(checkpoint, "write_safetensors", full_disk)
    with pytest.raises(OpenAlignError, match=r"saving checkpoint step_00000002 into .*checkpoints failed \(Error "
                                             r"while serializing: I/O error: No space left on device \(os error "
                                             r"28\)\): is the disk full\?; nothing of it was kept"):
        train(recipe, show_progress=False)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    monkeypatch.undo()
    original = torch.save

    def cut_short(obj, path, *args, **kwargs):
        if str(path).endswith("trainer_state.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 783360 vs 783252")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OpenAlignError, match=r"failed \(\[enforce fail .* unexpected pos .*\): is the disk full\?"):
        train(recipe, show_progress=False)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    monkeypatch.undo()

    def over_quota(descriptor):  # a network file system may report a quota only when the files are flushed
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(checkpoint.os, "fsync", over_quota)
    with pytest.raises(OpenAlignError, match=r"failed \(\[Errno 122\] Disk quota exceeded\): is the disk full\?"):
        train(recipe, show_progress=False)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    monkeypatch.undo()
    make_directory = Path.mkdir

    def refused(self, *args, **kwargs):  # a checkpoints folder that refuses new entries (read-only, immutable)
        if self.name.startswith(".step_"):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        return make_directory(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(OpenAlignError, match=r"saving checkpoint step_00000002 into .* failed \(\[Errno 1\]"):
        train(recipe, show_progress=False)
    monkeypatch.undo()

    def not_the_disk(*args, **kwargs):  # another failure of the writers is not said to be the disk's
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(checkpoint, "write_safetensors", not_the_disk)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train(recipe, show_progress=False)
