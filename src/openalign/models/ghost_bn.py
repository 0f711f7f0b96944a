"""Ghost batch normalisation, as COYO-ALIGN uses it (shared spec align-coyo-and-hf.md §3.4)."""

from __future__ import annotations

import torch
from torch import nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics come from ghost batches of ``virtual_batch_size``.

    In training, each device's batch of b examples is normalised in b / virtual_batch_size
    ghost batches, each with its own (biased) mean and variance, never synchronised across
    devices: this simulates the 16-examples-per-core BN of ALIGN's TPU runs. As in Keras'
    ``BatchNormalization(virtual_batch_size=v)``, which reshapes the batch to [v, b/v, ...] and
    reduces over the first axis, ghost batch g is the strided set {g, g + b/v, g + 2b/v, ...}.
    That grouping is also a zero-copy view of a contiguous batch, so the native batch-norm
    kernel does the work. The running statistics are updated once per step with the mean over
    ghost batches of their means and (biased) variances. In eval mode, or with
    ``virtual_batch_size=None``, this is exactly ``nn.BatchNorm2d`` of the same ``eps`` and
    ``momentum``, with the same state-dict keys. Their defaults are ALIGN's (Keras'), not
    ``nn.BatchNorm2d``'s (1e-5 and 0.1): ``eps`` 1e-3, and ``momentum`` 0.01, in PyTorch's
    convention: Keras' 0.99.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int | None = 16,
        eps: float = 1e-3,
        momentum: float = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        if virtual_batch_size is not None and virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive integer or None, got {virtual_batch_size}")
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.virtual_batch_size is None:
            return super().forward(x)
        n, channels = x.shape[0], x.shape[1]
        size = self.virtual_batch_size
        if n % size:
            raise ValueError(
                f"GhostBatchNorm2d got a per-device batch of {n} examples, which is not a multiple of "
                f"virtual_batch_size={size}: make the per-device batch a multiple of {size}, "
                "or set the model's virtual_batch_size to null for standard batch norm"
            )
        groups = n // size
        ghost = x.contiguous().view(size, groups * channels, *x.shape[2:])
        weight = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        out, mean, invstd = torch.native_batch_norm(ghost, weight, bias, None, None, True, 0.0, self.eps)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.view(groups, channels), invstd.view(groups, channels))
        return out.view_as(x).contiguous(memory_format=_memory_format(x))

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, invstd: torch.Tensor) -> None:
        var = invstd.float().pow(-2) - self.eps
        self.running_mean.lerp_(mean.float().mean(dim=0).to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(var.mean(dim=0).to(self.running_var.dtype), self.momentum)
        self.num_batches_tracked.add_(1)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
