"""Hugging Face AlignModel directories load into openalign and openalign models export to them,
with transformers' own AlignModel, AlignProcessor and pipeline as the references."""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (AlignConfig, AlignModel, AlignProcessor, AlignTextConfig, AlignVisionConfig, AutoTokenizer,
                          EfficientNetImageProcessor)

import openalign
from openalign.data.tokenizer import _packaged_copy
from openalign.errors import OpenAlignError

TEXTS = ["a photo of a cat", "a dog on a sofa", "an extremely long caption " * 20]


def _randomise_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine terms: HF's init would make activations vanish."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(channels, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(channels, generator=generator))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A small random AlignModel saved as transformers saves it, with align-base's processor
    settings scaled to 65 px (resize 78, bilinear, x/127.5 - 1) and the bert-base-uncased tokenizer."""
    torch.manual_seed(0)
    vision = AlignVisionConfig(width_coefficient=0.5, depth_coefficient=0.5, image_size=65, hidden_dim=640,
                               depthwise_padding=[])
    text = AlignTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    hf = AlignModel(AlignConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=160)).eval()
    _randomise_batch_norm(hf, 1)
    with torch.no_grad():
        hf.temperature.fill_(0.05)
    directory = tmp_path_factory.mktemp("hf") / "align-small"
    hf.save_pretrained(directory)
    image_processor = EfficientNetImageProcessor(
        size={"height": 78, "width": 78}, crop_size={"height": 65, "width": 65}, resample=2, do_center_crop=True,
        rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False, include_top=False)
    tokenizer = AutoTokenizer.from_pretrained(str(_packaged_copy("bert-base-uncased")))
    tokenizer.backend_tokenizer.no_padding()  # align-base's tokenizer has none of the packaged copy's 128-token
    tokenizer.backend_tokenizer.no_truncation()  # settings, which AlignProcessor would pad to over its own 64
    del tokenizer.init_kwargs["max_length"]
    AlignProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((120, 90, 3), (64, 200, 3))]


def _hf_outputs(directory: Path, images: list[Image.Image]) -> tuple[dict, object]:
    processor = AlignProcessor.from_pretrained(directory)
    inputs = processor(text=TEXTS, images=images, padding="max_length", max_length=64, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        return inputs, AlignModel.from_pretrained(directory).eval()(**inputs)


def _our_outputs(model, preprocess, tokenizer, images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        pixels = torch.stack([preprocess(image) for image in images])
        image_emb, text_emb = model.encode_image(pixels), model.encode_text(**tokenizer(TEXTS))
    return pixels, image_emb, text_emb


def test_a_hugging_face_directory_loads_with_identical_outputs(hf_dir, images):
    model, preprocess, tokenizer = openalign.load_pretrained(hf_dir)
    inputs, expected = _hf_outputs(hf_dir, images)
    pixels, image_emb, text_emb = _our_outputs(model, preprocess, tokenizer, images)
    assert torch.equal(pixels, inputs["pixel_values"])  # same resize, crop and rescale as AlignProcessor
    tokens = tokenizer(TEXTS)
    assert torch.equal(tokens["input_ids"], inputs["input_ids"]) and tokens["input_ids"].shape == (3, 64)
    assert torch.equal(tokens["attention_mask"], inputs["attention_mask"])
    torch.testing.assert_close(image_emb, expected.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_emb, expected.text_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logit_scale * text_emb @ image_emb.T, expected.logits_per_text, rtol=1e-5, atol=1e-4)
    assert model.logit_scale.item() == pytest.approx(20.0)
    assert (model.config.preprocess.resize_size, model.config.preprocess.image_size) == (78, 65)
    assert model.config.image.batch_norm_momentum == 0.01  # HF's 0.99 is Keras's convention (spec §8)


@pytest.mark.parametrize("resize", [80, 81, 96])
def test_preprocessing_equals_align_processors_where_the_crop_margin_is_odd(hf_dir, images, tmp_path, resize):
    # margins 15, 16, 31: transformers floors the centre-crop offset where torchvision rounds
    directory = tmp_path / "align"
    shutil.copytree(hf_dir, directory)
    processor = AlignProcessor.from_pretrained(directory)
    processor.image_processor.size = {"height": resize, "width": resize}
    processor.save_pretrained(directory)
    model, preprocess, _ = openalign.load_pretrained(directory)
    expected = AlignProcessor.from_pretrained(directory)(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(torch.stack([preprocess(image) for image in images]), expected)
    model.save_pretrained(tmp_path / "exported", format="hf")  # and back: the crop convention survives export
    exported = AlignProcessor.from_pretrained(tmp_path / "exported")(images=images, return_tensors="pt")
    assert torch.equal(exported["pixel_values"], expected)


def test_export_to_hugging_face_round_trips_through_transformers(hf_dir, images, tmp_path):
    model, preprocess, tokenizer = openalign.load_pretrained(hf_dir)
    model.save_pretrained(tmp_path / "exported", format="hf")
    _, loading = AlignModel.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    inputs, expected = _hf_outputs(hf_dir, images)
    exported_inputs, exported = _hf_outputs(tmp_path / "exported", images)
    assert torch.equal(exported_inputs["pixel_values"], inputs["pixel_values"])
    assert torch.equal(exported_inputs["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(exported.logits_per_text, expected.logits_per_text, rtol=1e-6, atol=1e-6)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["vision_config"]["batch_norm_momentum"] == pytest.approx(0.99)
    other = tmp_path / "momentum"  # another Keras momentum survives the round trip too (fine-tuning uses it)
    shutil.copytree(hf_dir, other)
    hf_config = json.loads((other / "config.json").read_text())
    hf_config["vision_config"]["batch_norm_momentum"] = 0.9
    (other / "config.json").write_text(json.dumps(hf_config))
    imported = openalign.load_pretrained(other)[0]
    assert imported.config.image.batch_norm_momentum == pytest.approx(0.1)
    imported.save_pretrained(tmp_path / "momentum-exported", format="hf")
    config = json.loads((tmp_path / "momentum-exported" / "config.json").read_text())
    assert config["vision_config"]["batch_norm_momentum"] == pytest.approx(0.9)
    # align-base's files, which transformers 4 reads too: its AlignProcessor fails on 5's processor_config.json
    assert (tmp_path / "exported" / "preprocessor_config.json").is_file()
    assert not (tmp_path / "exported" / "processor_config.json").exists()


def test_export_keeps_every_setting_of_the_config_it_was_loaded_from(tmp_path):
    vision = AlignVisionConfig(width_coefficient=0.5, depth_coefficient=0.5, image_size=65, hidden_dim=640,
                               depthwise_padding=[], batch_norm_eps=1e-4, drop_connect_rate=0.3)
    text = AlignTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           pad_token_id=1, layer_norm_eps=1e-6, hidden_dropout_prob=0.2, hidden_act="relu")
    hf = AlignModel(AlignConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=160,
                                temperature_init_value=0.5)).eval()
    hf.save_pretrained(tmp_path / "source")
    model, _, tokenizer = openalign.load_pretrained(tmp_path / "source")
    tokens = tokenizer(TEXTS)
    with torch.no_grad():  # relu, not BERT's gelu, in the feed-forward layers
        expected = F.normalize(hf.get_text_features(**tokens).pooler_output, dim=-1)
        torch.testing.assert_close(model.encode_text(**tokens), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "exported", format="hf")
    source, exported = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("source", "exported"))
    for config in (source, exported):
        config.pop("dtype", None)  # a property of the saved tensors, not of the architecture
    assert exported == source
    for name in ("model.safetensors", "config.json"):  # the weights as readable as the config (not 0600)
        assert (tmp_path / "exported" / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_short_position_tables_and_small_vocabularies_load_or_fail_clearly(hf_dir, images, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    short = tmp_path / "short"  # 32 positions: texts are cut to 32 tokens, not ALIGN's 64
    shutil.copytree(hf_dir, short)
    config["text_config"]["max_position_embeddings"] = 32
    (short / "config.json").write_text(json.dumps(config))
    state = load_file(str(short / "model.safetensors"))
    for key in [key for key in state if key.endswith("num_batches_tracked")]:  # transformers does without them
        del state[key]
    state["text_model.embeddings.position_embeddings.weight"] = state[
        "text_model.embeddings.position_embeddings.weight"][:32].clone()
    save_file(state, str(short / "model.safetensors"))
    model, _, tokenizer = openalign.load_pretrained(short)
    inputs = AlignProcessor.from_pretrained(short)(text=TEXTS, padding="max_length", max_length=32, truncation=True,
                                                   return_tensors="pt")
    assert torch.equal(tokenizer(TEXTS)["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        expected = AlignModel.from_pretrained(short).eval().get_text_features(**inputs).pooler_output
        torch.testing.assert_close(model.encode_text(**tokenizer(TEXTS)), F.normalize(expected, dim=-1),
                                   rtol=1e-5, atol=1e-5)

    small = tmp_path / "small"  # a vocabulary larger than the embedding table: an error, not an IndexError later
    shutil.copytree(hf_dir, small)
    config["text_config"].update(max_position_embeddings=512, vocab_size=1000)
    (small / "config.json").write_text(json.dumps(config))
    state = load_file(str(small / "model.safetensors"))
    state["text_model.embeddings.word_embeddings.weight"] = state["text_model.embeddings.word_embeddings.weight"][:1000]
    save_file(state, str(small / "model.safetensors"))
    with pytest.raises(OpenAlignError, match="'text.vocab_size' is 1000, but the tokenizer .* has 30522 tokens"):
        openalign.load_pretrained(small)


def test_a_model_trained_in_openalign_works_in_the_transformers_pipeline(tmp_path):
    from transformers import pipeline

    torch.manual_seed(0)
    model = openalign.create_model("align-test", image_projection=False, embed_dim=80,  # B0×0.25 pools to 80-d
                                   temperature_init=0.01).eval()
    _randomise_batch_norm(model, 2)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # BERT's 0.02-std init embeds every short prompt alike: spread the weights
        for weight in (p for p in model.text_tower.parameters() if p.ndim == 2):
            weight.copy_(0.5 * torch.randn(weight.shape, generator=generator))
    model.save_pretrained(tmp_path / "tiny", format="hf")
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path / "tiny"), device="cpu")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    labels = ["cat", "dog", "car"]
    results = classifier(image, candidate_labels=labels, hypothesis_template="a photo of a {}.")
    scores = {r["label"]: r["score"] for r in results}
    loaded, preprocess, tokenizer = openalign.load_pretrained(tmp_path / "tiny")
    with torch.no_grad():
        image_emb = loaded.encode_image(preprocess(image)[None])
        text_emb = loaded.encode_text(**tokenizer([f"a photo of a {label}." for label in labels]))
        expected = (loaded.logit_scale * image_emb @ text_emb.T).softmax(dim=-1)[0]
    assert [scores[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)
    assert expected.max() - expected.min() > 0.05, expected  # not a uniform guess that any model would match


def test_export_keeps_a_capped_logit_scale_and_alignprocessors_64_tokens(images, tmp_path):
    import math

    torch.manual_seed(0)
    model = openalign.create_model("align-test", image_projection=False, embed_dim=80, temperature_init=0.05,
                                   max_logit_scale=50.0, text={"max_length": 64}).eval()
    with torch.no_grad():
        model.log_temperature.fill_(math.log(0.01))  # 1/τ = 100, past the cap: the logits use 50
    _randomise_batch_norm(model, 3)
    model.save_pretrained(tmp_path / "capped", format="hf")
    processor = AlignProcessor.from_pretrained(tmp_path / "capped")
    assert processor(text=["a cat"], return_tensors="pt")["input_ids"].shape == (1, 64)  # not the vocabulary's 128
    tokenizer = model.config.build_tokenizer()
    inputs = processor(text=TEXTS, images=images, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], tokenizer(TEXTS)["input_ids"])
    with torch.no_grad():
        expected = model.logit_scale * model.encode_text(**tokenizer(TEXTS)) @ model.encode_image(
            inputs["pixel_values"]).T
        hf_logits = AlignModel.from_pretrained(tmp_path / "capped").eval()(**inputs).logits_per_text
    assert model.logit_scale.item() == pytest.approx(50.0)
    torch.testing.assert_close(hf_logits, expected, rtol=1e-5, atol=1e-4)


def test_a_model_reading_16_tokens_exports_a_processor_that_pads_to_16(images, tmp_path):
    torch.manual_seed(0)
    model = openalign.create_model("align-test", image_projection=False, embed_dim=80, text={"max_length": 16}).eval()
    model.save_pretrained(tmp_path / "short", format="hf")
    processor = AlignProcessor.from_pretrained(tmp_path / "short")
    assert processor(text=["a cat"], return_tensors="pt")["input_ids"].shape == (1, 16)  # not AlignProcessor's 64
    inputs = processor(text=TEXTS, images=images, truncation=True, return_tensors="pt")
    tokenizer = model.config.build_tokenizer()
    assert torch.equal(inputs["input_ids"], tokenizer(TEXTS)["input_ids"])
    with torch.no_grad():
        expected = model.logit_scale * model.encode_text(**tokenizer(TEXTS)) @ model.encode_image(
            inputs["pixel_values"]).T
        hf_logits = AlignModel.from_pretrained(tmp_path / "short").eval()(**inputs).logits_per_text
    torch.testing.assert_close(hf_logits, expected, rtol=1e-5, atol=1e-4)
    reloaded, _, reloaded_tokenizer = openalign.load_pretrained(tmp_path / "short")
    assert reloaded.config.text.max_length == 16 and reloaded_tokenizer(TEXTS)["input_ids"].shape == (3, 16)
    settings = json.loads((tmp_path / "short" / "tokenizer_config.json").read_text())
    for bad, message in ((600, "max_length is 600; .* between 2 and 512"), ("16", "max_length is '16'")):
        (tmp_path / "short" / "tokenizer_config.json").write_text(json.dumps({**settings, "max_length": bad}))
        with pytest.raises(OpenAlignError, match=message):
            openalign.load_pretrained(tmp_path / "short")


def test_a_fixed_length_in_tokenizer_json_is_read_as_align_processor_reads_it(hf_dir, tmp_path):
    fixed = tmp_path / "fixed"
    shutil.copytree(hf_dir, fixed)
    tokenizer = AutoTokenizer.from_pretrained(str(_packaged_copy("bert-base-uncased")))  # truncates at 128
    tokenizer.save_pretrained(fixed)
    settings = json.loads((fixed / "tokenizer_config.json").read_text())
    settings.pop("max_length", None)  # as transformers 4 wrote it: the length is in tokenizer.json alone
    (fixed / "tokenizer_config.json").write_text(json.dumps(settings))
    expected = AlignProcessor.from_pretrained(fixed)(text=TEXTS, truncation=True, return_tensors="pt")["input_ids"]
    _, _, ours = openalign.load_pretrained(fixed)
    assert torch.equal(ours(TEXTS)["input_ids"], expected)
    assert expected.shape[1] == (128 if int(transformers.__version__.split(".")[0]) >= 5 else 64)


def test_openalign_format_round_trips_and_convert_goes_both_ways(hf_dir, images, tmp_path):
    model, preprocess, tokenizer = openalign.load_pretrained(hf_dir)
    openalign_dir = openalign.pretrained.convert(hf_dir, tmp_path / "ours", to="openalign")
    assert {"config.yaml", "model.safetensors", "tokenizer.json"} <= {p.name for p in openalign_dir.iterdir()}
    back = openalign.pretrained.convert(openalign_dir, tmp_path / "back", to="hf")
    for directory in (openalign_dir, back):
        reloaded = openalign.load_pretrained(directory)
        for ours, theirs in zip(_our_outputs(model, preprocess, tokenizer, images),
                                _our_outputs(*reloaded, images)):
            assert torch.equal(ours, theirs)
    with pytest.raises(OpenAlignError, match="is the source .* or inside it"):
        openalign.pretrained.convert(back, back, to="openalign", overwrite=True)
    (back / "checkpoints" / "step_1").mkdir(parents=True)  # a model inside the source: a run's checkpoint, say
    (back / "checkpoints" / "step_1" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(OpenAlignError, match="or inside it"):
        openalign.pretrained.convert(back, back / "checkpoints" / "step_1", to="openalign", overwrite=True)
    with pytest.raises(OpenAlignError, match="or inside it"):  # a new checkpoint a resume would take
        openalign.pretrained.convert(back, back / "checkpoints" / "step_2", to="openalign")
    assert sorted(path.name for path in (back / "checkpoints").iterdir()) == ["step_1"]
    shutil.rmtree(back / "checkpoints")
    with pytest.raises(OpenAlignError, match="already holds model or tokenizer files .*config.json, model.safetensors"
                                             ".*overwrite=True"):
        model.save_pretrained(back)
    model.save_pretrained(back, overwrite=True)  # the AlignModel's files go: no stale config.json is left behind
    assert not (back / "config.json").exists() and not (back / "preprocessor_config.json").exists()
    for ours, theirs in zip(_our_outputs(model, preprocess, tokenizer, images),
                            _our_outputs(*openalign.load_pretrained(back), images)):
        assert torch.equal(ours, theirs)


def test_a_trained_models_directory_names_its_config_tokenizer_and_transforms(hf_dir, images, tmp_path):
    _, preprocess, tokenizer = openalign.load_pretrained(hf_dir)
    ours = openalign.pretrained.convert(hf_dir, tmp_path / "ours", to="openalign")
    texts = ["a photo of a cat", "two dogs"]
    for directory in (hf_dir, ours):  # read without the weights, as load_pretrained reads them
        assert openalign.model_config(directory) == openalign.load_pretrained(directory)[0].config
        assert torch.equal(openalign.get_transforms(directory)(images[0]), preprocess(images[0]))
        assert all(torch.equal(a, b) for a, b in zip(openalign.get_tokenizer(directory)(texts).values(),
                                                     tokenizer(texts).values()))
        with pytest.raises(OpenAlignError, match=re.escape(f"openalign.load_pretrained('{directory}') loads")):
            openalign.create_model(directory)  # random weights: never what a trained model's directory asks for
    # its config.yaml (a model section, with the tokenizer beside it) is a model file too, as a recipe is
    assert openalign.model_config(ours / "config.yaml") == openalign.model_config(ours)
    assert openalign.model_config(openalign.registry.find_config("recipes", "demo")).name == "align-tiny"
    with pytest.raises(OpenAlignError, match=r"create_model\('align-tiny'\) builds it with random ones"):
        openalign.load_pretrained("align-tiny")
    with pytest.raises(OpenAlignError, match="a trained model's directory or hub id loads with openalign.load_pre"):
        openalign.get_tokenizer("kakaobrain/align-base")


def test_overwriting_a_model_removes_its_vocabulary_processor_and_weight_shards(hf_dir, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(hf_dir, target)
    state = load_file(str(target / "model.safetensors"))  # as transformers shards a large model
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for shard, keys in shards.items():
        save_file({key: state[key] for key in keys}, str(target / shard))
    (target / "model.safetensors").unlink()
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {key: shard for shard, keys in shards.items() for key in keys}}))
    (target / "notes.txt").write_text("mine")  # not a model's file: it stays
    assert openalign.load_pretrained(target)[0].config.embed_dim == 160
    clippo = openalign.create_model("clippo-test")
    clippo.save_pretrained(target, overwrite=True)  # renders its texts: no vocabulary of its own
    assert sorted(path.name for path in target.iterdir()) == ["config.yaml", "model.safetensors", "notes.txt"]
    assert openalign.load_pretrained(target)[0].config.name == "clippo-test"
    # a damaged index names the user's files and folders, and the folder above: none of them goes
    (target / "runs").mkdir()
    (target / "vocab.json").mkdir()  # a folder under a tokenizer file's name
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "notes.txt", "b": "runs", "c": "..", "d": "../target/notes.txt"}}))
    clippo.save_pretrained(target, overwrite=True)
    assert sorted(path.name for path in target.iterdir()) == ["config.yaml", "model.safetensors", "notes.txt", "runs",
                                                               "vocab.json"]


def test_models_that_hugging_face_cannot_represent_are_refused(tmp_path):
    with pytest.raises(OpenAlignError, match="image_projection: true\\); Hugging Face's AlignModel has no image "
                                             "projection.*format='openalign'.*model.image_projection=false"):
        openalign.create_model("align-test").save_pretrained(tmp_path / "b3", format="hf")
    assert not (tmp_path / "b3").exists() and not list(tmp_path.iterdir())  # nor a staging directory left behind
    # a refused export over an existing model, overwrite or not, leaves that model as it was
    good = openalign.create_model("align-test", image_projection=False, embed_dim=80)
    before = {path.name: path.read_bytes() for path in good.save_pretrained(tmp_path / "good", format="hf").iterdir()}
    with pytest.raises(OpenAlignError, match="image_projection: true"):
        openalign.create_model("align-test").save_pretrained(tmp_path / "good", format="hf", overwrite=True)
    assert {path.name: path.read_bytes() for path in (tmp_path / "good").iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["good"]
    (tmp_path / "good" / "processor_config.json").write_text("{}")  # transformers 5's, which breaks transformers 4
    (tmp_path / "link").symlink_to(tmp_path / "good")  # through a symlink (to another disk, say), and over a model
    good.save_pretrained(tmp_path / "link", format="hf", overwrite=True)
    assert sorted(path.name for path in (tmp_path / "good").iterdir()) == sorted(before)  # no staging folder left
    assert openalign.load_pretrained(tmp_path / "link")[0].config.embed_dim == 80
    with pytest.raises(OpenAlignError, match="unknown format 'onnx'"):
        openalign.create_model("align-test").save_pretrained(tmp_path / "x", format="onnx")
    shortest = openalign.create_model("align-test", image_projection=False, embed_dim=80,
                                      preprocess={"resize_mode": "shortest", "resize_size": 32, "image_size": 32})
    with pytest.raises(OpenAlignError, match="resize_mode: shortest.*square resize only"):
        shortest.save_pretrained(tmp_path / "shortest", format="hf")


def test_export_warns_where_align_processor_would_preprocess_otherwise(tmp_path, caplog):
    plain = openalign.create_model("align-test", image_projection=False, embed_dim=80,
                                   preprocess={"resize_size": 36, "image_size": 32, "antialias": "never"})
    with caplog.at_level("WARNING"):
        plain.save_pretrained(tmp_path / "plain", format="hf")
    assert "antialiases when it shrinks images, and this model's evaluation (antialias: never)" in caplog.text


def test_mismatched_or_foreign_directories_get_clear_errors(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["text_projection.weight"] = state["text_projection.weight"][:, :16].contiguous()
    state["vision_model.encoder.blocks.0.extra.weight"] = torch.zeros(1)
    del state["text_model.encoder.layer.1.output.dense.bias"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(OpenAlignError, match=r"missing: text_model\.encoder\.layer\.1\.output\.dense\.bias; "
                                             r"unexpected: vision_model\.encoder\.blocks\.0\.extra\.weight; "
                                             r"wrong shape: text_projection\.weight \(160, 16\) \(model: \(160, 32\)\)"):
        openalign.load_pretrained(broken)

    config = json.loads((hf_dir / "config.json").read_text())
    for change, message in (({"model_type": "clip"}, "describes a 'clip' model, not ALIGN"),
                            ({"model_type": None}, "has no model_type: an AlignModel's config says 'align'"),
                            ({"vision_config": {**config["vision_config"], "depthwise_padding": [3]}},
                             "'vision_config.depthwise_padding' is \\[3\\]"),
                            ({"projection_dim": 128}, "projection_dim is 128, but AlignModel takes the vision model's "
                             "pooled features, unprojected, .* makes them 160 wide")):
        (broken / "config.json").write_text(json.dumps({key: value for key, value in {**config, **change}.items()
                                                        if value is not None}))
        with pytest.raises(OpenAlignError, match=message):
            openalign.load_pretrained(broken)
    (broken / "config.json").unlink()  # weights without a config: neither kind of directory's
    with pytest.raises(OpenAlignError, match=r"holds weights \(model.safetensors\) but no config beside them: a "
                                             "Hugging Face AlignModel directory has its config.json"):
        openalign.load_pretrained(broken)
    (broken / "config.json").write_text(json.dumps(config))
    for changes, message in (({"size": {"shortest_edge": 80}}, "must resize to a square"),
                             ({"crop_size": {"height": 65, "width": 57}}, "crops squares only"),
                             ({"resample": 4}, "PIL's BOX filter; openalign's preprocessing .* implements nearest")):
        processor = AlignProcessor.from_pretrained(hf_dir)
        for name, value in changes.items():
            setattr(processor.image_processor, name, value)
        processor.save_pretrained(broken)  # an image processor transformers runs, whose preprocessing ALIGN's is not
        with pytest.raises(OpenAlignError, match=message):
            openalign.load_pretrained(broken)
    AlignProcessor.from_pretrained(hf_dir).save_pretrained(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(OpenAlignError, match="has no weights: expected model.safetensors"):
        openalign.load_pretrained(broken)
    with pytest.raises(OpenAlignError, match="neither a directory nor a Hugging Face hub id"):
        openalign.load_pretrained(str(tmp_path / "no" / "such" / "dir"))


def test_sharded_safetensors_load_and_a_missing_shard_is_named(hf_dir, tmp_path, images):
    """Large hub models come in shards listed by model.safetensors.index.json; a shard left out of a
    copy was called truncated or corrupt."""
    sharded = tmp_path / "sharded"
    shutil.copytree(hf_dir, sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({key: state[key] for key in keys}, str(sharded / file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {key: file for file, keys in shards.items() for key in keys}}))
    expected = _our_outputs(*openalign.load_pretrained(hf_dir), images)
    for ours, theirs in zip(_our_outputs(*openalign.load_pretrained(sharded), images), expected):
        assert torch.equal(ours, theirs)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(OpenAlignError, match=r"model-00002-of-00002.safetensors' is missing: "
                                             r"model.safetensors.index.json lists it; copy or download"):
        openalign.load_pretrained(sharded)
    index = sharded / "model.safetensors.index.json"
    for malformed in ({"weight_map": []}, [1], {"weight_map": {}}):  # raised AttributeError inside, or loaded nothing
        index.write_text(json.dumps(malformed))
        with pytest.raises(OpenAlignError, match=r"model.safetensors.index.json' is malformed: expected"):
            openalign.load_pretrained(sharded)
    for shard in (5, str(hf_dir / "model.safetensors"), "../model.safetensors", "weights.bin"):  # not a shard beside
        index.write_text(json.dumps({"weight_map": {names[0]: shard}}))
        with pytest.raises(OpenAlignError, match=r"names the shard .*; a shard is a .safetensors file beside"):
            openalign.load_pretrained(sharded)


def test_a_temperature_that_is_not_one_number_is_named(hf_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(hf_dir, other)
    state = load_file(str(other / "model.safetensors"))
    save_file({**state, "temperature": torch.tensor([0.5, 0.5])}, str(other / "model.safetensors"))
    with pytest.raises(OpenAlignError, match=r"the checkpoint's temperature has shape \(2,\); AlignModel's is one"):
        openalign.load_pretrained(other)


def test_pytorch_bin_weights_load_without_running_pickled_code(hf_dir, tmp_path, images):
    legacy = tmp_path / "legacy"
    shutil.copytree(hf_dir, legacy)
    torch.save(load_file(str(legacy / "model.safetensors")), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    model, preprocess, tokenizer = openalign.load_pretrained(legacy)
    reference = openalign.load_pretrained(hf_dir)
    assert torch.equal(_our_outputs(model, preprocess, tokenizer, images)[1], _our_outputs(*reference, images)[1])

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"temperature": Payload()}, legacy / "pytorch_model.bin")
    with pytest.raises(OpenAlignError, match=r"holds more than tensors \(Unsupported global: GLOBAL print was not "
                                             r"an allowed global by default\); openalign loads weights only with "
                                             "weights_only, so that no pickled code runs"):
        openalign.load_pretrained(legacy)

    class Command:  # a module torch blocks outright: other words, which read as a corrupt file
        def __reduce__(self):
            return (os.system, ("echo pickled code ran",))

    torch.save({"temperature": Command()}, legacy / "pytorch_model.bin")
    with pytest.raises(OpenAlignError, match=r"holds more than tensors \(Trying to load unsupported GLOBAL "
                                             r"(posix|os)\.system whose module (posix|os) is blocked\); openalign"):
        openalign.load_pretrained(legacy)


@pytest.mark.parametrize("kind", ["hf", "openalign"])
def test_a_truncated_weights_file_is_named_with_the_remedy(hf_dir, tmp_path, kind):
    import shutil

    source = hf_dir if kind == "hf" else openalign.create_model("align-test").save_pretrained(tmp_path / "ours")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])  # a download cut short
    with pytest.raises(OpenAlignError, match=r"'.*copy/model.safetensors' is truncated or corrupt .*: copy or "
                                             "download it again"):
        openalign.load_pretrained(copy)


def test_weights_holding_nan_load_with_a_warning_that_names_them(tmp_path, caplog):
    """Training never checkpoints NaN weights, but weights from elsewhere may hold them: the load says
    so (by either route), rather than every embedding being NaN without a word."""
    model = openalign.create_model("align-test")
    clean = model.save_pretrained(tmp_path / "clean")
    with caplog.at_level("WARNING", logger="openalign.pretrained"):
        openalign.load_pretrained(clean)
    assert "NaN" not in caplog.text
    weights = load_file(clean / "model.safetensors")
    weights["text_projection.weight"][0, 0] = float("nan")
    weights["log_temperature"] = torch.full_like(weights["log_temperature"], float("inf"))
    broken = tmp_path / "broken"
    shutil.copytree(clean, broken)
    save_file(weights, broken / "model.safetensors")
    for load in (openalign.load_pretrained, model.init_from):
        caplog.clear()
        with caplog.at_level("WARNING", logger="openalign.pretrained"):
            load(broken)
        assert re.search(r"'.*broken' hold NaN or infinite values in 2 tensor\(s\) \(log_temperature, "
                         r"text_projection.weight\): the model's outputs will be NaN", caplog.text)


def test_a_model_directory_whose_tokenizer_is_missing_or_truncated_is_a_clear_error(tmp_path):
    directory = openalign.create_model("align-test").save_pretrained(tmp_path / "model")
    tokenizer = directory / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:500])
    with pytest.raises(OpenAlignError, match=r"the tokenizer in '.*model' cannot be loaded \(Expecting"):
        openalign.load_pretrained(directory)
    for wrong in ('{"garbage": 1}', "[]", '"x"'):  # JSON of another structure: KeyError, TypeError, ... inside
        tokenizer.write_text(wrong)
        with pytest.raises(OpenAlignError, match=r"the tokenizer in '.*model' cannot be loaded"):
            openalign.load_pretrained(directory)
    tokenizer.unlink()  # its config alone: transformers 5 builds the special tokens only, every word [UNK]
    with pytest.raises(OpenAlignError, match=r"holds its 5 special tokens and no vocabulary .* needs tokenizer.json"):
        openalign.load_pretrained(directory)
    for file in directory.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(OpenAlignError, match=r"cannot be loaded .* it needs tokenizer.json, or vocab.txt"):
        openalign.load_pretrained(directory)


def test_hub_ids_go_through_huggingface_hub(monkeypatch, hf_dir, tmp_path):
    """No network in tests: the hub download is replaced by a function returning the local copy."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(hf_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _, _ = openalign.load_pretrained("kakaobrain/align-base")
    assert calls and calls[0][0] == "kakaobrain/align-base" and "*.safetensors" in calls[0][1]
    assert model.config.embed_dim == 160 and model.config.name == "kakaobrain/align-base"

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    bin_only = tmp_path / "bin-only"  # an older repo: its weights are pytorch_model.bin alone
    shutil.copytree(hf_dir, bin_only, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(hf_dir / "model.safetensors")), bin_only / "pytorch_model.bin")
    calls.clear()
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: calls.append(allow_patterns) or str(bin_only))
    assert openalign.load_pretrained("someone/align-old")[0].config.embed_dim == 160
    assert len(calls) == 2 and "*.bin" not in calls[0] and "*.bin" in calls[1]  # .bin fetched only when needed

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OpenAlignError, match="'kakaobrain/align-base' is no directory here, and as a hub id it could "
                                             "not be fetched .*no network.*check the path"):
        openalign.load_pretrained("kakaobrain/align-base")
    (tmp_path / "runs" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # a mistyped local path looks like a hub id: the hub is tried, the directory named
    with pytest.raises(OpenAlignError, match=r"no network.*; did you mean 'runs/final'\?"):
        openalign.load_pretrained("runs/fianl")
    with pytest.raises(OpenAlignError, match=r"neither a directory nor .*; did you mean 'runs/final'\?"):
        openalign.load_pretrained("runs/finl/")
    with pytest.raises(OpenAlignError, match=r"no network.*holds the model$"):  # nothing close: no guess
        openalign.load_pretrained("runs/other")
    monkeypatch.chdir(hf_dir)  # loaded as '.', the model is named by its directory
    assert openalign.load_pretrained(".")[0].config.name == hf_dir.name


def test_a_hub_repo_of_an_openalign_model_loads_by_its_id(monkeypatch, hf_dir, tmp_path):
    """A model saved in openalign's format (save_pretrained's default, the only one for CLIPPO and ALIP) and
    uploaded as it is: the download fetches its config.yaml, as huggingface_hub fetches what the patterns allow."""
    import fnmatch

    import huggingface_hub

    repo = openalign.pretrained.convert(hf_dir, tmp_path / "repo", to="openalign")

    def fake_snapshot_download(repo_id, allow_patterns):
        snapshot = tmp_path / "cache" / repo_id / "snapshot"
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot / file.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, preprocess, tokenizer = openalign.load_pretrained("someone/align-small-openalign")
    assert model.config.name == "align-small" and tokenizer(TEXTS)["input_ids"].shape == (3, 64)
    images = [Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8))]
    for ours, theirs in zip(_our_outputs(model, preprocess, tokenizer, images),
                            _our_outputs(*openalign.load_pretrained(repo), images)):
        assert torch.equal(ours, theirs)


