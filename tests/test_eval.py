"""Retrieval and classification metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from openalign import create_model
from openalign.errors import OpenAlignError
from openalign.eval import (class_embeddings, classification_metrics, evaluate_shapes, nearest_neighbour_predict,
                            retrieval_metrics, shapes_chance_levels)

# scores[text, image]; captions 0-1 belong to image 0, caption 2 to image 1, captions 3-4 to image 2
SCORES = torch.tensor([[0.9, 0.1, 0.0],
                       [0.2, 0.8, 0.1],
                       [0.1, 0.3, 0.5],
                       [0.0, 0.0, 1.0],
                       [0.7, 0.6, 0.5]])
TEXT_TO_IMAGE = [0, 0, 1, 2, 2]


@pytest.mark.parametrize("chunk_size", [1, 2, 4096])
def test_retrieval_recall_by_hand(chunk_size):
    # image embeddings = identity, so text j · image i = SCORES[j, i]
    metrics = retrieval_metrics(torch.eye(3), SCORES, TEXT_TO_IMAGE, ks=(1, 2, 3), chunk_size=chunk_size)
    # exactly the shares (float64 means: a record shows 0.4, not float32's 0.4000000059604645)
    # text→image: ranks of the right image are 1, 2, 2, 1, 3
    assert metrics["image_retrieval_recall@1"] == 2 / 5
    assert metrics["image_retrieval_recall@2"] == 4 / 5
    assert metrics["image_retrieval_recall@3"] == 1.0
    # image→text: image 0 ranks its caption 0 first; image 1's only caption (2) comes third,
    # after captions 1 and 4; image 2 ranks its caption 3 first
    assert metrics["text_retrieval_recall@1"] == 2 / 3
    assert metrics["text_retrieval_recall@2"] == 2 / 3
    assert metrics["text_retrieval_recall@3"] == 1.0


def test_recall_at_k_beyond_the_number_of_items_is_one_and_said(caplog):
    with caplog.at_level("WARNING"):
        metrics = retrieval_metrics(torch.eye(3), SCORES, TEXT_TO_IMAGE, ks=(1, 3, 10))
    assert metrics["image_retrieval_recall@10"] == 1.0 and metrics["text_retrieval_recall@10"] == 1.0
    assert "recall@3, 10 over 3 images: every caption's image is among its top 3" in caplog.text


def test_contrastive_loss_and_in_batch_accuracy_by_hand(caplog):
    from openalign.errors import OpenAlignError
    from openalign.eval.retrieval import contrastive_metrics

    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    metrics = contrastive_metrics(images, texts, logit_scale=2.0, batch_size=2)
    # a last pair alone has nothing to be told from: it joins the batch before it, one batch of 3 whose
    # logits 2·cos are [[2, 1.6, 0], [0, 1.2, 2], [2, 1.6, 0]] (image by text)
    rows = [[2, 1.6, 0], [0, 1.2, 2], [2, 1.6, 0]]
    image_to_text = [-row[n] + math.log(sum(math.exp(v) for v in row)) for n, row in enumerate(rows)]
    columns = [[row[n] for row in rows] for n in range(3)]
    text_to_image = [-column[n] + math.log(sum(math.exp(v) for v in column)) for n, column in enumerate(columns)]
    assert metrics["contrastive_loss"] == pytest.approx((sum(image_to_text) + sum(text_to_image)) / 2 / 3, rel=1e-7)
    # image 0 alone scores its own text highest; image 2 ties image 0 for text 0 (a miss for text 0), and
    # texts 1 and 2 score another image above their own
    assert metrics["contrastive_i2t_accuracy"] == 1 / 3 and metrics["contrastive_t2i_accuracy"] == 0.0
    assert contrastive_metrics(images, texts, 2.0, batch_size=3) == metrics
    with caplog.at_level("WARNING"):  # more than the pairs: one batch of them all, and that is said
        assert contrastive_metrics(images, texts, 2.0, batch_size=1000) == metrics
    assert "contrastive batch 1000, but there are 3 pairs: one batch of 3" in caplog.text
    # batches of 2 and 2: [[2, 1.6], [0, 1.2]], then image 2 and text 2 with a fourth pair
    four = contrastive_metrics(torch.cat([images, images[:1]]), torch.cat([texts, texts[:1]]), 2.0, batch_size=2)
    first = [math.log(1 + math.exp(1.6 - 2)), math.log(1 + math.exp(0 - 1.2)),  # image→text
             math.log(1 + math.exp(0 - 2)), math.log(1 + math.exp(1.6 - 1.2))]  # text→image
    second = [math.log(1 + math.exp(2 - 0)), math.log(1 + math.exp(0 - 2)),  # [[0, 2], [0, 2]]: image→text
              math.log(2), math.log(2)]  # text→image: the columns [0, 0] and [2, 2], ties
    assert four["contrastive_loss"] == pytest.approx((sum(first) + sum(second)) / 2 / 4, rel=1e-7)
    assert four["contrastive_i2t_accuracy"] == 3 / 4 and four["contrastive_t2i_accuracy"] == 1 / 4
    collapsed = contrastive_metrics(torch.ones(5, 2) / 2 ** 0.5, torch.ones(5, 2) / 2 ** 0.5, 10.0, batch_size=4)
    assert collapsed["contrastive_loss"] == pytest.approx(math.log(5))  # the fifth pair joins the first four
    assert collapsed["contrastive_i2t_accuracy"] == collapsed["contrastive_t2i_accuracy"] == 0.0
    with pytest.raises(OpenAlignError, match="as many image as text embeddings"):
        contrastive_metrics(images, texts[:2], 2.0, batch_size=2)


def test_classification_metrics_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2, 2])
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(3 / 5)
    assert math.isnan(metrics["acc5"])  # CLIP_benchmark: undefined with fewer than 5 classes
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_top5_never_counts_a_class_scored_minus_infinity():
    logits = torch.full((2, 6), float("-inf"))
    logits[0, 0] = logits[1, 1] = 1.0  # a kNN's votes with k=1: one class each
    metrics = classification_metrics(logits, torch.tensor([0, 5]))
    assert metrics["acc1"] == metrics["acc5"] == 0.5


def test_class_embeddings_are_the_renormalised_mean_of_prompt_embeddings():
    table = {"a cat": [1.0, 0.0], "the cat": [0.0, 1.0], "a dog": [-1.0, 0.0], "the dog": [-1.0, 0.0]}
    calls = []
    weights = class_embeddings(lambda texts: (calls.append(texts), torch.tensor([table[t] for t in texts]))[1],
                               ["cat", "dog"], ["a {}", "the {}"])
    torch.testing.assert_close(weights, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [-1.0, 0.0]]))
    assert calls == [["a cat", "the cat", "a dog", "the dog"]]  # one call: full batches, one gather across ranks


def test_nearest_neighbour_takes_the_most_similar_memory_label():
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    queries = F.normalize(torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.5]]), dim=-1)
    assert nearest_neighbour_predict(memory, torch.tensor([7, 8, 9]), queries, chunk_size=2).tolist() == [7, 8, 9]


def test_metrics_refuse_inputs_that_would_give_numbers_silently_wrong():
    from openalign.errors import OpenAlignError
    from openalign.eval import knn_classify

    memory, queries = torch.tensor([[1.0, 0.0], [0.0, 10.0]]), torch.tensor([[1.0, 0.3]])
    with pytest.raises(OpenAlignError, match=r"memory row 1 has norm 10: pass F.normalize\(memory"):
        nearest_neighbour_predict(memory, torch.tensor([0, 1]), queries)  # dot products would pick label 1, cosine 0
    memory = F.normalize(memory, dim=-1)
    with pytest.raises(OpenAlignError, match="queries row 0 has norm 1.044"):
        knn_classify(memory, torch.tensor([0, 1]), queries, num_classes=2)
    queries = F.normalize(queries, dim=-1)
    assert nearest_neighbour_predict(memory.bfloat16(), torch.tensor([0, 1]), queries.bfloat16()).tolist() == [0]
    # a dead model's zero embeddings, and CLIPPO's x / (|x| + 1e-8) of features near zero, are scored, not refused
    dead = torch.cat([memory, torch.zeros(1, 2), 0.91 * memory[:1]])
    assert knn_classify(dead, torch.tensor([0, 1, 1, 0]), queries, num_classes=2, k=3).shape == (1, 2)
    with pytest.raises(OpenAlignError, match="memory row 0 has norm 0.5: "):  # but not a whole set below unit norm
        knn_classify(memory / 2, torch.tensor([0, 1]), queries, num_classes=2)
    with pytest.raises(OpenAlignError, match=r"memory_labels\[1\] is 7, but there are 3 classes"):
        knn_classify(memory, torch.tensor([0, 7]), queries, num_classes=3)
    with pytest.raises(OpenAlignError, match="k is 0"):
        knn_classify(memory, torch.tensor([0, 1]), queries, num_classes=2, k=0)
    with pytest.raises(OpenAlignError, match="queries are 3-d but the memory is 2-d"):
        knn_classify(memory, torch.tensor([0, 1]), F.normalize(torch.ones(1, 3), dim=-1), num_classes=2)
    with pytest.raises(OpenAlignError, match=r"text_to_image\[3\] is 5, but there are 3 images"):
        retrieval_metrics(torch.eye(3), SCORES[:4], [0, 1, 2, 5])
    with pytest.raises(OpenAlignError, match=r"text_to_image must hold one entry per row \(5\)"):
        retrieval_metrics(torch.eye(3), SCORES, [0, 1, 2])
    with pytest.raises(OpenAlignError, match=r"labels\[2\] is 7, but there are 3 classes"):
        classification_metrics(torch.randn(3, 3), torch.tensor([0, 1, 7]))
    with pytest.raises(OpenAlignError, match="must be whole numbers"):
        classification_metrics(torch.randn(3, 3), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(OpenAlignError, match=r"nothing to score \(labels is empty\)"):
        classification_metrics(torch.zeros(0, 3), [])
    with pytest.raises(OpenAlignError, match="no images to retrieve"):
        retrieval_metrics(torch.zeros(0, 3), torch.eye(3), [0, 0, 0])


def test_chance_levels(shapes_root):
    chance = shapes_chance_levels(shapes_root)
    assert chance["image_retrieval_recall@1"] == pytest.approx(1 / 24)
    assert chance["text_retrieval_recall@1"] == pytest.approx(5 / 120)  # 5 right captions among 120
    assert chance["text_retrieval_recall@5"] == pytest.approx(1 - math.comb(115, 5) / math.comb(120, 5))
    assert chance["zeroshot_shape_acc1"] == pytest.approx(1 / 6) and chance["knn_colour_acc1"] == pytest.approx(1 / 8)


def test_evaluate_shapes_reports_every_metric_and_restores_train_mode(shapes_root):
    model = create_model("align-test").train()
    metrics = evaluate_shapes(model, shapes_root, torch.device("cpu"), batch_size=16, knn_memory_size=32,
                              show_progress=False)
    expected = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    expected |= {f"{d}_retrieval_{s}_rank" for d in ("image", "text") for s in ("mean", "median")}
    expected |= {f"{t}_{a}_acc1" for t in ("zeroshot", "knn") for a in ("shape", "colour")}
    assert set(metrics) == expected
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if not k.endswith("_rank"))
    assert all(v >= 1.0 for k, v in metrics.items() if k.endswith("_rank"))
    assert model.training


def test_a_shapes_image_the_evaluation_reads_is_refused_before_training_when_missing(shapes_root, tmp_path,
                                                                                       tiny_overrides):
    import shutil

    from openalign.data.karpathy import read_karpathy
    from openalign.eval.shapes import check_shapes_dataset
    from openalign.eval.tasks import ShapesEvalConfig
    from openalign.recipe import load_recipe
    from openalign.train import train

    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    check_shapes_dataset(root)
    (root / "images" / "test" / "000004.png").unlink()  # a test image: retrieval and zero-shot read it
    with pytest.raises(OpenAlignError, match=r"1 of the \d+ images the shapes evaluation reads .* missing or not "
                                             r"files, e\.g\. '.*images/test/000004\.png': delete the folder"):
        check_shapes_dataset(root)
    with pytest.raises(OpenAlignError, match=r"images/test/000004\.png"):
        ShapesEvalConfig(root=str(root)).check_data()
    with pytest.raises(OpenAlignError, match=r"eval\.tasks\[0\] \(shapes\): .*images/test/000004\.png"):
        train(load_recipe("demo", tiny_overrides(root, tmp_path / "run")), show_progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step, not after training
    shutil.copy(shapes_root / "images" / "test" / "000004.png", root / "images" / "test" / "000004.png")
    ShapesEvalConfig(root=str(root)).check_data()
    memory = next(item.path for item in read_karpathy(root / "dataset_shapes.json", "train") if item.labels)
    memory.unlink()  # the kNN memory's first (single-shape) training image
    memory.mkdir()  # a folder where the file was is no image either
    with pytest.raises(OpenAlignError, match=rf"images/train/{memory.name}"):
        ShapesEvalConfig(root=str(root)).check_data()


def test_the_report_shows_fractions_as_percentages_and_losses_ranks_and_missing_values_as_they_are(tmp_path):
    from openalign.eval.suite import make_record, write_report

    record = make_record("mrpc", "clippo-test", "m", "sentence_pairs",
                         {"accuracy": 0.5, "acc5": math.nan, "train_loss": 0.2311, "text_retrieval_mean_rank": 3.5})
    markdown, _ = write_report([record], tmp_path / "report")
    assert "| clippo-test | m | mrpc | – | 50.00 | 3.5 | 0.2311 |" in markdown.read_text()  # metrics sorted by name
    probe = make_record("cifar10", "align-test", "m", "clip_benchmark_probe",
                        {"lp_acc1": 0.25, "weight_decay": 0.0001, "lr": 0.1, "epochs": 10, "seed": 0, "fewshot_k": -1,
                         "normalized": True})
    markdown, _ = write_report([probe], tmp_path / "probe")
    assert probe["task"] == "linear_probe"  # CLIP_benchmark's name for its protocol
    # epochs, fewshot_k, lp_acc1, lr, normalized, seed, weight_decay: its settings as they are
    assert "| align-test | m | cifar10 | 10 | -1 | 25.00 | 0.1 | True | 0 | 0.0001 |" in markdown.read_text()
    # a prefix is a prefix, dots and all (versions do not collide); its .md or .csv names it too
    for prefix, files in (("align_v1.0", ("align_v1.0.md", "align_v1.0.csv")),
                          ("align_v1.5", ("align_v1.5.md", "align_v1.5.csv")), ("table.md", ("table.md", "table.csv"))):
        assert [path.name for path in write_report([probe], tmp_path / prefix)] == list(files)


def test_retrieval_ranks_of_nan_scores_agree_with_the_recall():
    """A diverged model's NaN embeddings rank last, as a collapsed model's do, not first; one NaN
    image ranks as torch.topk (which decides the recall) puts it: above every number."""
    texts = torch.eye(5, 8).repeat_interleave(2, 0)  # captions 2i, 2i+1 are image i's, perfectly
    diverged = retrieval_metrics(torch.full((5, 8), math.nan), torch.full((10, 8), math.nan),
                                 [i // 2 for i in range(10)])
    assert diverged["image_retrieval_mean_rank"] == diverged["image_retrieval_median_rank"] == 5.0  # of 5 images
    assert diverged["text_retrieval_mean_rank"] == diverged["text_retrieval_median_rank"] == 9.0  # 8 others ahead
    images = torch.eye(5, 8)
    images[3] = math.nan
    metrics = retrieval_metrics(images, texts, [i // 2 for i in range(10)], ks=(1,))
    # every caption's top image is the NaN one: image 3's two captions hit (rank 1), the other 8 rank 2
    assert metrics["image_retrieval_recall@1"] == 2 / 10
    assert metrics["image_retrieval_mean_rank"] == (2 * 1 + 8 * 2) / 10
    # image 3's captions all score NaN: tied with its own, the other 8 count ahead (rank 9); the rest rank 1
    assert metrics["text_retrieval_mean_rank"] == (4 * 1 + 9) / 5


def test_retrieval_embeddings_of_two_widths_are_an_error_naming_both():
    with pytest.raises(OpenAlignError, match=r"of one width, \(n, d\) each: got \(2, 4\) and \(3, 5\)"):
        retrieval_metrics(torch.eye(2, 4), torch.eye(3, 5), [0, 1, 1])


def test_knn_takes_labels_as_a_list_or_array_as_the_metrics_do():
    import numpy as np

    from openalign.eval import knn_classify

    memory, queries = torch.eye(3, 4), torch.eye(3, 4)[[2, 0]]
    expected = knn_classify(memory, torch.tensor([0, 1, 1]), queries, 2, k=1)
    assert torch.equal(knn_classify(memory, [0, 1, 1], queries, 2, k=1), expected)
    assert torch.equal(knn_classify(memory, np.array([0, 1, 1]), queries, 2, k=1), expected)
    assert nearest_neighbour_predict(memory, [0, 1, 1], queries).tolist() == [1, 0]
