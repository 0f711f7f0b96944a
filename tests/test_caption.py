"""``openalign data caption``: synthetic captions for webdataset shards, with tiny random captioners built locally."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from openalign.cli import main
from openalign.data import caption as caption_module
from openalign.data.caption import Captioner, caption_shards
from openalign.errors import OpenAlignError

MTIME, MODE = 1_600_000_000, 0o640
PREFIX = "a photo of"  # BERT WordPiece tokens the random models continue from when prompted


@pytest.fixture(scope="module")
def bert_tokenizer():
    from openalign.data.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer("bert-base-uncased")


@pytest.fixture(scope="module")
def git_captioner(tmp_path_factory, bert_tokenizer) -> str:
    """A randomly initialised GIT saved the way microsoft/git-base is: GitProcessor (CLIP image processor + BERT)."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tok = bert_tokenizer
    config = GitConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
        vocab_size=tok.vocab_size, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-git")
    GitForCausalLM(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def ved_captioner(tmp_path_factory, bert_tokenizer) -> str:
    """A random VisionEncoderDecoder (ViT + BERT decoder) saved like nlpconnect/vit-gpt2-image-captioning:
    no processor class, just an image processor and a tokenizer."""
    from transformers import (BertConfig, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    tok = bert_tokenizer
    encoder = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        image_size=32, patch_size=8)
    decoder = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, is_decoder=True, add_cross_attention=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = \
        tok.cls_token_id, tok.pad_token_id, tok.sep_token_id
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.decoder_start_token_id = tok.cls_token_id
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.sep_token_id
    directory = tmp_path_factory.mktemp("tiny-ved")
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def _image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for index, sample in enumerate(samples):
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), MTIME + index, MODE
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path) -> Path:
    """Two img2dataset-style shards of 5 samples; 00000 has a corrupt JPEG (000002) and an image-less sample
    (000004), 00001 a PNG (000006)."""
    root = tmp_path / "shards"
    root.mkdir()
    for shard in range(2):
        samples = []
        for index in range(5):
            key = f"{shard * 5 + index:06d}"
            sample = {}
            if shard == 0 and index == 2:
                sample[f"{key}.jpg"] = _image_bytes(index)[:200] + b"\x00garbage" * 8  # a cut-off JPEG
            elif shard == 1 and index == 1:
                sample[f"{key}.png"] = _image_bytes(10 + index, "PNG")
            elif not (shard == 0 and index == 4):
                sample[f"{key}.jpg"] = _image_bytes(10 * shard + index)
            sample[f"{key}.txt"] = f"raw text {key} ünïcode".encode()
            sample[f"{key}.json"] = json.dumps({"key": key, "width": 32}).encode()
            samples.append(sample)
        _write_shard(root / f"{shard:05d}.tar", samples)
    return root


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar]


def test_caption_shards_adds_a_caption_member_and_copies_every_member(shards, tmp_path, git_captioner):
    out = tmp_path / "out"
    summary = caption_shards([str(shards / "{00000..00001}.tar")], git_captioner, out, batch_size=2, device="cpu",
                             max_new_tokens=6, show_progress=False)
    captions = []
    for name in ("00000.tar", "00001.tar"):
        original, written = _members(shards / name), _members(out / name)
        originals = iter(original)
        expected_order = []
        for info, _ in original:  # each caption follows its sample's last member (.json here)
            expected_order.append(info.name)
            key = info.name.split(".")[0]
            if info.name.endswith(".json") and key not in ("000002", "000004"):
                expected_order.append(f"{key}.caption.txt")
        assert [info.name for info, _ in written] == expected_order
        for info, data in written:
            if info.name.endswith(".caption.txt"):
                captions.append(data.decode("utf-8"))
                assert captions[-1] == captions[-1].strip() and "\n" not in captions[-1]
                assert (info.mtime, info.mode) == (MTIME + int(info.name[:6]) % 5, MODE)
            else:
                source_info, source_data = next(originals)
                assert (info.name, data, info.mtime, info.mode) == \
                       (source_info.name, source_data, source_info.mtime, source_info.mode)
    assert len(captions) == 8 and any(captions)  # random weights: some garbage words, possibly an empty string

    assert summary == json.loads((out / "captions.json").read_text())
    first = summary["shards"]["00000.tar"]
    assert (first["samples"], first["captioned"], first["skipped"]) == (5, 3, 2)
    assert first["skipped_no_image"] == ["000004"] and first["skipped_undecodable"] == ["000002"]
    assert summary["totals"] == {"shards": 2, "failed_shards": 0, "samples": 10, "captioned": 8, "skipped": 2}
    assert summary["captioner"] == git_captioner and summary["failed_shards"] == {}
    # ALIP's OFA settings by default: beam 5, no repeated trigrams
    assert summary["generation"] == {"max_new_tokens": 6, "num_beams": 5, "no_repeat_ngram_size": 3, "prompt": None}
    assert summary["device"] == "cpu" and not list(out.glob("*.tmp"))

    import webdataset as wds  # the loader sees the caption as the sample's caption.txt field

    samples = list(wds.WebDataset(str(out / "00001.tar"), shardshuffle=False))
    assert all("caption.txt" in sample and "txt" in sample for sample in samples) and len(samples) == 5