def test_convert_on_the_command_line(hf_dir, tmp_path, capsys):
    from openalign.cli import main

    assert main(["convert", str(hf_dir), str(tmp_path / "ours"), "--to", "openalign"]) == 0
    assert "openalign format" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    original, converted = AlignModel.from_pretrained(hf_dir), AlignModel.from_pretrained(tmp_path / "hf")
    for key, value in original.state_dict().items():
        if key == "temperature":  # stored as log τ in openalign: exp(log τ) is τ to within a rounding
            torch.testing.assert_close(value, converted.state_dict()[key], rtol=1e-6, atol=0)
        elif ".pooler." not in key:  # the unused pooler is written as an identity map
            assert torch.equal(value, converted.state_dict()[key]), key
    assert main(["convert", str(hf_dir), str(tmp_path / "ours"), "--to", "openalign"]) == 2
    assert "already holds model or tokenizer files" in capsys.readouterr().err
    assert main(["convert", str(hf_dir), "", "--to", "openalign"]) == 2  # not the working directory
    assert "the directory to save the model to is empty" in capsys.readouterr().err
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "tokenizer.json").write_text("the user's own")  # no model, but a file the save writes
    assert main(["convert", str(hf_dir), str(tmp_path / "stray"), "--to", "openalign"]) == 2
    assert "(tokenizer.json)" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "stray").iterdir()) == ["tokenizer.json"]
    assert (tmp_path / "stray" / "tokenizer.json").read_text() == "the user's own"
    assert main(["convert", str(hf_dir), str(tmp_path / "ours"), "--to", "openalign", "--overwrite"]) == 0
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--to", "hf"]) == 2
    assert "neither a directory nor a Hugging Face hub id" in " ".join(capsys.readouterr().err.split())
    # a model directory's own files name the directory, not an architecture or an open_clip state dict
    ours = tmp_path / "ours"
    assert main(["convert", str(ours / "model.safetensors"), str(tmp_path / "y"), "--to", "openalign",
                 "--architecture", "align-test"]) == 2
    assert "is the weights file of the model in" in " ".join(capsys.readouterr().err.split())
    for name, kind in (("config.yaml", "config"), ("model.safetensors", "weights")):
        with pytest.raises(OpenAlignError, match=f"is the {kind} file of the model in '.*ours': name that directory"):
            openalign.load_pretrained(ours / name)
    with pytest.raises(OpenAlignError, match="is the weights file of the model in '.*': name that directory"):
        openalign.load_pretrained(hf_dir / "model.safetensors")  # a Hugging Face ALIGN directory's, too
    released = tmp_path / "released"  # open_clip's hub layout: a CLIP config.json beside the weights file
    released.mkdir()
    (released / "config.json").write_text('{"model_type": "clip"}')
    torch.save({"logit_scale": torch.zeros(())}, released / "open_clip_pytorch_model.bin")
    with pytest.raises(OpenAlignError, match="is a weights file without a config: name the architecture"):
        openalign.load_pretrained(released / "open_clip_pytorch_model.bin")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:  # a webdataset shard: torch's advice is not repeated
        tar.add(ours / "config.yaml", "config.yaml")
    assert main(["convert", str(tmp_path / "shard.tar"), str(tmp_path / "z"), "--to", "openalign", "--architecture",
                 "alip-tiny"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is a tar archive, not a weights file openalign reads" in err and "weights_only" not in err
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))  # was 'a weights file without a config'
    for architecture in (None, "alip-tiny"):  # and, named one, 'truncated or corrupt (Unsupported operand 255)'
        with pytest.raises(OpenAlignError, match="photo.jpg' is not a weights file: openalign reads torch.save files"):
            openalign.load_pretrained(tmp_path / "photo.jpg", architecture=architecture)
    # a run directory's config.yaml is its recipe: never replaced by a model's, even with --overwrite
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name: align-test}\ntrain: {steps: 2}\n")
    assert main(["convert", str(ours), str(run), "--to", "openalign", "--overwrite"]) == 2
    assert "is a training run's directory" in " ".join(capsys.readouterr().err.split())
    assert (run / "config.yaml").read_text() == "model: {name: align-test}\ntrain: {steps: 2}\n"


def test_a_config_json_of_wrong_types_is_a_clear_error(hf_dir, tmp_path):
    settings = json.loads((hf_dir / "config.json").read_text())
    for name, change in (("projection", {"projection_dim": "eighty"}), ("vision", {"vision_config": "x"}),
                         ("list", None)):
        broken = tmp_path / name
        shutil.copytree(hf_dir, broken)
        (broken / "config.json").write_text(json.dumps([] if change is None else {**settings, **change}))
        with pytest.raises(OpenAlignError,
                           match=r"config.json' is (not a valid AlignConfig|not a JSON object)") as error:
            openalign.load_pretrained(broken)
        if name == "projection":  # what was wrong, which transformers says on its second line
            assert "'eighty'" in str(error.value), error.value
