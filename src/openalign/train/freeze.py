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

    A module whose parameters are all frozen (the largest such: ``image_tower`` itself) also runs
    as at inference, in training too: batch norm normalises with its running statistics and keeps
    them, dropout and drop-connect are off. A locked tower is then the function it was, as LiT
    locks it (open_clip's locked towers keep their batch-norm statistics too, ``freeze_bn_stats``).
    """
    names = dict(model.named_parameters())
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            example = next((top for top in tops if top.endswith(("tower", "encoder"))), tops[0])  # CLIPPO: encoder
            raise ConfigError(f"names '{prefix}', which no parameter is or is under; the model's parts: "
                              f"{', '.join(tops)} (e.g. train.freeze=[{example}])", "train.freeze")
    frozen = 0
    for name, param in names.items():
        if any(_under(name, prefix) for prefix in prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    if frozen == sum(param.numel() for param in names.values()):
        raise ConfigError(f"is {list(prefixes)}, which freezes every parameter: nothing would train", "train.freeze")
    locked = [module for module in model.modules() if is_frozen(module)]
    inner = {id(child) for module in locked for child in module.modules() if child is not module}
    for module in locked:
        if id(module) not in inner:  # the largest: its forward sets every module inside to inference
            module.register_forward_pre_hook(_run_as_at_inference)
    return frozen, sum(param.numel() for param in names.values())


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` has parameters and :func:`freeze` froze them all (it runs as at inference)."""
    params = list(module.parameters())
    return bool(params) and not any(param.requires_grad for param in params)


def _under(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _run_as_at_inference(module: nn.Module, args: Any) -> None:
    module.eval()  # model.train() sets training again; this runs before every forward pass
