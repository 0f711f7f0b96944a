"""ALIP (shared spec alip.md): the gates and the adaptive loss against values computed by hand,
the bi-path model, its data fields, the recipe's optimiser and schedule, and training."""

from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import openalign
from openalign.errors import ConfigError
from openalign.losses import ALIPLoss

ANGLES = {  # 2-d unit embeddings by angle: sample 0's raw text and caption agree exactly
    "image": [0.0, 1.0, 2.5],
    "text": [0.2, 1.9, 2.4],
    "caption": [0.2, 0.9, -0.5],
}


def unit(angles: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64).float()


def by_hand(scale: float, momentum: float, history: tuple[float, float, float], steps: int = 1) -> dict:
    """Spec §2-§4 in plain Python: running averages first, then W_s = min(1, e^{2(S_tc - H_tc)}),
    W_t/W_c = e^{2(S - H)} where S_tc < H_tc (else 1), and the weighted per-sample symmetric CE."""
    x, t, c = ANGLES["image"], ANGLES["text"], ANGLES["caption"]
    n = len(x)
    s_tc = [math.cos(t[i] - c[i]) for i in range(n)]
    s_xt = [math.cos(x[i] - t[i]) for i in range(n)]
    s_xc = [math.cos(x[i] - c[i]) for i in range(n)]
    h_tc, h_xt, h_xc = history
    for _ in range(steps):
        h_tc = momentum * h_tc + (1 - momentum) * sum(s_tc) / n
        h_xt = momentum * h_xt + (1 - momentum) * sum(s_xt) / n
        h_xc = momentum * h_xc + (1 - momentum) * sum(s_xc) / n
    w_s = [min(1.0, math.exp(2 * (s_tc[i] - h_tc))) for i in range(n)]
    w_t = [math.exp(2 * (s_xt[i] - h_xt)) if s_tc[i] < h_tc else 1.0 for i in range(n)]
    w_c = [math.exp(2 * (s_xc[i] - h_xc)) if s_tc[i] < h_tc else 1.0 for i in range(n)]

    def cross_entropy(row: list[float], target: int) -> float:
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    def path(y: list[float], weights: list[float]) -> float:
        total = 0.0
        for i in range(n):
            i2t = cross_entropy([scale * math.cos(x[i] - y[j]) for j in range(n)], i)
            t2i = cross_entropy([scale * math.cos(y[i] - x[j]) for j in range(n)], i)
            total += w_s[i] * weights[i] * (i2t + t2i) / 2
        return total / n

    return {"loss": path(t, w_t) + path(c, w_c), "h": (h_tc, h_xt, h_xc), "w_s": w_s, "w_t": w_t, "w_c": w_c}


def test_gates_and_adaptive_loss_equal_a_hand_computation():
    loss_fn = ALIPLoss(gamma_s=2.0, gamma_p=2.0, momentum=0.5)
    image, text, caption = unit(ANGLES["image"]), unit(ANGLES["text"]), unit(ANGLES["caption"])
    for step in (1, 2):  # the running averages carry over to the second call
        loss = loss_fn(image, text, caption, torch.tensor(5.0) if step == 1 else 5.0)  # a plain number too
        expected = by_hand(5.0, 0.5, (1.0, 1.0, 1.0), steps=step)
        assert loss.item() == pytest.approx(expected["loss"], rel=1e-5)
        histories = (loss_fn.history_text_caption, loss_fn.history_image_text, loss_fn.history_image_caption)
        assert [h.item() for h in histories] == pytest.approx(expected["h"], rel=1e-6)
    assert set(loss_fn.last_stats) >= {"history_text_caption", "weight_sample", "weight_text", "weight_caption",
                                       "similarity_image_text", "loss_text", "loss_caption"}
    weight_sample, weight_text, weight_caption = loss_fn.gates(image, text, caption)
    expected = by_hand(5.0, 0.5, (1.0, 1.0, 1.0), steps=3)
    assert weight_sample.tolist() == pytest.approx(expected["w_s"], rel=1e-5)
    assert weight_text.tolist() == pytest.approx(expected["w_t"], rel=1e-5)
    assert weight_caption.tolist() == pytest.approx(expected["w_c"], rel=1e-5)
    # the code's choices where the paper's figure differs (spec §8): min-clipped W_s, consistent
    # samples untouched, and pair weights e^{+2(S - H)}, unclipped
    assert weight_sample.max() <= 1.0 and weight_sample[:2].tolist() == [1.0, 1.0]  # 0 and 1: consistent
    assert weight_text[:2].tolist() == [1.0, 1.0] and weight_sample[2] < 1.0  # 2: raw text and caption disagree
    assert weight_text[2] > 1.0 > weight_caption[2]  # its raw text fits the image better than usual, its caption worse


