"""CLIPPO (shared spec clippo.md §2-§4): the one-tower model against an independent forward pass
written from the spec, its parameters, initialisation, timm initialisation, training and evaluation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_unifont

import openalign
from openalign.errors import OpenAlignError

pytestmark = needs_unifont
CPU = torch.device("cpu")


def reference_embedding(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """Spec §2.1 step by step from the weights alone: conv patches, + position embeddings, pre-LN
    blocks (MHA with biases, tanh-GELU MLP), final LayerNorm, MAP head (probe cross-attention, then
    p + MLP(LN(p))), the dense head, and z / (|z| + 1e-8)."""
    def ln(v, prefix):
        return F.layer_norm(v, v.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-6)

    def dense(v, prefix):
        return v @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]

    def mlp(v, prefix):
        return dense(F.gelu(dense(v, f"{prefix}.fc1"), approximate="tanh"), f"{prefix}.fc2")

    def attention(q, k, v):  # (B, Lq, C), (B, Lk, C): softmax(q kᵀ / √d) v per head
        b, lq, c = q.shape
        split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
        weights = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads)).softmax(-1)
        return (weights @ split(v)).transpose(1, 2).reshape(b, lq, c)

    p = "encoder.vit"
    tokens = F.conv2d(x, state[f"{p}.patch_embed.proj.weight"], state[f"{p}.patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + state[f"{p}.pos_embed"]
    block = 0
    while f"{p}.blocks.{block}.norm1.weight" in state:
        b = f"{p}.blocks.{block}"
        h = ln(tokens, f"{b}.norm1")
        q, k, v = dense(h, f"{b}.attn.qkv").chunk(3, dim=-1)
        tokens = tokens + dense(attention(q, k, v), f"{b}.attn.proj")
        tokens = tokens + mlp(ln(tokens, f"{b}.norm2"), f"{b}.mlp")
        block += 1
    tokens = ln(tokens, f"{p}.norm")
    a = f"{p}.attn_pool"
    probe = state[f"{a}.latent"].expand(x.shape[0], -1, -1)
    k, v = dense(tokens, f"{a}.kv").chunk(2, dim=-1)
    pooled = dense(attention(dense(probe, f"{a}.q"), k, v), f"{a}.proj")
    pooled = (pooled + mlp(ln(pooled, f"{a}.norm"), f"{a}.mlp"))[:, 0]
    z = dense(pooled, "head")
    return z / (z.norm(dim=-1, keepdim=True) + 1e-8)


def test_clippo_b16_has_the_parameters_of_big_visions_model():
    model = openalign.create_model("clippo-b16")
    assert sum(p.numel() for p in model.parameters()) == 93_474_817  # spec §2.2, measured on the Flax model
    names = [name for name, _ in model.named_parameters()]
    assert all(name.startswith(("encoder.vit.", "head.")) or name == "log_temperature" for name in names)
    assert not any("cls_token" in name or "type" in name or "text" in name for name in names)  # nothing per modality
    vit = model.encoder.vit
    assert vit.pos_embed.shape == (1, 196, 768) and vit.attn_pool.latent.shape == (1, 1, 768)
    assert model.head.weight.shape == (768, 768) and model.head.bias is not None
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 12 * 2 + 1 + 1 and all(m.eps == 1e-6 for m in norms)
    assert model.logit_scale.item() == pytest.approx(10.0)
    assert model.config.build_tokenizer()("a cat")["pixels"].shape == (1, 3, 224, 224)


def test_both_modalities_equal_an_independent_forward_pass_through_the_one_shared_tower():
    torch.manual_seed(0)
    model = openalign.create_model("clippo-test", encoder={"depth": 2}).eval()
    state = model.state_dict()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    text = model.config.build_tokenizer()(["a red circle", "a blue star", ""])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference_embedding(state, images, 2, 16),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(**text), reference_embedding(state, text["pixels"], 2, 16),
                                   rtol=1e-5, atol=1e-5)
        out = model(images, text)
    torch.testing.assert_close(out["image_emb"], model.encode_image(images), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["text_emb"], model.encode_text(**text), rtol=1e-5, atol=1e-6)
    assert out["logit_scale"].item() == pytest.approx(10.0)


def test_a_clippo_model_cast_to_bf16_classifies_and_takes_inputs_as_the_others_do():
    from PIL import Image

    model = openalign.create_model("clippo-test").eval()
    preprocess, tokenizer = openalign.get_transforms("clippo-test", train=False), openalign.get_tokenizer("clippo-test")
    images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue")]
    expected = openalign.classify(model, preprocess, tokenizer, images, ["a red image", "a blue image"])
    half = openalign.classify(model.bfloat16(), preprocess, tokenizer, images, ["a red image", "a blue image"])
    torch.testing.assert_close(half, expected, atol=0.05, rtol=0)  # rendered text, fp32 pixels, into bf16 weights
    with torch.no_grad():  # the processor's whole output, as CLIP_benchmark passes it (moved with .to, as HF's)
        assert torch.equal(model.encode_text(tokenizer(["a cat"]).to("cpu")), model.encode_text(**tokenizer(["a cat"])))
    with pytest.raises(OpenAlignError, match=r"a mapping of input_ids, without pixels: pass this model's tokenizer"):
        model.encode_text({"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(OpenAlignError, match=r"model\(image, text=tokenizer\(texts\)\)"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    model.constrain_parameters()  # every model has it: nothing to clamp here


def test_forward_checks_the_rendered_text_as_encode_text_does():
    """The one pass over both modalities takes nothing encode_image / encode_text refuse: 8-bit
    renderings (grey levels 0 and 127, not [-1, 1]) once embedded as text of another contrast."""
    model = openalign.create_model("clippo-test").eval()
    tokenizer = model.config.build_tokenizer()
    images, text = torch.rand(2, 3, 32, 32) * 2 - 1, tokenizer(["a red circle", "a blue star"])
    grey = (text["pixels"] * 127.5 + 127.5).round().to(torch.uint8)
    for bad, match in ((grey, r"rendered texts in \[-1, 1\], got torch.uint8 ones"),
                       (text["pixels"][0], r"\(N, 3, H, W\), got a tensor of shape \(3, 32, 32\)"),
                       (F.interpolate(text["pixels"], size=64), "takes 32×32 px images")):
        for call in (lambda: model(images, {"pixels": bad}), lambda: model.encode_text(bad)):
            with pytest.raises(OpenAlignError, match=match):
                call()
    with pytest.raises(OpenAlignError, match="takes 32×32 px images"):
        model(F.interpolate(images, size=64), text)
    assert torch.equal(tokenizer(b"a red circle")["pixels"], text["pixels"][:1])  # bytes: one text, not its bytes


def test_render_settings_are_checked_where_the_recipe_is_read(tmp_path):
    """A setting nothing can be rendered with is named by its key when the recipe loads, and a
    missing font when training builds its text processor (not inside a loader worker's error)."""
    from openalign.errors import ConfigError
    from openalign.recipe import load_recipe

    for override, key in (("model.render.text_brightness=300", "model.render.text_brightness"),
                          ("model.render.max_chars=-5", "model.render.max_chars"),
                          ("model.render.font_size=8", "model.render.font_size")):
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            load_recipe("clippo-shapes", [override])
    recipe = load_recipe("clippo-shapes", [f"model.render.font_path={tmp_path / 'missing.hex'}"])
    recipe.model.build_tokenizer()  # evaluation of images alone needs no font
    with pytest.raises(OpenAlignError, match="Unifont hex file not found: .*missing.hex"):
        recipe.model.build_tokenizer(train=True)


def test_the_text_processor_names_its_font_files_by_content(tmp_path):
    """The embedding cache keys text embeddings by the processor's repr: a font file replaced in
    place (another Unifont release at the same path) renders otherwise, so it must change the key."""
    from openalign.data.render import DEFAULT_UNIFONT

    font = tmp_path / "unifont.hex"
    font.write_bytes(Path(DEFAULT_UNIFONT).read_bytes())
    tokenizer = openalign.create_model("clippo-test", render={"font_path": str(font)}).config.build_tokenizer()
    before = repr(tokenizer)
    os.utime(font, ns=(1, 1))  # the same font, copied at another time (another node's copy): the same key
    assert repr(tokenizer) == before
    font.write_bytes(font.read_bytes() + b"E000:" + b"F" * 64 + b"\n")
    assert repr(tokenizer) != before and str(font) in before


def test_initialisation_follows_big_vision_and_only_kernels_are_decayed():
    from openalign.train import parameter_groups

    torch.manual_seed(0)
    model = openalign.create_model("clippo-b16")
    vit, width = model.encoder.vit, 768
    assert vit.pos_embed.std().item() == pytest.approx(1 / math.sqrt(width), rel=0.02)
    mlp_bias = vit.blocks[0].mlp.fc1.bias
    assert 0 < mlp_bias.abs().max().item() < 1e-5
    assert vit.blocks[0].attn.qkv.bias.abs().max().item() == 0.0
    bound = math.sqrt(6 / (2 * width))  # xavier-uniform of each 768×768 q, k and v matrix
    q, k, v = vit.blocks[0].attn.qkv.weight.split(width)
    assert all(bound * 0.98 < m.abs().max().item() <= bound for m in (q, k, v))
    patch = vit.patch_embed.proj.weight  # lecun normal: std 1/√fan_in, truncated
    assert patch.std().item() == pytest.approx(1 / math.sqrt(16 * 16 * 3), rel=0.05)

    decayed, exempt = parameter_groups(model, 0.1, "adamw")
    decayed_ids = {id(p) for p in decayed["params"]}
    kernels = {name for name, p in model.named_parameters() if name.endswith(".weight") and p.ndim >= 2}
    assert {name for name, p in model.named_parameters() if id(p) in decayed_ids} == kernels
    assert exempt["weight_decay"] == 0.0


def test_the_encoder_initialises_from_a_timm_vit_checkpoint(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    source = VisionTransformer(img_size=48, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))  # a class-token ViT on a 3×3 grid
    model = openalign.create_model("clippo-test")
    probe, head = model.encoder.vit.attn_pool.latent.clone(), model.head.weight.clone()
    model.init_from(tmp_path)
    vit = model.encoder.vit
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(vit.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert vit.pos_embed.shape == (1, 4, 32)  # class position dropped, 3×3 resampled to 2×2
    assert torch.equal(vit.attn_pool.latent, probe) and torch.equal(model.head.weight, head)  # heads stay random

    from openalign.models.vit import ViTConfig  # mean pooling: big_vision's gap, mean(norm(x)), loads the same

    averaged = ViTConfig(image_size=48, patch_size=16, width=32, depth=1, num_heads=2, pool="avg").build()
    averaged.load_timm_checkpoint(tmp_path)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(averaged(pixels), averaged.vit.norm(averaged.vit.forward_intermediates(
            pixels, norm=False, intermediates_only=True, output_fmt="NLC")[-1]).mean(dim=1))
    torch.testing.assert_close(averaged.vit.norm.weight, source.norm.weight)

    other = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, num_classes=0)
    save_file(other.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(OpenAlignError, match="another ViT size"):
        model.init_from(tmp_path / "wide.safetensors")
    with pytest.raises(OpenAlignError, match="does not exist"):
        model.init_from(tmp_path / "missing.safetensors")


def test_init_from_reads_every_openalign_clippo_model_as_load_pretrained_does(tmp_path, shapes_root):
    from openalign.recipe import load_recipe
    from openalign.train import train

    torch.manual_seed(0)
    saved = openalign.create_model("clippo-test").save_pretrained(tmp_path / "saved")
    overrides = ["model.name=clippo-test", f"data.train.root={shapes_root}", "data.train.num_train=256",
                 "data.train.num_test=24", "data.train.image_size=32", "data.num_workers=0", "train.steps=2",
                 "train.batch_size=16", "train.warmup_steps=1", "train.cooldown_steps=1", "train.ema_decay=0.9",
                 f"eval.tasks.0.root={shapes_root}", "eval.tasks.0.knn_memory_size=64", "run.checkpoint_every=2",
                 "run.tensorboard=false"]
    train(load_recipe("clippo-shapes", [*overrides, f"run.output_dir={tmp_path / 'run'}"]), show_progress=False)
    (checkpoint,) = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    for source in (saved, tmp_path / "run", checkpoint, checkpoint / "ema"):  # model, run, checkpoint, average
        torch.manual_seed(1)
        model = openalign.create_model("clippo-test")
        model.init_from(source)
        expected = openalign.load_pretrained(source)[0].state_dict()
        assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items()), source
    # a recipe's train.init_from takes a run as it does for ALIGN, and a run without a checkpoint says so
    train(load_recipe("clippo-shapes", [*overrides, "train.steps=1", f"run.output_dir={tmp_path / 'again'}",
                                        f"train.init_from={tmp_path / 'run'}"]), show_progress=False)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(OpenAlignError, match="holds no openalign checkpoint"):
        openalign.create_model("clippo-test").init_from(tmp_path / "empty")
    with pytest.raises(OpenAlignError, match="is the weights file of the model in"):
        openalign.create_model("clippo-test").init_from(saved / "model.safetensors")
    with pytest.raises(OpenAlignError, match="holds no model: neither an openalign one"):
        openalign.create_model("clippo-test").init_from(tmp_path / "empty" / "checkpoints")
    with pytest.raises(OpenAlignError, match="does not fit this model"):  # another size: named, not half-loaded
        openalign.create_model("clippo-tiny").init_from(saved)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (50, 0.5), (100, 1.0), (200, math.sqrt(0.5)),
                                            (350, math.sqrt(100 / 350) * 0.5), (400, 0.0)])
