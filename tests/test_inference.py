"""The inference API and the embed / classify / search commands, on align-test and images made here."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import openalign
from openalign import inference
from openalign.cli import main
from openalign.errors import OpenAlignError
from openalign.inference import (classify, embed_folder, find_images, optimize_for_inference, read_index, search,
                                 write_index)

LABELS = ["a red square", "a green square", "a blue square"]
GOOD_IMAGES = ["blue.png", "green.jpg", "nested/deeper/noise.PNG", "nested/red.png", "white.webp"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """align-test with logit scale 100, so that probabilities are not uniform."""
    torch.manual_seed(0)
    model = openalign.create_model("align-test").eval()
    with torch.no_grad():
        model.log_temperature.fill_(math.log(0.01))
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "align-test")


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple:
    return openalign.load_pretrained(model_dir)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five readable images (nested, mixed formats and case), a truncated PNG, a text file named .jpg,
    and a .txt file that is not a candidate at all."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index, name in enumerate(GOOD_IMAGES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) // (index + 1)
        Image.fromarray(pixels).save(root / name)
    complete = (root / "nested" / "red.png").read_bytes()
    (root / "corrupt.png").write_bytes(complete[: len(complete) // 2])
    (root / "not-an-image.jpg").write_text("this is text, not a JPEG")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def _reference_image_embeddings(model, preprocess, paths) -> torch.Tensor:
    pixels = torch.stack([preprocess(Image.open(path)) for path in paths])
    with torch.no_grad():
        return model.encode_image(pixels, normalize=True)


def test_optimize_for_inference_folds_batch_norm_and_keeps_the_embeddings(tmp_path):
    torch.manual_seed(0)
    model = openalign.create_model("align-test")
    norms = [m for m in model.image_tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():  # statistics and affine maps far from the identity, as in a trained model
        for norm in norms:
            norm.running_mean.normal_(0, 0.5)
            norm.running_var.uniform_(0.2, 3.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.2)
    model.eval()
    keys = set(model.state_dict())
    fast = optimize_for_inference(model)
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens = openalign.get_tokenizer("align-test")(["a red square", "two dogs"])
    with torch.no_grad():
        torch.testing.assert_close(fast.encode_image(pixels), model.encode_image(pixels), atol=1e-5, rtol=0)
        assert torch.equal(fast.encode_text(**tokens), model.encode_text(**tokens))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert fast.image_tower.embeddings.convolution.bias is not None
    assert len(norms) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 10  # original kept
    assert set(model.state_dict()) == keys and not model.training
    with pytest.raises(OpenAlignError, match="cannot train"):
        fast.train()
    assert not any(module.training for module in fast.modules())  # no dropout in the text tower after the refusal
    with pytest.raises(OpenAlignError, match="save the model it was made from"):
        fast.save_pretrained(tmp_path / "fast")
    assert not (tmp_path / "fast").exists()
    model.train()  # the original still trains
    with pytest.raises(OpenAlignError, match="eval mode"):
        model.image_tower.fold_batch_norm()
    assert optimize_for_inference(model, inplace=True) is model and not model.training


def test_classify_equals_softmax_of_scaled_cosines(loaded, image_dir):
    model, preprocess, tokenizer = loaded
    paths = [image_dir / name for name in GOOD_IMAGES]
    images = [Image.open(paths[0]), *paths[1:]]  # a PIL image and paths
    probabilities = classify(model, preprocess, tokenizer, images, LABELS, batch_size=2)

    with torch.no_grad():
        texts = model.encode_text(**tokenizer(LABELS), normalize=True)
    expected = (model.logit_scale.item() * _reference_image_embeddings(model, preprocess, paths) @ texts.T).softmax(-1)
    assert probabilities.shape == (len(GOOD_IMAGES), len(LABELS)) and probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(GOOD_IMAGES)))
    assert (probabilities.amax(1) - probabilities.amin(1)).min() > 1e-3  # not uniform: the comparison means something
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_to_half_precision_classifies_and_embeds(loaded, image_dir, dtype):
    """As documented, inference runs in the model's dtype: a model cast with .to(bf16) or .half()
    embeds (its projections in fp32, as under autocast) close to the fp32 model."""
    import copy

    model, preprocess, tokenizer = loaded
    half = copy.deepcopy(model).to(dtype)
    paths = [image_dir / name for name in GOOD_IMAGES]
    expected = classify(model, preprocess, tokenizer, paths, LABELS)
    torch.testing.assert_close(classify(half, preprocess, tokenizer, paths, LABELS), expected, atol=0.05, rtol=0)
    embeddings = embed_folder(half, preprocess, image_dir)[1]
    assert embeddings.dtype == torch.float32 and torch.isfinite(embeddings).all()


def test_classify_with_templates_averages_the_prompts(loaded, image_dir):
    model, preprocess, tokenizer = loaded
    templates = ["a photo of a {}.", "a drawing of a {}."]
    names = ["cat", "dog"]
    probabilities = classify(model, preprocess, tokenizer, [image_dir / "blue.png"], names, templates=templates)

    with torch.no_grad():
        classes = torch.stack([F.normalize(model.encode_text(**tokenizer([t.format(n) for t in templates])).mean(0),
                                           dim=0) for n in names])
    image = _reference_image_embeddings(model, preprocess, [image_dir / "blue.png"])
    torch.testing.assert_close(probabilities, (model.logit_scale.item() * image @ classes.T).softmax(-1),
                               atol=1e-5, rtol=1e-4)
    assert openalign.zero_shot_classifier(model, tokenizer, names, templates).shape == (2, model.config.embed_dim)


def test_preprocess_takes_8_bit_arrays_and_tensors_and_names_what_it_refuses(loaded, image_dir):
    model, preprocess, tokenizer = loaded
    image = Image.open(image_dir / "blue.png")
    expected = preprocess(image)
    array = np.array(image)
    for pixels in (array, torch.from_numpy(array).permute(2, 0, 1)):
        torch.testing.assert_close(preprocess(pixels), expected, rtol=0, atol=0)
    gray = array[..., 0]
    torch.testing.assert_close(preprocess(gray[..., None]), preprocess(Image.fromarray(gray)), rtol=0, atol=0)
    torch.testing.assert_close(classify(model, preprocess, tokenizer, [array], LABELS),
                               classify(model, preprocess, tokenizer, [image], LABELS))
    for bad, message in ((torch.rand(3, 8, 8), r"uint8 \(C, H, W\) .*; got float32 \(3, 8, 8\)"),
                         (array.astype(np.float32), r"as uint8 \(H, W\) .*; got float32 \(40, 48, 3\)"),
                         (str(image_dir / "blue.png"), "got str \\(open a file with PIL.Image.open\\)")):
        with pytest.raises(TypeError, match=message):
            preprocess(bad)


@pytest.mark.parametrize("device, message", [("tpu", "'tpu' is not a torch device"),
                                             ("cuda:7", "no CUDA device is visible" if not torch.cuda.is_available()
                                              else "only .* CUDA device"),
                                             ("mps", "'mps' is not available here")])
def test_load_pretrained_refuses_a_device_this_machine_lacks(model_dir, device, message):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(OpenAlignError, match=message):
        openalign.load_pretrained(model_dir, device=device)
    assert next(openalign.load_pretrained(model_dir, device="auto")[0].parameters()).device.type == (
        "cuda" if torch.cuda.is_available() else "cpu")


def test_classify_names_an_unreadable_image(loaded, image_dir):
    model, preprocess, tokenizer = loaded
    with pytest.raises(OpenAlignError, match="corrupt.png"):
        classify(model, preprocess, tokenizer, [image_dir / "corrupt.png"], LABELS)


def test_embed_folder_skips_unreadable_files_and_counts_them(loaded, image_dir, caplog):
    model, preprocess, _ = loaded
    with caplog.at_level(logging.WARNING, logger="openalign"):
        paths, embeddings = embed_folder(model, preprocess, image_dir, batch_size=3)
    assert paths == sorted(str(image_dir / name) for name in GOOD_IMAGES)
    torch.testing.assert_close(embeddings, _reference_image_embeddings(model, preprocess, paths), atol=1e-5, rtol=1e-4)
    assert "skipped 2 of 7 files" in caplog.text


def test_embed_folder_reads_an_image_over_pils_pixel_limit_without_pils_warning(loaded, tmp_path, monkeypatch,
                                                                                   caplog):
    """PIL's DecompressionBombWarning (over 89.5 MP: a 108 MP phone photo) came on stderr, in the
    middle of the progress bar; the user's own image is now read, without it. One over PIL's
    error limit (twice that) is skipped and counted."""
    import warnings

    model, preprocess, _ = loaded
    Image.new("RGB", (40, 40), "red").save(tmp_path / "large.png")
    Image.new("RGB", (50, 50), "red").save(tmp_path / "huge.png")
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 px: over it, under twice it; 2,500 over that
    with caplog.at_level(logging.WARNING, logger="openalign"), warnings.catch_warnings():
        warnings.simplefilter("error")
        paths, _ = embed_folder(model, preprocess, tmp_path)
        classify(model, preprocess, loaded[2], [tmp_path / "large.png"], ["red"])  # in Python too, without it
    assert paths == [str(tmp_path / "large.png"), str(tmp_path / "small.png")]
    assert "skipped 1 of 3 files" in caplog.text and "DecompressionBombError" in caplog.text


def test_embed_folder_takes_a_glob_and_worker_processes(loaded, image_dir):
    model, preprocess, _ = loaded
    paths, embeddings = embed_folder(model, preprocess, str(image_dir / "**" / "*.png"), batch_size=2, num_workers=1)
    assert paths == [str(image_dir / "blue.png"), str(image_dir / "nested" / "red.png")]  # corrupt.png skipped
    assert embeddings.shape == (2, model.config.embed_dim)


def test_a_folder_and_its_glob_list_the_same_files_through_symlinks(tmp_path, monkeypatch):
    """A directory link to '..' must not list the tree again and again (glob.glob follows it
    through '**'); a broken link is listed, to be counted unreadable; a file named with glob
    characters is itself."""
    from openalign.inference import find_images

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.jpg").write_bytes(b"")
    (tmp_path / "real" / "photo[1].jpg").write_bytes(b"")
    (tmp_path / "real" / "loop").symlink_to("..")
    (tmp_path / "broken.jpg").symlink_to("nowhere.jpg")
    expected = [str(tmp_path / "broken.jpg"), str(tmp_path / "real" / "photo[1].jpg"), str(tmp_path / "real" / "x.jpg")]
    assert find_images(tmp_path) == expected
    assert find_images(str(tmp_path / "**" / "*.jpg")) == expected
    assert find_images(str(tmp_path / "real" / "photo[1].jpg")) == [str(tmp_path / "real" / "photo[1].jpg")]
    (tmp_path / "._x.jpg").write_bytes(b"")  # hidden: macOS's AppleDouble files, say
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "y.jpg").write_bytes(b"")
    assert find_images(tmp_path) == expected and find_images(str(tmp_path / "**")) == expected
    assert find_images(str(tmp_path / ".*.jpg")) == [str(tmp_path / "._x.jpg")]  # named: listed
    monkeypatch.chdir(tmp_path)
    assert find_images("**/*.jpg") == ["broken.jpg", "real/photo[1].jpg", "real/x.jpg"]
    assert find_images("real/**.jpg") == ["real/photo[1].jpg", "real/x.jpg"]  # '**' inside a name: '*', as glob
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_images("~/real/x.jpg") == [str(tmp_path / "real" / "x.jpg")]


def test_embed_folder_without_images_is_an_error(loaded, tmp_path):
    model, preprocess, _ = loaded
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(OpenAlignError, match="no image files in .*expected a directory"):
        embed_folder(model, preprocess, tmp_path)
    (tmp_path / "broken.png").write_text("not a PNG")
    with pytest.raises(OpenAlignError, match="none of the 1 image files"):
        embed_folder(model, preprocess, tmp_path)


def test_index_round_trip_in_several_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "INDEX_ROW_GROUP", 3)
    paths = [f"images/{i}.png" for i in range(7)]
    embeddings = torch.randn(7, 5)
    write_index(tmp_path / "index.parquet", paths, embeddings, model_name="align-test", model_source="runs/m")

    schema = pq.read_schema(tmp_path / "index.parquet")
    assert schema.field("path").type == pa.string() and schema.field("embedding").type == pa.list_(pa.float32())
    assert pq.ParquetFile(tmp_path / "index.parquet").num_row_groups == 3
    index = read_index(tmp_path / "index.parquet")
    assert index.paths == paths and index.model_name == "align-test" and index.model_source == "runs/m"
    assert torch.equal(index.embeddings, embeddings)


def test_an_index_is_replaced_whole_or_not_at_all_and_keeps_non_utf8_paths(tmp_path, monkeypatch, caplog):
    target = tmp_path / "index.parquet"
    write_index(target, ["a.png", "b.png"], torch.randn(2, 5))
    before = target.read_bytes()

    def broken_table(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(pa, "table", broken_table)
        with pytest.raises(OpenAlignError, match="cannot write the index .*disk full"):
            write_index(target, ["c.png"], torch.randn(1, 5))
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["index.parquet"]

    latin1 = os.fsdecode(b"caf\xe9.png")  # a Linux file name that is not UTF-8 (surrogate escapes)
    with caplog.at_level("WARNING"):
        write_index(target, [latin1, "b.png"], torch.randn(2, 5))
    assert read_index(target).paths == ["caf\\xe9.png", "b.png"] and "1 image path(s) are not UTF-8" in caplog.text


def test_missing_or_malformed_index_is_an_error(tmp_path):
    with pytest.raises(OpenAlignError, match="does not exist"):
        read_index(tmp_path / "missing.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(OpenAlignError, match="cannot read index"):
        read_index(tmp_path / "text.parquet")
    pq.write_table(pa.table({"path": ["a.png"], "vector": [[1.0, 2.0]]}), tmp_path / "columns.parquet")
    with pytest.raises(OpenAlignError, match=r"malformed \(no column 'embedding'; it has path, vector\)"):
        read_index(tmp_path / "columns.parquet")
    # each malformation named (the columns alone were named, which are right for these)
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "embedding": [[1.0, 2.0], [1.0]]}), tmp_path / "ragged.parquet")
    with pytest.raises(OpenAlignError, match=r"malformed \(embeddings of different lengths \(1, 2\)\)"):
        read_index(tmp_path / "ragged.parquet")
    pq.write_table(pa.table({"path": ["a.png"], "embedding": [["x", "y"]]}), tmp_path / "strings.parquet")
    with pytest.raises(OpenAlignError, match=r"malformed \(column 'embedding' holds list<.*string>, not lists of "):
        read_index(tmp_path / "strings.parquet")
    pq.write_table(pa.table({"path": ["a.png", None], "embedding": [[1.0], [2.0]]}), tmp_path / "null.parquet")
    with pytest.raises(OpenAlignError, match=r"malformed \(rows without a path or an embedding\)"):
        read_index(tmp_path / "null.parquet")


def _brute_force(index: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = index / np.linalg.norm(index, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarities = queries.astype(np.float64) @ index.T.astype(np.float64)
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarities, order, axis=1), order


def test_search_is_the_exact_cosine_top_k(monkeypatch):
    monkeypatch.setattr(inference, "SEARCH_CHUNK_ROWS", 64)  # several chunks to merge
    generator = torch.Generator().manual_seed(0)
    index, queries = torch.randn(1000, 16, generator=generator) * 3, torch.randn(4, 16, generator=generator)
    scores, indices = search(index, queries, k=10)
    expected_scores, expected_indices = _brute_force(index.numpy(), queries.numpy(), 10)
    assert indices.shape == (4, 10) and np.array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-5)

    single_scores, single_indices = search(index, queries[1], k=3)
    assert single_indices.tolist() == expected_indices[1, :3].tolist() and single_scores.shape == (3,)
    assert search(index[:2], queries[0], k=5)[1].shape == (2,)  # k beyond the index: all of it
    with pytest.raises(OpenAlignError, match="embed the query with the model that built the index"):
        search(index, torch.randn(8), k=1)


def test_search_uses_faiss_for_large_indexes_when_installed(monkeypatch):
    class IndexFlatIP:  # numpy stand-in with faiss's interface
        def __init__(self, dim: int) -> None:
            self.vectors = np.empty((0, dim), dtype=np.float32)
            calls.append(dim)

        def add(self, vectors: np.ndarray) -> None:
            self.vectors = np.concatenate([self.vectors, vectors])

        def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            scores = queries @ self.vectors.T
            order = np.argsort(-scores, axis=1)[:, :k]
            return np.take_along_axis(scores, order, axis=1), order

    calls: list[int] = []
    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=IndexFlatIP))
    monkeypatch.setattr(inference, "FAISS_MIN_ROWS", 100)
    index, query = torch.randn(300, 8), torch.randn(8)
    scores, indices = search(index, query, k=4)
    expected_scores, expected_indices = _brute_force(index.numpy(), query[None].numpy(), 4)
    assert calls == [8] and indices.dtype == torch.long and indices.tolist() == expected_indices[0].tolist()
    np.testing.assert_allclose(scores.numpy(), expected_scores[0], atol=1e-5)


def test_search_with_faiss_matches_brute_force(monkeypatch):
    pytest.importorskip("faiss")  # in the test extras; the search extra's
    monkeypatch.setattr(inference, "FAISS_MIN_ROWS", 100)
    calls, real = [], inference._faiss_search
    monkeypatch.setattr(inference, "_faiss_search", lambda *args: calls.append(1) or real(*args))
    generator = torch.Generator().manual_seed(0)
    index = torch.randn(16, 500, generator=generator, dtype=torch.float64).T  # not contiguous, float64
    queries = torch.randn(3, 16, generator=generator).bfloat16()
    scores, indices = search(index, queries, k=7)
    expected_scores, expected_indices = _brute_force(index.float().numpy(), queries.float().numpy(), 7)
    assert indices.dtype == torch.long and np.array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-5)
    assert search(index[:101], queries[0], k=500)[1].tolist() == _brute_force(  # k beyond the index: all of it
        index[:101].float().numpy(), queries[:1].float().numpy(), 101)[1][0].tolist()
    assert len(calls) == 2 and real(index, F.normalize(queries.float(), dim=-1), 1) is not None  # faiss answered


def test_embed_classify_and_search_commands(model_dir, loaded, image_dir, tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setenv("COLUMNS", "400")  # wide tables: paths stay on one line
    out = tmp_path / "index.parquet"
    assert main(["embed", "--model", str(model_dir), "--images", str(image_dir), "--out", str(out),
                 "--device", "cpu", "--batch-size", "4"]) == 0
    assert f"wrote 5 embeddings (32-d) to {out}" in capsys.readouterr().out
    index = read_index(out)
    assert len(index.paths) == 5 and index.model_name == "align-test" and index.model_source == str(model_dir.resolve())
    assert main(["embed", "--model", str(model_dir), "--images", str(image_dir), "--out", str(out)]) == 0  # replaced
    capsys.readouterr()
    picture = tmp_path / "keep.png"
    shutil.copy(image_dir / "blue.png", picture)
    (tmp_path / "link.parquet").symlink_to(out)
    assert main(["embed", "--model", str(model_dir), "--images", str(image_dir), "--out", str(picture)]) == 2
    assert "exists and is not an index of embeddings" in " ".join(capsys.readouterr().err.split())
    assert picture.read_bytes() == (image_dir / "blue.png").read_bytes()  # not replaced by an index
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "pairs.parquet"  # a parquet data table is no index either
    pq.write_table(pa.table({"image": ["a.jpg"], "caption": ["a cat"]}), table)
    before = table.read_bytes()
    assert main(["embed", "--model", str(model_dir), "--images", str(image_dir), "--out", str(table)]) == 2
    assert "exists and is not an index of embeddings" in " ".join(capsys.readouterr().err.split())
    assert table.read_bytes() == before
    assert main(["embed", "--model", str(model_dir), "--images", str(image_dir), "--out", str(tmp_path / "e.CSV")]) == 2
    assert "embed writes a Parquet file; name it .parquet" in capsys.readouterr().err  # not Parquet under .csv
    assert not (tmp_path / "e.CSV").exists()
    link = tmp_path / "link.parquet"
    assert main(["embed", "--model", str(model_dir), "--images", str(image_dir), "--out", str(link)]) == 0
    assert link.is_symlink()  # the link kept, its target written
    capsys.readouterr()

    model, preprocess, tokenizer = loaded
    images = [str(image_dir / "blue.png"), str(image_dir / "nested" / "red.png")]
    assert main(["classify", "--model", str(model_dir), *images, "--labels", ",".join(LABELS)]) == 0
    table = capsys.readouterr().out
    expected = classify(model, preprocess, tokenizer, images, LABELS)
    for image, row in zip(images, expected.tolist()):
        line = next(line for line in table.splitlines() if image in line)
        assert [f"{p:.3f}" for p in row] == line.replace("│", " ").split()[1:]
    assert all(label in table for label in LABELS)
    # a directory (or a glob) classifies its images, as embed takes them; an unreadable file is skipped and counted
    caplog.clear()
    assert main(["classify", "--model", str(model_dir), str(image_dir), "--labels", ",".join(LABELS),
                 "--format", "jsonl", "--num-workers", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    readable, files = embed_folder(model, preprocess, image_dir)[0], find_images(image_dir)
    assert [row["image"] for row in rows] == readable and len(readable) < len(files)
    assert f"skipped {len(files) - len(readable)} of {len(files)} files that could not be read" in caplog.text
    odd = tmp_path / "photo[1].png"  # glob characters in a file's own name: the file itself
    shutil.copy(image_dir / "blue.png", odd)
    assert main(["classify", "--model", str(model_dir), str(odd), str(image_dir / "blue.png"), str(odd),
                 "--labels", ",".join(LABELS), "--format", "jsonl"]) == 0  # each image once
    assert [json.loads(line)["image"] for line in capsys.readouterr().out.splitlines()] == [
        str(odd), str(image_dir / "blue.png")]
    # --precision: bf16 autocast anywhere (a GPU's default), its rounding in the probabilities
    outputs = []
    for precision in ("fp32", "bf16"):
        assert main(["classify", "--model", str(model_dir), *images, "--labels", ",".join(LABELS), "--format", "jsonl",
                     "--precision", precision]) == 0
        outputs.append(torch.tensor([list(json.loads(line)["probabilities"].values())
                                     for line in capsys.readouterr().out.splitlines()]))
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=1e-5)  # batch norms folded: float rounding
    assert not torch.equal(outputs[0], outputs[1]) and torch.allclose(outputs[0], outputs[1], atol=0.05)
    assert main(["classify", "--model", str(model_dir), str(image_dir / "corrupt.png"), "--labels", "a cat"]) == 2
    assert "none of the 1 image files could be read (first:" in " ".join(capsys.readouterr().err.split())

    assert main(["search", "--index", str(out), "--model", str(model_dir), "a red square", "-k", "3"]) == 0
    table = capsys.readouterr().out
    query = model.encode_text(**tokenizer(["a red square"])).detach()
    _, expected_indices = _brute_force(index.embeddings.numpy(), query.numpy(), 3)
    ranked = [line.replace("│", " ").split() for line in table.splitlines() if str(image_dir) in line]
    assert [(row[0], row[2]) for row in ranked] == [(str(rank), index.paths[i])
                                                    for rank, i in enumerate(expected_indices[0], start=1)]


def test_search_warns_when_the_model_embeds_images_otherwise_than_when_it_built_the_index(image_dir, tmp_path, caplog):
    torch.manual_seed(0)
    model = openalign.create_model("align-test").eval()
    model_dir = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "index.parquet"
    assert main(["embed", "--model", str(model_dir), "--images", str(image_dir), "--out", str(out)]) == 0
    probe = read_index(out).model_probe  # the loaded model's image side, folded for inference or not
    assert inference.same_image_side(probe, inference.probe_embedding(*openalign.load_pretrained(model_dir)[:2]))
    caplog.clear()  # embed's count of unreadable files
    with caplog.at_level("WARNING"):
        assert main(["search", "--index", str(out), "--model", str(model_dir), "a cat", "--format", "jsonl"]) == 0
    assert not caplog.records  # the same weights: the fingerprint is the loaded model's, before folding

    with torch.no_grad():  # the text side retrained alone (a locked image tower): the index still holds
        model.text_projection.weight.mul_(0.5)
    model.save_pretrained(model_dir, overwrite=True)
    with caplog.at_level("WARNING"):
        assert main(["search", "--index", str(out), "--model", str(model_dir), "a cat", "--format", "jsonl"]) == 0
    assert not caplog.records
    with torch.no_grad():  # retrained in place: the same name and directory
        model.image_projection.weight.add_(torch.randn_like(model.image_projection.weight))
    model.save_pretrained(model_dir, overwrite=True)
    with caplog.at_level("WARNING"):
        assert main(["search", "--index", str(out), "--model", str(model_dir), "a cat", "--format", "jsonl"]) == 0
    assert "embeds images otherwise than when it built the index" in caplog.text
    assert inference.same_image_side(probe, [value + 1e-3 for value in probe])  # rounding, bf16: the same


def test_commands_report_bad_input_with_exit_2(model_dir, tmp_path, capsys):
    assert main(["embed", "--model", str(model_dir), "--images", str(tmp_path), "--out", str(tmp_path / "x.parquet"),
                 "--device", "cpu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no image files in" in err and "Traceback" not in err
    assert main(["search", "--index", str(tmp_path / "missing.parquet"), "--model", str(model_dir), "a cat"]) == 2
    err = capsys.readouterr().err  # on one line, unwrapped at a pipe's 80 columns: the path stays whole to copy
    assert err.count("\n") == 1 and f"{tmp_path / 'missing.parquet'}' does not exist" in err
    assert main(["search", "--index", str(tmp_path / "missing.parquet"), "--model", str(model_dir), " "]) == 2
    assert "the search query is blank" in " ".join(capsys.readouterr().err.split())
    assert main(["classify", "--model", str(model_dir), str(tmp_path / "x.png"), "--labels", " , "]) == 2
    assert "names no label" in " ".join(capsys.readouterr().err.split())
    assert main(["embed", "--model", str(model_dir), "--images", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert f"'{tmp_path}' is a directory; name a file in it" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "file").write_text("")
    assert main(["embed", "--model", str(model_dir), "--images", str(tmp_path), "--out",
                 str(tmp_path / "file" / "x.parquet")]) == 2
    assert "'file' is a file, not a directory" in " ".join(capsys.readouterr().err.split()).replace(str(tmp_path) + "/", "")
    with pytest.raises(SystemExit):
        main(["embed", "--model", str(model_dir), "--images", str(tmp_path), "--out", "x.parquet", "--batch-size", "0"])
    assert "argument --batch-size: 0 is less than 1" in capsys.readouterr().err
    assert main(["classify", "--model", str(model_dir), str(tmp_path / "x.png"), "--labels", "a cat,a dog,a cat"]) == 2
    assert "'a cat' given more than once" in " ".join(capsys.readouterr().err.split())
    # a missing image is reported before the model loads (from the hub, that is a download)
    assert main(["classify", "--model", str(tmp_path / "no-model"), str(tmp_path / "x.png"), "--labels", "a cat"]) == 2
    assert f"1 of the 1 images are not files: '{tmp_path / 'x.png'}' does not exist" in " ".join(
        capsys.readouterr().err.split())
    assert main(["convert", str(model_dir), str(tmp_path / "file"), "--to", "openalign"]) == 2
    assert "is a file; a model is saved to a directory" in " ".join(capsys.readouterr().err.split())


def test_classify_and_search_print_any_label_path_or_query_verbatim(model_dir, loaded, image_dir, tmp_path, capsys,
                                                                     monkeypatch, caplog):
    monkeypatch.setenv("COLUMNS", "80")  # a pipe's width: twelve numeric columns must not shrink to '0.…'
    monkeypatch.chdir(tmp_path)  # a path short enough for its table column (a long one folds over lines)
    odd = Path("[b]old [draft].png")  # rich markup in a file name
    shutil.copy(image_dir / "blue.png", odd)
    labels = ["[i]a cat, sleeping", *(f"label {i}" for i in range(11))]  # markup and a comma: from a file
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n\n")
    assert main(["classify", "--model", str(model_dir), str(odd), "--labels-file", str(tmp_path / "labels.txt")]) == 0
    printed = capsys.readouterr().out
    rows = [line.split("│") for line in printed.splitlines() if re.search(r"│\s*\d\.\d{3}\s*│", line)]
    shown = {label.strip(): float(p) for _, _, label, p, _ in rows}  # a row per label, most probable first
    expected = classify(*loaded, [str(odd)], labels)[0]
    assert shown == {label: round(p, 3) for label, p in zip(labels, expected.tolist())}
    assert [float(p) for *_, p, _ in rows] == sorted(shown.values(), reverse=True)
    assert "[b]old [draft].png" in printed and "[i]a cat, sleeping" in printed

    index = tmp_path / "index.parquet"
    write_index(index, [str(odd)], loaded[0].encode_image(loaded[1](Image.open(odd))[None]).detach(),
                model_name="align-test", model_source="another/model")
    with caplog.at_level("WARNING"):
        assert main(["search", "--index", str(index), "--model", str(model_dir), "a [/] cat", "-k", "1"]) == 0
    printed = capsys.readouterr().out
    assert "a [/] cat" in printed and "[b]old [draft].png" in printed
    assert "built with model 'align-test' (another/model)" in caplog.text  # same architecture, other weights


def test_classify_and_search_write_tsv_and_jsonl_for_scripts(model_dir, loaded, image_dir, tmp_path, capsys,
                                                              monkeypatch):
    import json

    monkeypatch.setenv("COLUMNS", "80")  # a pipe's width: a table would fold this path over lines
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4) / "blue.png"
    deep.parent.mkdir()
    shutil.copy(image_dir / "blue.png", deep)
    images = [str(deep), str(image_dir / "nested" / "red.png")]
    labels = [*LABELS, "a tab\there"]  # from a file: a label may hold a tab
    (tmp_path / "labels.txt").write_text("\n".join(labels))
    expected = classify(*loaded, images, labels).tolist()
    command = ["classify", "--model", str(model_dir), *images, "--labels-file", str(tmp_path / "labels.txt")]
    assert main([*command, "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["image"] for record in records] == images
    for record, row in zip(records, expected):
        assert list(record["probabilities"]) == labels
        assert list(record["probabilities"].values()) == pytest.approx(row, abs=1e-5)  # the CLI folds batch norm
    assert main([*command, "--format", "tsv"]) == 0
    header, *rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert header == ["image", *LABELS, "a tab\\there"]  # one column, the tab written as an escape
    assert [row[0] for row in rows] == images
    assert np.array([row[1:] for row in rows], dtype=float) == pytest.approx(np.array(expected), abs=1e-5)

    index = tmp_path / "index.parquet"
    assert main(["embed", "--model", str(model_dir), "--images", str(tmp_path), "--out", str(index)]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--model", str(model_dir), "a blue square", "-k", "1",
                 "--format", "tsv"]) == 0
    header, row = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    model, _, tokenizer = loaded
    score = (read_index(index).embeddings[0] @ model.encode_text(**tokenizer(["a blue square"]))[0]).item()
    assert header == ["rank", "score", "path"] and row[0] == "1" and row[2] == str(deep)
    assert float(row[1]) == pytest.approx(score, abs=1e-5)
    assert main(["search", "--index", str(index), "--model", str(model_dir), "a blue square", "--format", "jsonl"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {"rank": 1, "score": pytest.approx(score, abs=1e-5), "path": str(deep)}]


def test_classify_and_zero_shot_refuse_inputs_that_would_be_silently_wrong(loaded, image_dir):
    model, preprocess, tokenizer = loaded
    image = str(image_dir / "blue.png")
    for images, labels, templates, message in (
            ([image], "a cat", None, "labels are one str"),
            (image, ["a cat"], None, "images are one str"),
            ([image], ["a cat", "a dog"], ["a photo"], "has no '{}' for the class name"),
            ([image], ["a cat", "a dog"], ["a photo of a {label}"], "cannot be filled with a class name"),
            ([image], ["a cat", "a dog"], "a photo of a {}", "templates are one string"),
            ([image], ["a cat", "a cat"], None, "'a cat' given more than once; the probability would be split"),
            ([image], ["a cat", "A  Cat"], None, "'a cat' and 'A  Cat' are the same text to the model's tokenizer"),
            ([image], ["a cat", " "], None, "a label is blank")):
        with pytest.raises(OpenAlignError, match=message):
            classify(model, preprocess, tokenizer, images, labels, templates)
    with pytest.raises(OpenAlignError, match="no templates were given"):
        openalign.zero_shot_classifier(model, tokenizer, ["a cat"], templates=[])
    with pytest.raises(OpenAlignError, match="no class names were given"):
        openalign.zero_shot_classifier(model, tokenizer, [])


def test_indexes_from_other_writers_load_and_broken_ones_are_refused(tmp_path):
    vectors = [[1.0, 0.0], [0.0, 1.0]]
    other = pa.table({"path": pa.array(["a.png", "b.png"], pa.large_string()),
                      "embedding": pa.array(vectors, pa.list_(pa.float32(), 2))})  # fixed-size lists, as polars may
    pq.write_table(other, tmp_path / "other.parquet")
    assert torch.equal(read_index(tmp_path / "other.parquet").embeddings, torch.tensor(vectors))
    nan = pa.table({"path": ["a.png", "b.png"], "embedding": pa.array([[1.0, 0.0], [float("nan"), 1.0]],
                                                                      pa.list_(pa.float32()))})
    pq.write_table(nan, tmp_path / "nan.parquet")  # as another writer might
    with pytest.raises(OpenAlignError, match="1 embedding.* with NaN or infinite values \\(b.png\\)"):
        read_index(tmp_path / "nan.parquet")
    with pytest.raises(OpenAlignError, match="the model gave 1 embedding.* NaN or infinite values \\(b.png\\); "
                                             "nothing was written"):
        write_index(tmp_path / "ours.parquet", ["a.png", "b.png"], torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]))
    assert not (tmp_path / "ours.parquet").exists()
    with pytest.raises(OpenAlignError, match="index '.*' is a directory, not a file; expected a parquet file"):
        read_index(tmp_path)
    write_index(tmp_path / "empty.parquet", [], torch.empty(0, 2))
    with pytest.raises(OpenAlignError, match="holds no embeddings"):
        read_index(tmp_path / "empty.parquet")


def test_inference_turns_photos_upright_by_their_exif_orientation(loaded, tmp_path):
    """A camera's portrait photo is stored sideways with EXIF orientation 6 (display rotated 90°
    clockwise): embed and classify see it as displayed, as transformers' pipelines do."""
    model, preprocess, tokenizer = loaded
    upright = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    upright[:, :28] //= 4  # left half dark: any turn or mirror changes the picture
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored 56 × 40, sideways
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "photos").mkdir()
    stored.save(tmp_path / "photos" / "portrait.png", exif=exif)
    with torch.no_grad():
        expected = model.encode_image(preprocess(Image.fromarray(upright))[None], normalize=True)
        sideways = model.encode_image(preprocess(stored)[None], normalize=True)
    assert not torch.allclose(expected, sideways, atol=1e-3)
    _, embedded = embed_folder(model, preprocess, tmp_path / "photos")
    torch.testing.assert_close(embedded, expected, rtol=1e-5, atol=1e-6)
    with Image.open(tmp_path / "photos" / "portrait.png") as opened:
        from_pil = classify(model, preprocess, tokenizer, [opened], LABELS)
    from_path = classify(model, preprocess, tokenizer, [tmp_path / "photos" / "portrait.png"], LABELS)
    reference = classify(model, preprocess, tokenizer, [upright], LABELS)  # pixels: taken as they are
    torch.testing.assert_close(from_pil, reference)
    torch.testing.assert_close(from_path, reference)


