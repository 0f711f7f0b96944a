"""The built-in dataset, the Karpathy reader, transforms, the tokenizer, the sampler and the stream source."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import openalign
from openalign import get_tokenizer
from openalign.data import (Collate, EpochBatchSampler, ImageTransform, ShapesSpec, Tokenizer, WebDatasetSourceConfig,
                            build_shapes_dataset, read_karpathy)
from openalign.data.shapes import COLOURS, SHAPES, generate_example
from openalign.data.transforms import PreprocessConfig
from openalign.errors import ConfigError, OpenAlignError


def test_shapes_dataset_layout(shapes_root):
    data = json.loads((shapes_root / "dataset_shapes.json").read_text())
    splits = [entry["split"] for entry in data["images"]]
    assert splits.count("train") == 256 and splits.count("test") == 24
    test = [e for e in data["images"] if e["split"] == "test"]
    assert all(len(e["sentences"]) == 5 and len(set(s["raw"] for s in e["sentences"])) == 5 for e in test)
    assert all((shapes_root / e["filepath"] / e["filename"]).is_file() for e in data["images"])
    labelled = [e for e in data["images"] if e["labels"]]
    assert 0 < len(labelled) < len(data["images"])  # some two-shape images carry no single label
    assert {e["labels"]["shape"] for e in labelled} <= set(SHAPES)
    assert json.loads((shapes_root / "classnames.json").read_text()) == {"shape": list(SHAPES), "colour": list(COLOURS)}


def test_captions_describe_the_labelled_shape(shapes_root):
    """Every caption names the shape; some leave the colour out, as alt-text does, but never all five."""
    without_colour = 0
    for item in read_karpathy(shapes_root / "dataset_shapes.json", "test"):
        if item.labels:
            assert all(item.labels["shape"] in c for c in item.captions)
            assert any(item.labels["colour"] in c for c in item.captions)
            without_colour += sum(item.labels["colour"] not in c for c in item.captions)
    assert without_colour > 0


def test_generation_is_deterministic_and_seeded():
    spec = ShapesSpec(image_size=32)
    first, second = generate_example(spec, "train", 7), generate_example(spec, "train", 7)
    assert first[1] == second[1] and np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    other = generate_example(ShapesSpec(image_size=32, seed=1), "train", 7)
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_existing_dataset_is_reused_but_never_silently_replaced(shapes_root):
    spec = ShapesSpec(num_train=256, num_test=24, image_size=32)
    assert build_shapes_dataset(shapes_root, spec, show_progress=False) == shapes_root / "dataset_shapes.json"
    with pytest.raises(OpenAlignError, match="already holds a shapes dataset .*to use it, set "
                                             "data.train.num_train=256 data.train.num_test=24 "):
        build_shapes_dataset(shapes_root, ShapesSpec(num_train=10, num_test=2, image_size=32), show_progress=False)


def test_karpathy_reader_errors_name_the_problem(tmp_path, shapes_root):
    with pytest.raises(OpenAlignError, match="does not exist"):
        read_karpathy(tmp_path / "missing.json", "test")
    (tmp_path / "bad.json").write_text('{"annotations": []}')
    with pytest.raises(OpenAlignError, match="not a Karpathy-style caption file"):
        read_karpathy(tmp_path / "bad.json", "test")
    with pytest.raises(OpenAlignError, match="its splits are: test, train"):
        read_karpathy(shapes_root / "dataset_shapes.json", "val")


def test_karpathy_splits_join_with_a_plus_as_cocos_train_and_restval_do(shapes_root):
    joined = read_karpathy(shapes_root / "dataset_shapes.json", "train+test")  # in the file's order
    train, test = (read_karpathy(shapes_root / "dataset_shapes.json", split) for split in ("train", "test"))
    assert joined == train + test and len(test) == 24
    with pytest.raises(OpenAlignError, match="has no images in split 'val'; its splits are: test, train"):
        read_karpathy(shapes_root / "dataset_shapes.json", "test+val")  # Flickr30k's file has no restval, say


def test_karpathy_reader_skips_empty_captions_with_a_count_and_rejects_malformed_entries(tmp_path, caplog):
    def write(images):
        (tmp_path / "d.json").write_text(json.dumps({"images": images}))
        return tmp_path / "d.json"

    good = {"filename": "a.jpg", "split": "test", "sentences": [{"raw": " a cat "}, {"raw": "   "}]}
    blank = {"filename": "b.jpg", "split": "test", "sentences": [{"raw": ""}]}
    with caplog.at_level("WARNING"):
        items = read_karpathy(write([good, blank]), "test")
    assert [(i.path.name, i.captions) for i in items] == [("a.jpg", ("a cat",))]
    assert "skipped 2 empty caption(s) and 1 image(s)" in caplog.text
    with pytest.raises(OpenAlignError, match=r"images\[0\] needs a 'filename'"):
        read_karpathy(write([{"split": "test", "sentences": []}]), "test")
    with pytest.raises(OpenAlignError, match="a sentence of image 'a.jpg' has no 'raw' text"):
        read_karpathy(write([{"filename": "a.jpg", "split": "test", "sentences": [{"tokens": ["a"]}]}]), "test")


def test_eval_transform_is_squash_resize_then_centre_crop_at_offset_28():
    """Spec §3.5: 346×346 bilinear (aspect ratio not kept), crop 289 at (28, 28), x/127.5 - 1.

    The reference is PIL's antialiased bilinear resize; torchvision's (which AlignProcessor uses,
    and so do we: test_pretrained checks that equality) rounds differently by at most one level."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    out = ImageTransform(PreprocessConfig(), train=False)(image)
    resized = np.asarray(image.resize((346, 346), Image.Resampling.BILINEAR), dtype=np.float32)
    expected = resized[28:317, 28:317].transpose(2, 0, 1) / 127.5 - 1
    assert out.shape == (3, 289, 289)
    np.testing.assert_allclose(out.numpy(), expected, atol=1 / 127.5 + 1e-6)
    assert np.abs(out.numpy() - expected).mean() < 0.2 / 127.5  # mostly exact: the crop is in the right place


@pytest.mark.parametrize("resize_mode", ["squash", "shortest"])
def test_the_default_centre_crop_is_torchvisions_where_transformers_would_differ(resize_mode):
    import torchvision.transforms.v2 as T

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (101, 77, 3), dtype=np.uint8))
    for resize, crop in ((292, 289), (80, 65)):  # margins 3 and 15: torchvision rounds 1.5 and 7.5 up
        transform = ImageTransform(PreprocessConfig(image_size=crop, resize_size=resize, resize_mode=resize_mode),
                                   train=False)
        size = [resize] if resize_mode == "shortest" else [resize, resize]
        pixels = T.Compose([T.PILToTensor(), T.Resize(size, antialias=True), T.CenterCrop(crop)])(image)
        assert torch.equal(transform(image), pixels.float().mul_(transform.scale).sub_(transform.offset))


