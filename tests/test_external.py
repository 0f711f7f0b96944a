"""Weights released by the papers' own code: ALIP's open_clip state dict and CLIPPO's big_vision
.npz load into openalign models with the original code's outputs. The references are open_clip's
own CLIP model and an independent numpy forward of big_vision's CLIPPO (tests/big_vision_reference.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import big_vision_reference as big_vision
import openalign
from openalign.cli import main
from openalign.errors import OpenAlignError


def _open_clip_model(layers: int = 2) -> torch.nn.Module:
    """open_clip's CLIP at alip-tiny's sizes (GELU, as ALIP), every weight randomised so that
    a transposed or swapped tensor shows."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=128, vision_cfg=open_clip.model.CLIPVisionCfg(layers=layers, width=128, head_width=32,
                                                                image_size=48, patch_size=8),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=32, vocab_size=49408, width=128, heads=4, layers=2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.logit_scale.fill_(3.1)
    return model.eval()


def test_alips_released_open_clip_weights_load_with_open_clips_outputs(tmp_path):
    """ALIP_YFCC15M_B32.pt is a DDP state dict of open_clip's ViT-B/32 CLIP (spec alip.md §8.20);
    the same layout at alip-tiny's sizes gives open_clip's embeddings and logit scale, directly,
    after ``openalign convert --architecture`` and as ``train.init_from``."""
    import open_clip

    reference = _open_clip_model()
    checkpoint = tmp_path / "ALIP_tiny.pt"
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, checkpoint)
    pixels = torch.randn(3, 3, 48, 48)
    texts = ["a photo of a red car", "two dogs on a beach at sunset", ""]
    with torch.no_grad():
        expected_images = reference.encode_image(pixels, normalize=True)
        expected_texts = reference.encode_text(open_clip.tokenize(texts, context_length=32), normalize=True)

    model, _, tokenizer = openalign.load_pretrained(checkpoint, architecture="alip-tiny")
    assert main(["convert", str(checkpoint), str(tmp_path / "converted"), "--to", "openalign",
                 "--architecture", "alip-tiny"]) == 0
    converted, _, _ = openalign.load_pretrained(tmp_path / "converted")
    fine_tuned = openalign.create_model("alip-tiny").eval()
    fine_tuned.init_from(checkpoint)  # train.init_from: a recipe fine-tunes from the released file
    for loaded in (model, converted, fine_tuned):
        with torch.no_grad():
            images, text = loaded.encode_image(pixels), loaded.encode_text(**tokenizer(texts))
        torch.testing.assert_close(images, expected_images, atol=1e-5, rtol=0)
        torch.testing.assert_close(text, expected_texts, atol=1e-5, rtol=0)
        assert loaded.logit_scale.item() == pytest.approx(np.exp(3.1), rel=1e-6)


def test_clippos_released_big_vision_weights_load_with_big_visions_outputs(tmp_path):
    """A big_vision CLIPPO checkpoint (params/img/..., params/t, and optimiser state) at
    clippo-test's sizes gives the embeddings and scale of a numpy forward written from
    big_vision's code."""
    params = big_vision.make_params(width=32, depth=2, heads=2, mlp_dim=64, patch=8, image_size=32, embed_dim=16)
    big_vision.save_npz(params, tmp_path / "clippo_tiny.npz")
    config = openalign.model_config("clippo-test")
    config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, patch_size=8, depth=2,
                                                                     mlp_ratio=2.0))
    from openalign.external import load_external_weights

    only_params = {k.removeprefix("params/"): v for k, v in params.items() if k.startswith("params/")}
    big_vision.save_npz(only_params, tmp_path / "params_only.npz")  # a file of the parameters alone
    images = np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    for file, load in (("clippo_tiny.npz", load_external_weights), ("params_only.npz", load_external_weights),
                       ("clippo_tiny.npz", lambda model, path: model.init_from(path))):  # train.init_from
        model = openalign.create_model(config).eval()
        load(model, tmp_path / file)
        with torch.no_grad():
            ours = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
        np.testing.assert_allclose(ours.numpy(), big_vision.forward(params, images), atol=2e-6, rtol=0)
        assert model.logit_scale.item() == pytest.approx(big_vision.logit_scale(params), rel=1e-6)
    big_vision.save_npz({**params, "params/txt/Embed_0/embedding": np.zeros((4, 32), np.float32)},
                        tmp_path / "two_towers.npz")  # LiT's layout: a text tower CLIPPO does not have
    with pytest.raises(OpenAlignError, match="unexpected: txt/Embed_0/embedding"):
        load_external_weights(openalign.create_model(config), tmp_path / "two_towers.npz")


def test_npz_shapes_are_read_from_the_headers_of_members_with_and_without_npy(tmp_path):
    import zipfile

    from openalign.external import _npz_shape

    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3), np.float32))
    with zipfile.ZipFile(tmp_path / "a.npz", "a") as archive, archive.open("bare", "w") as member:
        np.lib.format.write_array(member, np.zeros((4,), np.int8))  # a member np.load lists under its own name
    with np.load(tmp_path / "a.npz") as archive:
        assert sorted(archive.files) == ["bare", "x"]
        assert (_npz_shape(archive, "x"), _npz_shape(archive, "bare")) == ((2, 3), (4,))


