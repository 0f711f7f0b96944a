"""Retrieval, zero-shot and kNN tasks on real dataset layouts, built here from the shapes dataset:
a Karpathy-style JSON, and class folders (``<root>/<class>/<image>``) like ImageNet's."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import openalign
from openalign.cli import main
from openalign.data import read_karpathy
from openalign.errors import ConfigError, OpenAlignError
from openalign.eval import (classification_metrics, evaluate_fewshot, evaluate_knn, evaluate_retrieval,
                            evaluate_shapes, evaluate_zeroshot)
from openalign.eval import datasets
from openalign.eval.datasets import class_names, read_lines_or_json
from openalign.eval.prompts import shipped_lines

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return openalign.create_model("align-test").eval()


@pytest.fixture(scope="module")
def folders(shapes_root, tmp_path_factory) -> Path:
    """train/<shape>/ from labelled training images and val/<shape>/ from labelled test images."""
    root = tmp_path_factory.mktemp("folders")
    for split, source in (("train", "train"), ("val", "test")):
        for item in read_karpathy(shapes_root / "dataset_shapes.json", source):
            if item.labels:
                (root / split / item.labels["shape"]).mkdir(parents=True, exist_ok=True)
                shutil.copy(item.path, root / split / item.labels["shape"] / item.path.name)
    return root


def _embed(model, paths):
    transform = model.config.build_transform(train=False)
    from PIL import Image

    with torch.no_grad():
        return model.encode_image(torch.stack([transform(Image.open(p)) for p in paths]))


def test_karpathy_retrieval_equals_a_direct_computation(model, shapes_root):
    """Reference: the model's own encoders on the JSON's images and captions, scored by
    retrieval_metrics (itself checked against clip-benchmark in test_eval_reference)."""
    from openalign.eval import retrieval_metrics

    ours = evaluate_retrieval(model, shapes_root / "dataset_shapes.json", CPU, show_progress=False)
    items = read_karpathy(shapes_root / "dataset_shapes.json", "test")
    tokenizer = model.config.build_tokenizer()
    with torch.no_grad():
        text_emb = model.encode_text(**tokenizer([c for item in items for c in item.captions]))
    reference = retrieval_metrics(_embed(model, [item.path for item in items]), text_emb,
                                  [n for n, item in enumerate(items) for _ in item.captions])
    assert ours == pytest.approx(reference, abs=1e-6)
    other_ks = evaluate_retrieval(model, shapes_root / "dataset_shapes.json", CPU, show_progress=False,
                                  recall_k=(2, 50))  # CLIP_benchmark's --recall_k
    assert {"image_retrieval_recall@2", "text_retrieval_recall@50"} <= set(other_ks) and \
        "image_retrieval_recall@1" not in other_ks
    assert other_ks["image_retrieval_recall@50"] == 1.0  # 24 images: every caption's is among the top 50
    assert evaluate_shapes(model, shapes_root, CPU, knn_memory_size=8, show_progress=False).items() >= ours.items()
    with pytest.raises(OpenAlignError, match=r"24 of the 24 'test' images .* are missing.*pass the image root"):
        evaluate_retrieval(model, shapes_root / "dataset_shapes.json", CPU, image_root="/nonexistent")


def test_the_contrastive_validation_loss_is_the_models_own_loss_on_batches_of_first_captions(model, shapes_root):
    """Reference: the model's forward pass and its contrastive loss (no label smoothing, the two
    directions averaged, as open_clip's validation loss) on each batch of images and first captions."""
    from openalign.losses import ContrastiveLoss

    ours = evaluate_retrieval(model, shapes_root / "dataset_shapes.json", CPU, show_progress=False,
                              contrastive_batch=10)
    items = read_karpathy(shapes_root / "dataset_shapes.json", "test")
    transform, tokenizer = model.config.build_transform(train=False), model.config.build_tokenizer()
    loss_fn, total = ContrastiveLoss(label_smoothing=0.0, directions="mean"), 0.0
    for start in range(0, len(items), 10):  # 24 images: batches of 10, 10 and 4
        batch = items[start:start + 10]
        with torch.no_grad():
            outputs = model(image=torch.stack([transform(Image.open(item.path)) for item in batch]),
                            text=tokenizer([item.captions[0] for item in batch]))
        total += loss_fn(**outputs).item() * len(batch)
    assert ours["contrastive_loss"] == pytest.approx(total / len(items), rel=1e-5)
    assert 0 <= ours["contrastive_i2t_accuracy"] <= 1 and 0 <= ours["contrastive_t2i_accuracy"] <= 1
    assert "contrastive_loss" not in evaluate_retrieval(model, shapes_root / "dataset_shapes.json", CPU,
                                                        show_progress=False)
    with pytest.raises(ConfigError, match="contrastive_batch.*at least 2"):
        openalign.eval.RetrievalEvalConfig(json=str(shapes_root / "dataset_shapes.json"), contrastive_batch=1)


def test_albef_and_blip_annotation_files_read_as_their_karpathy_split(model, shapes_root, tmp_path):
    """ALIP evaluates on ALBEF/BLIP-style files (shared spec alip.md §6.2): a list of {image, caption}
    per split, test files with a list of captions per image, training files one entry per caption."""
    karpathy = read_karpathy(shapes_root / "dataset_shapes.json", "test")
    relative = [str(item.path.relative_to(shapes_root)) for item in karpathy]
    (tmp_path / "shapes_test.json").write_text(json.dumps(
        [{"image": path, "caption": list(item.captions)} for path, item in zip(relative, karpathy)]))
    (tmp_path / "shapes_train.json").write_text(json.dumps(  # ALBEF's training form: an entry per caption
        [{"image": path, "caption": caption, "image_id": n} for n, (path, item) in enumerate(zip(relative, karpathy))
         for caption in item.captions]))
    for name in ("shapes_test.json", "shapes_train.json"):
        split = name.removesuffix(".json").split("_")[1]
        assert read_karpathy(tmp_path / name, split, shapes_root) == karpathy
    assert evaluate_retrieval(model, tmp_path / "shapes_test.json", CPU, image_root=shapes_root,
                              show_progress=False) == evaluate_retrieval(model, shapes_root / "dataset_shapes.json",
                                                                         CPU, show_progress=False)
    # ALIP's loader drops the path's first folder: an image root holding what is under it works too
    assert read_karpathy(tmp_path / "shapes_test.json", "test", shapes_root / relative[0].split("/")[0]) == karpathy
    with pytest.raises(OpenAlignError, match=r"its name says train, not 'test': name the test file"):
        read_karpathy(tmp_path / "shapes_train.json", "test", shapes_root)
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png", "caption": ["ok"]}, {"image": "b.png"}]))
    with pytest.raises(OpenAlignError, match=r"entry 1 needs an 'image' path and a 'caption'"):
        read_karpathy(tmp_path / "bad.json", "test")


def test_zeroshot_on_class_folders_equals_a_hand_computation(model, folders):
    templates = ["a {}", "a photo of a {}."]
    ours = evaluate_zeroshot(model, folders / "val", CPU, templates, show_progress=False)
    classes = sorted(p.name for p in (folders / "val").iterdir())
    paths = [p for c in classes for p in sorted((folders / "val" / c).iterdir())]
    labels = torch.tensor([classes.index(p.parent.name) for p in paths])
    tokenizer = model.config.build_tokenizer()
    with torch.no_grad():
        class_emb = torch.stack([F.normalize(model.encode_text(**tokenizer([t.format(c) for t in templates])).mean(0),
                                             dim=0) for c in classes])
    expected = classification_metrics(_embed(model, paths) @ class_emb.T, labels)
    assert ours == pytest.approx(expected)


def test_zeroshot_takes_each_classs_own_prompts_from_a_cupl_json(model, folders, tmp_path):
    """CuPL's JSON (class name → its own prompts), which CLIP_benchmark takes as templates."""
    from openalign.eval import ZeroShotEvalConfig

    classes = sorted(p.name for p in (folders / "val").iterdir())
    prompts = {name: [f"a {name} drawn in {colour}" for colour in ("red", "blue")][:1 + index % 2]
               for index, name in enumerate(classes)}
    (tmp_path / "cupl.json").write_text(json.dumps(prompts))
    ours = ZeroShotEvalConfig(root=str(folders / "val"), templates_file=str(tmp_path / "cupl.json")).run(
        model, CPU, 16, show_progress=False)
    paths = [p for c in classes for p in sorted((folders / "val" / c).iterdir())]
    labels = torch.tensor([classes.index(p.parent.name) for p in paths])
    tokenizer = model.config.build_tokenizer()
    with torch.no_grad():
        class_emb = torch.stack([F.normalize(model.encode_text(**tokenizer(prompts[c])).mean(0), dim=0)
                                 for c in classes])
    assert ours == pytest.approx(classification_metrics(_embed(model, paths) @ class_emb.T, labels))
    (tmp_path / "partial.json").write_text(json.dumps({classes[0]: ["a thing"]}))
    with pytest.raises(OpenAlignError, match=rf"per-class prompts .* have none for {len(classes) - 1} of the "):
        ZeroShotEvalConfig(root=str(folders / "val"), templates_file=str(tmp_path / "partial.json")).run(
            model, CPU, 16, show_progress=False)


def test_canonicalized_zeroshot_prompts_are_big_visions(model, folders, monkeypatch):
    """CLIPPO reads prompts as rendered pixels: big_vision strips punctuation (spec clippo.md §5.1)."""
    from openalign.eval import datasets
    from openalign.eval.classification import canonicalize_prompt
    from openalign.eval.suite import load_suite

    assert canonicalize_prompt("a bad photo of a kite (bird of prey).", "{}") == "a bad photo of a kite bird of prey"
    assert canonicalize_prompt("itap of the {}.", "{}") == "itap of the {}"
    assert canonicalize_prompt("Chesapeake_Bay  retriever, dog (x)", ",") == "chesapeake bay retriever, dog x"
    assert canonicalize_prompt("jack-o'-lantern", ",") == "jackolantern"
    classes = sorted(p.name for p in (folders / "val").iterdir())
    names = [f"The {name.title()} (shape), or synonym" for name in classes]  # first_class_name_only
    seen: list[str] = []
    embed_texts = datasets.embed_texts
    monkeypatch.setattr(datasets, "embed_texts", lambda m, t, texts, *a, **k: seen.extend(texts) or
                        embed_texts(m, t, texts, *a, **k))
    canonical = evaluate_zeroshot(model, folders / "val", CPU, ["a photo of a {}.", "{}!"], names, show_progress=False,
                                  canonicalize=True)
    assert seen == [prompt for name in classes for prompt in (f"a photo of a the {name} shape", f"the {name} shape")]
    seen.clear()
    expected = evaluate_zeroshot(model, folders / "val", CPU, ["a photo of a {}", "{}"],
                                 [f"the {name} shape" for name in classes], show_progress=False)
    assert canonical == expected
    clippo = load_suite("clippo").tasks[0]
    assert clippo.canonicalize and not load_suite("alip").tasks[0].canonicalize


