"""Evaluation metrics against independent references: the clip-benchmark package (CLIP_benchmark's
own recall_at_k and accuracy), scikit-learn, a primal ridge solve in numpy, and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openalign.errors import OpenAlignError
from openalign.eval import (classification_metrics, knn_classify, nearest_neighbour_predict, retrieval_metrics,
                            ridge_fewshot_probe)

clip_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval",
                                     reason="`make test` installs clip-benchmark (pip install --no-deps clip-benchmark)")


def _reference_recalls(image_emb, text_emb, text_to_image, ks):
    """CLIP_benchmark's zeroshot_retrieval.evaluate, from the scores on: its recall_at_k per k."""
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_to_image)), torch.as_tensor(text_to_image)] = True
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (clip_retrieval.recall_at_k(scores, positive, k) > 0).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (clip_retrieval.recall_at_k(scores.T, positive.T, k) > 0).float().mean().item()
    return metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recall_equals_clip_benchmark_with_ties_and_several_captions_per_image(seed):
    generator = torch.Generator().manual_seed(seed)
    num_images = 40
    # coarse values in {-1, -0.5, 0, 0.5, 1}: dot products are exact, so ties are real ties
    image_emb = torch.randint(-2, 3, (num_images, 8), generator=generator).float() / 2
    image_emb[5] = image_emb[4]  # duplicate images tie for every caption
    captions_per_image = torch.randint(1, 6, (num_images,), generator=generator)  # 1 to 5 captions
    text_to_image = torch.repeat_interleave(torch.arange(num_images), captions_per_image)
    noise = torch.randint(-1, 2, (len(text_to_image), 8), generator=generator).float() / 2
    text_emb = image_emb[text_to_image] + noise
    ks = (1, 5, 10)
    ours = retrieval_metrics(image_emb, text_emb, text_to_image, ks=ks, chunk_size=7)  # chunks must not matter
    reference = _reference_recalls(image_emb, text_emb, text_to_image, ks)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-7), key
    assert 0 < reference["image_retrieval_recall@1"] < 1  # neither trivial nor hopeless


def test_mean_and_median_rank_by_hand():
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text_emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # captions of images 0, 1, 2
    metrics = retrieval_metrics(image_emb, text_emb, [0, 1, 2], ks=(1,))
    # text→image ranks: caption 0 → image 0 first (1); caption 1 → image 1 scores 0, two above (3);
    # caption 2 → image 2 scores 0.8, image 1 above (2)
    assert metrics["image_retrieval_mean_rank"] == pytest.approx(2.0)
    assert metrics["image_retrieval_median_rank"] == pytest.approx(2.0)
    # image→text, where a tie counts against the positive: image 0 → caption 0 ties caption 1 at 1.0 (2);
    # image 1 → caption 1 scores 0, caption 2 above and caption 0 tied (3); image 2 → caption 2 scores 0.8,
    # none above (1)
    assert metrics["text_retrieval_mean_rank"] == pytest.approx(2.0)
    assert metrics["text_retrieval_median_rank"] == pytest.approx(2.0)


def test_the_median_rank_of_an_even_count_is_open_clips():
    """open_clip: floor(median(rank - 1)) + 1, where the median of an even count is the mean of the
    two middle values: ranks 1, 1, 3, 4 give floor(1.0) + 1 = 2 (not the lower middle, 1)."""
    scores = torch.tensor([[1.0, 0.5, 0.2, 0.1], [0.1, 1.0, 0.0, 0.0], [0.9, 0.8, 0.5, 0.1], [0.9, 0.8, 0.7, 0.1]])
    metrics = retrieval_metrics(torch.eye(4), scores, [0, 1, 2, 3], ks=(1,))  # caption j's scores: row j
    assert metrics["image_retrieval_mean_rank"] == pytest.approx(9 / 4)
    assert metrics["image_retrieval_median_rank"] == 2