def test_an_interrupted_job_resumes_where_it_stopped(shards, tmp_path, git_captioner, monkeypatch, caplog):
    reference = tmp_path / "reference"
    caption_shards([str(shards / "*.tar")], git_captioner, reference, max_new_tokens=4, show_progress=False)

    out = tmp_path / "out"
    original_call, calls = Captioner.__call__, []

    def interrupted(self, images):
        calls.append(len(images))
        if len(calls) == 2:  # the second shard's first batch: a kill mid-job
            raise KeyboardInterrupt
        return original_call(self, images)

    monkeypatch.setattr(Captioner, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        caption_shards([str(shards / "*.tar")], git_captioner, out, max_new_tokens=4, show_progress=False)
    assert (out / "00000.tar").is_file() and not (out / "00001.tar").exists()
    (out / "00001.tar.tmp").write_bytes(b"half a tar from a killed process")  # what SIGKILL would leave
    done_at = (out / "00000.tar").stat().st_mtime_ns

    calls.clear()
    with caplog.at_level(logging.INFO, logger="openalign"):
        summary = caption_shards([str(shards / "*.tar")], git_captioner, out, max_new_tokens=4, show_progress=False)
    assert len(calls) == 1  # only the second shard was captioned (5 images, one batch)
    assert "skipping" in caplog.text and "00000.tar already exists" in " ".join(caplog.text.split())
    assert (out / "00000.tar").stat().st_mtime_ns == done_at and not (out / "00001.tar.tmp").exists()
    for name in ("00000.tar", "00001.tar"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert summary["totals"] == {"shards": 2, "failed_shards": 0, "samples": 10, "captioned": 8, "skipped": 2}

    def no_model(*args, **kwargs):
        raise AssertionError("a finished job must not load the captioner")

    monkeypatch.setattr(caption_module, "Captioner", no_model)
    assert caption_shards([str(shards / "*.tar")], git_captioner, out, max_new_tokens=4,
                          show_progress=False)["totals"] == summary["totals"]
    with pytest.raises(OpenAlignError, match="other settings"):  # never mixes captions of two settings
        caption_shards([str(shards / "*.tar")], git_captioner, out, max_new_tokens=4, num_beams=3, show_progress=False)


def test_cli_captions_and_names_missing_and_truncated_shards(shards, tmp_path, git_captioner, capsys, caplog):
    out = tmp_path / "out"
    args = ["data", "caption", "--captioner", git_captioner, "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--max-new-tokens", "4", "--num-beams", "2", "--no-repeat-ngram-size", "2"]
    assert main([*args, str(shards / "{00000..00003}.tar")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "2 shard(s) not found" in err and "00002.tar" in err and "00003.tar" in err and "Traceback" not in err
    assert not out.exists()

    assert main([*args, str(shards / "{00000..00001}.tar")]) == 0
    assert "8 of 10 samples captioned, 2 skipped" in capsys.readouterr().out
    assert json.loads((out / "captions.json").read_text())["generation"]["num_beams"] == 2

    raw = (shards / "00001.tar").read_bytes()
    (shards / "00002.tar").write_bytes(raw[:3000])  # cut inside a member
    (shards / "00003.tar").write_bytes(raw[:512 * 4])  # cut at a header: tarfile alone would not notice
    assert main([*args, str(shards / "*.tar")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "2 shard(s) could not be read and were skipped" in err and "00002.tar" in err and "00003.tar" in err
    summary = json.loads((out / "captions.json").read_text())
    assert set(summary["failed_shards"]) == {"00002.tar", "00003.tar"} and summary["totals"]["failed_shards"] == 2
    assert not (out / "00002.tar").exists() and not (out / "00003.tar").exists() and not list(out.glob("*.tmp"))
    # a later run given other shards: the earlier run's failures are said, but they do not fail this one
    with caplog.at_level("WARNING"):
        assert main([*args, str(shards / "{00000..00001}.tar")]) == 0
    assert "also lists 2 shard(s) that an earlier run could not read and this one was not given" in caplog.text


def test_members_webdataset_ignores_are_copied_whole(shards, tmp_path, git_captioner):
    """A macOS ._ file, a README: webdataset ignores them, the copy keeps them, bytes and all (the
    copy used to write their headers without their bytes: a tar no reader could get past)."""
    source = tmp_path / "odd" / "00000.tar"
    source.parent.mkdir()
    _write_shard(source, [{"._000000.jpg": b"AppleDouble" * 10, "000000.jpg": _image_bytes(0), "000000.txt": b"a"},
                          {"README": b"shards made by hand\n", "000001.jpg": _image_bytes(1), "000001.txt": b"b"}])
    summary = caption_shards([str(source)], git_captioner, tmp_path / "out", batch_size=2, device="cpu",
                             max_new_tokens=4, show_progress=False)
    assert summary["shards"]["00000.tar"]["captioned"] == 2
    written = {info.name: data for info, data in _members(tmp_path / "out" / "00000.tar")}
    assert written["._000000.jpg"] == b"AppleDouble" * 10 and written["README"] == b"shards made by hand\n"
    # an earlier version's output: the ignored members' headers without their bytes, its summary entry of that size
    output, summary_path = tmp_path / "out" / "00000.tar", tmp_path / "out" / "captions.json"
    with tarfile.open(source) as tar, tarfile.open(output, "w") as broken:
        for info in tar:
            broken.addfile(info, None if info.name.startswith(("._", "README")) else tar.extractfile(info))
    summary = json.loads(summary_path.read_text())
    entry = summary["shards"]["00000.tar"]
    del entry["copies_every_member"]
    entry["output_bytes"] = output.stat().st_size
    summary_path.write_text(json.dumps(summary))
    caption_shards([str(source)], git_captioner, tmp_path / "out", batch_size=2, device="cpu", max_new_tokens=4,
                   show_progress=False)
    assert {info.name: data for info, data in _members(output)}["README"] == b"shards made by hand\n"  # made again


def test_prompts_and_a_vision_encoder_decoder_captioner(shards, tmp_path, git_captioner, ved_captioner):
    for name, model in (("git", git_captioner), ("ved", ved_captioner)):
        out = tmp_path / name
        summary = caption_shards([str(shards / "00001.tar")], model, out, max_new_tokens=3, num_beams=2,
                                 prompt=PREFIX, field="synthetic", show_progress=False)
        assert summary["shards"]["00001.tar"]["captioned"] == 5 and summary["generation"]["prompt"] == PREFIX
        texts = [data.decode() for info, data in _members(out / "00001.tar") if info.name.endswith(".synthetic.txt")]
        assert len(texts) == 5 and all(text.startswith(PREFIX) for text in texts)  # the caption continues the prompt

    with pytest.raises(OpenAlignError, match="already has a '000005.synthetic.txt' member"):
        caption_shards([str(tmp_path / "git" / "00001.tar")], git_captioner, tmp_path / "again", field="synthetic",
                       show_progress=False)
    with pytest.raises(OpenAlignError, match="could not load captioner"):
        caption_shards([str(shards / "00001.tar")], str(tmp_path / "no-such-model"), tmp_path / "x",
                       show_progress=False)


def test_a_rerun_recaptions_damaged_outputs_and_refuses_ones_from_another_source(shards, tmp_path, git_captioner,
                                                                                   monkeypatch, caplog):
    out = tmp_path / "out"
    caption_shards([str(shards / "*.tar")], git_captioner, out, max_new_tokens=4, show_progress=False)
    whole = {name: (out / name).read_bytes() for name in ("00000.tar", "00001.tar")}
    calls = []
    original_call = Captioner.__call__
    monkeypatch.setattr(Captioner, "__call__", lambda self, images: calls.append(len(images)) or
                        original_call(self, images))

    # The same files moved elsewhere: nothing to do.
    moved = tmp_path / "moved"
    shards.rename(moved)
    caption_shards([str(moved / "*.tar")], git_captioner, out, max_new_tokens=4, show_progress=False)
    assert calls == []

    # An output cut short since it was written is captioned again, with a warning.
    (out / "00001.tar").write_bytes(whole["00001.tar"][:3000])
    with caplog.at_level(logging.WARNING, logger="openalign"):
        summary = caption_shards([str(moved / "*.tar")], git_captioner, out, max_new_tokens=4, show_progress=False)
    assert calls == [5] and "damaged" in caplog.text
    assert (out / "00001.tar").read_bytes() == whole["00001.tar"] and summary["totals"]["captioned"] == 8

    # Another shard of the same name is an error before anything is captioned, whether the summary knows the output
    # or not; the outputs stay as they were.
    other = tmp_path / "other"
    other.mkdir()
    (other / "00000.tar").write_bytes((moved / "00001.tar").read_bytes())
    (other / "00002.tar").write_bytes((moved / "00000.tar").read_bytes())
    calls.clear()
    for lose_summary in (False, True):
        if lose_summary:
            (out / "captions.json").unlink()
        with pytest.raises(OpenAlignError, match=r"00000.tar was captioned from another file than .*other/00000.tar"):
            caption_shards([str(other / "*.tar")], git_captioner, out, max_new_tokens=4, show_progress=False)
        assert calls == [] and not (out / "00002.tar").exists()
        assert {name: (out / name).read_bytes() for name in whole} == whole

    # Without the summary, the outputs are read whole: a cut one is captioned again, a whole one is recounted.
    (out / "00000.tar").write_bytes(whole["00000.tar"][:5000])  # cut inside a member
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="openalign"):
        summary = caption_shards([str(moved / "*.tar")], git_captioner, out, max_new_tokens=4, show_progress=False)
    assert calls == [3] and "cannot be read" in caplog.text  # 00000.tar's three decodable images
    assert (out / "00000.tar").read_bytes() == whole["00000.tar"]
    assert summary["shards"]["00001.tar"]["recounted"] and summary["totals"]["captioned"] == 8
    # ... and recorded as checked, so that the next rerun reads no shard whole again
    reads = []
    original_members = caption_module._members
    monkeypatch.setattr(caption_module, "_members", lambda path: reads.append(path) or original_members(path))
    assert caption_shards([str(moved / "*.tar")], git_captioner, out, max_new_tokens=4,
                          show_progress=False)["totals"] == summary["totals"]
    assert reads == [] and calls == [3]


def test_empty_captions_are_counted_not_written_and_none_at_all_is_an_error(shards, tmp_path, git_captioner,
                                                                           monkeypatch, capsys, caplog):
    original_call = Captioner.__call__
    monkeypatch.setattr(Captioner, "__call__", lambda self, images: [
        "" if index % 2 else text for index, text in enumerate(original_call(self, images))])
    out = tmp_path / "half"
    summary = caption_shards([str(shards / "00001.tar")], git_captioner, out, batch_size=5, max_new_tokens=3,
                             show_progress=False)
    entry = summary["shards"]["00001.tar"]
    assert entry["skipped_empty_caption"] == ["000006", "000008"] and (entry["captioned"], entry["skipped"]) == (3, 2)
    assert "the captioner wrote an empty caption for 2 image(s) (first: 000006)" in caplog.text
    written = [info.name for info, _ in _members(out / "00001.tar") if info.name.endswith(".caption.txt")]
    assert written == ["000005.caption.txt", "000007.caption.txt", "000009.caption.txt"]

    monkeypatch.setattr(Captioner, "__call__", lambda self, images: [""] * len(images))
    assert main(["data", "caption", str(shards / "00001.tar"), "--captioner", git_captioner, "--out",
                 str(tmp_path / "none"), "--max-new-tokens", "3"]) == 2
    captured = capsys.readouterr()
    assert "0 of 5 samples captioned, 5 skipped" in captured.out
    assert "no sample got a caption: see why in" in " ".join(captured.err.split())
    assert "empty caption for every image: is --captioner a captioning model" in " ".join(captured.err.split())


def test_an_earlier_versions_output_of_a_source_with_ignored_members_is_captioned_again(tmp_path):
    """An earlier version wrote a README's header without its bytes; at the end of a shard the tar
    still reads as whole (the gap falls in its padding), so only the source can tell."""
    from openalign.data.caption import WHOLE_COPY, _finished_entry, _fingerprint

    def write(path, members):
        with tarfile.open(path, "w") as tar:
            for name, data, keep in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data) if keep else None)

    source, output = tmp_path / "s.tar", tmp_path / "o.tar"
    write(source, [("a.jpg", b"x" * 700, True), ("a.txt", b"cap", True), ("README", b"made by hand\n", True)])
    write(output, [("a.jpg", b"x" * 700, True), ("a.txt", b"cap", True), ("a.caption.txt", b"syn", True),
                   ("README", b"made by hand\n", False)])
    entry = {"source": str(source), "samples": 1, "captioned": 1, "skipped": 0, "output_bytes": output.stat().st_size,
             "source_fingerprint": _fingerprint(source)}
    assert _finished_entry(source, output, entry, "caption") is None
    write(source, [("a.jpg", b"x" * 700, True), ("a.txt", b"cap", True)])  # nothing ignored: the old output is whole
    write(output, [("a.jpg", b"x" * 700, True), ("a.txt", b"cap", True), ("a.caption.txt", b"syn", True)])
    entry.update(output_bytes=output.stat().st_size, source_fingerprint=_fingerprint(source))
    assert _finished_entry(source, output, entry, "caption") == {**entry, WHOLE_COPY: True}