def test_canonical_first_names_keep_each_classs_own_prompts_and_say_when_they_repeat(caplog):
    """Two classes whose first names are one ("crane, bird" and "crane, machine"): per-class
    prompts stay each class's (keyed by the whole names), and template prompts are warned of."""
    from openalign.eval.classification import class_prompts

    names = ["Crane, bird", "crane, construction machine"]
    cupl = {"Crane, bird": ["A crane, wading."], "crane, construction machine": ["A crane lifting steel."]}
    readable, templates = datasets._prompt_inputs(names, cupl, canonicalize=True)
    assert class_prompts(readable, templates) == [["a crane wading"], ["a crane lifting steel"]]
    readable, templates = datasets._prompt_inputs(["tench, Tinca tinca"], {"tench": ["A tench."]}, canonicalize=True)
    assert class_prompts(readable, templates) == [["a tench"]]  # keyed by the first name alone
    assert "class names repeat" not in caplog.text
    readable, templates = datasets._prompt_inputs(names, ["a photo of a {}."], canonicalize=True)
    assert class_prompts(readable, templates) == [["a photo of a crane"]] * 2
    assert "class names repeat ('crane')" in caplog.text


def test_imagenets_wordnet_id_folders_are_prompted_by_clips_class_names(model, folders, tmp_path, caplog):
    from openalign.eval.datasets import _imagenet_names

    wnids = sorted(f"n{index:08d}" for index in range(1000))
    with caplog.at_level("INFO"):
        names = _imagenet_names(wnids, "imagenet/val")
    assert names[:2] == ["tench", "goldfish"] and len(names) == 1000 and "prompting with CLIP's class names" in caplog.text
    assert _imagenet_names(["circle", "square"], "x") is None
    for index, shape in enumerate(sorted(p.name for p in (folders / "val").iterdir())[:2]):
        shutil.copytree(folders / "val" / shape, tmp_path / f"n0144076{index}")
    with caplog.at_level("WARNING"):
        evaluate_zeroshot(model, tmp_path, CPU, ["a {}"], show_progress=False)
    assert "class folders of" in caplog.text and "are WordNet ids (n01440760, ...)" in caplog.text


def test_knn_on_class_folders_equals_numpy_one_nearest_neighbour(model, folders):
    ours = evaluate_knn(model, folders / "train", folders / "val", CPU, k=1, show_progress=False)
    classes = sorted(p.name for p in (folders / "train").iterdir())
    train = [p for c in classes for p in sorted((folders / "train" / c).iterdir())]
    val = [p for c in classes for p in sorted((folders / "val" / c).iterdir()) if (folders / "val" / c).is_dir()]
    memory, queries = _embed(model, train).numpy(), _embed(model, val).numpy()
    predicted = np.array([classes.index(train[i].parent.name) for i in (queries @ memory.T).argmax(axis=1)])
    truth = np.array([classes.index(p.parent.name) for p in val])
    assert ours["acc1"] == pytest.approx(float((predicted == truth).mean()))
    assert ours["acc5"] == ours["acc1"]  # 1-NN ranks one class: top-5 is top-1 (as DINO's kNN)
    weighted = evaluate_knn(model, folders / "train", folders / "val", CPU, k=20, show_progress=False)
    assert 0 <= weighted["acc1"] <= weighted["acc5"] <= 1


def test_wrong_layouts_say_what_was_expected(model, folders, tmp_path):
    with pytest.raises(OpenAlignError, match="is not a directory; expected class subfolders"):
        evaluate_zeroshot(model, tmp_path / "missing", CPU, ["a {}"])
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "image.png").write_bytes(b"")
    with pytest.raises(OpenAlignError, match=r"has no class subfolders; expected <root>/<class>/<image>"):
        evaluate_zeroshot(model, tmp_path / "flat", CPU, ["a {}"])
    with pytest.raises(OpenAlignError, match="must each hold '{}'"):
        evaluate_zeroshot(model, folders / "val", CPU, ["a photo"])
    with pytest.raises(OpenAlignError, match="2 class names for 6 class folders"):
        evaluate_zeroshot(model, folders / "val", CPU, ["a {}"], names=["x", "y"])
    extra = tmp_path / "val"
    shutil.copytree(folders / "val", extra)
    (extra / "hexagon").mkdir()
    shutil.copy(next((extra / "star").iterdir()), extra / "hexagon" / "x.png")
    with pytest.raises(OpenAlignError, match="class folders that the other split lacks: hexagon"):
        evaluate_knn(model, folders / "train", extra, CPU)


def test_eval_commands_write_clip_benchmark_records(model, folders, shapes_root, tmp_path, capsys):
    model_dir = model.save_pretrained(tmp_path / "model")
    (tmp_path / "classnames.txt").write_text("\n".join(sorted(p.name for p in (folders / "val").iterdir())))
    commands = {
        "zeroshot": ["--root", str(folders / "val"), "--classnames", str(tmp_path / "classnames.txt"),
                     "--template", "a {}", "--template", "a drawing of a {}"],
        "knn": ["--train", str(folders / "train"), "--val", str(folders / "val"), "--k", "20",
                "--preprocess", "resize_mode=shortest", "--preprocess", "interpolation=bicubic"],  # a paper's own
        "retrieval": ["--json", str(shapes_root / "dataset_shapes.json"), "--contrastive-batch", "8"],
    }
    for task, options in commands.items():
        output = tmp_path / f"{task}.json"
        assert main(["eval", task, "--model", str(model_dir), *options, "--output", str(output)]) == 0, task
        record = json.loads(output.read_text())
        assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language",  # CLIP_benchmark's
                               "settings", "weights", "precision", "openalign"}  # then what it takes to reproduce it
        clip_benchmark_name = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}.get(task, task)
        assert record["task"] == clip_benchmark_name
        assert record["metrics"] and record["settings"]["task"] == task
        assert record["weights"] == str(model_dir.resolve()) and record["openalign"] == openalign.__version__
        assert record["precision"] == "fp32"  # auto, on this CPU
    records = {task: json.loads((tmp_path / f"{task}.json").read_text()) for task in commands}
    assert {"image_retrieval_recall@5", "contrastive_loss"} <= set(records["retrieval"]["metrics"])
    assert records["retrieval"]["settings"]["split"] == "test"
    assert records["retrieval"]["settings"]["contrastive_batch"] == 8
    knn_settings = {"k": 20, "temperature": 0.07, "val_root": str((folders / "val").resolve())}
    assert records["knn"]["settings"].items() >= knn_settings.items()
    given = {key: value for key, value in records["knn"]["settings"]["preprocess"].items() if value is not None}
    assert given == {"resize_mode": "shortest", "interpolation": "bicubic"}
    assert records["zeroshot"]["settings"].get("preprocess") is None
    assert main(["eval", "knn", "--model", str(model_dir), "--train", str(folders / "train"), "--val",
                 str(folders / "val"), "--preprocess", "resize_mode=diagonal"]) == 2
    assert "--preprocess: config key 'resize_mode' is 'diagonal', which is not allowed" in capsys.readouterr().err
    assert main(["eval", "knn", "--model", str(model_dir), "--train", str(folders / "train"), "--val",
                 str(folders / "val"), "--preprocess", "resize_size=8"]) == 2  # named as the option, before the work
    assert "--preprocess resize_size must be at least image_size" in capsys.readouterr().err
    assert records["zeroshot"]["settings"]["templates"] == ["a {}", "a drawing of a {}"]
    assert records["zeroshot"]["settings"]["split"] is None  # class folders have no split
    assert main(["eval", "zeroshot", "--model", str(model_dir), "--root", str(folders / "val"),
                 "--split", "train"]) == 2
    assert "split 'train' is a CLIP_benchmark webdataset directory's, but" in " ".join(capsys.readouterr().err.split())
    # test, the default before: a run's saved recipe spells it out, and it still runs
    assert main(["eval", "zeroshot", "--model", str(model_dir), "--root", str(folders / "val"), "--split", "test"]) == 0
    assert main(["eval", "zeroshot", "--model", str(model_dir), "--root", str(tmp_path / "nowhere")]) == 2
    assert "expected class subfolders" in " ".join(capsys.readouterr().err.split())
    assert main(["eval", "retrieval", "--model", str(model_dir), "--json", str(shapes_root / "dataset_shapes.json"),
                 "--recall-k", "0"]) == 2
    assert "--recall-k must be one or more k of at least 1, got [0]" in " ".join(capsys.readouterr().err.split())
    assert main(["eval", "retrieval", "--model", str(model_dir), "--json", str(shapes_root / "dataset_shapes.json"),
                 "--contrastive-batch", "1"]) == 2
    assert "--contrastive-batch must be at least 2" in " ".join(capsys.readouterr().err.split())


