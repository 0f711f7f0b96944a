"""``train.freeze``: parameters that training leaves as they are (LiT's locked image tower,
open_clip's ``--lock-image`` / ``--lock-text``), named by prefix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError


def freeze(model: nn.Module, prefixes: Sequence[str]) -> tuple[int, int]:
    """Stop training the parameters whose names start with one of ``prefixes`` (a whole name, or a
    module's: ``image_tower`` freezes ``image_tower.*``, not ``image_tower_x``); returns ``(frozen,
    total)`` parameter counts. They get no gradient, so no optimiser holds them and DDP leaves them out.

    A batch-norm layer whose parameters are all frozen also keeps its running statistics: it
    normalises with them, in training too, as open_clip's locked towers do (``freeze_bn_stats``); a
    frozen tower is then the function it was, as LiT locks it.
    """
    names = dict(model.named_parameters())
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            raise ConfigError(f"names '{prefix}', which no parameter is or is under; the model's parts: "
                              f"{', '.join(tops)} (e.g. train.freeze=[image_tower])", "train.freeze")
    frozen = 0
    for name, param in names.items():
        if any(_under(name, prefix) for prefix in prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None and \
                not module.weight.requires_grad and (module.bias is None or not module.bias.requires_grad):
            module.register_forward_pre_hook(_keep_running_statistics)
    return frozen, sum(param.numel() for param in names.values())


def _under(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _keep_running_statistics(module: nn.Module, args: Any) -> None:
    module.training = False  # model.train() sets it again; this runs before every forward pass