def test_train_transform_is_a_replayable_random_crop():
    config = PreprocessConfig(image_size=8, resize_size=12, random_flip=True)
    image = Image.fromarray(np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3))
    transform = ImageTransform(config, train=True)
    crops = [transform(image, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(c.shape == (3, 8, 8) for c in crops)
    assert len({c.sum().item() for c in crops}) > 3  # positions and flips vary
    torch.testing.assert_close(transform(image, torch.Generator().manual_seed(5)), crops[5])
    assert all(c.min() >= -1 and c.max() <= 1 for c in crops)


def test_random_area_boxes_cover_the_share_and_aspect_asked_for():
    from openalign.data.transforms import random_area_box

    generator = torch.Generator().manual_seed(0)
    boxes = [random_area_box(400, 400, (0.7, 1.0), (0.8, 1.25), generator) for _ in range(2000)]
    areas = np.array([h * w / (400 * 400) for _, _, h, w in boxes])
    aspects = np.array([w / h for _, _, h, w in boxes])
    assert all(0 <= top and 0 <= left and top + h <= 400 and left + w <= 400 for top, left, h, w in boxes)
    assert areas.min() > 0.69 and areas.max() <= 1.0 and aspects.min() > 0.79 and aspects.max() < 1.26
    # spread over both ranges (crops that do not fit are drawn again, as DALI does)
    assert areas.min() < 0.71 and areas.max() > 0.97 and aspects.min() < 0.82 and aspects.max() > 1.23
    # a strip no allowed crop fits: the whole height, cut to the widest allowed aspect, centred
    assert random_area_box(10, 1000, (0.7, 1.0), (0.8, 1.25), generator) == (0, 494, 10, 12)
    assert random_area_box(1000, 10, (0.7, 1.0), (0.8, 1.25), generator) == (494, 0, 12, 10)


def test_random_area_training_crops_then_squashes_and_flips_replayably():
    """ALIP's DALI augmentation (spec alip.md §5): random-area crop, bilinear squash to 224, flip."""
    import torchvision.transforms.v2.functional as TF

    from openalign.data.transforms import random_area_box

    config = PreprocessConfig(image_size=24, resize_size=24, resize_mode="shortest", interpolation="bicubic",
                              antialias="always", random_area=(0.7, 1.0), random_aspect=(0.8, 1.25),
                              train_interpolation="bilinear", random_flip=True)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    transform = ImageTransform(config, train=True)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    flips = 0
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        top, left, height, width = random_area_box(40, 60, (0.7, 1.0), (0.8, 1.25), generator)
        expected = TF.resized_crop(pixels, top, left, height, width, [24, 24],
                                   interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if bool(torch.rand((), generator=generator) < 0.5):
            expected, flips = expected.flip(-1), flips + 1
        assert torch.equal(transform(image, torch.Generator().manual_seed(seed)),
                           expected.float().mul_(transform.scale).sub_(transform.offset))
    assert 0 < flips < 12
    assert transform.draft_size == 33  # ceil(24 * sqrt(1.25 / 0.7)): the smallest crop still covers 24 px
    with pytest.raises(ConfigError, match="'random_area' must be \\[low, high\\] with 0 < low <= high <= 1"):
        PreprocessConfig(random_area=(0.0, 1.0))
    with pytest.raises(ConfigError, match="'random_aspect' must be \\[low, high\\]"):
        PreprocessConfig(random_aspect=(1.25, 0.8))


@pytest.mark.parametrize("antialias, in_training, in_evaluation", [("eval", False, True), ("never", False, False),
                                                                  ("always", True, True)])
def test_antialiasing_follows_the_setting_in_training_and_evaluation(antialias, in_training, in_evaluation):
    """ALIGN ("eval"): COYO trained on tf.image.resize, which does not antialias; AlignProcessor does."""
    import torchvision.transforms.v2.functional as TF

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    config = PreprocessConfig(image_size=30, resize_size=30, random_flip=False, antialias=antialias)
    for train, antialiased in ((True, in_training), (False, in_evaluation)):
        expected = TF.resize(pixels, [30, 30], interpolation=TF.InterpolationMode.BILINEAR, antialias=antialiased)
        other = TF.resize(pixels, [30, 30], interpolation=TF.InterpolationMode.BILINEAR, antialias=not antialiased)
        transform = ImageTransform(config, train=train)
        assert not torch.equal(expected, other)
        assert torch.equal(transform(image, torch.Generator().manual_seed(0)),
                           expected.float().mul_(transform.scale).sub_(transform.offset))


def tf_bilinear_resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """tf.image.resize(method="bilinear", antialias=False) of an (H, W, C) image in float64: half-pixel
    centres, source positions clamped to the image, no smoothing."""
    def weights(out: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = (np.arange(out) + 0.5) * (size / out) - 0.5
        low = np.floor(position)
        return (np.clip(low, 0, size - 1).astype(int), np.clip(np.ceil(position), 0, size - 1).astype(int),
                position - low)

    top, bottom, dy = weights(height, pixels.shape[0])
    left, right, dx = weights(width, pixels.shape[1])
    x = pixels.astype(np.float64)
    rows = x[top] * (1 - dy)[:, None, None] + x[bottom] * dy[:, None, None]
    return rows[:, left] * (1 - dx)[None, :, None] + rows[:, right] * dx[None, :, None]


def test_clippo_resizes_as_big_vision_does_truncating_to_uint8():
    """big_vision's resize(224) is tf.image.resize without antialiasing, cast back to uint8: the
    value is truncated (spec clippo.md §4), where torchvision's uint8 resize rounds."""
    preprocess = openalign.model_config("clippo-b16").preprocess
    image = np.random.default_rng(5).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    reference = tf_bilinear_resize(image, 224, 224)
    transform = ImageTransform(preprocess, train=False)
    pixels = (transform(Image.fromarray(image)) + transform.offset) / transform.scale  # back to 0..255
    pixels = pixels.round().permute(1, 2, 0).numpy()
    # away from a level, where a float32 resize (torchvision's, TF's: each off by up to ~0.01) and this
    # float64 one truncate alike
    clear = np.abs(reference - np.round(reference)) > 0.02
    assert np.array_equal(pixels[clear], np.floor(reference[clear]))
    assert clear.mean() > 0.95
    assert (pixels == np.round(reference)).mean() < 0.6  # rounding instead would differ in about half
    with pytest.raises(ConfigError, match="'resize_rounding' floor works with bilinear and nearest"):
        PreprocessConfig(interpolation="bicubic", resize_rounding="floor")


def test_grayscale_and_alpha_images_become_rgb():
    transform = ImageTransform(PreprocessConfig(image_size=8, resize_size=8), train=False)
    for mode in ("L", "RGBA", "CMYK", "P"):
        assert transform(Image.new(mode, (10, 10))).shape == (3, 8, 8)


def test_training_reads_literal_special_tokens_in_alt_text_as_text_as_coyo_align_does(tmp_path, shapes_root,
                                                                                       tiny_overrides, monkeypatch):
    """COYO-ALIGN's TF-Hub BERT preprocessing reads "[SEP]" in a caption as "[", "sep", "]"; a
    [PAD] (id 0) inside the text would be attended. AlignProcessor, at inference, reads them as
    special tokens, and so do evaluation and the inference API."""
    from openalign.data import loader
    from openalign.recipe import load_recipe
    from openalign.train import train

    config = openalign.model_config("align-test")
    assert config.build_tokenizer(train=True)("a [SEP] b [PAD]")["input_ids"][0, :10].tolist() == [
        101, 1037, 1031, 19802, 1033, 1038, 1031, 11687, 1033, 102]
    assert config.build_tokenizer()("a [SEP] b [PAD]")["input_ids"][0, :6].tolist() == [101, 1037, 102, 1038, 0, 102]
    processors = []
    original = loader.Collate.__init__
    monkeypatch.setattr(loader.Collate, "__init__", lambda self, processor, *rest: (
        processors.append(processor), original(self, processor, *rest))[1])
    train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path, steps=1) + ["eval.tasks=[]"]), show_progress=False)
    assert [processor.split_special_tokens for processor in processors] == [True]


def test_tokenizer_is_bert_base_uncased_padded_to_max_length():
    tokenizer = get_tokenizer("align-b7-base")
    encoded = tokenizer("a photo of a cat")
    assert encoded["input_ids"].shape == (1, 64)
    assert encoded["input_ids"][0, :8].tolist() == [101, 1037, 6302, 1997, 1037, 4937, 102, 0]
    assert encoded["attention_mask"][0].sum() == 7
    long = tokenizer(["word " * 200, "A Photo OF a CAT"])
    assert long["input_ids"].shape == (2, 64) and long["input_ids"][0, -1] == 102  # truncated, [SEP] kept
    assert long["input_ids"][1, :7].tolist() == [101, 1037, 6302, 1997, 1037, 4937, 102]  # lower-cased
    none = tokenizer([])  # an empty batch is an empty batch, of the same width
    assert none["input_ids"].shape == none["attention_mask"].shape == (0, 64)
    assert none["input_ids"].dtype == torch.long


def _tokenizer_variant(kind: str):
    """bert-base-uncased as shipped, changed, or a small tokenizer of another structure trained here."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "byte-level BPE with RoBERTa's <mask>":  # an added token that takes the whitespace before it
        from tokenizers import AddedToken

        hf = _tokenizer_variant("byte-level BPE")
        hf.add_special_tokens({"mask_token": AddedToken("<mask>", lstrip=True, special=True)})
        return hf
    if kind.startswith("bert"):
        hf = copy.deepcopy(get_tokenizer("align-b7-base").hf_tokenizer)
        if kind == "bert truncating on the left":
            hf.truncation_side = "left"
        elif kind == "bert with an added token holding a space":
            hf.add_tokens(["new york city"])
        return hf
    backend = Backend(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = {"byte-level BPE": pre_tokenizers.ByteLevel(add_prefix_space=False),
                             "Metaspace with split": pre_tokenizers.Metaspace(split=True),
                             "Metaspace without split": pre_tokenizers.Metaspace(split=False)}[kind]
    corpus = ["a photo of a red car parked by the sea", "new york city at night", "the cat sat on the mat"] * 30
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                           "[SEP]"]))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", backend.token_to_id("[CLS]")),
                                                 ("[SEP]", backend.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


@pytest.mark.parametrize("kind, cuts", [
    ("bert", " \t\n/+=.,;:-_%&?!|"), ("byte-level BPE", " \t\n"), ("Metaspace with split", " "),
    # where a cut could change the kept tokens, texts are read whole
    ("bert truncating on the left", ""), ("bert with an added token holding a space", ""),
    ("Metaspace without split", ""), ("byte-level BPE with RoBERTa's <mask>", ""),
])
def test_long_texts_are_cut_before_tokenization_only_where_the_tokens_stay_the_same(kind, cuts, monkeypatch):
    """A caption of megabytes is cut at whitespace (BERT: or punctuation) before tokenization,
    with the same tokens as the whole text, whatever the words, accents, CJK, punctuation and
    runs of whitespace near the cut; a tokenizer whose structure would let a cut change them is
    not cut."""
    from openalign.data.tokenizer import cut_characters

    hf = _tokenizer_variant(kind)
    assert cut_characters(hf) == cuts
    rng = random.Random(0)
    pieces = ["cat", "Café", "naïve", "東京", "!!", "x" * 120, "e\u0301", "\u200b", "--", "new york", "city",
              "3.14", "a/b+c==", "%2F", "/\u0301", "..", "[SEP]", "||", "_x_", "?&"]
    texts = ["".join(rng.choice(pieces) + rng.choice(["", " ", "  ", "\n", "\t", " \n "]) for _ in range(500))
             for _ in range(60)]
    texts += ["new york city " * 20_000, "x" * 121 + " " + "y" * 5000, " " * 600 + "late words", "w" * 1000]
    data_uri = "data:image/png;base64," + base64.b64encode(random.Random(1).randbytes(300_000)).decode()
    texts.append(data_uri)
    if kind == "byte-level BPE with RoBERTa's <mask>":  # a cut prefix would end in whitespace tokens
        texts.append("a cat" + " " * (32 * 14 + 10) + "<mask> on the mat" * 20)
    if kind == "bert with an added token holding a space":  # a cut inside it: "p", "##ne", ... replace it
        hf.add_tokens(["pneumonoultramicroscopicsilicovolcanoconiosis disease"])
        texts.append("x " * 13 + "pneumonoultramicroscopicsilicovolcanoconiosis disease" + "y" * 600)
    seen: list[int] = []
    original = type(hf).__call__

    def spy(self, batch, **kwargs):
        seen.extend(len(text) for text in ([batch] if isinstance(batch, str) else batch))
        return original(self, batch, **kwargs)

    monkeypatch.setattr(type(hf), "__call__", spy)
    ours = Tokenizer(hf, max_length=16)(texts)
    monkeypatch.undo()
    reference = hf(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"])
    assert (280_000 in seen) != bool(cuts)  # the long caption was cut where the tokenizer allows it
    assert (len(data_uri) in seen) == (kind != "bert")  # no whitespace: cut at "/" or "+" where each is a piece
    assert 1000 in seen  # no whitespace early on: read whole
    if kind == "bert":
        assert 5122 in seen  # the prefix is one [UNK] (a word over 100 characters), too few tokens: read whole


def test_clip_bpe_cuts_long_texts_with_the_same_tokens(monkeypatch):
    """ALIP's CLIP tokenizer (open_clip's, which splits words at any whitespace and punctuation)
    cuts alike."""
    from openalign.models.clip_towers import ClipTokenizer

    rng = random.Random(0)
    pieces = ["cat", "Café", "cafÃ©", "â€œquotedâ€", "&amp;", "&amp;amp;amp;", "&EACUTE;cole", "&lt;b&gt;",
              "<b>", "東京", "don't", "'s", "x" * 120, "ﬁ", "\u00a0", "3.14", "<end_of_text>", "a/b+c==", "/" * 40,
              "&amp/", "&not", "in;", "&#47", "%2F", "e\u0301", "!?", "_x_", "-", "|"]
    texts = ["".join(rng.choice(pieces) + rng.choice(["", " ", "  ", "\t", *(["\n"] * several_lines)])
                     for _ in range(500))
             for _ in range(40) for several_lines in (False, True)]  # ftfy decides per line: half are one line
    data_uri = "data:image/png;base64," + base64.b64encode(random.Random(1).randbytes(300_000)).decode()
    texts += ["a photo of a red car " * 20_000, "&amp;amp;amp; " * 20 + "w " * 300 + "<b>", data_uri,
              "ab" + "/" * 3000 + "cd"]
    # mojibake split by a cut (ftfy repairs the line only if the whole line decodes): "år 2019 été" as
    # Windows-1252, then a lossy "Ã?" or "Ã " at the cut (the last separator within 32 × 14 characters)
    for split in ("Ã?", "Ã "):
        head = "Ã¥r 2019 Ã©tÃ© " + ("photo of a red car " * 30)[:32 * 14 - 15 - 5].rstrip() + "x"
        texts.append(head + split + "b" * 500 + " more text")
    tokenizer = ClipTokenizer(max_length=16)
    tokenizer(["load"])
    simple, seen = tokenizer._tokenizer, []
    original = type(simple).__call__

    def spy(self, batch, **kwargs):
        seen.extend(len(text) for text in batch)
        return original(self, batch, **kwargs)

    monkeypatch.setattr(type(simple), "__call__", spy)
    ours = tokenizer(texts)["input_ids"]
    monkeypatch.undo()
    assert torch.equal(ours, simple(texts, context_length=16)) and max(seen) < 400_000  # the long captions were cut
    assert 3004 in seen  # a cut inside a run of punctuation could change its tokens: read whole


def test_sampler_epochs_are_permutations_split_between_ranks():
    ranks = [EpochBatchSampler(40, batch_size=4, rank=r, world_size=2, seed=3) for r in range(2)]
    streams = [iter(s) for s in ranks]
    epoch0 = [key for _ in range(5) for stream in streams for key in next(stream)]
    assert sorted(i for _, i in epoch0) == list(range(40)) and {e for e, _ in epoch0} == {0}
    epoch1 = [key for _ in range(5) for stream in streams for key in next(stream)]
    assert sorted(i for _, i in epoch1) == list(range(40)) and {e for e, _ in epoch1} == {1}
    assert [i for _, i in epoch0] != [i for _, i in epoch1]


def test_sampler_resumes_at_any_step_and_ignores_world_size():
    full = iter(EpochBatchSampler(30, batch_size=6, rank=0, world_size=1, seed=0))
    global_batches = [next(full) for _ in range(12)]  # 2.4 epochs: crosses epoch boundaries
    resumed = iter(EpochBatchSampler(30, batch_size=6, rank=0, world_size=1, seed=0, start_step=7))
    assert [next(resumed) for _ in range(5)] == global_batches[7:]
    halves = [iter(EpochBatchSampler(30, batch_size=3, rank=r, world_size=2, seed=0, start_step=7)) for r in range(2)]
    # strided: rank r has the global batch's examples r, r + 2, ..., so that ghost batches are one process's
    assert [[key for pair in zip(next(halves[0]), next(halves[1])) for key in pair] for _ in range(5)] == \
        global_batches[7:]


def test_sampler_refuses_a_dataset_smaller_than_one_global_batch():
    with pytest.raises(OpenAlignError, match="fewer than one global batch"):
        EpochBatchSampler(10, batch_size=8, rank=0, world_size=2, seed=0)


def test_collate_stacks_tensors_and_tokenizes_text():
    batch = Collate(get_tokenizer("align-test"))([{"image": torch.zeros(3, 4, 4), "text": "a red circle", "label": 1},
                                                  {"image": torch.ones(3, 4, 4), "text": "a cat", "label": 2}])
    assert batch["image"].shape == (2, 3, 4, 4)
    assert batch["text"]["input_ids"].shape == (2, 16) and batch["label"].tolist() == [1, 2]


def _write_shards(directory: Path, good: int, shards: int = 1) -> str:
    import webdataset as wds

    directory.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), (200, 30, 30)).save(buffer, format="JPEG")
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"{shard:06d}.tar")) as sink:
            for i in range(good):
                sink.write({"__key__": f"{shard}_{i:06d}", "jpg": buffer.getvalue(), "txt": f"caption {shard} {i}"})
            sink.write({"__key__": f"{shard}_corrupt", "jpg": b"not a jpeg", "txt": "broken"})
            sink.write({"__key__": f"{shard}_empty", "jpg": buffer.getvalue(), "txt": "  "})
    return str(directory / f"{{000000..{shards - 1:06d}}}.tar")


WDS_TRANSFORM = ImageTransform(PreprocessConfig(image_size=8, resize_size=10), train=True)


def test_webdataset_source_streams_pairs_and_skips_corrupt_images_and_empty_captions(tmp_path, caplog):
    from openalign.data.quality import COUNTS

    urls = _write_shards(tmp_path / "shards", good=5)
    stream = iter(WebDatasetSourceConfig(urls=urls, shuffle_buffer=1, open_shards=1).build(WDS_TRANSFORM, seed=0))
    before = Counter(COUNTS)
    with caplog.at_level("WARNING", logger="openalign"):
        samples = [next(stream) for _ in range(12)]  # resampled: the shard repeats forever
    assert all(s["image"].shape == (3, 8, 8) for s in samples)
    assert [s["text"] for s in samples] == [f"caption 0 {i % 5}" for i in range(12)]
    # the corrupt jpeg and the blank caption of both passes, counted by reason
    assert Counter(COUNTS) - before == {"skipped/undecodable image": 2, "skipped/empty caption": 2}


def test_descriptive_texts_have_a_letter_and_are_not_camera_file_names():
    from openalign.data.quality import is_descriptive

    for text in ("a red bus", "Paris", "IMG in the park", "2007 London trip", "P1 race", "P-51", "Sam 2"):
        assert is_descriptive(text), text
    for text in ("20071124", "12:30 - 14:00", "IMG_1234", "img 1234.JPG", "DSC01234.jpg", "DSCN0042", "P1010001",
                 "_MG_4471.CR2", "..."):
        assert not is_descriptive(text), text


def test_several_text_members_give_one_caption_first_or_at_random_without_non_descriptive_ones(tmp_path, capsys):
    """CLIPPO's YFCC-100M text (shared spec clippo.md §6): one of title, description and tags at
    random per example, non-descriptive ones dropped; a sample with none usable is skipped."""
    import webdataset as wds

    from openalign.cli import main
    from openalign.data.quality import COUNTS

    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), (200, 30, 30)).save(buffer, format="JPEG")
    members = {"bus": {"title.txt": "a red bus", "description.txt": "IMG_1234.JPG", "tags.txt": "bus,red,london"},
               "none": {"description.txt": "20071124", "tags.txt": " "},  # no title: its description's reason
               "sea": {"description.txt": "sunset over the sea"},
               "beach": {"title.txt": "DSC01234", "description.txt": "2007 11 24", "tags.txt": "beach"}}
    (tmp_path / "yfcc").mkdir()
    with wds.TarWriter(str(tmp_path / "yfcc" / "0.tar")) as sink:
        for key, texts in members.items():
            sink.write({"__key__": key, "jpg": buffer.getvalue(), **texts})
    keys = "title.txt;description.txt;tags.txt"

    def texts(**options) -> list[str]:
        source = WebDatasetSourceConfig(urls=str(tmp_path / "yfcc" / "0.tar"), text_key=keys, shuffle_buffer=1,
                                        open_shards=1, **options)
        stream = iter(source.build(WDS_TRANSFORM, seed=0))
        return [next(stream)["text"] for _ in range(60)]  # resampled: 20 passes over the 3 usable samples

    before = Counter(COUNTS)
    drawn = texts(text_choice="random", drop_non_descriptive=True)
    assert Counter(COUNTS) - before == {"skipped/non-descriptive caption": 20}  # "none": its title's reason
    assert set(drawn) == {"a red bus", "bus,red,london", "sunset over the sea", "beach"}
    assert 5 <= drawn.count("a red bus") <= 15 and drawn.count("beach") == 20
    assert drawn == texts(text_choice="random", drop_non_descriptive=True)  # drawn from the samples' seeds
    assert set(texts()) == {"a red bus", "20071124", "sunset over the sea", "DSC01234"}  # the first readable one
    assert main(["data", "inspect", str(tmp_path / "yfcc" / "0.tar"), "--text-key", keys, "--drop-non-descriptive",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["usable"], summary["skipped"]) == (3, {"non-descriptive caption": 1})
    from openalign.data.quality import CUT_SHORT, SkipSample
    from openalign.data.sources import check_not_cut_short

    check_not_cut_short({CUT_SHORT: True, "jpg": b"", "title.txt": b"x"}, ["jpg"], [], keys.split(";"))  # tags may lack
    with pytest.raises(SkipSample, match="cut short"):
        check_not_cut_short({CUT_SHORT: True, "jpg": b""}, ["jpg"], [], keys.split(";"))


def test_webdataset_stream_is_seeded_and_a_resume_without_positions_reads_fresh_data(tmp_path):
    urls = _write_shards(tmp_path / "shards", good=4, shards=8)

    def first_texts(seed: int, resume_at: int = 0) -> list[str]:
        dataset = WebDatasetSourceConfig(urls=urls, shuffle_buffer=8).build(WDS_TRANSFORM, seed)
        if resume_at:
            dataset.resume(resume_at, None)  # a checkpoint without stream positions
        stream = iter(dataset)
        return [next(stream)["text"] for _ in range(16)]

    assert first_texts(0) == first_texts(0)
    assert first_texts(0) != first_texts(0, 500)  # resuming at step 500 does not replay step 0's samples
    assert first_texts(0) != first_texts(1)


def test_webdataset_missing_shards_and_dead_streams_are_errors(tmp_path):
    urls = _write_shards(tmp_path / "shards", good=2)
    with pytest.raises(OpenAlignError, match=r"1 of the 2 shards .* do not exist, e.g. '.*000001.tar'"):
        WebDatasetSourceConfig(urls=urls.replace("000000}", "000001}")).build(WDS_TRANSFORM, seed=0)
    with pytest.raises(OpenAlignError, match=r"'.*shards' is a directory: name its shards, e.g. '.*shards/\*.tar'"):
        WebDatasetSourceConfig(urls=str(tmp_path / "shards")).build(WDS_TRANSFORM, seed=0)
    with pytest.raises(OpenAlignError, match=r"the pattern '.*shards/\*.tgz' \(a part of '.*'\) matches no file"):
        WebDatasetSourceConfig(urls=f"{urls}::{tmp_path / 'shards'}/*.tgz").build(WDS_TRANSFORM, seed=0)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "000000.tar").write_bytes(b"this is not a tar file" * 100)
    dead = WebDatasetSourceConfig(urls=str(tmp_path / "garbage" / "000000.tar"), max_consecutive_errors=5)
    with pytest.raises(OpenAlignError, match="5 consecutive samples .* failed"):
        next(iter(dead.build(WDS_TRANSFORM, seed=0)))


def test_table_sources_read_csv_tsv_and_parquet_with_paths_or_bytes_and_drop_bad_rows(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from openalign.data import TableSourceConfig

    (tmp_path / "images").mkdir()
    colours = {"red.png": (220, 20, 20), "blue.png": (20, 20, 220)}
    for name, colour in colours.items():
        Image.new("RGB", (40, 30), colour).save(tmp_path / "images" / name)
    (tmp_path / "pairs.csv").write_text("image,caption,synthetic\nimages/red.png,a red box,a red square\n"
                                        "images/gone.png,a lost image,x\nimages/blue.png,,a blue square\n"
                                        "images/blue.png,\"a blue box, wide\",a blue square\n")
    (tmp_path / "pairs.tsv").write_text("path\ttext\nimages/red.png\tred\n")
    encoded = []
    for name in colours:
        buffer = io.BytesIO()
        Image.open(tmp_path / "images" / name).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    pq.write_table(pa.table({"jpg": encoded, "txt": ["red", "blue"]}), tmp_path / "pairs.parquet")

    transform = ImageTransform(PreprocessConfig(image_size=24, resize_size=24, random_flip=False), train=False)
    csv = TableSourceConfig(path=str(tmp_path / "pairs.csv"), extra_columns={"caption": "synthetic"}).build(transform, 0)
    assert len(csv) == 2 and "dropped 1 row(s) with empty caption, 1 row(s) with missing image file" in caplog.text
    sample = csv[(0, 1)]
    assert (sample["text"], sample["caption"]) == ("a blue box, wide", "a blue square")
    torch.testing.assert_close(sample["image"], transform(Image.open(tmp_path / "images" / "blue.png")))
    tsv = TableSourceConfig(path=str(tmp_path / "pairs.tsv"), image_column="path", text_column="text").build(transform, 0)
    assert tsv[(0, 0)]["text"] == "red"
    # captions and file names are read as written, not as the numbers CSV typing would make of them; labels are numbers
    (tmp_path / "images" / "0001").write_bytes((tmp_path / "images" / "red.png").read_bytes())
    (tmp_path / "numbers.csv").write_text("image,caption,label\n0001,007,3\n0001,1.50,4\n")
    numbers = TableSourceConfig(path=str(tmp_path / "numbers.csv"), image_root=str(tmp_path / "images"),
                                extra_columns={"label": "label"}).rows()
    assert numbers == [(tmp_path / "images" / "0001", "007", {"label": 3}),
                       (tmp_path / "images" / "0001", "1.50", {"label": 4})]
    parquet = TableSourceConfig(path=str(tmp_path / "*.parquet"), image_column="jpg", text_column="txt").build(transform, 0)
    torch.testing.assert_close(parquet[(0, 0)]["image"], csv[(0, 0)]["image"])  # the same red image, from bytes
    # Hugging Face datasets' layout: Image structs {bytes, path}, binary captions; a row lacking an extra is dropped
    structs = [{"bytes": data, "path": None} for data in (*encoded, encoded[0], None)]
    hf = pa.table({"image": structs, "text": pa.array([b"red", b"blue", b"\xff latin-1", b"none"], pa.binary()),
                   "label": [0, None, 1, 2]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    caplog.clear()
    rows = TableSourceConfig(path=str(tmp_path / "hf.parquet"), text_column="text", extra_columns={"label": "label"}
                             ).rows()
    assert [(image, text, extra) for image, text, extra in rows] == [(encoded[0], "red", {"label": 0})]
    assert "1 row(s) with caption not UTF-8, 1 row(s) with empty column label, 1 row(s) with missing image file" \
        in caplog.text
    pq.write_table(pa.table({"image": [1.5], "caption": ["x"]}), tmp_path / "float.parquet")
    with pytest.raises(OpenAlignError, match="column 'image' holds float '1.5'; expected image paths, encoded"):
        TableSourceConfig(path=str(tmp_path / "float.parquet")).rows()
    with pytest.raises(OpenAlignError, match="no column 'url'; its columns are image, caption, synthetic"):
        TableSourceConfig(path=str(tmp_path / "pairs.csv"), image_column="url").build(transform, 0)
    with pytest.raises(OpenAlignError, match="no table matches"):
        TableSourceConfig(path=str(tmp_path / "missing.csv")).build(transform, 0)


def test_a_caption_of_only_characters_the_tokenizer_deletes_is_empty():
    """Zero-width spaces, byte-order marks, NULs and U+FFFD tokenize to [CLS] [SEP] alone: the
    sample has no text to learn from, as a blank caption has none."""
    from openalign.data.quality import SkipSample, caption_text

    tokenizer = get_tokenizer("align-test")
    for invisible in ("\u200b", "\x00", " \ufeff\u200b ", "\ufffd", "\u200d\u2060".encode()):
        text = invisible.decode() if isinstance(invisible, bytes) else invisible
        assert tokenizer([text])["attention_mask"].sum().item() == 2  # [CLS] [SEP]: what the check stands for
        with pytest.raises(SkipSample, match="empty caption"):
            caption_text(invisible)
    assert caption_text(" a\u200bb ") == "a\u200bb" and caption_text("\u00e9") == "\u00e9"
    assert caption_text("\U0001FAE8") == "\U0001FAE8"  # an emoji newer than this Python's Unicode (category Cn)
    # a lone UTF-16 surrogate (JSON's "\\ud83d", an emoji cut in half) is U+FFFD, as bad UTF-8 is: the fast
    # tokenizer refused the whole batch
    assert caption_text("a red thing \ud83d") == "a red thing \ufffd"
    assert caption_text("\ud83d\ude00 a smile") == "\U0001F600 a smile"  # a pair as two code units: joined
    with pytest.raises(SkipSample, match="empty caption"):
        caption_text(" \udc00 ")
    batch = tokenizer(["a red \ud83d thing", "a red thing"])
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # U+FFFD is deleted, as BERT deletes it



def test_texts_the_tokenizer_knows_no_word_of_are_counted_and_said(caplog):
    from openalign.data.loader import COUNTS_KEY
    from openalign.data.quality import COUNTS, UNKNOWN_TEXT

    tokenizer = get_tokenizer("align-test")
    with caplog.at_level("WARNING"):  # bert-base-uncased has no emoji: [CLS] [UNK] [SEP]
        batch = tokenizer(["\U0001F600\U0001F600", "a cat \U0001F600", "", "\U0001F600 \U0001F431"])
    assert batch["input_ids"][0, :3].tolist() == [101, 100, 102]
    assert COUNTS[UNKNOWN_TEXT] == 2  # a text with a word, and the empty text, are not counted
    assert [record.getMessage()[:45] for record in caplog.records] == [
        "1 text(s) so far are [UNK] alone to the token", "2 text(s) so far are [UNK] alone to the token"]
    # a batch's counts carry what its own captions noted, so that they reach the run's data_summary.json
    samples = [{"image": torch.zeros(3, 2, 2), "text": text} for text in ("\U0001F600", "a cat")]
    assert Collate(tokenizer)(samples)[COUNTS_KEY][1][UNKNOWN_TEXT] == 3


def test_tsv_captions_are_read_verbatim_and_one_bad_caption_drops_one_row(tmp_path, caplog):
    """Alt-text TSVs have no quoting: a caption starting with a quote mark must not swallow the
    rows after it; TSVs that pandas writes quote fields, and read as written too. A caption that
    is not UTF-8 drops its row, not the table; compressed and upper-case file names are tables too."""
    import csv
    import gzip

    from openalign.data import TableSourceConfig

    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "a.png")
    captions = ['"Best" pizza in town', '"The Road Not Taken - Robert Frost', "third row", 'a 5 x 7" frame']
    table = "image\tcaption\n" + "".join(f"a.png\t{caption}\n" for caption in captions)
    (tmp_path / "alt.tsv").write_text(table)
    assert [text for _, text, _ in TableSourceConfig(path=str(tmp_path / "alt.tsv")).rows()] == captions
    (tmp_path / "ALT.TSV.GZ").write_bytes(gzip.compress(table.encode()))
    assert [text for _, text, _ in TableSourceConfig(path=str(tmp_path / "ALT.TSV.GZ")).rows()] == captions
    closed = ['"Best" pizza in town', '"a quoted caption"', "third row"]  # every quote closed: still alt-text
    (tmp_path / "closed.tsv").write_text("image\tcaption\n" + "".join(f"a.png\t{caption}\n" for caption in closed))
    assert [text for _, text, _ in TableSourceConfig(path=str(tmp_path / "closed.tsv")).rows()] == closed
    with open(tmp_path / "all.tsv", "w", newline="") as handle:  # every field quoted, the header too
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writerows([["image", "caption"], *(["a.png", caption] for caption in closed)])
    assert [text for _, text, _ in TableSourceConfig(path=str(tmp_path / "all.tsv")).rows()] == closed
    # a TSV that pandas or the csv module wrote quotes such fields: read as written
    with open(tmp_path / "quoted.tsv", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["image", "caption"])
        writer.writerows([["a.png", caption] for caption in [*captions, "a\ttab", "two\nlines"]])
    assert [text for _, text, _ in TableSourceConfig(path=str(tmp_path / "quoted.tsv")).rows()] == \
        [*captions, "a\ttab", "two\nlines"]
    # an image file name that is not UTF-8 (written on a Latin-1 system) still names its file
    shutil.copy(tmp_path / "a.png", os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))
    (tmp_path / "latin1.csv").write_bytes(b"image,caption\ncaf\xe9.png,a red square\nmissing\xe9.png,gone\n")
    rows = TableSourceConfig(path=str(tmp_path / "latin1.csv")).rows()
    assert [(image.read_bytes() == (tmp_path / "a.png").read_bytes(), text) for image, text, _ in rows] == [
        (True, "a red square")]
    (tmp_path / "mixed.csv").write_bytes(b"image,caption\na.png,caf\xe9 latin-1\na.png,caf\xc3\xa9 utf-8\n")
    assert [text for _, text, _ in TableSourceConfig(path=str(tmp_path / "mixed.csv")).rows()] == ["café utf-8"]
    assert "dropped 1 row(s) with caption not UTF-8" in caplog.text
    (tmp_path / "a.parquet.gz").write_bytes(b"")
    with pytest.raises(OpenAlignError, match="is not .csv, .tsv"):
        TableSourceConfig(path=str(tmp_path / "a.parquet.gz")).rows()
    # past the CSV reader's 1 MB blocks: quoted line breaks (pandas), and an alt-text TSV whose
    # small unquoted reading failed or whose large one lost a block of rows to an unclosed quote
    many = [f"caption {i}" + (" with\na line break" if i % 7 == 0 else "") for i in range(80_000)]
    with open(tmp_path / "big.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "caption"], *(["a.png", caption] for caption in many)])
    assert [text for _, text, _ in TableSourceConfig(path=str(tmp_path / "big.csv")).rows()] == many
    for rows in (200, 60_000):
        alt = [f"caption {i}" if i != rows // 2 else '"an unclosed quote' for i in range(rows)]
        (tmp_path / "cc3m.tsv").write_text("image\tcaption\n" + "".join(f"a.png\t{caption}\n" for caption in alt))
        assert [text for _, text, _ in TableSourceConfig(path=str(tmp_path / "cc3m.tsv")).rows()] == alt, rows


def test_16_bit_and_float_images_are_scaled_to_8_bits_not_clipped():
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    eight_bit = np.rint(ramp / 257).astype(np.uint8)
    transform = ImageTransform(PreprocessConfig(image_size=32, resize_size=32), train=False)
    expected = transform(Image.fromarray(eight_bit).convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")  # PIL opens a 16-bit grayscale PNG as I;16
    for image in (Image.open(buffer), Image.fromarray(ramp.astype(np.int32), "I"),
                  Image.fromarray((ramp / 65535).astype(np.float32), "F")):
        pixels = transform(image)
        assert (pixels - expected).abs().max() <= 1 / 127.5 + 1e-6, image.mode  # within one 8-bit level
    assert transform(Image.fromarray(ramp)).mean() < 0.1  # PIL's own convert("RGB") would give almost 1 (white)


def test_written_whole_replaces_a_file_in_one_rename_or_leaves_it_as_it_was(tmp_path):
    from openalign.files import written_whole

    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with written_whole(target) as temporary:
            temporary.write_text("half")
            assert target.read_text() == "old" and temporary.parent == tmp_path
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    with written_whole(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_skips_are_logged_as_samples_or_as_shards(monkeypatch, caplog):
    from collections import Counter

    from openalign.data import quality

    monkeypatch.setattr(quality, "COUNTS", Counter())  # the counts so far decide when a skip is logged
    policy = quality.SkipPolicy("shards")
    policy.skip(quality.SkipSample(quality.TRUNCATED_SHARD, "ReadError"), "00001.tar")
    policy.skip(quality.SkipSample(quality.EMPTY_CAPTION))
    assert "skipped 1 shard(s) so far for truncated or corrupt shard; latest (00001.tar)" in caplog.text
    assert "skipped 1 sample(s) so far for empty caption" in caplog.text


def test_unreadable_rows_of_a_map_style_source_are_counted_once_an_epoch_and_stand_ins_spread(tmp_path):
    """A table whose first 120 rows are unreadable (more than the 100-in-a-row stop of a stream)
    trains: each bad row counted once when the epoch draws it, its stand-in a readable row drawn at
    random (not the one after the run, 121 times), the same on a replay; a source whose every
    image fails is an error that says so."""
    from openalign.data.karpathy import CaptionedImage
    from openalign.data.quality import COUNTS
    from openalign.data.sources import CaptionDataset

    items = []
    for i in range(240):
        path = tmp_path / f"{i:03d}.png"
        if i < 120:
            path.write_bytes(b"corrupt")
        else:
            Image.new("RGB", (12, 12), (i, 0, 0)).save(path)
        items.append(CaptionedImage(path, (f"caption {i}",)))
    dataset = CaptionDataset(items, WDS_TRANSFORM, seed=0)
    before = Counter(COUNTS)
    texts = [dataset[(0, index)]["text"] for index in range(len(items))]
    assert Counter(COUNTS) - before == {"skipped/undecodable image": 120}
    assert set(texts[120:]) == {f"caption {i}" for i in range(120, 240)}  # every readable row as itself
    assert max(Counter(texts).values()) <= 6  # the 120 stand-ins spread over the 120 readable rows
    assert [dataset[(0, index)]["text"] for index in range(120)] == texts[:120]  # replayed on a resume
    broken = CaptionDataset(items[:120], WDS_TRANSFORM, seed=0)
    with pytest.raises(OpenAlignError, match=r"100 samples drawn at random to stand in for the unreadable .*000\.png "
                                             "could not be read either: nearly every image fails"):
        broken[(0, 0)]


def test_a_table_counts_each_columns_bad_cells_apart_and_never_trains_on_nan_or_replaced_bytes(tmp_path, caplog):
    """ALIP's table: alt-text and a synthetic caption. A row lacking either is dropped under its
    own column's reason (not both as 'empty caption'); invalid UTF-8 in the synthetic column is
    dropped as in the caption column (not kept with U+FFFD); a float column's NaN is no caption
    'nan', nor a value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from openalign.data.sources import TableSourceConfig

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_bytes(b"image,caption,synthetic\na.png,,a red square\na.png,alt text,\n"
                                         b"a.png,alt,caf\xe9 au lait\na.png,alt two,a blue square\n")
    table = TableSourceConfig(path=str(tmp_path / "pairs.csv"), extra_columns={"caption": "synthetic"})
    with caplog.at_level("WARNING", logger="openalign"):
        assert table.rows() == [(tmp_path / "a.png", "alt two", {"caption": "a blue square"})]
    assert ("dropped 1 row(s) with column synthetic not UTF-8, 1 row(s) with empty caption, 1 row(s) with empty "
            "column synthetic") in caplog.text
    pq.write_table(pa.table({"image": ["a.png"] * 3, "caption": [1.5, float("nan"), None],
                             "score": [float("nan"), 0.5, 0.5]}), tmp_path / "floats.parquet")
    caplog.clear()
    with caplog.at_level("WARNING", logger="openalign"):
        assert TableSourceConfig(path=str(tmp_path / "floats.parquet")).rows() == [(tmp_path / "a.png", "1.5", {})]
        with pytest.raises(OpenAlignError, match="no usable row"):
            TableSourceConfig(path=str(tmp_path / "floats.parquet"), extra_columns={"score": "score"}).rows()
    assert "dropped 2 row(s) with empty caption" in caplog.text
    assert "1 row(s) with empty column score" in caplog.text
    from openalign.data.quality import SkipSample
    from openalign.data.sources import extra_value

    for data, reason in ((b" ", "empty caption.txt"), (b"caf\xe9", "caption.txt not UTF-8"), (None, "no caption.txt")):
        with pytest.raises(SkipSample) as skipped:  # a shard's extra member: its own reasons, too
            extra_value("caption.txt", data)
        assert skipped.value.reason == reason