def test_records_name_the_checkpoint_read_and_the_report_tells_apart_what_differs(model, folders, tmp_path,
                                                                                   capsys):
    """A run directory is evaluated at its latest complete checkpoint, which the record names (the run
    may write newer ones); records of one dataset that differ in settings (k) or checkpoint are rows
    the report labels, not look-alikes."""
    from openalign.train.checkpoint import STATE_FILE

    run = tmp_path / "run"
    for step in (1, 2, 3):
        model.save_pretrained(run / "checkpoints" / f"step_{step}")
        if step < 3:  # step 3 is being written: incomplete
            (run / "checkpoints" / f"step_{step}" / STATE_FILE).write_bytes(b"")
    knn = ["eval", "knn", "--model", str(run), "--train", str(folders / "train"), "--val", str(folders / "val")]
    assert main([*knn, "--output", str(tmp_path / "out" / "a.json")]) == 0
    assert main([*knn, "--k", "5", "--temperature", "0.1", "--output", str(tmp_path / "out" / "b.json")]) == 0
    assert json.loads((tmp_path / "out" / "a.json").read_text())["weights"] == str(
        (run / "checkpoints" / "step_2").resolve())
    (run / "checkpoints" / "step_3" / STATE_FILE).write_bytes(b"")
    assert main([*knn, "--output", str(tmp_path / "out" / "c.json")]) == 0
    assert main(["eval", "report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report.md").read_text()
    dataset = folders.name
    for shown in (f"{dataset} (k=1, temperature=0.07, weights=step_2)", f"{dataset} (k=5, temperature=0.1, "
                  "weights=step_2)", f"{dataset} (k=1, temperature=0.07, weights=step_3)"):
        assert f"| {shown} |" in markdown, shown
    assert main([*knn, "--temperature", "0"]) == 2
    assert "error: --temperature must be positive" in capsys.readouterr().err
    # a suite task without a name records its dataset as the command does, so that both share a report row
    suite = {"examples": False, "tasks": [{"task": "knn", "train_root": str(folders / "train"),
                                           "val_root": str(folders / "val")}]}
    (tmp_path / "suite.yaml").write_text(json.dumps(suite))
    assert main(["eval", "suite", str(tmp_path / "suite.yaml"), "--model", str(run), "--out", str(tmp_path / "s")]) == 0
    record = json.loads((tmp_path / "s" / "00-knn.json").read_text())
    assert record["dataset"] == dataset and record["weights"].endswith("step_3")


def test_records_hold_the_class_names_and_prompts_read_and_the_report_tells_them_apart(model, folders, tmp_path,
                                                                                      monkeypatch, capsys):
    """A templates file edited between two runs gave two identical-looking records: only its name,
    as typed (relative), was recorded."""
    model_dir = model.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    zeroshot = ["eval", "zeroshot", "--model", str(model_dir), "--root", str(folders / "val"),
                "--templates-file", "prompts.txt"]
    Path("prompts.txt").write_text("a sketch of a {}.\n")
    assert main([*zeroshot, "--output", "out/a.json"]) == 0
    Path("prompts.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    assert main([*zeroshot, "--output", "out/b.json"]) == 0
    first, second = (json.loads(Path(f"out/{name}.json").read_text())["settings"] for name in "ab")
    assert first["templates_file"] == second["templates_file"] == str(tmp_path / "prompts.txt")  # absolute
    assert first["templates_file_sha256"] != second["templates_file_sha256"]
    assert main(["eval", "report", "out", "--out", "report"]) == 0
    markdown = Path("report.md").read_text()
    assert f"(templates_file_sha256={first['templates_file_sha256']})" in markdown
    assert f"(templates_file_sha256={second['templates_file_sha256']})" in markdown
    shipped = ["eval", "zeroshot", "--model", str(model_dir), "--root", str(folders / "val"), "--templates-file",
               "clip_paper_templates", "--output", "out/c.json"]  # a shipped list: its name, and its contents' hash
    assert main(shipped) == 0
    settings = json.loads(Path("out/c.json").read_text())["settings"]
    assert settings["templates_file"] == "clip_paper_templates" and len(settings["templates_file_sha256"]) == 16
    # the lists as the task began: a file edited while it runs does not change what the record says it used
    from openalign.eval.tasks import ZeroShotEvalConfig

    original = ZeroShotEvalConfig.run

    def edited_meanwhile(self, *args, **kwargs):
        metrics = original(self, *args, **kwargs)
        Path("prompts.txt").write_text("something else entirely {}.\n")
        return metrics

    monkeypatch.setattr(ZeroShotEvalConfig, "run", edited_meanwhile)
    assert main([*zeroshot, "--output", "out/d.json"]) == 0
    monkeypatch.setattr(ZeroShotEvalConfig, "run", original)
    assert json.loads(Path("out/d.json").read_text())["settings"]["templates_file_sha256"] == \
        second["templates_file_sha256"]
    Path("prompts.json").write_text('["a photo of a {} \\ud83d"]')  # a lone surrogate, which JSON allows
    assert main(["eval", "zeroshot", "--model", str(model_dir), "--root", str(folders / "val"), "--templates-file",
                 "prompts.json", "--output", "out/e.json"]) == 0
    capsys.readouterr()
    assert main([*shipped[:-2], "--template", "a {}", "--output", "out/f.json"]) == 2  # one would go unused
    assert "--templates-file is 'clip_paper_templates', and templates are given too (['a {}'])" in \
        " ".join(capsys.readouterr().err.split())


def test_report_labels_stay_short_and_a_record_without_settings_says_so(tmp_path):
    from openalign.eval.suite import write_report

    base = {"dataset": "in|1k", "model": "m", "pretrained": "p", "task": "zeroshot_classification", "language": "en",
            "metrics": {"acc1": 0.5}}
    eighty = [f"a photo number {i} of a {{}}." for i in range(80)]
    records = [{**base, "settings": {"task": "zeroshot", "templates": eighty}},
               {**base, "settings": {"task": "zeroshot", "templates": ["a {}"]}},
               base]  # written before records carried settings
    markdown, table = write_report(records, tmp_path / "report")
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| m |")]
    labels = sorted(row.split(" | ")[2] for row in rows)  # a '|' in a name escaped
    assert labels == [r"in\|1k (settings not recorded)",
                      r'in\|1k (templates=["a photo number 0 of a {}.", "a photo …)', r'in\|1k (templates=["a {}"])']


def test_a_byte_order_mark_is_no_part_of_a_class_name_a_template_or_a_json(tmp_path):
    """An editor's UTF-8 byte-order mark would become part of the first class name ('\\ufeffboat'):
    for CLIPPO, which renders the prompt, a different class embedding."""
    from openalign.files import read_json

    bom = "\ufeff"
    (tmp_path / "names.txt").write_text(f"{bom}boat\ncar\n", encoding="utf-8")
    (tmp_path / "templates.json").write_text(f'{bom}["a {{}}.", "the {{}}."]', encoding="utf-8")
    assert read_lines_or_json(tmp_path / "names.txt", "class names") == ["boat", "car"]
    assert read_lines_or_json(tmp_path / "templates.json", "templates") == ["a {}.", "the {}."]
    entry = {"filename": "names.txt", "split": "test", "sentences": [{"raw": "a line"}]}
    (tmp_path / "dataset_x.json").write_text(bom + json.dumps({"images": [entry]}), encoding="utf-8")
    assert read_json(tmp_path / "dataset_x.json") == {"images": [entry]}
    # retrieval and the karpathy training source read it so
    assert [item.captions for item in read_karpathy(tmp_path / "dataset_x.json", "test")] == [("a line",)]


def test_evaluation_runs_at_the_precision_the_suite_or_the_command_line_asks(model, shapes_root, tmp_path,
                                                                            monkeypatch):
    """ALIP's paper evaluates in fp32 (spec alip.md §6.1), so its suite says so; ``--precision``
    overrides a suite's and sets a task's (``auto``: bf16 autocast on GPU only)."""
    import yaml

    from openalign.eval import features
    from openalign.eval.suite import load_suite
    from openalign.precision import autocast_dtype

    seen: list[torch.dtype | None] = []
    original = features.autocast
    monkeypatch.setattr(features, "autocast", lambda device, *rest: (
        seen.append(autocast_dtype(device, *rest)), original(device, *rest))[1])
    model_dir = model.save_pretrained(tmp_path / "model")
    suite = {"precision": "bf16", "examples": False,
             "tasks": [{"task": "retrieval", "json": str(shapes_root / "dataset_shapes.json")}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    expected = {None: None, "bf16": torch.bfloat16, "fp32": None, "auto": None}  # on this CPU
    for flag in (None, "fp32"):
        seen.clear()
        assert main(["eval", "suite", str(tmp_path / "suite.yaml"), "--model", str(model_dir),
                     "--out", str(tmp_path / "results"), *(["--precision", flag] if flag else [])]) == 0
        assert seen and set(seen) == {expected[flag or "bf16"]}, flag
        assert json.loads((tmp_path / "results" / "00-retrieval.json").read_text())["precision"] == (flag or "bf16")
    for flag in (None, "bf16"):
        seen.clear()
        assert main(["eval", "shapes", "--model", str(model_dir), "--root", str(shapes_root),
                     "--output", str(tmp_path / "records" / f"{flag}.json"),
                     *(["--precision", flag] if flag else [])]) == 0
        assert seen and set(seen) == {expected[flag]}, flag
    # the record says what auto resolved to, and the report tells the two apart
    assert [json.loads((tmp_path / "records" / f"{flag}.json").read_text())["precision"] for flag in (None, "bf16")] \
        == ["fp32", "bf16"]
    assert main(["eval", "report", str(tmp_path / "records"), "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report.md").read_text()
    assert "(precision=fp32) |" in markdown and "(precision=bf16) |" in markdown
    assert load_suite("alip").precision == "fp32"
    assert {load_suite(name).precision for name in ("align", "clippo")} == {"auto"}


def test_recipes_list_the_new_tasks_and_validate_them():
    from openalign.errors import ConfigError
    from openalign.recipe import load_recipe

    recipe = load_recipe("demo", ["eval.tasks=[{task: knn, train_root: a, val_root: b, k: 20}, "
                                  "{task: retrieval, json: x.json}, {task: zeroshot, root: v}]"])
    assert [task.name for task in recipe.eval.tasks] == ["knn", "retrieval", "zeroshot"]
    assert recipe.eval.tasks[0].k == 20 and recipe.eval.tasks[2].templates is None
    with pytest.raises(ConfigError, match=r"'eval.tasks\[0\].k' must be at least 1"):
        load_recipe("demo", ["eval.tasks=[{task: knn, train_root: a, val_root: b, k: 0}]"])
    with pytest.raises(ConfigError, match="'zeroshott', which is unknown; did you mean 'zeroshot'"):
        load_recipe("demo", ["eval.tasks=[{task: zeroshott, root: a}]"])


def test_a_suite_runs_its_tasks_and_the_report_merges_the_results(model, folders, shapes_root, tmp_path, capsys):
    import csv

    import yaml

    model_dir = model.save_pretrained(tmp_path / "model")
    suite = {"names": ["shapes-retrieval", "shapes-knn"], "batch_size": 16,
             "tasks": [{"task": "retrieval", "json": str(shapes_root / "dataset_shapes.json")},
                       {"task": "knn", "train_root": str(folders / "train"), "val_root": str(folders / "val")}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    assert main(["eval", "suite", str(tmp_path / "suite.yaml"), "--model", str(model_dir),
                 "--out", str(tmp_path / "results")]) == 0
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")}
    assert set(records) == {"shapes-retrieval", "shapes-knn"}
    pictures = sorted(p.name for p in (tmp_path / "results").glob("*.png"))
    assert pictures == ["shapes-retrieval_examples.png"]  # retrieval draws its examples; kNN has none
    picture = tmp_path / "results" / pictures[0]
    Image.open(picture).save(picture)  # without its mark, as before pictures were marked: beside its record
    assert main(["eval", "suite", str(tmp_path / "suite.yaml"), "--model", str(model_dir),
                 "--out", str(tmp_path / "results")]) == 0  # so an earlier suite's, and replaced
    assert records["shapes-knn"]["task"] == "knn" and records["shapes-knn"]["dataset"] == "shapes-knn"
    expected = evaluate_retrieval(model, shapes_root / "dataset_shapes.json", CPU, show_progress=False)
    assert records["shapes-retrieval"]["metrics"] == pytest.approx(expected)

    (tmp_path / "results" / "unrelated.json").write_text('{"not": "a record"}')  # skipped, not an error
    older = {**records["shapes-retrieval"], "task": "retrieval", "dataset": "older"}  # before CLIP_benchmark's names
    (tmp_path / "results" / "older.json").write_text(json.dumps(older))
    probe = {**older, "dataset": "probe-old", "task": "linear_probe", "metrics": {"lp_acc1": 0.5, "c": 0.5}}
    (tmp_path / "results" / "probe_old.json").write_text(json.dumps(probe))  # ours, before the rename
    theirs = {**probe, "dataset": "probe-cb", "metrics": {"lp_acc1": 0.6, "weight_decay": 1e-4}}
    (tmp_path / "results" / "probe_cb.json").write_text(json.dumps(theirs))  # CLIP_benchmark's protocol
    assert main(["eval", "report", str(tmp_path / "results"), "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("## zeroshot_retrieval") == 1 and "| older |" in markdown  # one table for both
    assert "| image_retrieval_recall@1 | image_retrieval_recall@5 | image_retrieval_recall@10 |" in markdown
    assert "## knn" in markdown and "## zeroshot_retrieval" in markdown
    probes = markdown.split("## logistic_regression_probe")[1].split("## ")[0]
    assert "| probe-old |" in probes and "| probe-cb |" not in probes  # two protocols, two tables
    assert "| probe-cb |" in markdown.split("## linear_probe")[1].split("## ")[0]
    recall = 100 * expected["image_retrieval_recall@1"]
    assert f"| align-test | {model_dir} | shapes-retrieval | " in markdown and f"{recall:.2f}" in markdown
    assert "![results-shapes-retrieval_examples.png](report_examples/results-shapes-retrieval_examples.png)" in markdown
    shown = tmp_path / "report_examples" / "results-shapes-retrieval_examples.png"
    assert shown.read_bytes() == (tmp_path / "results" / "shapes-retrieval_examples.png").read_bytes()
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert len(rows) == 2 * len(expected) + len(records["shapes-knn"]["metrics"]) + 2 + 2  # older records too
    assert main(["eval", "report", str(tmp_path / "model"), "--out", str(tmp_path / "r2")]) == 2
    assert "no result records" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "broken.json").write_text('{"dataset": "shapes"')  # named explicitly: an error, not a skip
    assert main(["eval", "report", str(tmp_path / "results"), str(tmp_path / "broken.json"), "--out",
                 str(tmp_path / "r3")]) == 2
    err = capsys.readouterr().err  # one line: the path whole, to copy
    assert err.count("\n") == 1 and f"cannot read '{tmp_path / 'broken.json'}'" in err


def test_the_shipped_suites_are_valid():
    from openalign.eval.suite import load_suite

    suite = load_suite("align")
    assert [task.name for task in suite.tasks] == ["knn", "retrieval", "retrieval"]
    assert suite.names == ["imagenet-knn", "flickr30k", "coco"] and suite.tasks[0].k == 1
    # COYO-ALIGN's evaluation: tf.image.resize, which does not antialias (spec align-coyo-and-hf.md §3.5)
    for task in suite.tasks:
        transform = task.transform(SimpleNamespace(config=openalign.model_config("align-b7-base")))
        assert transform.antialias is False and transform.config.resize_size == 346
    from openalign.recipe import load_recipe

    for name in ("coco", "flickr30k"):  # the fine-tuning recipes evaluate as the suite does
        test, val = load_recipe(f"align-b7-base-finetune-{name}").eval.tasks
        assert test == suite.tasks[suite.names.index(name)] and val.preprocess == test.preprocess
    clippo = load_suite("clippo")
    assert [task.name for task in clippo.tasks] == ["zeroshot"] * 3 + ["fewshot", "retrieval"]
    assert clippo.names[:3] == ["imagenet-zeroshot", "cifar100-zeroshot", "pets-zeroshot"]
    assert (clippo.tasks[3].shots, clippo.tasks[3].seeds, clippo.tasks[3].l2) == (10, (0, 1, 2), 1024.0)
    # few-shot: resize(256)|central_crop(224) (spec clippo.md §5.2); zero-shot: the model's resize(224)
    few_shot = clippo.tasks[3].transform(SimpleNamespace(config=openalign.model_config("clippo-b16")))
    assert (few_shot.config.resize_mode, few_shot.config.resize_size, few_shot.config.image_size) == (
        "squash", 256, 224)
    # zero-shot as big_vision's default evaluator: ImageNet, CIFAR-100 and Pets, 81 prompts, canonicalised
    assert all(task.preprocess is None and task.canonicalize and task.templates_file == "clip_paper_templates"
               for task in clippo.tasks[:3])


def test_the_shipped_class_names_and_templates_are_clips_and_tasks_take_them_by_name(tmp_path):
    from openalign.errors import OpenAlignError
    from openalign.eval.classification import canonicalize_prompt
    from openalign.eval.datasets import read_lines_or_json
    from openalign.eval.suite import load_suite

    names = read_lines_or_json("imagenet1k_classnames", "class names")
    assert len(names) == 1000 and names[:3] == ["tench", "goldfish", "great white shark"]
    assert names[999] == "toilet paper" and names.count("sunglasses") == 2  # CLIP's list, sorted-wnid order
    templates = read_lines_or_json("imagenet1k_templates", "templates")
    assert len(templates) == 80 and "a photo of a {}." in templates and all("{}" in t for t in templates)
    assert read_lines_or_json("clip_paper_templates", "templates") == templates + ["{}"]  # big_vision: 81
    clippo_zeroshot = load_suite("clippo").tasks[0]
    assert (clippo_zeroshot.classnames, clippo_zeroshot.templates_file) == ("imagenet1k_classnames", "clip_paper_templates")
    # CLIPPO prompts CIFAR-100 and Pets with TFDS's label names, canonicalised: the shipped CLIP names
    # canonicalise to the same strings (TFDS's names at a few indices, written out here)
    tfds = {"cifar100_classnames": {1: "aquarium_fish", 41: "lawn_mower", 99: "worm"},
            "pets_classnames": {0: "Abyssinian", 2: "american_pit_bull_terrier", 9: "British_Shorthair",
                                36: "yorkshire_terrier"}}
    for task in load_suite("clippo").tasks[1:3]:
        shipped = read_lines_or_json(task.classnames, "class names")
        for index, name in tfds[task.classnames].items():
            assert canonicalize_prompt(shipped[index], ",") == canonicalize_prompt(name, ",")
    (tmp_path / "imagenet1k_classnames").write_text("mine\n")  # a real file wins over a shipped name
    assert read_lines_or_json(tmp_path / "imagenet1k_classnames", "class names") == ["mine"]
    with pytest.raises(OpenAlignError, match="nor is it one of the shipped lists: .*clip_paper_templates"):
        read_lines_or_json("imagenet_names.txt", "class names")
    for name, text in (("blank.txt", "\n  \n"), ("empty.json", "[]")):  # not a silent fall-back to the defaults
        (tmp_path / name).write_text(text)
        with pytest.raises(OpenAlignError, match=f"templates file '.*{name}' holds no templates"):
            read_lines_or_json(tmp_path / name, "templates")
    (tmp_path / "broken.json").write_text('["a {}",')
    with pytest.raises(OpenAlignError, match="cannot read class names file '.*broken.json'"):
        read_lines_or_json(tmp_path / "broken.json", "class names")


def test_the_embedding_cache_skips_extraction_and_never_serves_stale_results(model, folders, tmp_path, monkeypatch):
    from openalign.eval import embed_images
    from openalign.eval.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    paths = sorted((folders / "val").rglob("*.png"))[:6]
    transform = model.config.build_transform(train=False)
    first = embed_images(model, transform, paths, CPU, show_progress=False)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    with monkeypatch.context() as patch:
        patch.setattr(model, "encode_image", must_not_run)
        assert torch.equal(embed_images(model, transform, paths, CPU, show_progress=False), first)
    other = openalign.create_model("align-test").eval()  # other weights: a new key
    original = embed_images(other, transform, paths, CPU, show_progress=False)
    assert not torch.equal(original, first)
    with torch.no_grad():  # the same model changed in place (as an optimiser step does): a new key
        other.image_projection.weight.mul_(-1)
    changed = embed_images(other, transform, paths, CPU, show_progress=False)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3 and not torch.equal(changed, first)
    other.image_projection.weight.data.mul_(-1)  # through .data, which bumps no version counter: seen too
    assert torch.equal(embed_images(other, transform, paths, CPU, show_progress=False), original)  # its first entry
    other.image_projection.weight.data[0] += 1
    assert not torch.equal(embed_images(other, transform, paths, CPU, show_progress=False), original)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    copied = tmp_path / "copy.png"
    shutil.copy(paths[0], copied)
    stale = embed_images(model, transform, [copied, *paths[1:]], CPU, show_progress=False)
    assert paths[0].parent.name != "star"
    copied.write_bytes(next((folders / "val" / "star").iterdir()).read_bytes())  # same path, new content
    fresh = embed_images(model, transform, [copied, *paths[1:]], CPU, show_progress=False)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 6
    assert not torch.allclose(fresh[0], stale[0], atol=1e-3)
    torch.testing.assert_close(fresh[1:], stale[1:])


def test_weights_are_hashed_once_while_held_fixed_and_afresh_outside(model, monkeypatch):
    from openalign.eval.cache import fixed_weights, weights_digest

    calls = []
    state_dict = model.state_dict
    monkeypatch.setattr(model, "state_dict", lambda: calls.append(1) or state_dict())
    with fixed_weights(model):
        with fixed_weights(model):  # nested, as an evaluation inside a suite
            assert weights_digest(model) == weights_digest(model)
        weights_digest(model)
    assert len(calls) == 1
    weights_digest(model), weights_digest(model)
    assert len(calls) == 3


def test_embedding_takes_a_device_by_name_as_torch_does(model):
    from openalign.eval import embed_texts

    tokenizer, texts = model.config.build_tokenizer(), ["a red circle", "a blue square"]
    assert torch.equal(embed_texts(model, tokenizer, texts, "cpu", show_progress=False),
                       embed_texts(model, tokenizer, texts, CPU, show_progress=False))


def test_the_embedding_cache_keeps_text_embeddings_keyed_by_the_texts_and_the_tokenizer(model, tmp_path, monkeypatch):
    from openalign.eval import embed_texts
    from openalign.eval.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    tokenizer, texts = model.config.build_tokenizer(), ["a red circle", "a blue square", "a green star"]
    first = embed_texts(model, tokenizer, texts, CPU, show_progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(model, "encode_text", lambda **kwargs: pytest.fail("the cache should have answered"))
        assert torch.equal(embed_texts(model, tokenizer, texts, CPU, show_progress=False), first)
    # another text, another order, or a tokenizer that truncates differently: new entries, right values
    changed = embed_texts(model, tokenizer, texts[:2] + ["a green circle"], CPU, show_progress=False)
    # (a random BERT tells texts apart by little)
    assert torch.equal(changed[:2], first[:2]) and not torch.allclose(changed[2], first[2], atol=1e-5)
    reordered = embed_texts(model, tokenizer, texts[::-1], CPU, show_progress=False)
    torch.testing.assert_close(reordered, first.flip(0))
    short = type(tokenizer)(tokenizer.hf_tokenizer, 3)  # [CLS] a [SEP]: every text the same
    truncated = embed_texts(model, short, texts, CPU, show_progress=False)
    torch.testing.assert_close(truncated[0], truncated[1])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4


def test_a_task_can_preprocess_images_otherwise_than_the_model(model, folders):
    """CLIPPO's few-shot probe squashes to 256 and crops 224 where its model squashes to 224: a
    task's ``preprocess`` changes the resize and crop, never the model's mean and std."""
    from dataclasses import replace

    from openalign.config import from_dict
    from openalign.data.transforms import ImageTransform
    from openalign.errors import ConfigError
    from openalign.eval import evaluate_fewshot
    from openalign.eval.tasks import EvalTaskConfig

    settings = {"task": "fewshot", "train_root": str(folders / "train"), "val_root": str(folders / "val"),
                "shots": 3, "seeds": [0]}
    task = from_dict(EvalTaskConfig, {**settings, "preprocess": {"resize_size": 48, "resize_mode": "shortest"}})
    assert task.transform(model).config == replace(model.config.preprocess, resize_size=48, resize_mode="shortest")
    changed = task.run(model, CPU, batch_size=16, show_progress=False)
    expected = ImageTransform(replace(model.config.preprocess, resize_size=48, resize_mode="shortest"), train=False)
    assert changed == evaluate_fewshot(model, folders / "train", folders / "val", CPU, 3, (0,), show_progress=False,
                                       transform=expected)
    assert changed != from_dict(EvalTaskConfig, settings).run(model, CPU, batch_size=16, show_progress=False)
    with pytest.raises(ConfigError, match="'preprocess.resize_size' must be at least image_size"):
        from_dict(EvalTaskConfig, {**settings, "preprocess": {"resize_size": 8}}).transform(model)
    with pytest.raises(ConfigError, match="'preprocess' is set, but the shapes task"):
        from_dict(EvalTaskConfig, {"task": "shapes", "root": "x", "preprocess": {"resize_size": 48}})


def test_fewshot_probe_uses_pre_projection_features(model, folders, tmp_path, monkeypatch):
    import openalign.eval.datasets as datasets
    from openalign.eval import evaluate_fewshot, ridge_fewshot_probe

    embedded, embed = [], datasets.embed_images
    monkeypatch.setattr(datasets, "embed_images", lambda model, transform, paths, *args, **kwargs: embedded.append(
        len(paths)) or embed(model, transform, paths, *args, **kwargs))
    ours = evaluate_fewshot(model, folders / "train", folders / "val", CPU, shots=3, seeds=(0, 1), show_progress=False)
    num_train = sum(1 for _ in (folders / "train").rglob("*.png"))
    assert embedded[0] <= 3 * 6 * 2 < num_train  # only the sampled training images (6 classes, 2 seeds)
    classes = sorted(p.name for p in (folders / "train").iterdir())
    transform = model.config.build_transform(train=False)
    from PIL import Image

    def features(root):
        paths = [p for c in classes if (root / c).is_dir() for p in sorted((root / c).iterdir())]
        with torch.no_grad():
            pooled = model.image_tower(torch.stack([transform(Image.open(p)) for p in paths]))
        assert pooled.shape[1] == model.image_tower.output_dim != model.config.embed_dim  # before the projection
        return pooled, torch.tensor([classes.index(p.parent.name) for p in paths])

    (train_x, train_y), (val_x, val_y) = features(folders / "train"), features(folders / "val")
    expected = ridge_fewshot_probe(train_x, train_y, val_x, val_y, len(classes), shots=3, seeds=(0, 1))
    assert ours["3shot_acc1"] == pytest.approx(expected["acc1"], abs=1e-6)
    assert [ours["3shot_acc1_seed0"], ours["3shot_acc1_seed1"]] == pytest.approx(expected["acc1_per_seed"], abs=1e-6)
    model_dir = model.save_pretrained(tmp_path / "model")
    assert main(["eval", "fewshot", "--model", str(model_dir), "--train", str(folders / "train"),
                 "--val", str(folders / "val"), "--shots", "3", "--output", str(tmp_path / "f.json")]) == 0
    assert "3shot_acc1" in json.loads((tmp_path / "f.json").read_text())["metrics"]


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_clip_benchmark_webdataset_layouts_give_the_same_results_as_files(model, folders, shapes_root, tmp_path):
    classes = sorted(p.name for p in (folders / "val").iterdir())
    images = [(p, classes.index(p.parent.name)) for c in classes for p in sorted((folders / "val" / c).iterdir())]
    classification = tmp_path / "wds_shapes"
    for shard, start in enumerate(range(0, len(images), 7)):  # several shards
        _write_tar(classification / "test" / f"{shard}.tar",
                   {name: data for n, (path, label) in enumerate(images[start:start + 7], start)
                    for name, data in ((f"s{n:04d}.png", path.read_bytes()), (f"s{n:04d}.cls", str(label).encode()))})
    (classification / "classnames.txt").write_text("\n".join(classes))
    (classification / "zeroshot_classification_templates.txt").write_text("a {c}\na drawing of a {c}\n")
    from_wds = evaluate_zeroshot(model, classification, CPU, show_progress=False)
    from_folders = evaluate_zeroshot(model, folders / "val", CPU, ["a {}", "a drawing of a {}"], show_progress=False)
    assert from_wds == pytest.approx(from_folders)
    model_dir = model.save_pretrained(tmp_path / "model")
    assert main(["eval", "zeroshot", "--model", str(model_dir), "--root", str(classification),
                 "--output", str(tmp_path / "z.json")]) == 0
    assert json.loads((tmp_path / "z.json").read_text())["dataset"] == "wds_shapes"  # the dataset, not its parent
    for label, message in ((b"99", r"'9/bad' of .* has label 99, outside the 6 classes"),
                           (b"cat", r"'9/bad' of .* has the label b'cat'; a .cls holds a class index")):
        _write_tar(classification / "test" / "9.tar", {"bad.png": images[0][0].read_bytes(), "bad.cls": label})
        with pytest.raises(OpenAlignError, match=message):
            evaluate_zeroshot(model, classification, CPU, show_progress=False)
    (classification / "test" / "9.tar").unlink()
    (classification / "classnames.txt").write_text("\n".join(classes), encoding="utf-16")
    with pytest.raises(OpenAlignError, match="classnames.txt' is not UTF-8 text"):
        evaluate_zeroshot(model, classification, CPU, show_progress=False)

    retrieval = tmp_path / "wds_captions"
    items = read_karpathy(shapes_root / "dataset_shapes.json", "test")
    _write_tar(retrieval / "test" / "0.tar",
               {name: data for n, item in enumerate(items)
                for name, data in ((f"{n:04d}.png", item.path.read_bytes()), (f"{n:04d}.txt", "\n".join(item.captions).encode()))})
    (retrieval / "dataset_type.txt").write_text("retrieval\n", encoding="utf-16")
    with pytest.raises(OpenAlignError, match="dataset_type.txt' is not UTF-8 text"):
        evaluate_retrieval(model, retrieval, CPU, show_progress=False)
    (retrieval / "dataset_type.txt").write_text("retrieval\n")
    assert evaluate_retrieval(model, retrieval, CPU, show_progress=False) == pytest.approx(
        evaluate_retrieval(model, shapes_root / "dataset_shapes.json", CPU, show_progress=False))
    (retrieval / "test" / "1.tar").write_bytes(b"not a tar archive")
    with pytest.raises(OpenAlignError, match="cannot read shard '.*1.tar'"):
        evaluate_retrieval(model, retrieval, CPU, show_progress=False)
    whole = (retrieval / "test" / "0.tar").read_bytes()
    (retrieval / "test" / "1.tar").unlink()
    import tarfile

    with tarfile.open(retrieval / "test" / "0.tar") as archive:
        headers = [member.offset for member in archive.getmembers()]
    for cut in (headers[len(headers) // 2], headers[-1] + 100):  # at a header (tarfile stops quietly), and in one
        (retrieval / "test" / "0.tar").write_bytes(whole[:cut])
        with pytest.raises(OpenAlignError, match="shard '.*0.tar' is truncated or damaged: no end-of-archive"):
            evaluate_retrieval(model, retrieval, CPU, show_progress=False)


def test_a_class_folder_without_images_stays_a_class_with_a_warning(tmp_path, caplog):
    from PIL import Image

    from openalign.eval import read_class_folders

    (tmp_path / "cat").mkdir(), (tmp_path / "dog").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cat" / "1.png")
    (tmp_path / "dog" / "notes.txt").write_text("no pictures here")
    paths, labels, classes = read_class_folders(tmp_path)
    assert classes == ["cat", "dog"] and labels.tolist() == [0] and [p.name for p in paths] == ["1.png"]
    assert "1 class folder(s) of" in caplog.text and "hold no images (dog)" in caplog.text


def test_class_folders_named_by_numbers_are_in_their_numbers_order(tmp_path):
    """ImageNet-V2's folders are 0 to 999: as text, 10 came before 2 and the class names went to the wrong folders."""
    from PIL import Image

    from openalign.eval import read_class_folders

    for name in ("0", "1", "2", "10", "11"):
        (tmp_path / "v2" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "v2" / name / "a.png")
    assert read_class_folders(tmp_path / "v2")[2] == ["0", "1", "2", "10", "11"]
    (tmp_path / "v2" / "b").mkdir()  # not all numbers: sorted as text, as ImageFolder sorts them
    Image.new("RGB", (4, 4)).save(tmp_path / "v2" / "b" / "a.png")
    assert read_class_folders(tmp_path / "v2")[2] == ["0", "1", "10", "11", "2", "b"]


def test_a_damaged_embedding_cache_entry_is_computed_again(model, folders, tmp_path, monkeypatch, caplog):
    from openalign.eval import embed_images
    from openalign.eval.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    paths, transform = sorted((folders / "val").rglob("*.png"))[:4], model.config.build_transform(train=False)
    first = embed_images(model, transform, paths, CPU, show_progress=False)
    entry = next((tmp_path / "cache").glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:40])  # a write cut short
    assert torch.equal(embed_images(model, transform, paths, CPU, show_progress=False), first)
    assert "is unreadable" in caplog.text and "computing it again" in caplog.text
    from openalign.files import read_safetensors

    assert torch.equal(read_safetensors(entry)["embeddings"], first)  # and stored again
    from safetensors.torch import save_file

    for wrong in (first[:3], first[:, 0], first.to(torch.int32)):  # readable, but not these images' embeddings
        save_file({"embeddings": wrong.contiguous()}, str(entry))
        caplog.clear()
        assert torch.equal(embed_images(model, transform, paths, CPU, show_progress=False), first)
        assert f"not {len(paths)} rows of embeddings" in caplog.text


def test_a_webdataset_root_that_cannot_be_written_is_extracted_under_the_cache_directory(tmp_path, monkeypatch):
    from openalign.eval.clip_benchmark_wds import read_split

    root = tmp_path / "wds_tiny"
    _write_tar(root / "test" / "0.tar", {"a.png": b"A" * 10, "a.cls": b"1", "b.jpg": b"B" * 20, "b.cls": b"0"})
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / ".openalign").write_text("")  # not a directory: as a read-only mount, nothing can be made there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = read_split(root)
    target = first.paths[0].parent
    assert target.parent.parent == tmp_path / "cache" / "openalign" / "wds" and target.name == "test"
    assert [p.name for p in first.paths] == ["0_a.png", "0_b.jpg"] and first.labels == [1, 0]
    (target / "0_b.jpg").write_bytes(b"B" * 5)  # an interrupted extraction: rewritten whole
    assert read_split(root) == first and (target / "0_b.jpg").read_bytes() == b"B" * 20
    assert sorted(p.name for p in target.iterdir()) == ["0_a.png", "0_b.jpg"]  # no temporary files left
    extracted = (target / "0_b.jpg").stat().st_mtime_ns
    assert read_split(root) == first and (target / "0_b.jpg").stat().st_mtime_ns == extracted  # not again
    _write_tar(root / "test" / "0.tar", {"a.png": b"A" * 10, "a.cls": b"1", "b.jpg": b"C" * 20, "b.cls": b"1"})
    os.utime(root / "test" / "0.tar", ns=(extracted + 10**9, extracted + 10**9))  # made again, later
    remade = read_split(root)  # another image of the same size under the same key: extracted again
    assert remade.labels == [1, 1] and (target / "0_b.jpg").read_bytes() == b"C" * 20
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / ".openalign"))
    with pytest.raises(OpenAlignError, match=r"cannot extract the images of .* set XDG_CACHE_HOME to a writable"):
        read_split(root)


def test_a_webdataset_split_is_the_shards_its_nshards_txt_names_read_as_clip_benchmark_reads_them(tmp_path, caplog):
    from openalign.eval.clip_benchmark_wds import read_split

    root = tmp_path / "wds_tiny"
    # two samples named alike in two folders of one tar: two keys, as webdataset keys them
    _write_tar(root / "test" / "0.tar", {"a/x.png": b"A", "a/x.txt": b"one", "b/x.png": b"B", "b/x.txt": b"two"})
    _write_tar(root / "test" / "1.tar", {"y.png": b"C", "y.txt": b"three"})
    _write_tar(root / "test" / "2.tar", {"z.png": b"D", "z.txt": b"stale"})  # left from an earlier download
    (root / "dataset_type.txt").write_text("Retrieval\n")  # CLIP_benchmark lower-cases it
    (root / "test" / "nshards.txt").write_text("2\n")
    split = read_split(root)
    assert split.captions == [["one"], ["two"], ["three"]]
    assert [p.read_bytes() for p in split.paths] == [b"A", b"B", b"C"]
    assert "1 .tar file(s) of" in caplog.text and "left out, as CLIP_benchmark leaves them (e.g. 2.tar)" in caplog.text
    (root / "test" / "nshards.txt").write_text("4\n")
    with pytest.raises(OpenAlignError, match=r"lacks 1 of the 4 shards its nshards.txt names \(e.g. 3.tar\)"):
        read_split(root)
    (root / "test" / "nshards.txt").write_text("two\n")
    with pytest.raises(OpenAlignError, match="holds 'two', not the number of the split's shards"):
        read_split(root)
    (root / "test" / "nshards.txt").unlink()  # without it, every shard
    assert read_split(root).captions == [["one"], ["two"], ["three"], ["stale"]]
    _write_tar(root / "test" / "3.tar", {"a/x.png": b"E", "a/x.txt": b"four", "a_x.png": b"F", "a_x.txt": b"five"})
    split = read_split(root)  # a/x and a_x: one file name each
    assert split.captions[-2:] == [["four"], ["five"]] and [p.read_bytes() for p in split.paths[-2:]] == [b"E", b"F"]


def test_linear_probe_task_fits_on_all_training_features(model, folders, tmp_path):
    from openalign.eval import evaluate_linear_probe, logistic_regression_probe

    from PIL import Image

    ours = evaluate_linear_probe(model, folders / "train", folders / "val", CPU, c=0.5, show_progress=False)
    classes = sorted(p.name for p in (folders / "train").iterdir())
    transform = model.config.build_transform(train=False)

    def features(root):  # every image of the split, through the image tower alone (before the projection)
        paths = [p for c in classes if (root / c).is_dir() for p in sorted((root / c).iterdir())]
        with torch.no_grad():
            pooled = model.image_tower(torch.stack([transform(Image.open(p)) for p in paths]))
        return pooled, torch.tensor([classes.index(p.parent.name) for p in paths])

    (train, train_y), (val, val_y) = features(folders / "train"), features(folders / "val")
    assert ours == pytest.approx(logistic_regression_probe(train, train_y, val, val_y, len(classes), c=0.5), abs=1e-6)
    model_dir = model.save_pretrained(tmp_path / "model")
    assert main(["eval", "linear_probe", "--model", str(model_dir), "--train", str(folders / "train"),
                 "--val", str(folders / "val"), "--c", "0.5", "--output", str(tmp_path / "p.json")]) == 0
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["task"] == "logistic_regression_probe" and record["metrics"] == pytest.approx(ours)
    assert set(ours) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "c"}  # CLIP_benchmark's names


def test_clip_benchmark_probe_task_embeds_only_the_rows_it_uses(model, folders, tmp_path, monkeypatch, capsys):
    from openalign.eval import adamw_linear_probe, clip_benchmark_probe_rows, evaluate_clip_benchmark_probe
    from openalign.eval import features as features_module

    classes = sorted(p.name for p in (folders / "train").iterdir())

    def split(root):
        paths = [p for c in classes if (root / c).is_dir() for p in sorted((root / c).iterdir())]
        return paths, torch.tensor([classes.index(p.parent.name) for p in paths])

    (train_paths, train_y), (val_paths, val_y) = split(folders / "train"), split(folders / "val")
    rows, held_out = clip_benchmark_probe_rows(train_y, len(classes), fewshot_k=2, seed=1, val_proportion=0.3)
    train_x = _embed(model, [train_paths[i] for i in rows])  # L2-normalised embeddings, as CLIP_benchmark's
    sweep_x = _embed(model, [train_paths[i] for i in held_out])
    expected = adamw_linear_probe(train_x, train_y[rows], _embed(model, val_paths), val_y, len(classes), sweep_x,
                                  train_y[held_out], fewshot_k=2, epochs=3, seed=1)
    embedded = []
    original = features_module._load
    monkeypatch.setattr(features_module, "_load", lambda path, transform: embedded.append(path) or original(
        path, transform))
    ours = evaluate_clip_benchmark_probe(model, folders / "train", folders / "val", CPU, sweep_proportion=0.3,
                                         fewshot_k=2, epochs=3, seed=1, show_progress=False)
    assert ours == pytest.approx(expected, abs=1e-6)
    assert ours["fewshot_k"] == 2 and ours["normalized"] is True and 0 <= ours["lp_acc1"] <= 1
    assert len(embedded) == 2 * len(classes) + len(held_out) + len(val_paths) < len(train_paths) + len(val_paths)

    model_dir = model.save_pretrained(tmp_path / "model")
    assert main(["eval", "clip_benchmark_probe", "--model", str(model_dir), "--train", str(folders / "train"),
                 "--val", str(folders / "val"), "--sweep-proportion", "0.3", "--fewshot-k", "2", "--epochs", "3",
                 "--seed", "1", "--output", str(tmp_path / "lp.json")]) == 0
    record = json.loads((tmp_path / "lp.json").read_text())
    assert record["task"] == "linear_probe" and record["metrics"] == pytest.approx(expected, abs=1e-6)
    capsys.readouterr()
    assert main(["eval", "clip_benchmark_probe", "--model", str(model_dir), "--train", str(folders / "train"),
                 "--val", str(folders / "val"), "--fewshot-k", "1000"]) == 2
    assert f"'{folders / 'train'}': class 'square' has 24 training examples, fewer than fewshot_k=1000" in " ".join(
        capsys.readouterr().err.split())
    assert main(["eval", "clip_benchmark_probe", "--model", str(model_dir), "--train", str(folders / "train"),
                 "--val", str(folders / "val"), "--fewshot-k", "0"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: --fewshot-k must be at least 1 (images per class), or -1" in err
    with pytest.raises(SystemExit):  # one way to choose the weight decay at a time, as CLIP_benchmark
        main(["eval", "clip_benchmark_probe", "--model", "m", "--train", "a", "--val", "b", "--sweep", "c",
              "--sweep-proportion", "0.2"])


def test_example_captions_stay_in_their_column_beside_the_images(tmp_path, monkeypatch):
    """matplotlib's own wrapping runs to the figure's edge: a COCO-length caption went under the
    first image. Each caption ends left of its row's first image and within the picture."""
    import matplotlib.pyplot as plt

    from openalign.eval.examples import _draw

    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to measure it
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    found = [tmp_path / "a.png"] * 5
    captions = ["a photo of a brown dog running along the beach beside the water at sunset " * 4,
                "Supercalifragilisticexpialidocious" * 3, "short"]
    _draw([(caption, found, found[0]) for caption in captions], tmp_path / "grid.png")
    figure = drawn[0]
    renderer = figure.canvas.get_renderer()
    rows = [figure.axes[row * 6:(row + 1) * 6] for row in range(len(captions))]
    for caption_axis, first_image, *_ in rows:
        [text] = caption_axis.texts
        extent = text.get_window_extent(renderer)
        assert extent.x1 <= first_image.get_window_extent(renderer).x0
        assert extent.y0 >= 0 and extent.y1 <= figure.bbox.height
    assert rows[0][0].texts[0].get_text().endswith("…")  # too long for the column: cut, and said to be


def test_retrieval_examples_draw_the_true_top_k(model, shapes_root, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from openalign.eval.examples import PICTURE_SUFFIXES, _draw, is_examples_picture, retrieval_examples

    rows = retrieval_examples(model, shapes_root / "dataset_shapes.json", CPU, tmp_path / "grid.png", queries=3, k=4)
    items = read_karpathy(shapes_root / "dataset_shapes.json", "test")
    tokenizer, transform = model.config.build_tokenizer(), model.config.build_transform(train=False)
    with torch.no_grad():
        images = model.encode_image(torch.stack([transform(Image.open(item.path)) for item in items]))
        for caption, found, truth in rows:
            scores = model.encode_text(**tokenizer([caption]))[0] @ images.T
            assert found == [items[i].path for i in scores.topk(4).indices.tolist()]
            assert any(caption in item.captions and item.path == truth for item in items)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] > 300 and grid.size[1] > 300
    model_dir = model.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "examples", "--model", str(model_dir), "--json", str(shapes_root / "dataset_shapes.json"),
                 "--queries", "2", "--out", "~/grids/cli.png"]) == 0  # a ~ path, as a shell would not expand it
    assert (tmp_path / "home" / "grids" / "cli.png").is_file() and not (tmp_path / "~").exists()
    assert "2 captions" in capsys.readouterr().out

    # --out replaces an earlier picture, never another file of that name (a dataset image named by mistake)
    dataset_image = shutil.copy(items[0].path, tmp_path / "image.png")
    before = Path(dataset_image).read_bytes()
    args = ["eval", "examples", "--model", str(model_dir), "--json", str(shapes_root / "dataset_shapes.json"),
            "--queries", "2", "--out"]
    assert main([*args, str(dataset_image)]) == 2 and Path(dataset_image).read_bytes() == before
    assert "is not an openalign examples picture" in capsys.readouterr().err
    assert main([*args, "~/grids/cli.png"]) == 0
    for suffix in PICTURE_SUFFIXES:  # every format carries the mark
        _draw(rows, tmp_path / f"grid{suffix}")
        assert is_examples_picture(tmp_path / f"grid{suffix}")
    assert not is_examples_picture(Path(dataset_image))


def test_a_caption_prefix_is_put_before_every_caption(model, shapes_root, tmp_path):
    """ALIP's retrieval prefixes captions with "a photo of ": the same as a JSON whose captions say it."""
    data = json.loads((shapes_root / "dataset_shapes.json").read_text())
    for image in data["images"]:
        for sentence in image["sentences"]:
            sentence["raw"] = "a photo of " + sentence["raw"]
    (tmp_path / "prefixed.json").write_text(json.dumps(data))
    expected = evaluate_retrieval(model, tmp_path / "prefixed.json", CPU, image_root=shapes_root, show_progress=False)
    prefixed = evaluate_retrieval(model, shapes_root / "dataset_shapes.json", CPU, show_progress=False,
                                  caption_prefix="a photo of ")
    assert prefixed == pytest.approx(expected)
    assert prefixed != pytest.approx(evaluate_retrieval(model, shapes_root / "dataset_shapes.json", CPU,
                                                        show_progress=False))


def test_the_embedding_cache_keys_on_the_models_config_precision_and_mode(model, folders, tmp_path, monkeypatch):
    """The same weights under another config (batch norm's epsilon is no weight), at bf16 instead
    of fp32, in train mode or through a training transform embed differently: each is a new
    entry, not the first one's rows."""
    from openalign.eval import embed_images
    from openalign.eval.cache import CACHE_ENV
    from openalign.precision import precision_scope

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    paths = sorted((folders / "val").rglob("*.png"))[:4]
    transform = model.config.build_transform(train=False)
    first = embed_images(model, transform, paths, CPU, show_progress=False)
    other = openalign.create_model("align-test", image={"batch_norm_eps": 0.5}).eval()
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(embed_images(other, transform, paths, CPU, show_progress=False), first, atol=1e-4)
    with precision_scope("bf16"):
        bf16 = embed_images(model, transform, paths, CPU, show_progress=False)
    assert not torch.equal(bf16, first)
    torch.testing.assert_close(bf16, first, atol=0.05, rtol=0)  # the same model, at another precision
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    # a training transform (random crops) or a model in train mode (batch statistics) embeds otherwise
    augmented = embed_images(model, model.config.build_transform(train=True), paths, CPU, show_progress=False)
    assert not torch.allclose(augmented, first, atol=1e-4)
    training = copy.deepcopy(model).train()  # its batch norms' running statistics move: a copy
    assert not torch.allclose(embed_images(training, transform, paths, CPU, show_progress=False), first, atol=1e-4)
    assert torch.equal(embed_images(model, transform, paths, CPU, show_progress=False), first)  # still served
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 5


def test_a_suite_with_a_batch_size_below_one_is_refused(tmp_path):
    from openalign.eval.suite import load_suite

    (tmp_path / "suite.yaml").write_text("tasks: [{task: shapes, root: data}]\nbatch_size: 0\n")
    with pytest.raises(OpenAlignError, match="has batch_size 0; it must be at least 1"):
        load_suite(tmp_path / "suite.yaml")


def test_a_suite_task_the_model_cannot_take_is_refused_before_the_first_task(folders, shapes_root, tmp_path):
    """A suite written for a larger model (CLIPPO's few-shot task resizes to 256 and crops 224) with
    a small one: the error comes before the first task, not after the tasks before it."""
    import yaml

    from openalign.eval.suite import load_suite, run_suite

    model = openalign.create_model("alip-tiny")  # a ViT: it takes one image size only
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"tasks": [
        {"task": "retrieval", "json": str(shapes_root / "dataset_shapes.json")},
        {"task": "fewshot", "train_root": str(folders / "train"), "val_root": str(folders / "val"), "shots": 1,
         "preprocess": {"resize_size": 256, "image_size": 224}}]}))
    size = model.config.preprocess.image_size
    with pytest.raises(OpenAlignError, match=rf"the suite cannot run \(checked before any task runs\): tasks\[1\] "
                                             rf"\(fewshot\): config key 'preprocess.image_size' is 224, but this "
                                             rf"model takes {size} px images"):
        run_suite(load_suite(tmp_path / "suite.yaml"), model, "m", tmp_path / "results", CPU, show_progress=False)
    assert not (tmp_path / "results").exists()
    # a conv tower takes any size: there the error is the crop that does not fit, as it says
    from openalign.eval.tasks import EvalPreprocess

    conv = openalign.create_model("align-tiny")
    EvalPreprocess(image_size=64, resize_size=72).transform(conv)
    with pytest.raises(ConfigError, match=r"'preprocess.resize_size' must be at least image_size \(64\)"):
        EvalPreprocess(image_size=64).transform(conv)


def test_review_bad_inputs_are_refused_before_results_are_lost(model, folders, shapes_root, tmp_path, capsys, caplog,
                                                               monkeypatch):
    import yaml

    from openalign.eval.suite import load_suite
    from openalign.eval.tasks import ClipBenchmarkProbeEvalConfig, LinearProbeEvalConfig, SentencePairEvalConfig

    task = {"task": "knn", "train_root": "a", "val_root": "b"}
    for names, message in ((["knn", "knn"], "names several tasks 'knn'"), (["a", "../../escape"], "not a plain file"),
                           (["a", "x/y"], "not a plain file"), (["a", ""], "not a plain file")):
        (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"names": names, "tasks": [task, task]}))
        with pytest.raises(OpenAlignError, match=message):
            load_suite(tmp_path / "suite.yaml")
    for make, key in ((lambda: LinearProbeEvalConfig("a", "b", c=math.nan), "c"),
                      (lambda: ClipBenchmarkProbeEvalConfig("a", "b", lr=math.inf), "lr"),
                      (lambda: SentencePairEvalConfig("a", "b", head_lr=math.nan), "head_lr")):
        with pytest.raises(ConfigError, match=f"'{key}' must be positive and finite"):
            make()

    model_dir = model.save_pretrained(tmp_path / "model")
    dataset = tmp_path / "dataset.json"
    dataset.write_text('{"images": []}')  # a dataset file named as the output by mistake: kept
    args = ["eval", "knn", "--model", str(model_dir), "--train", str(folders / "train"), "--val", str(folders / "val")]
    assert main([*args, "--output", str(dataset)]) == 2
    assert dataset.read_text() == '{"images": []}' and "is not an openalign result" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "r" / "knn.json")]) == 0
    assert main([*args, "--output", str(tmp_path / "r" / "knn.json")]) == 0  # an earlier result is replaced
    (tmp_path / "r" / "broken.json").write_text("{bad")
    (tmp_path / "table.csv").write_text("url,caption\n")
    assert main(["eval", "report", str(tmp_path / "r"), "--out", str(tmp_path / "table")]) == 2
    assert (tmp_path / "table.csv").read_text() == "url,caption\n"
    with caplog.at_level("WARNING"):
        assert main(["eval", "report", str(tmp_path / "r"), "--out", str(tmp_path / "report")]) == 0
        assert main(["eval", "report", str(tmp_path / "r"), "--out", str(tmp_path / "report")]) == 0  # ours: replaced
    assert "skipped 1 JSON file(s) that are not readable result records" in caplog.text
    assert main(["eval", "report", str(tmp_path / "r"), "--out", ""]) == 2
    assert "names no file: give a prefix" in capsys.readouterr().err
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"tasks": [
        {"task": "knn", "train_root": str(folders / "train"), "val_root": str(folders / "val")},
        {"task": "zeroshot", "root": str(tmp_path / "absent")}]}))
    assert main(["eval", "suite", str(tmp_path / "suite.yaml"), "--model", str(model_dir), "--out",
                 str(tmp_path / "suite_out")]) == 2
    assert "tasks[1].root: " in capsys.readouterr().err and not (tmp_path / "suite_out").exists()  # before task 0
    (tmp_path / "suite_out").mkdir()
    (tmp_path / "suite_out" / "00-knn.json").write_text('{"images": []}')  # not a result: kept, before any task
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"tasks": [
        {"task": "knn", "train_root": str(folders / "train"), "val_root": str(folders / "val")}]}))
    assert main(["eval", "suite", str(tmp_path / "suite.yaml"), "--model", str(model_dir), "--out",
                 str(tmp_path / "suite_out")]) == 2
    assert "exists and is not an openalign result" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "suite_out" / "00-knn.json").read_text() == '{"images": []}'
    with pytest.raises(OpenAlignError, match="class 'square' has 24 training examples, fewer than 1000 shots"):
        evaluate_fewshot(model, folders / "train", folders / "val", CPU, shots=1000, show_progress=False)

    shutil.copytree(folders, tmp_path / "folders")
    (tmp_path / "folders" / "val" / ".ipynb_checkpoints").mkdir()  # no class
    expected = evaluate_knn(model, folders / "train", folders / "val", CPU, show_progress=False)
    assert evaluate_knn(model, tmp_path / "folders" / "train", tmp_path / "folders" / "val", CPU,
                        show_progress=False) == expected
    classes = sorted(p.name for p in (folders / "val").iterdir())
    # a repeated name is logged, not refused: CLIP's ImageNet names repeat 'missile' and 'sunglasses'
    names = ["circle"] * len(classes)
    monkeypatch.setattr(datasets, "_REPEATS_LOGGED", set())
    with caplog.at_level("WARNING"):
        repeated = evaluate_zeroshot(model, folders / "val", CPU, names=names, show_progress=False)
    assert "class names repeat ('circle')" in caplog.text and 0 <= repeated["acc1"] <= 1
    caplog.clear()
    with caplog.at_level("WARNING"):  # logged once a process, not at every evaluation
        assert evaluate_zeroshot(model, folders / "val", CPU, names=names, show_progress=False) == repeated
    assert "class names repeat" not in caplog.text
    shipped = shipped_lines("imagenet1k_classnames")
    assert class_names([f"n{index:08d}" for index in range(1000)], shipped) == shipped
    with pytest.raises(OpenAlignError, match="class name None is not a non-empty string"):
        evaluate_zeroshot(model, folders / "val", CPU, names={c: None for c in classes}, show_progress=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # every image is then a decompression bomb
    with pytest.raises(OpenAlignError, match="cannot read evaluation image"):
        evaluate_knn(model, folders / "train", folders / "val", CPU, show_progress=False)


def test_prompt_files_and_caption_files_of_the_wrong_content_are_clear_errors(model, folders, tmp_path):
    for content, message in (("[1, 2]", "templates must each hold"), ('["a {}", null]', "templates must each hold"),
                             ('{"circle": "a circle"}', "map each class name to a non-empty list of prompts")):
        (tmp_path / "prompts.json").write_text(content)
        with pytest.raises(OpenAlignError, match=message):
            evaluate_zeroshot(model, folders / "val", CPU, read_lines_or_json(tmp_path / "prompts.json", "templates"),
                              show_progress=False)
    (tmp_path / "utf16.json").write_text('{"images": []}', encoding="utf-16")
    with pytest.raises(OpenAlignError, match="is not a Karpathy-style caption file"):
        read_karpathy(tmp_path / "utf16.json", "test")


def _stub_captioning_metrics(monkeypatch) -> None:
    """CLIP_benchmark's command line imports its captioning metrics' pycocoevalcap (104 MB, with
    Java tools), which these tests do not install and which no task here runs: stand-ins are put in."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("pycocoevalcap") is not None:
        return
    for package, name in (("tokenizer.ptbtokenizer", "PTBTokenizer"), ("bleu.bleu", "Bleu"),
                          ("meteor.meteor", "Meteor"), ("rouge.rouge", "Rouge"), ("cider.cider", "Cider"),
                          ("spice.spice", "Spice")):
        parts = ["pycocoevalcap", *package.split(".")]
        for depth in range(1, len(parts) + 1):
            module = sys.modules.get(".".join(parts[:depth])) or types.ModuleType(".".join(parts[:depth]))
            monkeypatch.setitem(sys.modules, module.__name__, module)
        setattr(module, name, object)


def test_clip_benchmark_evaluates_an_openalign_model_through_its_own_command_line(model, folders, shapes_root, tmp_path,
                                                                                   monkeypatch):
    """CLIP_benchmark's own code (its command line, data loading and metrics) on an openalign model
    directory, through the `openalign` model type: the metrics equal openalign's own evaluation of
    the same datasets (CLIP_benchmark's webdataset layout), for zero-shot classification and retrieval."""
    pytest.importorskip("clip_benchmark.datasets.builder", reason="CLIP_benchmark's datasets need requests")
    _stub_captioning_metrics(monkeypatch)
    from openalign.clip_benchmark import main as clip_benchmark_main

    classes = sorted(p.name for p in (folders / "val").iterdir())
    images = [(p, classes.index(p.parent.name)) for c in classes for p in sorted((folders / "val" / c).iterdir())]
    classification = tmp_path / "wds" / "wds_shapes"
    for shard, start in enumerate(range(0, len(images), 7)):
        _write_tar(classification / "test" / f"{shard}.tar",
                   {name: data for n, (path, label) in enumerate(images[start:start + 7], start)
                    for name, data in ((f"s{n:04d}.png", path.read_bytes()), (f"s{n:04d}.cls", str(label).encode()))})
    (classification / "test" / "nshards.txt").write_text(str(shard + 1))
    (classification / "classnames.txt").write_text("\n".join(classes))
    (classification / "zeroshot_classification_templates.txt").write_text("a {c}\na drawing of a {c}\n")
    retrieval = tmp_path / "wds" / "wds_captions"
    items = read_karpathy(shapes_root / "dataset_shapes.json", "test")
    _write_tar(retrieval / "test" / "0.tar",
               {name: data for n, item in enumerate(items) for name, data in
                ((f"{n:04d}.png", item.path.read_bytes()), (f"{n:04d}.txt", "\n".join(item.captions).encode()))})
    (retrieval / "test" / "nshards.txt").write_text("1")
    (retrieval / "dataset_type.txt").write_text("retrieval\n")
    model_dir = model.save_pretrained(tmp_path / "model")

    for root, task, ours in ((classification, "zeroshot_classification", evaluate_zeroshot),
                             (retrieval, "zeroshot_retrieval", evaluate_retrieval)):
        output = tmp_path / f"{task}.json"
        assert clip_benchmark_main(["eval", "--model_type", "openalign", "--model", "align-test", "--pretrained",
                                    str(model_dir), "--dataset", f"wds/{root.name}", "--dataset_root", str(root),
                                    "--task", task, "--no_amp", "--num_workers", "0", "--batch_size", "8",
                                    "--recall_k", "1", "5", "10", "--output", str(output)]) == 0
        theirs = json.loads(output.read_text())["metrics"]
        expected = ours(model, root, CPU, show_progress=False)
        assert set(theirs) <= set(expected) and len(theirs) >= 3
        assert theirs == pytest.approx({key: expected[key] for key in theirs}, abs=1e-6), task


def test_clip_benchmarks_command_line_says_what_is_missing_in_one_line(monkeypatch, capsys):
    package = pytest.importorskip("clip_benchmark")
    pytest.importorskip("clip_benchmark.models")
    from openalign.clip_benchmark import main as clip_benchmark_main

    monkeypatch.setitem(sys.modules, "clip_benchmark.cli", None)  # as without pycocoevalcap: its import fails
    monkeypatch.delattr(package, "cli", raising=False)  # (imported by an earlier test where it can be)
    assert clip_benchmark_main(["eval", "--model_type", "openalign"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CLIP_benchmark's command line needs its dependencies") and err.count("\n") == 1


def test_an_image_listed_twice_in_a_retrieval_split_is_said(tmp_path, caplog):
    from PIL import Image

    from openalign.eval.datasets import retrieval_items

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    entries = [{"filename": name, "split": "test", "sentences": [{"raw": f"caption {index}"}]}
               for index, name in enumerate(["a.png", "b.png", "a.png"])]
    (tmp_path / "captions.json").write_text(json.dumps({"images": entries}))
    with caplog.at_level("WARNING"):
        assert len(retrieval_items(tmp_path / "captions.json")) == 3
        assert len(retrieval_items(tmp_path / "captions.json")) == 3  # the run reads what the check read
    assert "1 image(s) of" in caplog.text and "appear more than once (e.g. '" in caplog.text
    assert caplog.text.count("appear more than once") == 1
