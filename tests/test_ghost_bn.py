"""Ghost batch norm against independent references: nn.BatchNorm2d, per-group F.batch_norm, numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openalign.models import GhostBatchNorm2d


def _pair(size, **kwargs):
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(6, virtual_batch_size=size, **kwargs)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
    return ghost


def test_without_virtual_batch_it_is_batchnorm2d():
    ghost = _pair(None)
    reference = nn.BatchNorm2d(6, eps=1e-3, momentum=0.01)
    reference.load_state_dict(ghost.state_dict())
    x = torch.randn(10, 6, 5, 5) * 3 + 1
    torch.testing.assert_close(ghost(x), reference(x))
    torch.testing.assert_close(ghost.running_var, reference.running_var)
    ghost.eval(), reference.eval()
    torch.testing.assert_close(ghost(x), reference(x))
    assert set(ghost.state_dict()) == set(reference.state_dict())


def test_each_strided_ghost_batch_is_normalised_on_its_own():
    """Keras' grouping: the batch reshaped to [virtual, b / virtual]; ghost batch g = rows g, g + b/v, ..."""
    ghost = _pair(4)
    x = (torch.randn(12, 6, 3, 3) * torch.arange(1, 13).view(12, 1, 1, 1)).requires_grad_()
    out = ghost(x)
    expected = torch.empty_like(out)
    for g in range(3):
        rows = torch.arange(g, 12, 3)
        expected[rows] = F.batch_norm(x[rows], None, None, ghost.weight, ghost.bias, training=True, eps=1e-3)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    grad, = torch.autograd.grad((out * upstream).sum(), x)
    expected_grad, = torch.autograd.grad((expected * upstream).sum(), x)
    torch.testing.assert_close(grad, expected_grad)


def test_running_statistics_average_the_ghost_batches():
    ghost = _pair(4)
    x = torch.randn(8, 6, 4, 4) * 2 + 0.5
    ghost(x)
    groups = x.numpy().reshape(4, 2, 6, 4, 4)  # [virtual, groups, C, H, W]
    means = groups.mean(axis=(0, 3, 4))  # (groups, C)
    variances = groups.var(axis=(0, 3, 4))  # biased, as Keras
    np.testing.assert_allclose(ghost.running_mean.numpy(), 0.01 * means.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ghost.running_var.numpy(), 0.99 + 0.01 * variances.mean(axis=0), rtol=1e-5)
    assert int(ghost.num_batches_tracked) == 1


def test_eval_mode_uses_running_statistics_for_any_batch_size():
    ghost = _pair(4)
    for _ in range(3):
        ghost(torch.randn(8, 6, 4, 4))
    ghost.eval()
    x = torch.randn(3, 6, 4, 4)  # not a multiple of 4: fine at inference
    expected = F.batch_norm(x, ghost.running_mean, ghost.running_var, ghost.weight, ghost.bias, False, 0.0, 1e-3)
    torch.testing.assert_close(ghost(x), expected)


def test_batch_not_a_multiple_of_virtual_batch_is_a_clear_error():
    ghost = _pair(16)
    with pytest.raises(ValueError, match="not a multiple of virtual_batch_size=16"):
        ghost(torch.randn(24, 6, 2, 2))


def test_channels_last_input_gives_the_same_values_and_keeps_its_layout():
    ghost = _pair(4)
    x = torch.randn(8, 6, 5, 5)
    expected = ghost(x)
    out = ghost(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_efficientnet_uses_ghost_bn_with_align_settings():
    from openalign import create_model

    norms = [m for m in create_model("align-b3-mini").image_tower.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, GhostBatchNorm2d) for m in norms)
    assert {(m.virtual_batch_size, m.eps, m.momentum) for m in norms} == {(16, 1e-3, 0.01)}
