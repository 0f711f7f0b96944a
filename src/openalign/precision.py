"""Mixed precision: bf16 autocast on GPU, fp32 on CPU, unless the settings say otherwise."""

from __future__ import annotations

import torch


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """An autocast context: bf16 for ``precision="bf16"``, or for ``"auto"`` on CUDA; fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