def test_the_running_averages_are_buffers_that_checkpoints_carry():
    loss_fn = ALIPLoss()
    loss_fn(unit(ANGLES["image"]), unit(ANGLES["text"]), unit(ANGLES["caption"]), torch.tensor(10.0))
    state = loss_fn.state_dict()
    assert set(state) == {"history_text_caption", "history_image_text", "history_image_caption"}
    assert state["history_image_text"].item() < 1.0
    restored = ALIPLoss()
    restored.load_state_dict(state)
    assert restored.history_image_text.item() == state["history_image_text"].item()


def test_the_gates_are_constants_for_the_gradient():
    """The gradient equals that of the weighted loss with the weights frozen as numbers: no
    gradient flows through the gates or the running averages (spec §2: computed under no_grad)."""
    embeddings = [unit(ANGLES[k]).requires_grad_() for k in ("image", "text", "caption")]
    ALIPLoss()(*embeddings, torch.tensor(10.0)).backward()
    frozen = [e.detach().clone().requires_grad_() for e in embeddings]
    weight_sample, weight_text, weight_caption = ALIPLoss().gates(*(e.detach() for e in frozen))
    image, text, caption = frozen
    labels = torch.arange(3)

    def symmetric(y: torch.Tensor) -> torch.Tensor:  # per-sample ½[CE(i→t) + CE(t→i)], written out
        logits = 10.0 * image @ y.T
        return (torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                + torch.nn.functional.cross_entropy(logits.T, labels, reduction="none")) / 2

    reference = ((weight_sample * weight_text * symmetric(text)).mean()
                 + (weight_sample * weight_caption * symmetric(caption)).mean())
    reference.backward()
    for ours, theirs in zip(embeddings, frozen):
        assert theirs.grad.abs().sum() > 0
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_mismatched_embeddings_are_refused_before_the_running_averages_move():
    """A (1, d) caption broadcasts through the gates: it must be refused with a message, not move
    the running averages and then fail (or not) deeper down."""
    image, text, caption = unit(ANGLES["image"]), unit(ANGLES["text"]), unit(ANGLES["caption"])
    loss_fn = ALIPLoss()
    for args in ((image, text, caption[:1], 10.0), (image, text, caption[:, :1], 10.0),
                 (image[0], text[0], caption[0], 10.0), (image, text[:2], caption, 10.0),
                 (image, text, caption, torch.ones(3))):
        with pytest.raises(ValueError, match="one shape"):
            loss_fn(*args)
    assert [buffer.item() for buffer in loss_fn.buffers()] == [1.0, 1.0, 1.0]
    from openalign.losses import ALIPLossConfig

    for key in ("gamma_s", "gamma_p"):
        for value in (math.nan, math.inf, 0.0):
            with pytest.raises(ConfigError, match=key):
                ALIPLossConfig(**{key: value})