def test_a_photo_whose_exif_is_malformed_is_embedded_as_stored(loaded, tmp_path):
    """Pillow's exif_transpose rewrites the EXIF block and raises on a malformed one (here a
    struct.error), though the pixels decode: the photo is embedded as stored, not the run stopped.
    Every orientation of a sound EXIF block still turns as exif_transpose turns it."""
    from PIL import ImageOps

    from openalign.inference import upright

    model, preprocess, tokenizer = loaded
    pixels = Image.fromarray(np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Camera"
    buffer = io.BytesIO()
    pixels.save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    data[data.find(b"Exif\x00\x00") + 17] = 0  # inside the first IFD entry
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "bad_exif.jpg").write_bytes(bytes(data))
    with Image.open(io.BytesIO(bytes(data))) as opened, pytest.raises(Exception):
        ImageOps.exif_transpose(opened)
    paths, embedded = embed_folder(model, preprocess, tmp_path / "photos")
    assert len(paths) == 1 and embedded.shape[0] == 1
    probabilities = classify(model, preprocess, tokenizer, [tmp_path / "photos" / "bad_exif.jpg"], LABELS)
    assert probabilities.shape == (1, len(LABELS))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        pixels.save(buffer, "PNG", exif=exif)
        with Image.open(buffer) as ours, Image.open(io.BytesIO(buffer.getvalue())) as theirs:
            assert np.array_equal(np.asarray(upright(ours)), np.asarray(ImageOps.exif_transpose(theirs))), orientation


