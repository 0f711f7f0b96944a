"""EfficientNet exactly as ALIGN uses it (shared spec align-coyo-and-hf.md §1.1 and §6.2).

Differences from a classification EfficientNet, all taken from COYO-ALIGN's Keras model:
no top 1x1 conv head (the embedding is the global mean of the last block's BN output), ghost
batch norm with eps 1e-3, per-sample drop-connect, and TF's "unknown input size" padding:
the stem pads (0, 1) and stride-2 depthwise convs pad (k//2 - 1, k//2) on each axis.

Module and parameter names follow Hugging Face's ``AlignVisionModel`` (``embeddings.*``,
``encoder.blocks.{i}.*``), so ``kakaobrain/align-base`` vision weights load by prefix alone.
timm's EfficientNets cannot express that padding, which is why this tower is written here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint
from torchvision.ops import stochastic_depth

from ..errors import ConfigError, OpenAlignError
from .base import ImageTowerConfig
from .ghost_bn import GhostBatchNorm2d

NormLayer = Callable[[int], nn.Module]  # builds a batch norm for a channel count


@dataclass
class EfficientNetConfig(ImageTowerConfig, tag="efficientnet"):
    """EfficientNet scaled by width and depth from the B0 base stages (Keras defaults).

    ``batch_norm_momentum`` uses PyTorch's convention (0.01 = Keras 0.99);
    ``virtual_batch_size`` is the ghost-BN group size, or None for standard batch norm.
    """

    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    depth_divisor: int = 8
    kernel_sizes: tuple[int, ...] = (3, 3, 5, 3, 5, 5, 3)
    strides: tuple[int, ...] = (1, 2, 2, 2, 1, 2, 1)
    in_channels: tuple[int, ...] = (32, 16, 24, 40, 80, 112, 192)
    out_channels: tuple[int, ...] = (16, 24, 40, 80, 112, 192, 320)
    num_block_repeats: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
    expand_ratios: tuple[int, ...] = (1, 6, 6, 6, 6, 6, 6)
    squeeze_expansion_ratio: float = 0.25
    drop_connect_rate: float = 0.2
    batch_norm_eps: float = 1e-3
    batch_norm_momentum: float = 0.01
    virtual_batch_size: int | None = 16

    def __post_init__(self) -> None:
        lengths = {len(getattr(self, name)) for name in
                   ("kernel_sizes", "strides", "in_channels", "out_channels", "num_block_repeats", "expand_ratios")}
        if len(lengths) != 1:
            raise ConfigError("and strides, in_channels, out_channels, num_block_repeats and expand_ratios "
                              "must have one entry per stage (the same length)", "kernel_sizes")
        if any(s not in (1, 2) for s in self.strides):
            raise ConfigError(f"must all be 1 or 2, got {list(self.strides)}", "strides")
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise ConfigError(f"must all be odd, got {list(self.kernel_sizes)}", "kernel_sizes")
        if self.virtual_batch_size is not None and self.virtual_batch_size < 1:
            raise ConfigError("must be a positive integer, or null for standard batch norm", "virtual_batch_size")
        if not 0.0 <= self.drop_connect_rate < 1.0:
            raise ConfigError("must be in [0, 1)", "drop_connect_rate")

    def round_filters(self, channels: int) -> int:
        """Channels scaled by width, rounded to the divisor, never more than 10% down (Keras)."""
        scaled = channels * self.width_coefficient
        rounded = max(self.depth_divisor, int(scaled + self.depth_divisor / 2) // self.depth_divisor * self.depth_divisor)
        if rounded < 0.9 * scaled:
            rounded += self.depth_divisor
        return int(rounded)

    def round_repeats(self, repeats: int) -> int:
        return int(math.ceil(self.depth_coefficient * repeats))

    @property
    def output_dim(self) -> int:
        return self.round_filters(self.out_channels[-1])

    def build(self) -> EfficientNet:
        return EfficientNet(self)


class ConvNorm(nn.Module):
    """A convolution and the batch norm after it, which inference can fold into one convolution.

    ``folded_names`` names the two attributes (Hugging Face's names, which vary by layer).
    """

    folded_names: ClassVar[tuple[str, str]]

    def fold(self) -> None:
        """Replace the convolution by one that applies the batch norm's eval-mode affine map too,
        and the batch norm by the identity."""
        conv_name, norm_name = self.folded_names
        setattr(self, conv_name, fuse_conv_bn_eval(getattr(self, conv_name), getattr(self, norm_name)))
        setattr(self, norm_name, nn.Identity().eval())  # eval like the rest of the folded tower


class Stem(ConvNorm):
    """3x3 stride-2 conv padded (0, 1) on each axis, BN, SiLU."""

    folded_names = ("convolution", "batchnorm")

    def __init__(self, out_dim: int, norm: NormLayer) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(3, out_dim, kernel_size=3, stride=2, bias=False)
        self.batchnorm = norm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.batchnorm(self.convolution(F.pad(x, (0, 1, 0, 1)))))


class Expansion(ConvNorm):
    folded_names = ("expand_conv", "expand_bn")

    def __init__(self, in_dim: int, out_dim: int, norm: NormLayer) -> None:
        super().__init__()
        self.expand_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
        self.expand_bn = norm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.expand_bn(self.expand_conv(x)))


class Depthwise(ConvNorm):
    """Depthwise conv: "same" padding at stride 1, TF's asymmetric (k//2 - 1, k//2) at stride 2."""

    folded_names = ("depthwise_conv", "depthwise_norm")

    def __init__(self, dim: int, kernel_size: int, stride: int, norm: NormLayer) -> None:
        super().__init__()
        half = kernel_size // 2
        self.pad = (half - 1, half, half - 1, half) if stride == 2 else None
        self.depthwise_conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, groups=dim, bias=False,
                                        padding=0 if stride == 2 else half)
        self.depthwise_norm = norm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return F.silu(self.depthwise_norm(self.depthwise_conv(x)))