def test_a_table_names_its_first_missing_image_and_sends_url_lists_to_img2dataset(tmp_path, caplog):
    from openalign.data.sources import TableSourceConfig

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,one\nb.png,two\nc.png,three\n")
    with caplog.at_level("WARNING", logger="openalign"):
        assert len(TableSourceConfig(path=str(tmp_path / "pairs.csv")).rows()) == 1
    assert f"2 row(s) with missing image file (the first missing: {tmp_path / 'pairs.csv'} data row 2: " \
           f"{tmp_path / 'b.png'})" in caplog.text
    (tmp_path / "urls.csv").write_text("url,caption\nhttps://example.com/a.jpg,one\nHTTP://example.com/b.jpg,two\n")
    with pytest.raises(OpenAlignError, match=r"dropped: \{'image URL, not a file': 2\}\); download the URLs with "
                                             "img2dataset first"):
        TableSourceConfig(path=str(tmp_path / "urls.csv"), image_column="url").rows()
    # mostly missing files and one URL: the hint is the files'
    (tmp_path / "mixed.csv").write_text("image,caption\nb.png,two\nc.png,three\nhttps://example.com/a.jpg,one\n")
    with pytest.raises(OpenAlignError, match=r"; the first missing image: .*mixed.csv data row 1: .*b.png$"):
        TableSourceConfig(path=str(tmp_path / "mixed.csv")).rows()
    (tmp_path / "tables").mkdir()  # several tables: the first one's missing image is still named
    (tmp_path / "tables" / "a.csv").write_text("image,caption\nb.png,two\nc.png,three\n")
    (tmp_path / "tables" / "b.csv").write_text("image,caption\nhttps://example.com/a.jpg,one\n")
    with pytest.raises(OpenAlignError, match=r"; the first missing image: .*a.csv data row 1: .*b.png$"):
        TableSourceConfig(path=str(tmp_path / "tables" / "*.csv")).rows()