def test_rsqrt_schedule_with_warmup_and_cooldown_is_big_visions(step, expected):
    from openalign.train import lr_factor

    # spec §4.1 with timescale = warmup = cooldown = 100 and 400 steps (the COCO sanity run)
    assert lr_factor(step, "rsqrt", 100, 400, cooldown_steps=100, timescale=100) == pytest.approx(expected)
    assert lr_factor(300, "rsqrt", 100, 400, timescale=1000) == pytest.approx(1 / math.sqrt(1.2))


def test_clippo_trains_from_its_recipe_evaluates_and_reloads(tmp_path, shapes_root):
    from openalign.recipe import load_recipe
    from openalign.train import train

    overrides = ["model.name=clippo-test", f"data.train.root={shapes_root}", "data.train.num_train=256",
                 "data.train.num_test=24", "data.train.image_size=32", "data.num_workers=0", "train.steps=4",
                 "train.batch_size=16", "train.warmup_steps=1", "train.cooldown_steps=1",
                 f"eval.tasks.0.root={shapes_root}", "eval.tasks.0.knn_memory_size=64",
                 f"run.output_dir={tmp_path / 'run'}", "run.checkpoint_every=0", "run.tensorboard=false"]
    recipe = load_recipe("clippo-shapes", overrides)
    assert (recipe.loss.label_smoothing, recipe.loss.directions, recipe.train.schedule) == (0.0, "mean", "rsqrt")
    result = train(recipe, show_progress=False)
    assert 0.0 <= result.metrics["shapes/image_retrieval_recall@10"] <= 1.0
    model, transform, text_processor = openalign.load_pretrained(tmp_path / "run")
    assert isinstance(model, openalign.models.Clippo) and transform.config.image_size == 32
    with pytest.raises(OpenAlignError, match="no AlignModel form"):
        model.save_pretrained(tmp_path / "hf", format="hf")
    saved = model.save_pretrained(tmp_path / "saved")
    again, _, _ = openalign.load_pretrained(saved)
    pixels = text_processor(["a red circle"])["pixels"]
    torch.testing.assert_close(again.encode_text(pixels), model.encode_text(pixels))