def test_inference_runs_a_model_in_train_mode_as_in_eval_mode_and_leaves_it_so(loaded, tmp_path):
    """A model fresh from create_model is in train mode: batch statistics would move its running
    statistics and make its outputs depend on the batch."""
    model, preprocess, tokenizer = loaded
    images = [np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8) for seed in range(3)]
    expected = classify(model.eval(), preprocess, tokenizer, images, LABELS, templates=["a photo of {}"])
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    model.train()
    try:
        assert torch.equal(classify(model, preprocess, tokenizer, images, LABELS, templates=["a photo of {}"],
                                    batch_size=3), expected)
        assert model.training  # its mode restored
        assert all(torch.equal(value, buffers[name]) for name, value in model.named_buffers())
    finally:
        model.eval()


def test_classify_and_search_send_no_control_characters_to_the_terminal(model_dir, loaded, image_dir, tmp_path,
                                                                         capsys):
    """A file name (or someone else's index) holding an escape sequence or a line break is shown
    escaped; a labels file saved with a byte-order mark has no U+FEFF in its first label."""
    odd = tmp_path / "evil\x1b[31mred\nline.png"
    shutil.copy(image_dir / "blue.png", odd)
    (tmp_path / "labels.txt").write_text("\ufeffa cat\na dog\n", encoding="utf-8")
    assert main(["classify", "--model", str(model_dir), str(odd), "--labels-file", str(tmp_path / "labels.txt")]) == 0
    printed = capsys.readouterr().out
    assert "\x1b[31m" not in printed and "\\x1b[31mred\\nline.png" in "".join(printed.split())
    assert "\ufeff" not in printed and "a cat" in printed
    index = tmp_path / "index.parquet"
    write_index(index, [str(odd)], loaded[0].encode_image(loaded[1](Image.open(odd))[None]).detach())
    assert main(["search", "--index", str(index), "--model", str(model_dir), "a \x1b[31mcat\x07", "-k", "1"]) == 0
    printed = capsys.readouterr().out  # the query in the title too
    assert "\x1b" not in printed and "\x07" not in printed and "\\x1b[31mred" in "".join(printed.split())
    assert "\\x1b[31mcat\\x07" in printed