def test_alip_vit_b32_is_open_clips_vit_b32_and_embeds_both_texts_with_one_tower():
    model = openalign.create_model("alip-vit-b32")
    assert sum(p.numel() for p in model.parameters()) == 151_277_313  # open_clip's ViT-B-32
    # open_clip's initialisation (shared spec alip.md §1): text width 512 in 12 layers, vision width 768
    params = dict(model.named_parameters())
    text = "text_tower.transformer."
    for name, std in (("token_embedding.weight", 0.02), ("positional_embedding", 0.01),
                      ("text_projection", 512 ** -0.5)):
        assert params[text + name].std().item() == pytest.approx(std, rel=0.02), name
    for layer in (0, 11):
        block = f"{text}transformer.resblocks.{layer}."
        for name, std in (("attn.in_proj_weight", 512 ** -0.5), ("attn.out_proj.weight", 512 ** -0.5 * 24 ** -0.5),
                          ("mlp.c_fc.weight", 1024 ** -0.5), ("mlp.c_proj.weight", 512 ** -0.5 * 24 ** -0.5)):
            assert params[block + name].std().item() == pytest.approx(std, rel=0.02), block + name
    for name, rel in (("class_embedding", 0.1), ("positional_embedding", 0.03), ("proj", 0.02)):
        assert params[f"image_tower.{name}"].std().item() == pytest.approx(768 ** -0.5, rel=rel), name
    assert model.input_fields == ("image", "text", "caption")
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.log_temperature.fill_(math.log(0.001))
    assert model.logit_scale.item() == pytest.approx(100.0)  # capped, as ALIP clamps it

    tiny = openalign.create_model("alip-tiny").eval()
    tokens = tiny.config.build_tokenizer()(["a red circle", "A RED CIRCLE"])
    with torch.no_grad():
        out = tiny(torch.randn(2, 3, 48, 48), text=tokens, caption=tokens)
    torch.testing.assert_close(out["text_emb"], out["caption_emb"])  # the same tower and weights
    torch.testing.assert_close(out["text_emb"][0], out["text_emb"][1])  # CLIP's tokenizer lower-cases
    with pytest.raises(ConfigError, match="'model.preprocess.image_size' is 64, but the image tower takes 48 px"):
        openalign.create_model("alip-tiny", preprocess={"image_size": 64, "resize_size": 72})


def test_clips_tokenizer_packs_sot_ids_eot_and_keeps_eot_when_cutting():
    from openalign.models import ClipTokenizer

    ids = ClipTokenizer(8)(["a photo", "one two three four five six seven eight nine"])["input_ids"]
    assert ids[0, 0] == 49406 and ids[0, 3] == 49407 and ids[0, 4:].eq(0).all()  # [SOT] a photo [EOT] pad
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and ids[1].ne(0).all()
    # the mask covers [SOT] to [EOT]: "!" is id 0, as the padding is, and was masked
    batch = ClipTokenizer(8)(["!?!?!?", ""])
    assert batch["input_ids"][0, :4].tolist() == [49406, 0, 37619, 49407]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]


def test_shapes_alt_text_noise_replaces_that_share_of_training_captions_only():
    from openalign.data.shapes import ShapesSpec, generate_example

    clean, noisy = ShapesSpec(image_size=16), ShapesSpec(image_size=16, alt_text_noise=0.6)
    changed = 0
    for index in range(300):
        image, captions, labels, caption = generate_example(clean, "train", index)
        image_n, captions_n, labels_n, caption_n = generate_example(noisy, "train", index)
        assert np.array_equal(np.asarray(image), np.asarray(image_n)) and caption == caption_n and labels == labels_n
        changed += captions != captions_n
        if labels:
            assert labels["shape"] in caption and labels["colour"] in caption  # the clean, terse caption
    assert changed / 300 == pytest.approx(0.6 * (1 - 1 / 40), abs=0.07)  # a few noise draws repeat the caption
    for index in range(20):
        assert generate_example(clean, "test", index)[1] == generate_example(noisy, "test", index)[1]


def test_sources_carry_the_caption_field_and_the_trainer_keeps_what_the_model_reads(tmp_path, shapes_root):
    from openalign.data import Collate, KarpathySourceConfig, WebDatasetSourceConfig
    from openalign.errors import OpenAlignError

    model = openalign.create_model("alip-tiny")
    transform = model.config.build_transform(train=True)
    sample = KarpathySourceConfig(json=str(shapes_root / "dataset_shapes.json")).build(transform, 0)[(0, 3)]
    assert sample["caption"] and sample["text"]
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for key, caption in (("a", "a red circle"), ("b", None), ("c", "a blue star")):
            buffer = io.BytesIO()
            Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="JPEG")
            members = {"jpg": buffer.getvalue(), "txt": b"raw alt-text"}
            if caption:
                members["caption.txt"] = caption.encode()
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = WebDatasetSourceConfig(urls=str(shard), extra_keys={"caption": "caption.txt"}, shuffle_buffer=1)
    stream = iter(source.build(transform, 0))
    captions = sorted(next(stream)["caption"] for _ in range(2))  # resampled: b (no caption) is skipped
    assert set(captions) <= {"a red circle", "a blue star"}
    collate = Collate(model.config.build_tokenizer(), ("image", "text"))
    batch = collate([sample, sample])
    assert set(batch) == {"image", "text", "__counts__"}  # ALIGN's model reads no caption: not tokenised
    with pytest.raises(OpenAlignError, match="lack the field 'caption'"):
        Collate(model.config.build_tokenizer())([sample, {k: v for k, v in sample.items() if k != "caption"}])


