"""GLUE-style sentence-pair fine-tuning of a pixel model (shared spec clippo.md §5.4): the pair
layout, the metrics against hand-computed values, the file readers, a learnable synthetic pair
task through the command line, and the errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_unifont

import openalign
from openalign.cli import main
from openalign.data.render import TextRenderer
from openalign.errors import ConfigError, OpenAlignError
from openalign.eval import SentencePairEvalConfig, finetune_sentence_pairs, read_sentence_pairs
from openalign.eval.sentence_pairs import classification_scores, regression_scores, render_pairs

WORDS = ("cat", "dog", "red", "sun", "box", "map")


def same_or_different(n: int, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """Pairs whose label says whether both sentences start with the same word: neither sentence
    alone tells, so a model must see both halves. At 32 px only a sentence's first line of about
    four characters is visible, so the deciding word comes first."""
    first, second, labels = [], [], []
    for _ in range(n):
        a = rng.choice(WORDS)
        same = rng.random() < 0.5
        b = a if same else rng.choice([word for word in WORDS if word != a])
        first.append(f"{a} is here")
        second.append(f"{b} is there")
        labels.append("same" if same else "different")
    return first, second, labels


def _clippo_test_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    """A seeded clippo-test model saved under ``tmp_path``, with the output so far cleared."""
    torch.manual_seed(0)
    model_dir = openalign.create_model("clippo-test").save_pretrained(tmp_path / "model")
    capsys.readouterr()
    return model_dir


def write_tsv(path: Path, columns: list[str], rows: list[tuple[str, ...]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(row) for row in [tuple(columns), *rows]) + "\n")
    return path


@needs_unifont
@pytest.mark.parametrize("image_size", [32, 96])
def test_pairs_put_sentence_a_in_the_top_half_and_b_in_the_bottom_half(image_size):
    renderer = openalign.create_model("clippo-test").config.build_tokenizer().renderer if image_size == 32 \
        else TextRenderer(image_size)
    first = ["the cat is red and sits on a very long mat " * 3, "a", ""]
    second = ["the dog is blue", "b " * 200, "only the second"]
    pairs = render_pairs(renderer, first, second)
    alone_a, alone_b = renderer.batch(first), renderer.batch(second)
    half = image_size // 2
    assert pairs.shape == (3, 3, image_size, image_size) and pairs.dtype == torch.float32
    assert torch.equal(pairs[:, :, :half], alone_a[:, :, :half])
    assert torch.equal(pairs[:, :, half:], alone_b[:, :, :half])  # overflow of either half is dropped
    assert pairs[0, :, half:].min() == -1.0 and pairs[2, :, :half].unique().numel() == 1  # ink / an empty A
    assert torch.equal(render_pairs(renderer, first), alone_a)  # single sentences: the whole image


def test_metrics_match_hand_computed_values():
    # binary: TP=3, FP=1, FN=2, TN=4 (label 1 positive)
    pairs = [(1, 1)] * 3 + [(0, 1)] * 1 + [(1, 0)] * 2 + [(0, 0)] * 4
    labels, predictions = (torch.tensor(column) for column in zip(*pairs))
    scores = classification_scores(predictions, labels, 2)
    assert scores["accuracy"] == pytest.approx(0.7)
    assert scores["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))  # 0.6667
    assert scores["mcc"] == pytest.approx((3 * 4 - 1 * 2) / math.sqrt(4 * 5 * 6 * 5))  # 10 / √600
    # three classes, confusion (rows true) [[2,1,0],[0,2,1],[1,0,3]]: c=7, s=10, t=p=(3,3,4)
    # MCC = (7·10 − 34) / √((100 − 34)(100 − 34)) = 36/66
    confusion = [[2, 1, 0], [0, 2, 1], [1, 0, 3]]
    pairs = [(t, p) for t in range(3) for p in range(3) for _ in range(confusion[t][p])]
    labels, predictions = (torch.tensor(column) for column in zip(*pairs))
    scores = classification_scores(predictions, labels, 3)
    assert scores["accuracy"] == pytest.approx(0.7) and scores["mcc"] == pytest.approx(36 / 66)
    assert "f1" not in scores
    constant = classification_scores(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]), 2)
    assert constant["mcc"] == 0.0 and constant["f1"] == 0.0  # CoLA's 0.0: a degenerate classifier


def test_regression_scores_equal_scipys_pearson_and_spearman_with_ties():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 200) + rng.choice([0.0, 0.2, 0.4], 200)  # STS-B-like, many tied scores
    predictions = np.round(labels + rng.normal(0, 1.5, 200), 1)  # ties among the predictions too
    scores = regression_scores(torch.from_numpy(predictions).float(), torch.from_numpy(labels))
    assert scores["pearson"] == pytest.approx(pearsonr(predictions.astype(np.float32), labels)[0], abs=1e-9)
    assert scores["spearman"] == pytest.approx(spearmanr(predictions, labels)[0], abs=1e-12)
    # by hand: ranks of (1, 2, 2, 3) are (1, 2.5, 2.5, 4); against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert regression_scores(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4]))["spearman"] == \
        pytest.approx(3 / math.sqrt(10))
    assert all(math.isnan(value) for value in regression_scores(torch.ones(4), torch.arange(4.0)).values())


def test_real_valued_labels_are_a_regression_task_not_a_class_each(tmp_path):
    stsb = write_tsv(tmp_path / "stsb.tsv", ["sentence1", "sentence2", "label"],
                     [("a", "b", "5.000"), ("c", "d", "0.500"), ("e", "f", "3")])
    with pytest.raises(OpenAlignError, match=r"has real-valued labels \(0.500, 3, 5.000, ...\): scores, as STS-B's, "
                                             r"are a regression task \(regression: true; --regression\)"):
        read_sentence_pairs(stsb)
    assert read_sentence_pairs(stsb, regression=True) == (["a", "c", "e"], ["b", "d", "f"], [5.0, 0.5, 3.0], [])
    bad = write_tsv(tmp_path / "bad.tsv", ["sentence", "label"], [("a", "1.5"), ("b", "high")])
    with pytest.raises(OpenAlignError, match=r"line 3: the label 'high' is not a finite number"):
        read_sentence_pairs(bad, regression=True)
    with pytest.raises(OpenAlignError, match=r"line 2: the label 'nan' is not a finite number"):
        read_sentence_pairs(write_tsv(tmp_path / "nan.tsv", ["sentence", "label"], [("a", "nan")]), regression=True)


def test_readers_map_labels_and_report_bad_files(tmp_path):
    tsv = write_tsv(tmp_path / "train.tsv", ["index", "sentence1", "sentence2", "label"],
                    [("0", "a \"quoted\" one", "b", "not_entailment"), ("1", "c", "d", "entailment")])
    assert read_sentence_pairs(tsv) == (['a "quoted" one', "c"], ["b", "d"], [1, 0], ["entailment", "not_entailment"])
    sst = write_tsv(tmp_path / "sst.tsv", ["sentence", "label"], [("good", "1"), ("bad", "0"), ("meh", "10")])
    assert read_sentence_pairs(sst) == (["good", "bad", "meh"], None, [1, 0, 2], ["0", "1", "10"])  # numeric order
    pandas = write_tsv(tmp_path / "pandas.tsv", ["sentence", "label"], [("a", "1.0"), ("b", "0.0"), ("c", "10.0")])
    assert read_sentence_pairs(pandas)[2:] == ([1, 0, 2], ["0.0", "1.0", "10.0"])  # whole numbers written as floats
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text('{"sentence1": "x", "sentence2": "y", "label": "entailment"}\n\n'
                     '{"sentence1": "z", "sentence2": "w", "label": "entailment", "idx": 3}\n')
    assert read_sentence_pairs(jsonl, ["entailment", "not_entailment"]) == (["x", "z"], ["y", "w"], [0, 0],
                                                                            ["entailment", "not_entailment"])

    with pytest.raises(OpenAlignError, match="does not exist"):
        read_sentence_pairs(tmp_path / "missing.tsv")
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(OpenAlignError, match="is empty"):
        read_sentence_pairs(tmp_path / "empty.tsv")
    with pytest.raises(OpenAlignError, match="holds no examples"):
        read_sentence_pairs(write_tsv(tmp_path / "header.tsv", ["sentence", "label"], []))
    with pytest.raises(OpenAlignError, match=r"line 3: 2 tab-separated fields, but the header has 3"):
        read_sentence_pairs(write_tsv(tmp_path / "short.tsv", ["sentence1", "sentence2", "label"],
                                      [("a", "b", "0"), ("c", "1")]))
    with pytest.raises(OpenAlignError, match="labels that the training split lacks: neutral"):
        read_sentence_pairs(write_tsv(tmp_path / "mnli.tsv", ["sentence1", "label"], [("a", "neutral")]),
                            ["entailment", "not_entailment"])
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "label": 0}\n{"sentence": "b"}\n')
    with pytest.raises(OpenAlignError, match="line 2: lacks label"):
        read_sentence_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(OpenAlignError, match="line 3: the label is blank"):  # a GLUE test split
        read_sentence_pairs(write_tsv(tmp_path / "test.tsv", ["sentence", "label"], [("a", "1"), ("b", " ")]))


def test_a_missing_column_names_the_columns_found_and_expected(tmp_path):
    path = write_tsv(tmp_path / "qqp.tsv", ["question1", "question2", "is_duplicate"], [("a", "b", "0")])
    with pytest.raises(OpenAlignError, match=r"has columns 'question1', 'question2', 'is_duplicate'; "
                                             r"expected 'sentence1' \(or 'sentence'\), optionally 'sentence2', "
                                             r"and 'label'"):
        read_sentence_pairs(path)


@needs_unifont
def test_a_synthetic_pair_task_is_learned_through_the_command_line(tmp_path, capsys):
    rng = random.Random(0)
    for name, count in (("train", 256), ("dev", 64)):
        write_tsv(tmp_path / "same_word" / f"{name}.tsv", ["sentence1", "sentence2", "label"],
                  list(zip(*same_or_different(count, rng))))
    model_dir = _clippo_test_model(tmp_path, capsys)
    assert main(["eval", "sentence_pairs", "--model", str(model_dir), "--train", str(tmp_path / "same_word/train.tsv"),
                 "--val", str(tmp_path / "same_word/dev.tsv"), "--epochs", "6", "--lr", "5e-4", "--head-lr", "5e-3",
                 "--seed", "0", "--device", "cpu", "--output", str(tmp_path / "result.json")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads((tmp_path / "result.json").read_text())
    assert record["task"] == "sentence_pairs" and record["dataset"] == "same_word" and record["model"] == "clippo-test"
    metrics = record["metrics"]
    assert set(metrics) == {"accuracy", "f1", "mcc", "train_loss"}
    assert metrics["accuracy"] >= 0.9 and metrics["mcc"] >= 0.8, metrics  # chance: 0.5 and 0.0


@needs_unifont
def test_a_synthetic_similarity_score_is_learned_by_regression_through_the_command_line(tmp_path, capsys):
    """STS-B's form: a score per pair (high where both sentences start with the same word, spread
    within each group), learned with --regression and scored by correlation."""
    rng = random.Random(0)
    for name, count in (("train", 256), ("dev", 64)):
        first, second, labels = same_or_different(count, rng)
        scores = [f"{(3.5 if label == 'same' else 0.0) + 1.5 * rng.random():.3f}" for label in labels]
        write_tsv(tmp_path / "stsb" / f"{name}.tsv", ["sentence1", "sentence2", "label"],
                  list(zip(first, second, scores)))
    model_dir = _clippo_test_model(tmp_path, capsys)
    assert main(["eval", "sentence_pairs", "--model", str(model_dir), "--train", str(tmp_path / "stsb/train.tsv"),
                 "--val", str(tmp_path / "stsb/dev.tsv"), "--regression", "--epochs", "10", "--lr", "5e-4",
                 "--head-lr", "5e-3", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert set(metrics) == {"pearson", "spearman", "train_loss"}
    # chance: 0; the two groups told apart perfectly, in random order within each: a Spearman's of about 0.87
    assert metrics["pearson"] >= 0.7 and metrics["spearman"] >= 0.6, metrics


def test_zero_shot_sentence_classification_equals_a_hand_computation(tmp_path, capsys):
    """The colab's SST-2 protocol (shared spec clippo.md §5.1): each sentence embedded as text, each
    class the renormalised mean of its prompts' embeddings, the highest cosine wins."""
    import torch.nn.functional as F

    from openalign.eval import evaluate_zeroshot_sentences
    from openalign.eval.prompts import shipped_lines

    rng = random.Random(0)
    words = {"0": ["awful", "dull", "bad"], "1": ["great", "moving", "fun"]}
    rows = [(f"a {rng.choice(words[label])} film", label) for label in rng.choices("01", k=30)]
    path = write_tsv(tmp_path / "sst2" / "dev.tsv", ["sentence", "label"], rows)
    torch.manual_seed(0)
    model = openalign.create_model("align-test").eval()
    templates, names = shipped_lines("sst2_templates"), shipped_lines("sst2_classnames")
    assert names == ["negative", "positive"] and len(templates) == 5
    tokenizer = model.config.build_tokenizer()
    with torch.no_grad():
        sentences = model.encode_text(**tokenizer([sentence for sentence, _ in rows]))
        classes = torch.stack([F.normalize(model.encode_text(**tokenizer([t.format(n) for t in templates])).mean(0),
                                           dim=0) for n in names])
    expected = (sentences @ classes.T).argmax(1).eq(torch.tensor([int(label) for _, label in rows])).double().mean()
    metrics = evaluate_zeroshot_sentences(model, path, torch.device("cpu"), templates, names, show_progress=False)
    assert metrics["acc1"] == pytest.approx(expected.item()) and math.isnan(metrics["acc5"])
    model_dir = model.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert main(["eval", "zeroshot_sentences", "--model", str(model_dir), "--val", str(path), "--classnames",
                 "sst2_classnames", "--templates-file", "sst2_templates", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["task"], record["dataset"]) == ("zeroshot_sentences", "sst2")
    assert record["metrics"]["acc1"] == pytest.approx(expected.item())
    pairs = write_tsv(tmp_path / "pairs.tsv", ["sentence1", "sentence2", "label"], [("a", "b", "0")])
    with pytest.raises(OpenAlignError, match="holds sentence pairs"):
        evaluate_zeroshot_sentences(model, pairs, torch.device("cpu"))
    with pytest.raises(OpenAlignError, match=r"3 class names for the 2 labels of .*sorted order \(0, 1\)"):
        evaluate_zeroshot_sentences(model, path, torch.device("cpu"), names=["a", "b", "c"])


@needs_unifont
def test_the_callers_model_is_left_untouched(tmp_path):
    torch.manual_seed(0)
    model = openalign.create_model("clippo-test").train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    first, second, labels = same_or_different(40, random.Random(1))
    names = sorted(set(labels))
    data = (first, second, [names.index(label) for label in labels])
    metrics = finetune_sentence_pairs(model, data, data, 2, "cpu", epochs=1, batch_size=16, show_progress=False)
    assert set(metrics) == {"accuracy", "f1", "mcc", "train_loss"} and math.isfinite(metrics["train_loss"])
    assert model.training and all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    again = finetune_sentence_pairs(model, data, data, 2, "cpu", epochs=1, batch_size=16, show_progress=False)
    assert again == metrics  # seeded: the same head initialisation and order


def test_a_model_without_rendered_text_is_refused(tmp_path, capsys):
    model = openalign.create_model("align-test")
    data = (["a", "b"], ["c", "d"], [0, 1])
    with pytest.raises(OpenAlignError, match="needs a model that reads rendered text"):
        finetune_sentence_pairs(model, data, data, 2, "cpu", show_progress=False)
    path = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [("a", "0"), ("b", "1")])
    model_dir = model.save_pretrained(tmp_path / "align")
    assert main(["eval", "sentence_pairs", "--model", str(model_dir), "--train", str(path), "--val", str(path),
                 "--device", "cpu"]) == 2
    assert "reads rendered text" in " ".join(capsys.readouterr().err.split())


def test_the_task_config_validates_and_recipes_list_it():
    from openalign.recipe import load_recipe

    with pytest.raises(ConfigError, match="'lr' must be positive"):
        SentencePairEvalConfig(train="a.tsv", val="b.tsv", lr=0)
    with pytest.raises(ConfigError, match="'epochs' must be at least 1"):
        SentencePairEvalConfig(train="a.tsv", val="b.tsv", epochs=0)
    recipe = load_recipe("demo", ["eval.tasks=[{task: sentence_pairs, train: t.tsv, val: d.tsv, head_lr: 0.01}]"])
    task = recipe.eval.tasks[0]
    assert isinstance(task, SentencePairEvalConfig) and task.name == "sentence_pairs" and task.head_lr == 0.01
    assert not task.regression
    assert load_recipe("demo", ["eval.tasks=[{task: sentence_pairs, train: t.tsv, val: d.tsv, regression: true}]"]
                       ).eval.tasks[0].regression