def _worker_waiting(started) -> None:
    from openalign.data.loader import _start_worker

    _start_worker(0)
    started.set()
    import time

    time.sleep(60)


@pytest.mark.skipif(not hasattr(__import__("signal"), "sigwaitinfo"), reason="sigwaitinfo is Linux's")
def test_a_loader_worker_outlives_sigterm_from_others_and_ends_on_its_parents():
    """torchrun and schedulers send SIGTERM to a rank's whole process group: a training worker keeps
    serving the step the rank finishes before it stops. Its own process's SIGTERM (torch's and
    multiprocessing's way to stop a stuck worker, after which they wait for it) still ends it."""
    import multiprocessing
    import signal
    import subprocess

    context = multiprocessing.get_context("fork")
    started = context.Event()
    worker = context.Process(target=_worker_waiting, args=(started,), daemon=True)
    worker.start()
    try:
        assert started.wait(30)
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # another process's
        worker.join(1.0)
        assert worker.is_alive()
        worker.terminate()  # its parent's
        worker.join(30)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()


def test_annotation_list_counts_an_image_whose_caption_list_is_empty(tmp_path, caplog):
    """An ALBEF/BLIP entry with ``"caption": []`` leaves its image without a caption: it is left out
    of retrieval with a count, as the Karpathy reader counts one, not silently."""
    (tmp_path / "test.json").write_text(json.dumps([{"image": "a.jpg", "caption": ["a dog"]},
                                                    {"image": "b.jpg", "caption": []},
                                                    {"image": "c.jpg", "caption": "a cat"}]))
    with caplog.at_level("WARNING"):
        items = read_karpathy(tmp_path / "test.json", "test")
    assert [item.path.name for item in items] == ["a.jpg", "c.jpg"]
    assert "skipped 0 empty caption(s) and 1 image(s) left without a caption" in caplog.text