def test_the_coco_and_yfcc_recipes_are_big_visions_settings():
    from openalign.recipe import load_recipe

    coco = load_recipe("clippo-b16-coco")
    t = coco.train
    assert (t.batch_size, t.steps, t.lr, t.schedule, t.warmup_steps, t.rsqrt_timescale, t.cooldown_steps) == \
        (4000, 400, 1e-4, "rsqrt", 100, 100, 100)
    assert t.weight_decay * t.lr == pytest.approx(3e-4) and t.grad_clip == 1.0 and t.init_from
    assert (t.optimizer, t.betas, t.eps) == ("adafactor", (0.9, 0.999), 1e-30)  # big_vision's scale_by_adafactor
    assert coco.model.preprocess.random_flip
    yfcc = load_recipe("clippo-b16-yfcc100m")
    t = yfcc.train
    assert (t.batch_size, t.steps, t.lr, t.warmup_steps, t.rsqrt_timescale, t.cooldown_steps) == \
        (8192, 100_000, 1e-3, 10_000, 10_000, 10_000)
    assert t.weight_decay * t.lr == pytest.approx(1e-4) and not yfcc.model.preprocess.random_flip
    assert (t.optimizer, t.betas, t.eps) == ("adafactor", (0.9, 0.999), 1e-30)
    assert (yfcc.loss.label_smoothing, yfcc.loss.directions) == (0.0, "mean")
    source = yfcc.data.train  # §6: title, description or tags at random; non-descriptive ones dropped
    assert (source.text_key, source.text_choice, source.drop_non_descriptive) == (
        "title.txt;description.txt;tags.txt", "random", True)
    # CLIPPO reads prompts as pixels: every zero-shot evaluation canonicalises them as big_vision does (§5.1)
    from openalign.eval.suite import load_suite
    from openalign.eval.tasks import ZeroShotEvalConfig

    tasks = [task for name in ("clippo-b16-coco", "clippo-b16-yfcc100m") for task in load_recipe(name).eval.tasks]
    zero_shot = [task for task in [*tasks, *load_suite("clippo").tasks] if isinstance(task, ZeroShotEvalConfig)]
    assert len(zero_shot) >= 4 and all(task.canonicalize for task in zero_shot)