def test_a_collapsed_model_ranks_last_not_first():
    metrics = retrieval_metrics(torch.zeros(4, 3), torch.zeros(8, 3), [0, 0, 1, 1, 2, 2, 3, 3], ks=(1,))
    assert metrics["image_retrieval_mean_rank"] == metrics["image_retrieval_median_rank"] == 4
    assert metrics["text_retrieval_mean_rank"] == 7  # ahead of its best caption: the other images' six


def test_classification_metrics_equal_scikit_learn():
    """CLIP_benchmark computes these with its own accuracy() and sklearn's balanced_accuracy_score;
    its accuracy() fails on NumPy 2 (float() of a 1-element array), so sklearn's top-k accuracy,
    the same definition, is the reference for acc1 and acc5."""
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 12, (300,), generator=generator)
    logits = torch.randn(300, 12, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels, 12)
    ours = classification_metrics(logits, labels)
    classes = list(range(12))
    assert ours["acc1"] == pytest.approx(top_k_accuracy_score(labels, logits, k=1, labels=classes))
    assert ours["acc5"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=classes))
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(dim=1)))
    assert 0.2 < ours["acc1"] < ours["acc5"] < 1
    # tied logits (a degenerate or quantised model): the prediction is argmax's, the first of the tied
    tied = torch.zeros(6, 10)
    tied[0, [3, 7]] = tied[3, [3, 9]] = tied[4, [0, 1]] = 1.0
    tied[1, 7] = tied[2, 3] = tied[5, 0] = 1.0
    tied_labels = torch.tensor([3, 7, 3, 3, 1, 0])
    assert classification_metrics(tied, tied_labels)["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(tied_labels, tied.argmax(dim=1)))


def test_weighted_knn_votes_by_hand(caplog):
    memory = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[0.6, 0.8]])  # similarities 0.6, 0.96, 0.8, -0.6
    votes = knn_classify(memory, labels, query, num_classes=3, k=3, temperature=0.1)
    expected = torch.tensor([[np.exp(6.0), np.exp(9.6) + np.exp(8.0), 0.0]], dtype=torch.float32) / np.exp(9.6)
    torch.testing.assert_close(votes, expected, rtol=1e-5, atol=0)  # relative to the nearest neighbour's
    one_nn = knn_classify(memory, labels, query, num_classes=3, k=1).argmax(dim=1)
    assert torch.equal(one_nn, nearest_neighbour_predict(memory, labels, query)) and one_nn.item() == 1
    # chunking the queries changes nothing
    queries = torch.nn.functional.normalize(torch.randn(9, 2, generator=torch.Generator().manual_seed(1)), dim=1)
    torch.testing.assert_close(knn_classify(memory, labels, queries, 3, k=2, chunk_size=4),
                               knn_classify(memory, labels, queries, 3, k=2))
    with caplog.at_level("WARNING"):  # more neighbours than the memory has: all of it votes, and that is said
        torch.testing.assert_close(knn_classify(memory, labels, queries, 3, k=9),
                                   knn_classify(memory, labels, queries, 3, k=4))
    assert "k=9, but the memory holds 4 items: every one of them votes, as with k=4" in caplog.text


def test_weighted_knn_votes_do_not_overflow_at_a_small_temperature():
    """exp(0.999 / 0.01) is infinite in fp32: unscaled, both classes would tie at inf."""
    memory = torch.nn.functional.normalize(torch.tensor([[0.9496, 0.3135], [0.999, 0.0447]]), dim=1)
    votes = knn_classify(memory, torch.tensor([0, 1]), torch.tensor([[1.0, 0.0]]), num_classes=2, k=2,
                         temperature=0.01)
    assert torch.isfinite(votes).all() and votes.argmax().item() == 1
    similarities = memory[:, 0].double()  # the query is (1, 0)
    torch.testing.assert_close(votes[0], torch.exp((similarities - similarities[1]) / 0.01).float(), rtol=1e-4, atol=0)
    # at T = 1e-4 the first class's vote, exp(-0.05 / 1e-4), underflows: it is still a vote, above a class
    # no neighbour chose
    votes = knn_classify(memory, torch.tensor([0, 1]), torch.tensor([[1.0, 0.0]]), num_classes=3, k=2,
                         temperature=1e-4)
    assert votes[0, 1] == 1.0 and 0 < votes[0, 0] < 1e-30 and votes[0, 2] == 0