def test_karpathy_entries_without_a_field_the_model_reads_are_dropped_and_counted(tmp_path, caplog):
    """ALIP's synthetic caption missing, empty or not text in an entry stopped training at the step
    whose batch drew it; a key the model does not read (a url) drops nothing."""
    from openalign.data import KarpathySourceConfig
    from openalign.recipe import load_recipe
    from openalign.train import train

    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "a.png")
    entries = [{"filename": "a.png", "split": "train", "sentences": [{"raw": f"raw {i}"}], "caption": f"synthetic {i}",
                "url": f"http://x/{i}"} for i in range(10)]
    del entries[3]["caption"], entries[4]["url"]
    entries[5]["caption"], entries[7]["caption"] = " ", 5
    entries[9]["sentences"] = [{"raw": " "}]  # an image left without a caption
    (tmp_path / "captions.json").write_text(json.dumps({"images": entries}))
    source = KarpathySourceConfig(json=str(tmp_path / "captions.json"))
    transform = ImageTransform(PreprocessConfig(image_size=8, resize_size=8), train=True)
    dataset = source.build(transform, 0)
    dataset.require_fields(("image", "text"))  # ALIGN reads no caption field: nothing more is dropped
    assert len(dataset) == 9 and dataset.dropped == {"skipped/image without a caption": 1}
    dataset.require_fields(("image", "text", "caption"))  # ALIP's
    assert [item.captions[0] for item in dataset.items] == [f"raw {i}" for i in (0, 1, 2, 4, 6, 8)]
    assert dataset.dropped == {"skipped/entry without caption": 3, "skipped/image without a caption": 1}
    assert "dropped 3 of the 9 entries without a field the model reads (3 entry without caption)" in caplog.text
    with pytest.raises(OpenAlignError, match=r"\(1 for image without a caption\); data.strict is true"):
        source.build(transform, 0, strict=True)
    (tmp_path / "captioned.json").write_text(json.dumps({"images": entries[:9]}))
    strict = KarpathySourceConfig(json=str(tmp_path / "captioned.json")).build(transform, 0, strict=True)
    with pytest.raises(OpenAlignError, match=r"dropped entries when it was read \(3 for entry without caption\); "
                                             "data.strict is true"):
        strict.require_fields(("image", "text", "caption"))
    # in training: ALIP's model on these entries trains on the six, counted in the run's summary
    overrides = ["model.name=alip-tiny", f"data.train={{type: karpathy, json: '{tmp_path / 'captions.json'}'}}",
                 "data.num_workers=0", "train.steps=1", "train.batch_size=2", "train.warmup_steps=0",
                 "train.schedule=linear", "eval.tasks=[]", f"run.output_dir={tmp_path / 'run'}",
                 "run.tensorboard=false"]
    counts = train(load_recipe("alip-shapes", overrides), show_progress=False).data_counts
    assert counts == {"skipped/entry without caption": 3, "skipped/image without a caption": 1}
    # in a mixture, each child is asked, and the mixture's drops are its children's
    from openalign.data.sources import MixtureDataset

    mixture = MixtureDataset([source.build(transform, 0), source.build(transform, 1)], [1, 1], seed=0)
    mixture.require_fields(("image", "text", "caption"))
    assert [len(child) for child in mixture.children] == [6, 6]
    assert mixture.dropped == {"skipped/entry without caption": 6, "skipped/image without a caption": 2}
    entries[2]["filepath"] = None
    (tmp_path / "captions.json").write_text(json.dumps({"images": entries}))
    with pytest.raises(OpenAlignError, match=r"images\[2\] has 'filepath' None; expected the folder of its file"):
        source.build(transform, 0)


