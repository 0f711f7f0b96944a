"""Gradient accumulation by feature caching (``train.accum_steps``) gives the whole batch's gradient; so does
activation checkpointing (``train.grad_checkpointing``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import needs_unifont
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


def step_gradients(model: torch.nn.Module, loss_fn: torch.nn.Module, batch: dict, accum_steps: int,
                   forward: torch.nn.Module | None = None) -> dict:
    """The gradients one ``train_step`` leaves (plain SGD at lr 0: the weights stay as they were)."""
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)
    train_step(model, loss_fn, sgd, scheduler, batch, CPU, "fp32", forward=forward, accum_steps=accum_steps)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_gradients(actual: dict, expected: dict) -> None:
    """As tests/test_distributed.py: the tolerance scales with each tensor's largest gradient, since
    some are analytically zero (a batch-norm bias before another batch norm) and hold only noise."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        scale = max(grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulated_gradients_and_statistics_equal_the_whole_batch_with_ghost_batch_norm(accum_steps):
    """Ghost batches of 4 in a batch of 16: strided micro-batches hold whole ghost batches. The
    logit scale, live in every micro-batch's loss, gets its gradient once, not ``accum_steps``
    times; the batch-norm running statistics end the step as the whole batch leaves them."""
    torch.manual_seed(0)
    model = openalign.create_model("align-test")
    reference = copy.deepcopy(model)
    expected = step_gradients(reference, ContrastiveLoss(), tiny_batch(), 1)
    assert_same_gradients(step_gradients(model, ContrastiveLoss(), tiny_batch(), accum_steps), expected)
    assert expected["log_temperature"].abs() > 1e-4
    whole, initial = dict(reference.named_buffers()), dict(openalign.create_model("align-test").named_buffers())
    running = [name for name in whole if name.endswith("running_var")]
    assert running and not torch.equal(whole[running[0]], initial[running[0]])  # the step moved them
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_models_accumulate_too():
    """``train.compile`` hands train_step a compiled module (here with the eager backend, which
    traces as inductor does but compiles nothing): its graphs with and without gradient give the
    whole batch's gradient too."""
    torch.manual_seed(0)
    model = openalign.create_model("align-test")
    expected = step_gradients(copy.deepcopy(model), ContrastiveLoss(), tiny_batch(), 1)
    compiled = torch.compile(model, backend="eager")
    assert_same_gradients(step_gradients(model, ContrastiveLoss(), tiny_batch(), 2, compiled), expected)


def test_standard_batch_norm_is_refused_since_each_micro_batch_would_get_its_own_statistics(
        tmp_path, shapes_root, tiny_overrides):
    model = openalign.create_model("align-test", image={"virtual_batch_size": None})
    with pytest.raises(OpenAlignError, match=r"'image_tower\..*' is standard batch norm"):
        step_gradients(model, ContrastiveLoss(), tiny_batch(), 2)
    recipe = load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + [
        "train.accum_steps=2", "model.image.virtual_batch_size=null"])
    with pytest.raises(ConfigError, match=r"train.accum_steps.*is 2, but .* standard batch norm"):
        train(recipe, show_progress=False)
    step_gradients(model.eval(), ContrastiveLoss(), tiny_batch(), 2)  # frozen statistics (eval mode) are fine


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


def test_a_run_with_accumulation_trains_as_one_without(tmp_path, shapes_root, tiny_overrides, caplog, monkeypatch):
    """The same recipe with ``train.accum_steps: 2`` (and ``train.compile``, with the eager backend
    to keep the test fast, or ``train.grad_checkpointing``) logs the same losses step after step and
    saves the same batch-norm statistics after its first step. (Later steps are compared through
    the losses: LAMB turns the rounding noise of analytically zero gradients into full-size steps
    of weights that do not affect the output, such as a batch-norm bias before another batch norm, but do shift the
    later one's statistics.)"""
    from openalign.train import loop

    real_compile, real_accumulate, accumulated = torch.compile, loop.accumulated_backward, []
    monkeypatch.setattr(torch, "compile", lambda module, **options: real_compile(module, backend="eager"))
    monkeypatch.setattr(loop, "accumulated_backward",
                        lambda *args: accumulated.append(args[6]) or real_accumulate(*args))  # steps
    losses, weights = [], []
    for settings in (["train.accum_steps=1"], ["train.accum_steps=2", "train.compile=true"],
                     ["train.accum_steps=2", "train.grad_checkpointing=true"]):
        output = tmp_path / "-".join(settings)
        recipe = load_recipe("demo", tiny_overrides(shapes_root, output, steps=3) + [
            "eval.tasks=[]", "run.checkpoint_every=1", *settings])
        with caplog.at_level("INFO", logger="openalign.train"):
            train(recipe, show_progress=False)
        losses.append([record["loss"] for record in read_history(output) if "loss" in record])
        weights.append(load_file(output / "checkpoints" / "step_00000001" / "model.safetensors"))
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)
    assert "batch 16: 1 rank(s) × 16 example(s), each in 2 micro-batches of 8" in caplog.text
    assert accumulated == [2, 2, 2] * 2
    statistics = [name for name in weights[0] if "running_" in name or "num_batches" in name]
    assert statistics and weights[0]["image_tower.embeddings.batchnorm.num_batches_tracked"].item() == 1
    for name in statistics:
        for other in weights[1:]:
            torch.testing.assert_close(other[name], weights[0][name], rtol=1e-4, atol=1e-6, msg=name)


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


