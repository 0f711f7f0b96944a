"""Gradient accumulation by feature caching (``train.accum_steps``) gives the whole batch's gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import openalign
from openalign.errors import ConfigError, OpenAlignError
from openalign.losses import ALIPLoss, ContrastiveLoss
from openalign.recipe import load_recipe
from openalign.train import read_history, train, train_step
from openalign.train.accumulate import split_batch

CPU = torch.device("cpu")
CAPTIONS = ["a red circle", "a blue square", "a green star", "a cross", "a small red square", "two circles",
            "a yellow triangle", "a large blue circle"] * 2


def tiny_batch(fields: tuple[str, ...] = ("text",)) -> dict:
    tokenizer = openalign.get_tokenizer("align-test")
    generator = torch.Generator().manual_seed(7)
    batch = {"image": torch.randn(16, 3, 32, 32, generator=generator).to(memory_format=torch.channels_last)}
    for offset, name in enumerate(fields):
        batch[name] = tokenizer(CAPTIONS[offset:] + CAPTIONS[:offset])
    return batch


def step_gradients(model: torch.nn.Module, loss_fn: torch.nn.Module, batch: dict, accum_steps: int) -> dict:
    """The gradients one ``train_step`` leaves (plain SGD at lr 0: the weights stay as they were)."""
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)
    train_step(model, loss_fn, sgd, scheduler, batch, CPU, "fp32", accum_steps=accum_steps)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_gradients(actual: dict, expected: dict) -> None:
    """As tests/test_distributed.py: the tolerance scales with each tensor's largest gradient, since
    some are analytically zero (a batch-norm bias before another batch norm) and hold only noise."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        scale = max(grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulated_gradients_equal_the_whole_batch_with_ghost_batch_norm(accum_steps):
    """Ghost batches of 4 in a batch of 16: strided micro-batches hold whole ghost batches. The
    logit scale, live in every micro-batch's loss, gets its gradient once, not ``accum_steps``
    times; the batch-norm statistics advance once per micro-batch, not again in the caching pass."""
    torch.manual_seed(0)
    model = openalign.create_model("align-test")
    reference = copy.deepcopy(model)
    expected = step_gradients(reference, ContrastiveLoss(), tiny_batch(), 1)
    assert_same_gradients(step_gradients(model, ContrastiveLoss(), tiny_batch(), accum_steps), expected)
    assert expected["log_temperature"].abs() > 1e-4
    counters = [b for name, b in model.named_buffers() if name.endswith("num_batches_tracked")]
    assert counters and all(counter.item() == accum_steps for counter in counters)


def test_dropout_is_replayed_so_the_gradient_stays_exact():
    """With dropout and drop-connect on, each micro-batch is re-embedded with the random draws of its
    cached embedding: the gradient equals that of the whole-batch loss on embeddings made, with
    gradient, in the same order from the same seed."""
    stochastic = {"image": {"drop_connect_rate": 0.3}, "text": {"hidden_dropout_prob": 0.3}}
    torch.manual_seed(0)
    model = openalign.create_model("align-test", **stochastic)
    reference = copy.deepcopy(model)
    batch = tiny_batch()
    torch.manual_seed(11)
    parts = [reference(**part) for part in split_batch(batch, 2)]
    outputs = {name: torch.cat([p[name] for p in parts]) for name in ("image_emb", "text_emb")}
    ContrastiveLoss()(**outputs, logit_scale=reference.logit_scale).backward()
    expected = {name: p.grad.clone() for name, p in reference.named_parameters()}
    torch.manual_seed(11)
    assert_same_gradients(step_gradients(model, ContrastiveLoss(), batch, 2), expected)


def test_alips_gates_see_the_whole_batch_once_per_step():
    """ALIP's running averages advance once per step on the whole batch, and its gates weight the
    micro-batches' losses as they weight the whole batch's."""
    torch.manual_seed(0)
    model = openalign.create_model("align-test", text_fields=["text", "caption"])
    reference = copy.deepcopy(model)
    whole, accumulated = ALIPLoss(momentum=0.5), ALIPLoss(momentum=0.5)
    expected = step_gradients(reference, whole, tiny_batch(("text", "caption")), 1)
    assert_same_gradients(step_gradients(model, accumulated, tiny_batch(("text", "caption")), 2), expected)
    for name, value in whole.named_buffers():
        assert value.item() != 1.0  # moved from its initial value, by one update
        torch.testing.assert_close(dict(accumulated.named_buffers())[name], value, msg=name)


def test_split_batch_refuses_what_does_not_split():
    with pytest.raises(OpenAlignError, match="a batch of 16 examples does not split into train.accum_steps=3"):
        split_batch(tiny_batch(), 3)
    with pytest.raises(OpenAlignError, match="the batch holds list"):
        split_batch({"image": torch.zeros(4, 3), "key": ["a", "b", "c", "d"]}, 2)


def test_outputs_that_are_not_per_example_are_refused():
    model = openalign.create_model("align-test")
    batch = tiny_batch()

    class Pooled(torch.nn.Module):  # an output that mixes the micro-batch's examples
        input_fields = ("image", "text")

        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, image, text):
            return {**self.inner(image, text=text), "pooled": self.inner.encode_image(image).mean(0, keepdim=True)}

    with pytest.raises(OpenAlignError, match=r"output 'pooled' is \(1, 32\) for a micro-batch of 8"):
        step_gradients(Pooled(), lambda **outputs: outputs["image_emb"].sum(), batch, 2)


def test_a_run_with_accumulation_trains_as_one_without(tmp_path, shapes_root, tiny_overrides, caplog):
    """The same recipe with ``train.accum_steps: 2`` logs the same losses step after step, and its
    batch norms counted two micro-batches per step. (Its weights are compared through the losses:
    LAMB turns the rounding noise of analytically zero gradients into full-size steps of weights
    that do not affect the output.)"""
    losses, weights = [], []
    for accum_steps in (1, 2):
        output = tmp_path / f"accum{accum_steps}"
        recipe = load_recipe("demo", tiny_overrides(shapes_root, output, steps=3) + [
            "eval.tasks=[]", f"train.accum_steps={accum_steps}"])
        with caplog.at_level("INFO", logger="openalign.train"):
            train(recipe, show_progress=False)
        losses.append([record["loss"] for record in read_history(output) if "loss" in record])
        weights.append(load_file(output / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert "batch 16: 1 rank(s) × 16 example(s), each in 2 micro-batches of 8" in caplog.text
    counter = "image_tower.embeddings.batchnorm.num_batches_tracked"
    assert (weights[0][counter].item(), weights[1][counter].item()) == (3, 6)


@pytest.mark.parametrize("accum_steps, message", [
    (3, r"is 16, which does not divide evenly between 1 rank\(s\) × 3 micro-batches"),
    (8, r"gives 2 examples per device and micro-batch .* virtual_batch_size=4"),
    (0, "must be at least 1"),
])
def test_accumulation_that_does_not_fit_the_batch_is_a_config_error(tmp_path, shapes_root, tiny_overrides,
                                                                     accum_steps, message):
    with pytest.raises(ConfigError, match=message):
        train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + [f"train.accum_steps={accum_steps}"]),
              show_progress=False)