def test_an_init_from_that_names_no_model_is_a_config_error(tmp_path, shapes_root):
    from conftest import tiny_recipe_overrides
    from openalign.errors import ConfigError
    from openalign.recipe import load_recipe
    from openalign.train import train

    recipe = load_recipe("demo", tiny_recipe_overrides(shapes_root, tmp_path / "run") + ["train.init_from=x"])
    with pytest.raises(ConfigError, match="'train.init_from' cannot initialise this model: 'x' is neither"):
        train(recipe, show_progress=False)
    with pytest.raises(ConfigError, match="train.init_from"):  # a first run under --resume latest reads it too
        train(recipe, resume="latest", show_progress=False)


CORPUS = ("The first sentence is here. A second one follows it! Is this the third? Short. "
          "The fifth sentence closes the document.")


def test_sentence_pairs_are_neighbours_within_documents_with_the_first_rendered(tmp_path):
    import gzip
    import json

    from openalign.data import SentencePairsSourceConfig

    (tmp_path / "a.txt").write_text(CORPUS + "\n\nOnly one sentence in this document.\n")
    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt") as handle:  # C4's own file names
        handle.write(json.dumps({"text": "Another document starts. And it ends here.", "url": "x"}) + "\n")
    model = openalign.create_model("clippo-test")
    processor = model.config.build_tokenizer()
    dataset = SentencePairsSourceConfig(path=str(tmp_path / "*")).build(None, 0, 0, processor)
    assert dataset.pairs == [("The first sentence is here.", "A second one follows it!"),
                             ("A second one follows it!", "Is this the third?"),
                             ("Another document starts.", "And it ends here.")]  # "Short." is under 10 characters
    sample = dataset[(0, 1)]
    assert torch.equal(sample["image"], processor(["A second one follows it!"])["pixels"][0])
    assert sample["text"] == "Is this the third?"

    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(OpenAlignError, match="bad.jsonl, line 1: .*'text' field"):
        SentencePairsSourceConfig(path=str(tmp_path / "bad.jsonl")).build(None, 0, 0, processor)
    with pytest.raises(OpenAlignError, match=r"1 text file\(s\) not found: .*missing/\*.txt"):
        SentencePairsSourceConfig(path=str(tmp_path / "missing/*.txt")).build(None, 0, 0, processor)
    with pytest.raises(OpenAlignError, match=r"2 text file\(s\) not found: .*b.txt, .*c.txt"):  # a download missing
        SentencePairsSourceConfig(path=str(tmp_path / "{a,b,c}.txt")).build(None, 0, 0, processor)
    whole = (tmp_path / "c4-train.00000-of-01024.json.gz").read_bytes()
    (tmp_path / "cut.json.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(OpenAlignError, match=r"cannot read text file '.*cut.json.gz' \(EOFError"):
        SentencePairsSourceConfig(path=str(tmp_path / "cut.json.gz")).build(None, 0, 0, processor)
    (tmp_path / "latin1.txt").write_bytes(CORPUS.encode() + b"\nCaf\xe9 au lait is served. With a croissant too.\n")
    latin1 = SentencePairsSourceConfig(path=str(tmp_path / "latin1.txt"))
    dataset = latin1.build(None, 0, 0, processor)  # the line that is not UTF-8 is dropped and counted, not mangled
    assert len(dataset.pairs) == 2 and dataset.dropped == {"skipped/document not UTF-8": 1}
    with pytest.raises(OpenAlignError, match="dropped entries when it was read .*data.strict is true"):
        latin1.build(None, 0, 0, processor, strict=True)
    align = openalign.create_model("align-test").config.build_tokenizer()
    with pytest.raises(OpenAlignError, match="reads rendered text"):
        SentencePairsSourceConfig(path=str(tmp_path / "a.txt")).build(None, 0, 0, align)


def test_a_mixture_draws_each_source_at_its_weight_and_shards_map_style_sources():
    from openalign.data.sources import MixtureDataset, _endless

    class Tagged(torch.utils.data.Dataset):
        def __init__(self, tag, size):
            self.tag, self.size = tag, size

        def __len__(self):
            return self.size

        def __getitem__(self, key):
            return {"source": self.tag, "index": key[1]}

    stream = iter(MixtureDataset([Tagged("a", 50), Tagged("b", 50)], [3.0, 1.0], seed=0))
    draws = [next(stream)["source"] for _ in range(4000)]
    assert draws.count("a") / len(draws) == pytest.approx(0.75, abs=0.025)
    shards = [[next(it)[0]["index"] for _ in range(25)]
              for it in (_endless(Tagged("a", 50), s, 2, 0, None) for s in (0, 1))]
    assert sorted(shards[0] + shards[1]) == list(range(50))  # one pass: disjoint shards covering everything


def test_clippo_co_trains_on_image_text_and_sentence_pairs(tmp_path, shapes_root):
    from openalign.recipe import load_recipe
    from openalign.train import train

    (tmp_path / "corpus.txt").write_text(CORPUS + "\n" + CORPUS.replace("sentence", "line") + "\n")
    overrides = ["model.name=clippo-test", "data.num_workers=0", "train.steps=3", "train.batch_size=8",
                 "train.warmup_steps=1", "train.cooldown_steps=1", "eval.tasks=[]", f"run.output_dir={tmp_path / 'run'}",
                 "run.checkpoint_every=0", "run.tensorboard=false",
                 "data.train={type: mixture, weights: [0.5, 0.5], sources: [{type: shapes, root: " + str(shapes_root) +
                 ", num_train: 256, num_test: 24, image_size: 32}, {type: sentence_pairs, path: " +
                 str(tmp_path / "corpus.txt") + "}]}"]
    recipe = load_recipe("clippo-shapes", overrides)
    result = train(recipe, show_progress=False)
    assert result.step == 3
    # the stream the trainer read mixes both kinds: rendered sentences hold only ink and background
    processor = recipe.model.build_tokenizer()
    stream = iter(recipe.data.train.build(recipe.model.build_transform(train=True), 0, 0, processor))
    rendered = [next(stream)["image"].unique().numel() <= 2 for _ in range(40)]
    assert 5 < sum(rendered) < 35


def test_a_misspelt_freeze_prefix_names_clippos_parts_with_one_of_them_as_the_example():
    from openalign.errors import ConfigError
    from openalign.train.freeze import freeze

    with pytest.raises(ConfigError, match=r"names 'image_tower', which no parameter is or is under; the model's parts: "
                                          r"encoder, head, log_temperature \(e.g. train.freeze=\[encoder\]\)"):
        freeze(openalign.create_model("clippo-test"), ["image_tower"])