def test_released_weights_that_do_not_fit_get_errors_naming_them(tmp_path):
    torch.save(_open_clip_model(layers=3).state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(OpenAlignError, match=r"open_clip weights .* does not fit this model \(unexpected: "
                                             r"visual\.transformer\.resblocks\.2\."):
        openalign.load_pretrained(tmp_path / "deeper.pt", architecture="alip-tiny")
    with pytest.raises(OpenAlignError, match="loads into a model with open_clip towers .* not into 'align-test'"):
        openalign.load_pretrained(tmp_path / "deeper.pt", architecture="align-test")
    with pytest.raises(OpenAlignError, match="is a weights file without a config: name the architecture"):
        openalign.load_pretrained(tmp_path / "deeper.pt")
    with pytest.raises(OpenAlignError, match="weights file '.*missing.pt' does not exist"):
        openalign.load_pretrained(tmp_path / "missing.pt", architecture="alip-tiny")
    state = _open_clip_model().state_dict()
    broken = {"list.pt": [torch.zeros(1)], "with_epoch.pt": {**state, "epoch": 3},
              "two_scales.pt": {**state, "logit_scale": torch.ones(2)}}
    messages = {"list.pt": "holds a list, not a state dict", "with_epoch.pt": r"values that are not weights \(epoch",
                "two_scales.pt": r"wrong shape: logit_scale \(2,\)"}
    for name, content in broken.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not weights at all\n")
    messages |= {"empty.pt": "truncated or corrupt", "text.pt": "text.pt' is not a weights file"}
    for name, message in messages.items():
        with pytest.raises(OpenAlignError, match=message):
            openalign.load_pretrained(tmp_path / name, architecture="alip-tiny")

    params = big_vision.make_params(width=32, depth=2, heads=2, mlp_dim=64, patch=16, image_size=32, embed_dim=16)
    big_vision.save_npz(params, tmp_path / "clippo.npz")
    with pytest.raises(OpenAlignError, match=r"do not fit 'clippo-test' \(unexpected: Transformer/encoderblock_1/"):
        openalign.load_pretrained(tmp_path / "clippo.npz", architecture="clippo-test")  # one block, not two
    with pytest.raises(OpenAlignError, match="loads into a CLIPPO model with a ViT encoder"):
        openalign.load_pretrained(tmp_path / "clippo.npz", architecture="align-test")
    params = big_vision.make_params(width=32, depth=1, heads=2, mlp_dim=128, patch=16, image_size=32, embed_dim=16)
    big_vision.save_npz(params, tmp_path / "clippo.npz")  # clippo-test's shapes: only the damage is wrong
    openalign.load_pretrained(tmp_path / "clippo.npz", architecture="clippo-test")
    whole = (tmp_path / "clippo.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:5000])
    np.savez_compressed(tmp_path / "compressed.npz", **params)
    for name, data in (("flipped.npz", whole), ("flipped_compressed.npz", (tmp_path / "compressed.npz").read_bytes())):
        middle = len(data) // 2
        (tmp_path / name).write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    for broken in ("cut.npz", "flipped.npz", "flipped_compressed.npz"):
        with pytest.raises(OpenAlignError, match="is not a readable .npz file"):
            openalign.load_pretrained(tmp_path / broken, architecture="clippo-test")


def test_clippo_b16_expects_the_parameter_tree_of_the_released_checkpoints():
    """The shapes of spec clippo.md §2.2 (measured on big_vision's model), written out here."""
    from openalign.external import _check_big_vision_fits

    attention = {**{f"{n}/kernel": (768, 12, 64) for n in ("query", "key", "value")},
                 **{f"{n}/bias": (12, 64) for n in ("query", "key", "value")},
                 "out/kernel": (12, 64, 768), "out/bias": (768,)}
    mlp = {"Dense_0/kernel": (768, 3072), "Dense_0/bias": (3072,), "Dense_1/kernel": (3072, 768),
           "Dense_1/bias": (768,)}
    shapes = {"embedding/kernel": (16, 16, 3, 768), "embedding/bias": (768,), "pos_embedding": (1, 196, 768),
              "Transformer/encoder_norm/scale": (768,), "Transformer/encoder_norm/bias": (768,),
              "MAPHead_0/probe": (1, 1, 768), "MAPHead_0/LayerNorm_0/scale": (768,),
              "MAPHead_0/LayerNorm_0/bias": (768,), "head/kernel": (768, 768), "head/bias": (768,), "t": (1,)}
    shapes |= {f"MAPHead_0/MultiHeadDotProductAttention_0/{k}": v for k, v in attention.items()}
    shapes |= {f"MAPHead_0/MlpBlock_0/{k}": v for k, v in mlp.items()}
    for block in range(12):
        prefix = f"Transformer/encoderblock_{block}/"
        shapes |= {f"{prefix}LayerNorm_{i}/{p}": (768,) for i in (0, 1) for p in ("scale", "bias")}
        shapes |= {f"{prefix}MultiHeadDotProductAttention_0/{k}": v for k, v in attention.items()}
        shapes |= {f"{prefix}MlpBlock_0/{k}": v for k, v in mlp.items()}
    model = openalign.create_model("clippo-b16")
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == 93_474_817  # the spec's count
    _check_big_vision_fits(model, shapes, "clippo_b16_yfcc100m.npz")  # no error
    with pytest.raises(OpenAlignError, match=r"wrong shape: pos_embedding \(1, 197, 768\)"):
        _check_big_vision_fits(model, {**shapes, "pos_embedding": (1, 197, 768)}, "with_a_class_token.npz")


def test_alip_vit_b32_takes_the_weights_of_open_clips_vit_b32_by_name_and_shape():
    """ALIP's file loads strictly into ALIP's create_model("ViT-B/32") (spec alip.md §8.20), whose
    weights are open_clip's ViT-B-32's: every one maps onto alip-vit-b32's at its shape."""
    import open_clip

    from openalign.external import _from_open_clip

    theirs = {_from_open_clip(k): tuple(v.shape) for k, v in open_clip.create_model("ViT-B-32").state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in openalign.create_model("alip-vit-b32").state_dict().items()}
    assert theirs == ours