def test_blocked_knn_over_the_memory_equals_a_full_matrix_in_numpy():
    """Memory scored in blocks of 7 (a running top-k), queries in chunks of 3: the votes equal numpy's
    full similarity matrix, argsort and weighted vote."""
    generator = torch.Generator().manual_seed(2)
    memory = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(10, 8, generator=generator), dim=1)
    labels = torch.randint(0, 4, (50,), generator=generator)
    similarity = queries.numpy() @ memory.numpy().T
    expected = np.zeros((10, 4), dtype=np.float64)
    for row in range(10):
        for column in np.argsort(-similarity[row])[:5]:
            expected[row, labels[column]] += np.exp((similarity[row, column] - similarity[row].max()) / 0.07)
    votes = knn_classify(memory, labels, queries, 4, k=5, chunk_size=3, memory_chunk_size=7)
    torch.testing.assert_close(votes, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=0)
    small_blocks = knn_classify(memory, labels, queries, 4, k=5, chunk_size=3, memory_chunk_size=2)  # blocks < k
    torch.testing.assert_close(small_blocks, votes)


def _numpy_fewshot(train_x, train_y, test_x, test_y, num_classes, shots, seed, l2):
    """CLIPPO's probe written out in numpy with the primal solve only: the same sampling order."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(train_y == c)
        chosen.extend(members[torch.randperm(len(members), generator=generator)[:shots].numpy()])
    x = train_x[chosen].astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5  # big_vision's jnp.std: the population std
    design = np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])
    targets = 2.0 * np.eye(num_classes)[train_y[chosen]] - 1.0
    weights = np.linalg.solve(design.T @ design + l2 * np.eye(design.shape[1]), design.T @ targets)
    test = np.hstack([(test_x - mean) / std, np.full((len(test_x), 1), 100.0)])
    return float(((test @ weights).argmax(axis=1) == test_y).mean())


@pytest.mark.parametrize("num_classes, shots, num_test", [
    (5, 10, 200),  # 10 shots × 5 classes = 50 rows < 65 features: the dual solve runs
    (10, 1, 4000), (10, 2, 4000),  # with so few shots, an n−1 std would shift the accuracy: 4,000 test points see it
])
def test_fewshot_ridge_probe_equals_a_primal_numpy_solve(num_classes, shots, num_test):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(num_classes, 64))
    train_y, test_y = rng.integers(0, num_classes, 400), rng.integers(0, num_classes, num_test)
    train_x = centres[train_y] + 2.0 * rng.normal(size=(400, 64))
    test_x = centres[test_y] + 2.0 * rng.normal(size=(num_test, 64))
    result = ridge_fewshot_probe(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                                 torch.from_numpy(test_y), num_classes, shots=shots, seeds=(0, 1, 2))
    expected = [_numpy_fewshot(train_x, train_y, test_x, test_y, num_classes, shots, seed, 1024.0)
                for seed in (0, 1, 2)]
    assert result["acc1_per_seed"] == pytest.approx(expected)
    assert result["acc1"] == pytest.approx(np.mean(expected))
    assert 0.3 < result["acc1"] < 1.0
    with pytest.raises(OpenAlignError, match="fewer than 200 shots"):
        ridge_fewshot_probe(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                            torch.from_numpy(test_y), num_classes, shots=200)


def test_logistic_regression_probe_equals_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from openalign.eval import logistic_regression_probe
    from openalign.eval.probe import _fit_and_score, fit_logistic_regression

    rng = np.random.default_rng(1)
    num_classes, dim = 4, 16
    centres = rng.normal(size=(num_classes, dim))
    train_y, test_y = rng.integers(0, num_classes, 300), rng.integers(0, num_classes, 150)
    train_x = centres[train_y] + 1.5 * rng.normal(size=(300, dim))
    test_x = centres[test_y] + 1.5 * rng.normal(size=(150, dim))
    train_x, test_x = 5.0 * train_x + 3.0, 5.0 * test_x + 3.0  # not standardised: the two fits differ
    args = (torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x), torch.from_numpy(test_y),
            num_classes)
    # CLIP's probe: scikit-learn on the features as they are
    raw = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(train_x, train_y)
    ours = logistic_regression_probe(*args, c=0.5)
    np.testing.assert_allclose(ours["lp_acc1"], float((raw.predict(test_x) == test_y).mean()))
    _, our_logits = _fit_and_score(*args, 0.5, 1000, standardize=False)
    np.testing.assert_allclose(our_logits.softmax(-1).numpy(), raw.predict_proba(test_x), atol=1e-5)
    logits = torch.from_numpy(raw.decision_function(test_x))
    expected = {f"lp_{key}": value for key, value in classification_metrics(logits, torch.from_numpy(test_y)).items()}
    assert ours == pytest.approx({**expected, "c": 0.5}, abs=1e-6, nan_ok=True)  # acc5 is NaN below 5 classes
    # standardize=True: standardised as sklearn's StandardScaler does (the population std), plus our 1e-5
    scaler = StandardScaler().fit(train_x)
    scale = scaler.scale_ + 1e-5
    reference = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit((train_x - scaler.mean_) / scale, train_y)
    standardized = logistic_regression_probe(*args, c=0.5, standardize=True)
    predicted = reference.predict((test_x - scaler.mean_) / scale)
    assert standardized["lp_acc1"] == pytest.approx(float((predicted == test_y).mean()))
    assert 0.4 < standardized["lp_acc1"] < 1.0
    _, standardized_logits = _fit_and_score(*args, 0.5, 1000, standardize=True)  # the probe's own standardising
    np.testing.assert_allclose(standardized_logits.softmax(-1).numpy(),
                               reference.predict_proba((test_x - scaler.mean_) / scale), atol=1e-5)
    # the objective is strictly convex: the fitted weights themselves must agree (up to the
    # softmax's shift invariance, which the penalty pins for W but not for the bias)
    weight, bias = fit_logistic_regression(torch.from_numpy((train_x - scaler.mean_) / scale),
                                           torch.from_numpy(train_y), num_classes, c=0.5)
    np.testing.assert_allclose(weight.numpy().T, reference.coef_, atol=1e-4)
    np.testing.assert_allclose(bias.numpy() - bias.numpy().mean(), reference.intercept_ - reference.intercept_.mean(),
                               atol=1e-4)


def test_c_search_halves_its_step_around_the_peak_down_to_eight_points_a_decade():
    from openalign.eval.probe import search_c

    scored = []

    def peaked(c):  # best at 10^1.375; 10^1.25 and 10^1.5 tie on the way, and the smaller wins
        scored.append(round(math.log10(c), 3))
        return -abs(math.log10(c) - 1.375)

    assert search_c(peaked) == pytest.approx(10 ** 1.375)
    assert scored == [-6, -4, -2, 0, 2, 4, 6, 1, 3, 0.5, 1.5, 1.25, 1.75, 1.125, 1.375]  # 15 fits, not 97
    assert search_c(lambda c: 0.5) == pytest.approx(1e-6)  # ties: the strongest regularisation


def test_logistic_regression_probe_chooses_c_on_held_out_training_examples():
    from sklearn.linear_model import LogisticRegression

    from openalign.eval import logistic_regression_probe
    from openalign.eval.probe import search_c, stratified_split

    rng = np.random.default_rng(2)  # few noisy examples in many dimensions: strong regularisation wins
    num_classes, dim = 3, 40
    centres = rng.normal(size=(num_classes, dim))
    train_y, test_y = np.repeat(np.arange(num_classes), 20), rng.integers(0, num_classes, 300)
    train_x = 0.3 * centres[train_y] + rng.normal(size=(60, dim))
    test_x = 0.3 * centres[test_y] + rng.normal(size=(300, dim))
    args = (torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x), torch.from_numpy(test_y),
            num_classes)
    chosen = logistic_regression_probe(*args, c=None)
    assert chosen == logistic_regression_probe(*args, c=chosen["c"])  # then refitted on all training examples

    fit, held_out = (rows.numpy() for rows in stratified_split(torch.from_numpy(train_y), 0.2, seed=0))
    assert len(held_out) == 12 and set(train_y[held_out]) == {0, 1, 2}  # 4 of each class's 20
    assert sorted(np.concatenate([fit, held_out])) == list(range(60))

    def held_out_accuracy(c):  # scikit-learn's fit on the same rows, scored on the held-out ones
        model = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(train_x[fit], train_y[fit])
        return float((model.predict(train_x[held_out]) == train_y[held_out]).mean())

    # the same search over scikit-learn's held-out scores picks the same C (scoring on the test
    # set, or on training rows the fit saw, would pick another)
    assert chosen["c"] == pytest.approx(search_c(held_out_accuracy))
    assert chosen["c"] < 1.0


def _clip_benchmark_linear_probe(monkeypatch, tmp_path, features, fewshot_k, seed, batch_size):
    """CLIP_benchmark's linear_probe.evaluate, run on the CPU: its features cached where it reads
    them, its .cuda() and 'cuda' moves made no-ops (it asserts device == 'cuda'), AMP off, and its
    top-k accuracy helper written for numpy 2."""
    linear_probe = pytest.importorskip("clip_benchmark.metrics.linear_probe")
    cache = tmp_path / "features" / "model"
    cache.mkdir(parents=True)
    for split, (x, y) in features.items():
        torch.save(x, cache / f"features_{split}.pt")
        torch.save(y, cache / f"targets_{split}.pt")
    original_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: original_to(
        self, *("cpu" if arg == "cuda" else arg for arg in args), **kwargs))

    def accuracy(output, target, topk=(1,)):  # its own, without float() of a 1-element array (numpy 2.x refuses)
        correct = output.topk(max(topk), 1, True, True)[1].t().eq(target.view(1, -1))
        return [correct[:k].float().sum().item() / len(target) for k in topk]

    monkeypatch.setattr(linear_probe, "accuracy", accuracy)
    torch.manual_seed(seed)  # its few-shot permutation draws from the global generator
    return linear_probe.evaluate(
        torch.nn.Identity(), None, None, fewshot_k, batch_size, 0, 0.1, 10, "model", seed, str(tmp_path / "features"),
        "cuda", val_dataloader=[] if "val" in features else None, amp=False)


def _probe_clusters(num_classes, counts, dim=8, seed=0):
    """Normalised, overlapping Gaussian clusters: (features, labels) for each of ``counts``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    splits = []
    for count in counts:
        labels = np.arange(count) % num_classes
        x = torch.from_numpy(0.6 * centres[labels] + rng.normal(size=(count, dim))).float()
        splits.append((torch.nn.functional.normalize(x, dim=1), torch.from_numpy(labels)))
    return splits


