"""Checks of what the metric functions take: what would otherwise give a number without an error
(labels past the classes, a caption of an image that is not there, embeddings that were never
normalised, so that "cosine" nearest neighbours are dot-product ones)."""

from __future__ import annotations

import torch

from ..errors import OpenAlignError

_UNIT_NORM_TOLERANCE = 2e-2  # a bf16 embedding normalised in fp32 is within 0.8% of unit norm


def check_unit_norm(function: str, name: str, embeddings: torch.Tensor) -> None:
    """``embeddings`` (N, dim) are L2-normalised: no row's norm is above 1, and some row's is 1.
    Rows of a smaller norm pass: a dead model's zeros, CLIPPO's ``x / (‖x‖ + 1e-8)`` of features
    near zero; so do NaN rows, a diverged model's: their metrics say so."""
    if embeddings.ndim != 2:
        raise OpenAlignError(f"{function}: {name} must be (N, dim) embeddings; got shape {tuple(embeddings.shape)}")
    norms = torch.linalg.vector_norm(embeddings, dim=1, dtype=torch.float32)
    off = norms > 1 + _UNIT_NORM_TOLERANCE
    if not off.any() and 0 < norms.nan_to_num(0).max() < 1 - _UNIT_NORM_TOLERANCE:  # none normalised
        off = norms > 0
    if off.any():
        row = int(off.nonzero()[0, 0])
        raise OpenAlignError(f"{function} compares L2-normalised embeddings (cosine similarity), but {name} row {row} "
                             f"has norm {norms[row].item():.4g}: pass F.normalize({name}, dim=-1) (encode_image and "
                             "encode_text normalise by default)")


def check_labels(function: str, name: str, labels: torch.Tensor, rows: int, limit: int, what: str) -> None:
    """``labels`` has ``rows`` whole numbers (at least one), each in ``[0, limit)``: an index into
    ``limit`` ``what``."""
    if rows == 0:
        raise OpenAlignError(f"{function}: there is nothing to score ({name} is empty)")
    if labels.ndim != 1 or labels.shape[0] != rows:
        raise OpenAlignError(f"{function}: {name} must hold one entry per row ({rows}); got shape "
                             f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise OpenAlignError(f"{function}: {name} must be whole numbers; got {labels.dtype}")
    outside = (labels < 0) | (labels >= limit)
    if outside.any():
        index = int(outside.nonzero()[0, 0])
        raise OpenAlignError(f"{function}: {name}[{index}] is {int(labels[index])}, but there are {limit} {what} "
                             f"(0 to {limit - 1})")
