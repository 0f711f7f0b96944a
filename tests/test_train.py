"""The training loop: outputs, exact resume, checkpoint handling, and configuration errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import openalign
from openalign.distributed import DistributedContext
from openalign.errors import ConfigError, OpenAlignError
from openalign.recipe import load_recipe
from openalign.train import Checkpointer, load_checkpoint_model, load_weights, read_history, train
from openalign.train.checkpoint import WEIGHTS_FILE

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
    assert history[0]["lr"] == 0.0  # linear warm-up starts at 0 (spec §3.3)
    assert "shapes/image_retrieval_recall@1" in history[-1] and set(result.metrics) == set(history[-1]) - {"step"}
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    assert (output / "config.yaml").is_file()


def test_checkpoint_loads_back_into_a_model(trained_run):
    output, _ = trained_run
    model = load_checkpoint_model(output)  # a run directory means its latest checkpoint
    saved = load_file(str(output / "checkpoints" / "step_00000004" / WEIGHTS_FILE))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])
    assert not model.training


def _state(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((directory / "checkpoints").glob("step_*"))[-1] / WEIGHTS_FILE))


def test_resume_continues_exactly(tmp_path, shapes_root, tiny_overrides, monkeypatch):
    straight = tmp_path / "straight"
    train(load_recipe("demo", tiny_overrides(shapes_root, straight, steps=6) + STOCHASTIC), show_progress=False)

    interrupted = tmp_path / "interrupted"
    recipe = load_recipe("demo", tiny_overrides(shapes_root, interrupted, steps=6) + STOCHASTIC)
    original_save = Checkpointer.save

    def crash_after_step_4(self, step, *args):
        path = original_save(self, step, *args)
        if step == 4:
            raise KeyboardInterrupt("simulated preemption")
        return path

    monkeypatch.setattr(Checkpointer, "save", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, show_progress=False)
    monkeypatch.setattr(Checkpointer, "save", original_save)
    result = train(recipe, resume="latest", show_progress=False)

    assert result.step == 6
    expected, actual = _state(straight), _state(interrupted)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    losses = [[r["loss"] for r in read_history(d) if "loss" in r] for d in (straight, interrupted)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_resume_latest_without_checkpoints_starts_from_scratch(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", 3, DistributedContext(0, 1, 0, torch.device("cpu")))
    assert checkpointer.resolve("latest") is None
    with pytest.raises(OpenAlignError, match="neither 'latest', a checkpoint directory"):
        checkpointer.resolve(str(tmp_path / "nowhere"))


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
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


def test_loading_weights_of_another_architecture_lists_the_offending_keys(trained_run):
    output, _ = trained_run
    with pytest.raises(OpenAlignError, match=r"does not fit this model \(.*wrong shape: .*another architecture"):
        load_weights(openalign.create_model("align-tiny"), output / "checkpoints" / "step_00000004" / WEIGHTS_FILE)


def test_batch_that_does_not_fill_ghost_batches_is_a_config_error(tmp_path, shapes_root, tiny_overrides):
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + ["train.batch_size=10"])
    with pytest.raises(ConfigError, match="not a multiple of the ghost batch norm's virtual_batch_size=4"):
        train(recipe, show_progress=False)


def test_adamw_cosine_and_grad_clip_train_too(tmp_path, shapes_root, tiny_overrides):
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=3) + [
        "train.optimizer=adamw", "train.schedule=cosine", "train.grad_clip=1.0", "eval.tasks=[]"])
    result = train(recipe, show_progress=False)
    assert result.step == 3 and result.metrics == {}
    assert all(r["loss"] > 0 for r in read_history(tmp_path) if "loss" in r)
