"""With the same weights, openalign's ALIGN equals transformers' AlignModel to 1e-5 in fp32."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AlignConfig, AlignModel, AlignTextConfig, AlignVisionConfig

from openalign import create_model
from openalign.hf import state_dict_to_hf
from openalign.models import GhostBatchNorm2d

WIDTH, DEPTH, IMAGE_SIZE = 0.5, 0.5, 65  # odd size: TF's asymmetric padding matters
TEXT = {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64}


def hf_model() -> AlignModel:
    vision = AlignVisionConfig(width_coefficient=WIDTH, depth_coefficient=DEPTH, image_size=IMAGE_SIZE,
                               hidden_dim=64, depthwise_padding=[])
    config = AlignConfig(text_config=AlignTextConfig(**TEXT).to_dict(), vision_config=vision.to_dict(), projection_dim=160)
    return AlignModel(config).eval()


def openalign_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("align-b7-base", embed_dim=160,
                         image={"width_coefficient": WIDTH, "depth_coefficient": DEPTH, "virtual_batch_size": None},
                         text={**TEXT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():  # non-trivial batch-norm statistics, so eval mode is a real test
        if isinstance(module, GhostBatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(channels, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(channels, generator=generator))
    with torch.no_grad():
        model.log_temperature.fill_(-3.0)
    return model.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, AlignModel]:
    model, hf = openalign_model(), hf_model()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model), strict=True)
    assert not missing and not unexpected
    return model, hf


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1000, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    return {"pixel_values": torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1,
            "input_ids": input_ids, "attention_mask": attention_mask}


def test_state_dict_names_map_one_to_one(pair):
    model, hf = pair
    ours = set(state_dict_to_hf(model))
    theirs = {k for k in hf.state_dict() if ".pooler." not in k}
    assert ours - {k for k in ours if ".pooler." in k} == theirs


@torch.no_grad()
def test_image_tower_equals_hf(pair, inputs):
    model, hf = pair
    expected = hf.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    actual = model.encode_image(inputs["pixel_values"], normalize=False)
    assert expected.abs().mean() > 1e-2  # activations are not vanishing
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_tower_equals_hf(pair, inputs):
    model, hf = pair
    expected = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    actual = model.encode_text(inputs["input_ids"], inputs["attention_mask"], normalize=False)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_logits_and_normalised_embeddings_equal_hf(pair, inputs):
    model, hf = pair
    output = hf(**inputs)
    image_emb = model.encode_image(inputs["pixel_values"])
    text_emb = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(image_emb, output.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_emb, output.text_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logit_scale * text_emb @ image_emb.T, output.logits_per_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf.temperature, torch.tensor(math.exp(-3.0)))  # not HF's default of 1.0


@torch.no_grad()
def test_b7_feature_map_at_289():
    """Spec §1.1, measured on the HF port: B7 at 289×289 ends in a 640×9×9 map, pooled to 640."""
    model = create_model("align-b7-base").eval()
    features = model.image_tower.forward_features(torch.zeros(1, 3, 289, 289))
    assert features.shape == (1, 640, 9, 9)
    assert model.encode_image(torch.zeros(1, 3, 289, 289)).shape == (1, 640)


@pytest.mark.parametrize("name, width, depth",
                         [("align-b3-mini", 1.2, 1.4), ("align-b5-base", 1.6, 2.2), ("align-b7-base", 2.0, 3.1)])
def test_image_tower_sizes_equal_hf(name, width, depth):
    """Parameter count and per-block shapes equal HF's AlignVisionModel of the same coefficients."""
    from transformers import AlignVisionModel

    hf = AlignVisionModel(AlignVisionConfig(width_coefficient=width, depth_coefficient=depth, depthwise_padding=[]))
    ours = create_model(name).image_tower
    hf_shapes = {k: v.shape for k, v in hf.state_dict().items()}
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert our_shapes == hf_shapes
    if name == "align-b7-base":
        assert sum(p.numel() for p in ours.parameters()) == 62_143_440  # spec §6.3
