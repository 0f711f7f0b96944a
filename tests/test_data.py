"""The built-in dataset, the Karpathy reader, transforms, the tokenizer, the sampler and the stream source."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openalign import get_tokenizer
from openalign.data import (Collate, EpochBatchSampler, ImageTransform, ShapesSpec, WebDatasetSourceConfig,
                            build_shapes_dataset, read_karpathy)
from openalign.data.shapes import COLOURS, SHAPES, generate_example
from openalign.data.transforms import PreprocessConfig
from openalign.errors import OpenAlignError


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
    with pytest.raises(OpenAlignError, match="already holds a shapes dataset"):
        build_shapes_dataset(shapes_root, ShapesSpec(num_train=10, num_test=2, image_size=32), show_progress=False)


def test_karpathy_reader_errors_name_the_problem(tmp_path, shapes_root):
    with pytest.raises(OpenAlignError, match="does not exist"):
        read_karpathy(tmp_path / "missing.json", "test")
    (tmp_path / "bad.json").write_text('{"annotations": []}')
    with pytest.raises(OpenAlignError, match="not a Karpathy-style caption file"):
        read_karpathy(tmp_path / "bad.json", "test")
    with pytest.raises(OpenAlignError, match="its splits are: test, train"):
        read_karpathy(shapes_root / "dataset_shapes.json", "val")


def test_eval_transform_is_squash_resize_then_centre_crop_at_offset_28():
    """Spec §3.5: 346×346 bilinear (aspect ratio not kept), crop 289 at (28, 28), x/127.5 - 1."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    out = ImageTransform(PreprocessConfig(), train=False)(image)
    resized = np.asarray(image.resize((346, 346), Image.Resampling.BILINEAR), dtype=np.float32)
    expected = resized[28:317, 28:317].transpose(2, 0, 1) / 127.5 - 1
    assert out.shape == (3, 289, 289)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_train_transform_is_a_replayable_random_crop():
    config = PreprocessConfig(image_size=8, resize_size=12, random_flip=True)
    image = Image.fromarray(np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3))
    transform = ImageTransform(config, train=True)
    crops = [transform(image, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(c.shape == (3, 8, 8) for c in crops)
    assert len({c.sum().item() for c in crops}) > 3  # positions and flips vary
    torch.testing.assert_close(transform(image, torch.Generator().manual_seed(5)), crops[5])
    assert all(c.min() >= -1 and c.max() <= 1 for c in crops)


def test_grayscale_and_alpha_images_become_rgb():
    transform = ImageTransform(PreprocessConfig(image_size=8, resize_size=8), train=False)
    for mode in ("L", "RGBA", "CMYK", "P"):
        assert transform(Image.new(mode, (10, 10))).shape == (3, 8, 8)


def test_tokenizer_is_bert_base_uncased_padded_to_max_length():
    tokenizer = get_tokenizer("align-b7-base")
    encoded = tokenizer("a photo of a cat")
    assert encoded["input_ids"].shape == (1, 64)
    assert encoded["input_ids"][0, :8].tolist() == [101, 1037, 6302, 1997, 1037, 4937, 102, 0]
    assert encoded["attention_mask"][0].sum() == 7
    long = tokenizer(["word " * 200, "A Photo OF a CAT"])
    assert long["input_ids"].shape == (2, 64) and long["input_ids"][0, -1] == 102  # truncated, [SEP] kept
    assert long["input_ids"][1, :7].tolist() == [101, 1037, 6302, 1997, 1037, 4937, 102]  # lower-cased


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
    assert [next(halves[0]) + next(halves[1]) for _ in range(5)] == global_batches[7:]


def test_sampler_refuses_a_dataset_smaller_than_one_global_batch():
    with pytest.raises(OpenAlignError, match="fewer than one global batch"):
        EpochBatchSampler(10, batch_size=8, rank=0, world_size=2, seed=0)


def test_collate_stacks_tensors_and_tokenizes_text():
    batch = Collate(get_tokenizer("align-test"))([{"image": torch.zeros(3, 4, 4), "text": "a red circle", "label": 1},
                                                  {"image": torch.ones(3, 4, 4), "text": "a cat", "label": 2}])
    assert batch["image"].shape == (2, 3, 4, 4)
    assert batch["text"]["input_ids"].shape == (2, 16) and batch["label"].tolist() == [1, 2]


def _write_shards(directory: Path, good: int) -> str:
    import webdataset as wds

    directory.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), (200, 30, 30)).save(buffer, format="JPEG")
    with wds.TarWriter(str(directory / "000000.tar")) as sink:
        for i in range(good):
            sink.write({"__key__": f"{i:06d}", "jpg": buffer.getvalue(), "txt": f"caption {i}"})
        sink.write({"__key__": "corrupt", "jpg": b"not a jpeg", "txt": "broken"})
    return str(directory / "{000000..000000}.tar")


def test_webdataset_source_streams_pairs_and_skips_corrupt_images(tmp_path):
    urls = _write_shards(tmp_path / "shards", good=5)
    transform = ImageTransform(PreprocessConfig(image_size=8, resize_size=10), train=True)
    stream = iter(WebDatasetSourceConfig(urls=urls, shuffle_buffer=1).build(transform, seed=0))
    samples = [next(stream) for _ in range(12)]  # resampled: the shard repeats forever
    assert all(s["image"].shape == (3, 8, 8) for s in samples)
    assert {s["text"] for s in samples} <= {f"caption {i}" for i in range(5)}