@pytest.mark.parametrize("fewshot_k, with_val, num_classes", [(-1, True, 6), (4, True, 6), (-1, False, 6),
                                                             (5, False, 6), (-1, True, 5)])
def test_adamw_linear_probe_equals_clip_benchmarks(monkeypatch, tmp_path, fewshot_k, with_val, num_classes):
    from openalign.eval.probe import adamw_linear_probe, clip_benchmark_probe_rows

    train, val, test = _probe_clusters(num_classes, (60, 30, 120))
    features = {"train": train, "test": test, **({"val": val} if with_val else {})}
    seed = 3
    # one batch an epoch: CLIP_benchmark shuffles with its DataLoader's draws, openalign with its
    # own generator, so that only the order within the batch (float rounding) differs
    reference = _clip_benchmark_linear_probe(monkeypatch, tmp_path, features, fewshot_k, seed, batch_size=128)
    monkeypatch.undo()
    rows, held_out = clip_benchmark_probe_rows(train[1], num_classes, fewshot_k, seed)
    assert held_out is None
    ours = adamw_linear_probe(train[0][rows], train[1][rows], *test, num_classes,
                              *(val if with_val else (None, None)), fewshot_k=fewshot_k, lr=0.1, epochs=10,
                              batch_size=128, seed=seed)
    assert ours["weight_decay"] == reference["weight_decay"]
    for key in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"):
        assert ours[key] == pytest.approx(reference[key], abs=1e-12, nan_ok=True), key
    assert math.isnan(ours["lp_acc5"]) == (num_classes < 6)  # its top-5 needs a test label of 5 or more
    assert {key: ours[key] for key in ("epochs", "seed", "fewshot_k", "normalized")} == {
        key: reference[key] for key in ("epochs", "seed", "fewshot_k", "normalized")}
    if with_val and fewshot_k < 0 and num_classes == 6:  # a sweep that chose other than its first or last point
        assert 1e-6 < ours["weight_decay"] < 1e2, ours["weight_decay"]