def test_the_alip_recipe_is_the_original_and_onecycle_cycles_lr_and_beta1():
    from openalign.recipe import load_recipe
    from openalign.train import build_optimizer, build_scheduler, parameter_groups

    recipe = load_recipe("alip-vit-b32-yfcc15m")
    t = recipe.train
    assert (t.batch_size, t.steps, t.lr, t.weight_decay, t.betas, t.grad_clip) == (
        4096, 117696, 1e-3, 0.2, (0.9, 0.98), 8.0)
    assert (t.schedule, t.warmup_steps, t.weight_decay_scope) == ("onecycle", 11770, "all")
    assert recipe.data.train.extra_keys == {"caption": "caption.txt"}
    assert recipe.data.train.resampled is False  # 32 epochs, each pair once an epoch, as DALI reads them
    from openalign.precision import gradient_scaler

    scaler = gradient_scaler(torch.device("cpu"), "fp16", recipe.train.loss_scale_growth_interval)
    assert scaler.is_enabled() and scaler.get_growth_interval() == 200  # ALIP's fp16 GradScaler
    assert (recipe.loss.gamma_s, recipe.loss.gamma_p, recipe.loss.momentum) == (2.0, 2.0, 0.99)

    model = openalign.create_model("alip-tiny")
    groups = parameter_groups(model, 0.2, "adamw", decay_all=True)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))  # even biases and τ
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.2, (0.9, 0.98), 1e-8, torch.device("cpu"), decay_all=True)
    scheduler = build_scheduler(optimizer, "onecycle", 10, 100)
    seen = {}
    for step in range(100):
        seen[step] = (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx((1e-3 / 25, 0.95)) and seen[9] == pytest.approx((1e-3, 0.85))  # PyTorch: peak at pct·total − 1
    assert seen[99][0] < 1e-6 and seen[99][1] == pytest.approx(0.95, abs=1e-3)


def test_shortest_side_preprocessing_equals_torchvisions_resize_and_centre_crop():
    import torchvision.transforms.v2 as T

    model = openalign.create_model("alip-vit-b32")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 300, 3), dtype=np.uint8))
    reference = T.Compose([T.PILToTensor(), T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                           T.CenterCrop(224), T.ToDtype(torch.float32, scale=True),
                           T.Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])])
    torch.testing.assert_close(model.config.build_transform(train=False)(image), reference(image), atol=1e-5, rtol=0)
    # training: DALI's random-area crop (0.7-1 of the area, aspect 0.8-1.25) squashed to 224, so a
    # square image is cropped at varying scales, not only flipped (spec alip.md §5 "Loader")
    square = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    crops = [model.config.build_transform(train=True)(square, torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(crop.shape == (3, 224, 224) for crop in crops)
    assert not any(torch.equal(crop, crops[0]) or torch.equal(crop, crops[0].flip(-1)) for crop in crops[1:])


def test_alip_trains_from_its_recipe_and_resumes_its_running_averages(tmp_path, shapes_root):
    from openalign.recipe import load_recipe
    from openalign.train import train
    from openalign.train.checkpoint import STATE_FILE

    overrides = [f"data.train.root={tmp_path / 'data'}", "data.train.num_train=128", "data.train.num_test=24",
                 "data.train.image_size=48", "data.num_workers=0", "train.batch_size=16", "train.steps=4",
                 "train.warmup_steps=2", f"eval.tasks.0.root={tmp_path / 'data'}", "eval.tasks.0.knn_memory_size=64",
                 f"run.output_dir={tmp_path / 'run'}", "run.checkpoint_every=2", "run.log_every=1",
                 "run.tensorboard=false"]
    recipe = load_recipe("alip-shapes", overrides)
    result = train(recipe, show_progress=False)
    assert result.step == 4 and 0 <= result.metrics["shapes/text_retrieval_recall@10"] <= 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002" / STATE_FILE, weights_only=True)
    assert 0 < state["loss"]["history_image_text"].item() < 1.0
    history = [r for r in openalign.train.read_history(tmp_path / "run") if "loss" in r]
    assert {"weight_sample", "history_text_caption", "loss_caption"} <= set(history[-1])