class SqueezeExcite(nn.Module):
    """Channel gating; the bottleneck width comes from the block's input channels (Keras)."""

    def __init__(self, dim: int, squeeze_dim: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, squeeze_dim, kernel_size=1)
        self.expand = nn.Conv2d(squeeze_dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.silu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class Projection(ConvNorm):
    folded_names = ("project_conv", "project_bn")

    def __init__(self, in_dim: int, out_dim: int, norm: NormLayer) -> None:
        super().__init__()
        self.project_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
        self.project_bn = norm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_bn(self.project_conv(x))


class MBConvBlock(nn.Module):
    """Inverted-residual block; residual with per-sample drop-connect on all but a stage's first block."""

    def __init__(self, cfg: EfficientNetConfig, in_dim: int, out_dim: int, stride: int, kernel_size: int,
                 expand_ratio: int, drop_rate: float, residual: bool, norm: NormLayer) -> None:
        super().__init__()
        hidden = in_dim * expand_ratio
        self.expansion = Expansion(in_dim, hidden, norm) if expand_ratio != 1 else None
        self.depthwise_conv = Depthwise(hidden, kernel_size, stride, norm)
        self.squeeze_excite = SqueezeExcite(hidden, max(1, int(in_dim * cfg.squeeze_expansion_ratio)))
        self.projection = Projection(hidden, out_dim, norm)
        self.residual = residual
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expansion(x) if self.expansion is not None else x
        h = self.projection(self.squeeze_excite(self.depthwise_conv(h)))
        if self.residual:
            h = stochastic_depth(h, self.drop_rate, "row", self.training) + x
        return h


class EfficientNet(nn.Module):
    """ALIGN's image tower: pixels in [-1, 1] → globally mean-pooled features (N, output_dim)."""

    def __init__(self, cfg: EfficientNetConfig) -> None:
        super().__init__()
        norm = partial(GhostBatchNorm2d, virtual_batch_size=cfg.virtual_batch_size,
                       eps=cfg.batch_norm_eps, momentum=cfg.batch_norm_momentum)
        self.embeddings = Stem(cfg.round_filters(32), norm)
        self.encoder = nn.Module()
        self.encoder.blocks = nn.ModuleList(self._blocks(cfg, norm))
        self.output_dim = cfg.output_dim
        self.batch_norm_folded = False
        self.grad_checkpointing = False
        self.apply(_init_weights)

    @staticmethod
    def _blocks(cfg: EfficientNetConfig, norm: NormLayer) -> list[MBConvBlock]:
        total = sum(cfg.round_repeats(n) for n in cfg.num_block_repeats)
        blocks = []
        for stage, repeats in enumerate(cfg.num_block_repeats):
            in_dim, out_dim = cfg.round_filters(cfg.in_channels[stage]), cfg.round_filters(cfg.out_channels[stage])
            for j in range(cfg.round_repeats(repeats)):
                blocks.append(MBConvBlock(
                    cfg, in_dim if j == 0 else out_dim, out_dim,
                    stride=cfg.strides[stage] if j == 0 else 1,
                    kernel_size=cfg.kernel_sizes[stage], expand_ratio=cfg.expand_ratios[stage],
                    drop_rate=cfg.drop_connect_rate * len(blocks) / total, residual=j > 0, norm=norm,
                ))
        return blocks

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last block's feature map (N, output_dim, h, w), before pooling."""
        x = self.embeddings(pixels)
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.encoder.blocks:
            x = _checkpointed(block, x) if checkpointed else block(x)
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input in training and recompute the block in the backward pass
        (timm's name): activation memory for one block at a time, for one more forward pass."""
        self.grad_checkpointing = enable

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_features(pixels).mean(dim=(2, 3))

    @torch.no_grad()
    def fold_batch_norm(self) -> None:
        """Fold every batch norm into the convolution before it, for inference.

        Each eval-mode batch norm is an affine map per channel, so the convolution can apply it:
        one pass over each feature map fewer, with outputs equal to float rounding. Afterwards the
        tower is for inference only: it refuses training mode, and its state dict no longer
        matches checkpoints (save the model it was made from). Needs eval mode.
        """
        if self.training:
            raise OpenAlignError("batch norm can be folded only in eval mode (it folds the running statistics): "
                                 "call .eval() first")
        if self.batch_norm_folded:
            return
        for module in list(self.modules()):
            if isinstance(module, ConvNorm):
                module.fold()
        self.batch_norm_folded = True

    def train(self, mode: bool = True) -> EfficientNet:
        if mode and self.batch_norm_folded:
            raise OpenAlignError("this EfficientNet's batch norms are folded into its convolutions for inference "
                                 "(optimize_for_inference), so it cannot train: train the model it was made from")
        return super().train(mode)


def _checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)``, recomputed in the backward pass. The recomputation runs the block's batch norms
    again, on the same inputs, with the same drop-connect (the random state is replayed): in eager
    mode their running statistics are set back after it, so that they are updated once per step, as
    without checkpointing. A compiled graph recomputes only what the gradient needs, never the
    buffers' update, and takes no such context (``torch.compile`` accepts none): that holds while
    the block compiles whole (a graph break inside it would run this eagerly, updating twice; a
    test keeps it whole) and with an AOT backend (inductor, ``aot_eager``: the ``eager`` backend
    cannot differentiate the block's in-place update of its buffers)."""
    if torch.compiler.is_compiling():
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(block)))


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Set ``module``'s buffers (batch-norm running statistics and counters) back to their values on entry."""
    saved = [buffer.clone() for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)


def _init_weights(module: nn.Module) -> None:
    """Keras EfficientNet init: VarianceScaling(2.0, fan_out, truncated normal); zero biases."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        std = math.sqrt(2.0 / fan_out) / 0.87962566103423978  # std of a unit normal truncated at ±2
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