def _model_batch(model: torch.nn.Module) -> dict:
    """16 examples of what ``model`` takes: random pixels of its size, each text field tokenised."""
    size = model.config.preprocess.image_size
    tokenizer = model.config.build_tokenizer()
    batch = {"image": torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(7))}
    for offset, name in enumerate(model.input_fields[1:]):
        batch[name] = tokenizer(CAPTIONS[offset:] + CAPTIONS[:offset])
    return batch


@pytest.mark.parametrize("name, overrides, accum_steps", [
    ("align-test", {"image.drop_connect_rate": 0.3, "text.hidden_dropout_prob": 0.2}, 1),
    ("align-test", {"image.drop_connect_rate": 0.3, "text.hidden_dropout_prob": 0.2}, 2),
    ("alip-tiny", {}, 1),
    pytest.param("clippo-test", {"encoder.depth": 4}, 1, marks=needs_unifont),
])
def test_grad_checkpointing_gives_the_same_step_keeping_fewer_activations(name, overrides, accum_steps):
    """The same gradients with dropout and drop-connect (the recomputation replays the random state),
    batch-norm running statistics updated once (the recomputation runs every batch norm again), and
    far fewer bytes held for the backward pass."""
    torch.manual_seed(0)
    model = openalign.create_model(name, **overrides)
    checkpointed, batch = copy.deepcopy(model), _model_batch(model)
    loss_fn = ALIPLoss() if name == "alip-tiny" else ContrastiveLoss()
    held = {}
    for key, candidate in (("plain", model), ("checkpointed", checkpointed)):
        candidate.set_grad_checkpointing(key == "checkpointed")
        sizes = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:  # what the forward pass keeps for the backward
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            held[key] = step_gradients(candidate, copy.deepcopy(loss_fn), batch, accum_steps), sum(sizes)
    assert_same_gradients(held["checkpointed"][0], held["plain"][0])
    assert held["checkpointed"][1] < 0.5 * held["plain"][1]  # 0.1 to 0.3 of it for these tiny models
    for (key, value), (_, reference) in zip(checkpointed.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6, msg=key)


def test_a_compiled_checkpointed_block_updates_its_batch_norm_statistics_once():
    """Under torch.compile (inductor, as train.compile uses it) a checkpointed block takes no context
    to set its statistics back (torch.compile accepts none): the compiled graph updates them once."""
    from openalign.models import efficientnet

    torch.manual_seed(0)
    block = openalign.create_model("align-test").image_tower.encoder.blocks[1].train()
    reference, checkpointed = copy.deepcopy(block), copy.deepcopy(block)
    pixels = torch.randn(8, block.expansion.expand_conv.in_channels, 16, 16)
    reference(pixels).pow(2).sum().backward()
    torch.compile(lambda x: efficientnet._checkpointed(checkpointed, x))(pixels).pow(2).sum().backward()
    for (key, value), (_, expected) in zip(checkpointed.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=key)
    gradients = {name: parameter.grad for name, parameter in checkpointed.named_parameters()}
    expected = {name: parameter.grad for name, parameter in reference.named_parameters()}
    for name, gradient in expected.items():  # inductor sums in another order: 1e-3 of each largest (of 1 at least:
        scale = max(gradient.abs().max().item(), 1.0)  # a bias before a batch norm has a gradient of noise only)
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-3, atol=1e-3 * scale, msg=name)


@pytest.mark.parametrize("name", ["align-test", "alip-tiny"])
def test_checkpointed_models_trace_whole_for_torch_compile(name):
    """A graph break inside a checkpointed EfficientNet block would run its recomputation eagerly,
    without the context that sets its batch-norm statistics back; one in BERT was transformers'
    warning about a cache an encoder has not."""
    model = openalign.create_model(name).train()
    model.set_grad_checkpointing(True)
    explained = torch._dynamo.explain(model)(**split_batch(_model_batch(model), 2)[0])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
