"""``train.ema_decay``: the weight average, step by step, in a run's checkpoints and evaluations, and on resume."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_recipe_overrides, train_until_preempted
from openalign import load_pretrained
from openalign.errors import ConfigError, OpenAlignError
from openalign.recipe import load_recipe
from openalign.train import read_history, train
from openalign.train.ema import WeightAverage


def test_the_average_follows_its_formula_with_the_warm_up_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)  # frozen: never averaged (it never changes)
    average = WeightAverage(model, decay=0.5, warmup=True)
    assert not average.module.training and not any(p.requires_grad for p in average.module.parameters())
    assert [average.decay_at(t) for t in (1, 2, 8, 9, 100)] == [2 / 11, 3 / 12, 0.5, 0.5, 0.5]
    assert WeightAverage(model, 0.9, warmup=False).decay_at(1) == 0.9

    expected = {name: value.clone() for name, value in model.state_dict().items()}
    for step in (1, 2, 9):
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param))
        model.train()(torch.randn(8, 3))  # moves the running statistics and counts the batch
        average.update(step)
        decay = {1: 2 / 11, 2: 3 / 12, 9: 0.5}[step]
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                expected[name] = decay * expected[name] + (1 - decay) * value
            else:
                expected[name] = value.clone()
        for name, value in average.module.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6, msg=f"{name} at step {step}")
    assert average.module.state_dict()["1.num_batches_tracked"] == 3
    assert average.module[2].weight is model[2].weight  # frozen: the model's own tensor, not a copy
    assert average.module[2].bias is not model[2].bias
    assert not torch.equal(average.module[0].weight, model[0].weight)
    # its own memory: linear 3→4 (16), batch norm (4 + 4 + 4 + 4 and an int64 count), bias 2, all but the frozen 8
    assert average.nbytes == (16 + 16 + 2) * 4 + 8


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 2.0])
def test_a_decay_outside_the_open_unit_interval_is_a_config_error(shapes_root, tmp_path, decay):
    with pytest.raises(ConfigError, match=r"train\.ema_decay.*\(0, 1\)"):
        load_recipe("demo", tiny_recipe_overrides(shapes_root, tmp_path) + [f"train.ema_decay={decay}"])


def _checkpoint(run, step: int):
    return run / "checkpoints" / f"step_{step:08d}"


def test_a_run_averages_each_step_evaluates_and_checkpoints_the_average_and_resumes_it_exactly(
        tmp_path, shapes_root, monkeypatch):
    settings = ["train.ema_decay=0.6", "run.checkpoint_every=1", "run.keep_checkpoints=10",
                "model.image.drop_connect_rate=0.3"]  # the average's own weights: no random draws to replay
    straight = tmp_path / "straight"
    import openalign.train.loop as loop

    evaluated, real_evaluate = [], loop.evaluate  # the weights each evaluation is given

    def recording(config, model, *args, **kwargs):
        evaluated.append({name: value.clone() for name, value in model.state_dict().items()})
        return real_evaluate(config, model, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate", recording)
        result = train(load_recipe("demo", tiny_recipe_overrides(shapes_root, straight, steps=5) + settings),
                       show_progress=False)

    averages = {step: load_file(str(_checkpoint(straight, step) / "ema" / "model.safetensors")) for step in range(1, 6)}
    weights = {step: load_file(str(_checkpoint(straight, step) / "model.safetensors")) for step in range(1, 6)}
    for step in range(2, 6):  # each step's average, from the one before and the step's weights
        decay = min(0.6, (1 + step) / (10 + step))
        for name, value in averages[step].items():
            if value.is_floating_point():
                torch.testing.assert_close(value, decay * averages[step - 1][name] + (1 - decay) * weights[step][name],
                                           rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")
            else:
                assert torch.equal(value, weights[step][name]), name
    assert any(not torch.equal(averages[5][name], weights[5][name]) for name in weights[5])

    # evaluated beside the model, under ema/: the model's weights, then the average's
    for name in weights[5]:
        assert torch.equal(evaluated[-2][name], weights[5][name]) and torch.equal(evaluated[-1][name],
                                                                                  averages[5][name]), name
    final = read_history(straight)[-1]
    assert {"shapes/image_retrieval_recall@1", "ema/shapes/image_retrieval_recall@1"} <= set(final)
    assert set(result.metrics) == set(final) - {"step"}
    # the average is a model directory: it loads wherever a model is named
    model, _, _ = load_pretrained(_checkpoint(straight, 5) / "ema")
    for name, value in model.state_dict().items():
        assert torch.equal(value, averages[5][name]), name

    with pytest.raises(OpenAlignError, match=r"is the weight average of checkpoint .*step_00000005' \(a model, "
                                             r"without training state\): resume from .*train.init_from="):
        train(load_recipe("demo", tiny_recipe_overrides(shapes_root, straight, steps=5) + settings),
              resume=str(_checkpoint(straight, 5) / "ema"), show_progress=False)

    interrupted = tmp_path / "interrupted"
    recipe = load_recipe("demo", tiny_recipe_overrides(shapes_root, interrupted, steps=5) + settings)
    train_until_preempted(recipe, 3, monkeypatch)
    train(recipe, resume="latest", show_progress=False)
    resumed = load_file(str(_checkpoint(interrupted, 5) / "ema" / "model.safetensors"))
    for name, value in averages[5].items():
        assert torch.equal(value, resumed[name]), name


def test_an_average_added_on_resume_starts_from_the_resumed_weights(tmp_path, shapes_root, caplog):
    run = tmp_path / "run"
    train(load_recipe("demo", tiny_recipe_overrides(shapes_root, run, steps=2) + ["eval.tasks=[]"]),
          show_progress=False)
    recipe = load_recipe("demo", tiny_recipe_overrides(shapes_root, run, steps=3)
                         + ["eval.tasks=[]", "train.ema_decay=0.5", "train.ema_warmup=false"])
    with caplog.at_level(logging.WARNING):
        train(recipe, resume="latest", show_progress=False, allow_changes=["train.ema_decay", "train.ema_warmup"])
    assert "holds no weight average" in caplog.text
    before = load_file(str(_checkpoint(run, 2) / "model.safetensors"))
    after = load_file(str(_checkpoint(run, 3) / "model.safetensors"))
    average = load_file(str(_checkpoint(run, 3) / "ema" / "model.safetensors"))
    for name, value in average.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.5 * before[name] + 0.5 * after[name], rtol=1e-5, atol=1e-6)
