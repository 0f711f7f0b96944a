"""Image-text retrieval recall, as CLIP_benchmark defines it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: Sequence[int] | torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int = 4096) -> dict[str, float]:
    """Recall@k in both directions from L2-normalised embeddings; ``text_to_image[j]`` is caption j's image.

    ``image_retrieval_recall@k`` (text→image): the share of captions whose image is among their
    top k images. ``text_retrieval_recall@k`` (image→text): the share of images with at least
    one of their captions among their top k captions. Scores are computed ``chunk_size``
    queries at a time, never as one full matrix.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=image_emb.device)
    k_max = max(ks)
    hits_t2i = _topk_hits(text_emb, image_emb, k_max, chunk_size,
                          lambda rows, top: top == text_to_image[rows, None])
    image_ids = torch.arange(image_emb.shape[0], device=image_emb.device)
    hits_i2t = _topk_hits(image_emb, text_emb, k_max, chunk_size,
                          lambda rows, top: text_to_image[top] == image_ids[rows, None])
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = hits_t2i[:, :k].any(dim=1).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = hits_i2t[:, :k].any(dim=1).float().mean().item()
    return metrics


def _topk_hits(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int, is_positive) -> torch.Tensor:
    """(num_queries, k) booleans: whether the i-th best key of each query is a positive."""
    k = min(k, keys.shape[0])
    hits = []
    for start in range(0, queries.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, queries.shape[0]), device=queries.device)
        top = (queries[rows] @ keys.T).topk(k, dim=1).indices
        hits.append(is_positive(rows, top))
    return torch.cat(hits)
