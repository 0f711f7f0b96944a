"""Image-text retrieval recall, as CLIP_benchmark defines it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import OpenAlignError
from .checks import check_labels

log = logging.getLogger(__name__)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: Sequence[int] | torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int = 4096) -> dict[str, float]:
    """Recall@k in both directions from L2-normalised embeddings; ``text_to_image[j]`` is caption j's image.
    The scores are the embeddings' dot products, as given (CLIP_benchmark's ``recall_at_k`` takes
    scores): cosine similarities only when the embeddings are normalised, as openalign's
    evaluations and ``encode_image`` / ``encode_text`` give them.

    ``image_retrieval_recall@k`` (text→image): the share of captions whose image is among their
    top k images. ``text_retrieval_recall@k`` (image→text): the share of images with at least
    one of their captions among their top k captions. These are CLIP_benchmark's definitions,
    top k included (``torch.topk`` decides ties, as there). ``*_mean_rank`` / ``*_median_rank``
    (open_clip's): the 1-based rank of the best-placed positive, with the non-positive keys that
    tie it counted ahead of it, so that a collapsed model (every score equal) ranks last rather
    than first; the median is open_clip's, ``floor(median(rank - 1)) + 1`` with the mean of the
    two middle ranks of an even count. Scores are computed ``chunk_size`` queries at a time,
    never as one full matrix.
    """
    text_to_image = torch.as_tensor(text_to_image, device=image_emb.device)
    if image_emb.shape[0] == 0:
        raise OpenAlignError("retrieval_metrics: there are no images to retrieve")
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise OpenAlignError(f"retrieval_metrics needs image and text embeddings of one width, (n, d) each: got "
                             f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    check_labels("retrieval_metrics", "text_to_image", text_to_image, text_emb.shape[0], image_emb.shape[0], "images")
    text_to_image = text_to_image.long()
    if covering := [k for k in ks if k >= image_emb.shape[0]]:  # CLIP_benchmark's topk would raise
        log.warning("recall@%s over %d images: every caption's image is among its top %d, so image retrieval "
                    "scores 1 at that k by definition", ", ".join(map(str, covering)), image_emb.shape[0], covering[0])
    image_ids = torch.arange(image_emb.shape[0], device=image_emb.device)
    directions = {  # name: (queries, keys, positive mask of a chunk of query rows)
        "image_retrieval": (text_emb, image_emb, lambda rows: text_to_image[rows, None] == image_ids[None]),
        "text_retrieval": (image_emb, text_emb, lambda rows: image_ids[rows, None] == text_to_image[None]),
    }
    metrics = {}
    for direction, (queries, keys, positive_mask) in directions.items():
        hits = {k: [] for k in ks}
        ranks = []
        for start in range(0, queries.shape[0], chunk_size):
            rows = torch.arange(start, min(start + chunk_size, queries.shape[0]), device=queries.device)
            scores, positive = queries[rows] @ keys.T, positive_mask(rows)
            for k in ks:  # one top-k per k, as CLIP_benchmark: top-k of a larger k can order ties differently
                top = scores.topk(min(k, keys.shape[0]), dim=1).indices
                hits[k].append(positive.gather(1, top).any(dim=1))
            # a NaN score (a diverged model) ranks as torch.topk ranks it, above every number; left NaN,
            # every comparison with it is false and a NaN model would rank every positive first
            scores.masked_fill_(scores.isnan(), float("inf"))  # in place: the top-k are taken
            best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
            ranks.append(1 + ((scores >= best) & ~positive).sum(dim=1))
        for k in ks:
            metrics[f"{direction}_recall@{k}"] = torch.cat(hits[k]).double().mean().item()
        rank = torch.cat(ranks).double()
        metrics[f"{direction}_mean_rank"] = rank.mean().item()
        metrics[f"{direction}_median_rank"] = float(np.floor(np.median(rank.cpu().numpy() - 1)) + 1)
    return metrics


def contrastive_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float,
                        batch_size: int) -> dict[str, float]:
    """The contrastive loss and in-batch accuracy of image-text pairs (row i of each), held out
    from training: open_clip's ``clip_val_loss`` and big_vision's contrastive evaluation
    (CLIPPO's ``evals.val`` / ``evals.coco``: loss and ``ncorrect``).

    The pairs are taken in consecutive batches of ``batch_size`` (the last may be smaller; a last
    pair alone, which would have no other to be told from, joins the batch before it), as a
    training batch would hold them: in each, every image is scored against every text by
    ``logit_scale`` × cosine. ``contrastive_loss`` is the mean over pairs of the two directions'
    cross-entropies, ``(CE(image→text) + CE(text→image)) / 2``, without label smoothing (open_clip's);
    it depends on the batch size, so compare it between evaluations of the same ``batch_size``.
    ``contrastive_i2t_accuracy``: the share of images whose own text scores above every other text
    of their batch; ``contrastive_t2i_accuracy``, of texts whose own image does (a tie is a miss,
    as the retrieval ranks count it, so that a collapsed model scores 0, not 1 / batch)."""
    if image_emb.shape != text_emb.shape or image_emb.shape[0] == 0:
        raise OpenAlignError(f"contrastive_metrics needs as many image as text embeddings, at least one: got "
                             f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if batch_size > image_emb.shape[0]:
        log.warning("contrastive batch %d, but there are %d pairs: one batch of %d, whose loss compares only with "
                    "evaluations at that batch size", batch_size, image_emb.shape[0], image_emb.shape[0])
    loss, correct = 0.0, {"i2t": 0, "t2i": 0}
    starts = list(range(0, image_emb.shape[0], batch_size))
    if len(starts) > 1 and image_emb.shape[0] - starts[-1] == 1:
        starts.pop()
    for start, end in zip(starts, [*starts[1:], image_emb.shape[0]]):
        images, texts = image_emb[start:end].double(), text_emb[start:end].double()
        logits = logit_scale * images @ texts.T
        target = torch.arange(logits.shape[0], device=logits.device)
        for direction, scores in (("i2t", logits), ("t2i", logits.T)):
            loss += torch.nn.functional.cross_entropy(scores, target, reduction="sum").item() / 2
            own = scores.diagonal()
            others = scores.masked_fill(torch.eye(len(target), dtype=torch.bool, device=scores.device), float("-inf"))
            correct[direction] += int((own > others.max(dim=1).values).sum())
    pairs = image_emb.shape[0]
    return {"contrastive_loss": loss / pairs, "contrastive_i2t_accuracy": correct["i2t"] / pairs,
            "contrastive_t2i_accuracy": correct["t2i"] / pairs}
