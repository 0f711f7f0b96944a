"""ALIGN's contrastive loss against a hand-written formula and Hugging Face's align_loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openalign.losses import ContrastiveLoss, ContrastiveLossConfig


def _embeddings(n=6, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
    return image, text


def _smoothed_cross_entropy(logits: np.ndarray, epsilon: float) -> float:
    """Keras categorical_crossentropy(from_logits, label_smoothing): targets (1-ε)·onehot + ε/C, mean over rows."""
    n = logits.shape[0]
    targets = (1 - epsilon) * np.eye(n) + epsilon / n
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-(targets * log_softmax).sum(axis=1).mean())


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_loss_is_the_sum_of_both_smoothed_directions(epsilon):
    image, text = _embeddings()
    scale = torch.tensor(7.5, dtype=torch.float64)
    loss = ContrastiveLoss(label_smoothing=epsilon)(image, text, scale)
    logits = (scale * image @ text.T).numpy()
    expected = _smoothed_cross_entropy(logits, epsilon) + _smoothed_cross_entropy(logits.T, epsilon)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert ContrastiveLoss(label_smoothing=epsilon)(image, text, 7.5).item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_twice_hugging_face_align_loss():
    """HF's align_loss averages the two directions where COYO-ALIGN sums them (spec §6.2)."""
    from transformers.models.align.modeling_align import align_loss

    image, text = _embeddings(n=8, seed=3)
    scale = torch.tensor(20.0, dtype=torch.float64)
    ours = ContrastiveLoss(label_smoothing=0.1)(image, text, scale)
    assert ours.item() == pytest.approx(2 * align_loss(scale * text @ image.T).item(), rel=1e-6)


def test_logits_are_computed_in_fp32_from_bf16_embeddings():
    image, text = (t.float() for t in _embeddings(n=4, dim=8))
    reference = ContrastiveLoss()(image, text, torch.tensor(10.0))
    loss = ContrastiveLoss()(image.bfloat16(), text.bfloat16(), torch.tensor(10.0))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)


def test_gradient_reaches_the_temperature_and_both_towers():
    image, text = (t.float().requires_grad_() for t in _embeddings())
    scale = torch.tensor(5.0, requires_grad=True)
    ContrastiveLoss()(image, text, scale).backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and scale.grad != 0


def test_loss_records_each_direction():
    image, text = _embeddings()
    loss_fn = ContrastiveLoss()
    loss = loss_fn(image, text, torch.tensor(3.0, dtype=torch.float64))
    assert set(loss_fn.last_stats) == {"loss_i2t", "loss_t2i"}
    logits = 3.0 * (image @ text.T).numpy()  # rows: images, columns: texts
    assert loss_fn.last_stats["loss_i2t"].item() == pytest.approx(_smoothed_cross_entropy(logits, 0.1))
    assert loss_fn.last_stats["loss_t2i"].item() == pytest.approx(_smoothed_cross_entropy(logits.T, 0.1))
    assert loss_fn.last_stats["loss_i2t"].item() != pytest.approx(loss_fn.last_stats["loss_t2i"].item())
    assert loss.item() == pytest.approx((loss_fn.last_stats["loss_i2t"] + loss_fn.last_stats["loss_t2i"]).item())


def test_config_rejects_out_of_range_smoothing():
    from openalign.errors import ConfigError

    with pytest.raises(ConfigError, match="label_smoothing"):
        ContrastiveLossConfig(label_smoothing=1.5)


def test_unpaired_batches_and_bad_smoothing_are_clear_errors():
    embeddings = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="row i of the image embeddings with row i of the text embeddings, but got "
                                         "4 images and 3 texts"):
        ContrastiveLoss()(embeddings, embeddings[:3], torch.tensor(10.0))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got -1"):
        ContrastiveLoss(label_smoothing=-1)