@pytest.mark.parametrize("count, proportion", [(10, 0.2), (11, 0.25), (7, 0.5), (1000, 0.1)])
def test_the_probes_held_out_rows_are_torchs_random_split(count, proportion):
    from openalign.eval.probe import random_split_rows

    kept, held_out = random_split_rows(count, proportion, torch.Generator().manual_seed(5))
    reference = torch.utils.data.random_split(range(count), [1 - proportion, proportion],
                                              generator=torch.Generator().manual_seed(5))
    assert kept.tolist() == reference[0].indices and held_out.tolist() == reference[1].indices


def test_the_probes_few_shot_rows_are_the_first_k_of_each_class_in_a_permutation():
    from openalign.eval.probe import clip_benchmark_probe_rows

    for seed, count, num_classes, k in ((4, 12, 3, 2), (0, 500, 7, 9), (1, 300, 13, 1)):
        labels = torch.arange(count) % num_classes
        labels = labels[torch.randperm(count, generator=torch.Generator().manual_seed(100 + seed))]
        rows, _ = clip_benchmark_probe_rows(labels, num_classes, fewshot_k=k, seed=seed)
        permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        expected, taken = [], [0] * num_classes  # CLIP_benchmark's loop, by hand
        for row in permutation:
            if taken[int(labels[row])] < k:
                taken[int(labels[row])] += 1
                expected.append(row)
        assert rows.tolist() == expected
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1])
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(4)).tolist()
    assert clip_benchmark_probe_rows(labels, 3, fewshot_k=-1, seed=4)[0].tolist() == permutation
    rows, held_out = clip_benchmark_probe_rows(labels, 3, fewshot_k=1, seed=4, val_proportion=0.25)
    assert len(held_out) == 3 and not set(rows.tolist()) & set(held_out.tolist())
    assert sorted(labels[rows].tolist()) == [0, 1, 2]
    with pytest.raises(OpenAlignError, match="class 2 has 3 training examples, fewer than fewshot_k=4"):
        clip_benchmark_probe_rows(labels, 3, fewshot_k=4)
    with pytest.raises(OpenAlignError, match="class 'c' has 1 training example once 6 are held out, fewer than "
                                             "fewshot_k=2"):
        clip_benchmark_probe_rows(labels, 3, fewshot_k=2, seed=1, val_proportion=0.5, class_names="abc")
    with pytest.raises(OpenAlignError, match="val_proportion is 1.5: a share .* between 0 and 1"):
        clip_benchmark_probe_rows(labels, 3, val_proportion=1.5)
    with pytest.raises(OpenAlignError, match="a share of 0.01 of 12 training examples holds out 0 and keeps 12"):
        clip_benchmark_probe_rows(labels, 3, val_proportion=0.01)
    with pytest.raises(OpenAlignError, match="fewshot_k must be at least 1"):
        clip_benchmark_probe_rows(labels, 3, fewshot_k=0)