def test_rows_a_table_drops_are_in_the_run_summary_once_and_an_error_under_strict(tmp_path):
    from openalign.recipe import load_recipe
    from openalign.train import train

    for colour in ("red", "blue"):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{colour}.png")
    rows = [f"{colour}.png,a {colour} square" for colour in ("red", "blue") * 4]
    (tmp_path / "pairs.csv").write_text("\n".join(["image,caption", *rows, "gone.png,a missing file", "red.png,"]))
    overrides = ["model.name=align-test", f"data.train={{type: table, path: '{tmp_path / 'pairs.csv'}'}}",
                 "data.num_workers=0", "train.steps=2", "train.batch_size=4", "train.warmup_steps=0", "eval.tasks=[]",
                 f"run.output_dir={tmp_path / 'run'}", "run.checkpoint_every=1", "run.tensorboard=false"]
    expected = {"skipped/empty caption": 1, "skipped/missing image file": 1}
    assert train(load_recipe("demo", overrides), show_progress=False).data_counts == expected
    assert json.loads((tmp_path / "run" / "data_summary.json").read_text()) == expected
    resumed = load_recipe("demo", [*overrides, "train.steps=3"])  # the resumed run's counts go on, not twice
    assert train(resumed, resume="latest", show_progress=False).data_counts == expected
    with pytest.raises(OpenAlignError, match=r"dropped entries when it was read \(1 for empty caption, 1 for missing "
                                             r"image file\); data.strict is true"):
        train(load_recipe("demo", [*overrides, f"run.output_dir={tmp_path / 'strict'}", "data.strict=true"]),
              show_progress=False)


def test_a_parquet_caption_column_of_lists_is_an_error_not_their_repr(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from openalign.data import TableSourceConfig

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    pq.write_table(pa.table({"image": ["a.png", "a.png"], "caption": [["a red square", "red"], ["a square"]]}),
                   tmp_path / "lists.parquet")
    with pytest.raises(OpenAlignError, match=r"column 'caption' holds lists \(\['a red square', 'red'\]\), not text: "
                                             r".*give each its own row \(pandas: df.explode\(column\)\)"):
        TableSourceConfig(path=str(tmp_path / "lists.parquet")).rows()


def test_unbalanced_braces_and_empty_url_parts_are_errors_naming_the_pattern(tmp_path):
    from openalign.data.shards import expand_shards, expand_urls

    with pytest.raises(OpenAlignError, match=r"'.*/shards-\{00000..00001.tar' has unbalanced braces"):
        expand_urls(str(tmp_path / "shards-{00000..00001.tar"), "shards")
    with pytest.raises(OpenAlignError, match=r"has unbalanced braces"):
        expand_shards([str(tmp_path / "shards-00000}.tar")])
    (tmp_path / "a.tar").write_bytes(b"")
    for pattern in (f"{tmp_path / 'a.tar'}::", f"{tmp_path / 'a.tar'}::::{tmp_path / 'a.tar'}"):
        with pytest.raises(OpenAlignError, match="has an empty part between its '::' separators"):
            expand_urls(pattern, "shards")


def test_a_run_that_fails_on_its_data_ends_its_loader_workers_before_it_returns(tmp_path):
    """Left to the interpreter's exit, each worker was reported "killed by signal: Terminated"
    after the run's own error, as if a second failure had followed it."""
    import multiprocessing

    from openalign.recipe import load_recipe
    from openalign.train import train

    for index in range(8):
        Image.new("RGB", (16, 16), (index * 30, 0, 0)).save(tmp_path / f"{index}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [f"{index}.png,a red square {index}" for index in range(8)] + ["bad.png,a broken file"]
    (tmp_path / "pairs.csv").write_text("\n".join(["image,caption", *rows]))
    recipe = load_recipe("demo", [
        "model.name=align-test", f"data.train={{type: table, path: '{tmp_path / 'pairs.csv'}'}}", "data.strict=true",
        "data.num_workers=2", "train.steps=6", "train.batch_size=4", "train.warmup_steps=0", "eval.tasks=[]",
        f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false"])
    with pytest.raises(OpenAlignError, match="undecodable image.*data.strict is true"):
        train(recipe, show_progress=False)
    assert multiprocessing.active_children() == []
