"""Zero-shot and nearest-neighbour classification, and the usual classification metrics."""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import OpenAlignError
from .checks import check_labels, check_unit_norm

log = logging.getLogger(__name__)


def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                     templates: Sequence[str | Callable[[str], str]] | Mapping[str, Sequence[str]]) -> torch.Tensor:
    """(num_classes, dim) class embeddings: the renormalised mean of each class's prompt embeddings
    (:func:`openalign.zero_shot_classifier` calls this with a model's text tower).

    ``encode_text`` maps a list of strings to L2-normalised embeddings, and is called once, with
    every class's prompts in turn (ImageNet's 80,000: it must batch them, as
    :func:`~openalign.eval.embed_texts` does), so that batches are full and ranks gather once. A
    template is a string with one ``{}`` for the class name, or a function of the class name
    (CLIP's prompt ensembling, ALIGN paper §5.2). A mapping of class name → its own prompts
    (CuPL's JSON, which CLIP_benchmark takes) gives each class those instead.
    """
    prompts = class_prompts(class_names, templates)
    embeddings = encode_text([prompt for own in prompts for prompt in own])
    return torch.stack([F.normalize(own.mean(dim=0), dim=-1)
                        for own in embeddings.split([len(own) for own in prompts])])


def class_prompts(class_names: Sequence[str],
                  templates: Sequence[str | Callable[[str], str]] | Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Each class's prompts, as :func:`class_embeddings` embeds them; checked, not embedded."""
    if isinstance(templates, Mapping):
        return _per_class_prompts(class_names, templates)
    _check_prompts(class_names, templates)
    return [[template(name) if callable(template) else template.format(name) for template in templates]
            for name in class_names]


def _per_class_prompts(class_names: Sequence[str], prompts: Mapping[str, Sequence[str]]) -> list[list[str]]:
    missing = [name for name in class_names if name not in prompts]
    if missing:
        raise OpenAlignError(f"the per-class prompts (a mapping of class name to its prompts, as CuPL's) have none "
                             f"for {len(missing)} of the {len(class_names)} classes, e.g. {missing[:3]}; their keys "
                             f"are {list(prompts)[:3]}")
    for name in class_names:
        own = prompts[name]
        if isinstance(own, str) or not own or not all(isinstance(prompt, str) for prompt in own):
            raise OpenAlignError(f"the prompts of class {name!r} must be a non-empty list of strings, got {own!r:.80}")
    return [list(prompts[name]) for name in class_names]


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_prompt(text: str, keep: str = "") -> str:
    """big_vision's zero-shot text canonicalisation (CLIPPO's evaluation, shared spec clippo.md
    §5.1): ``_`` as a space, ASCII punctuation removed except each whole occurrence of ``keep``
    (``","`` in class names, ``"{}"`` in templates), lower case, runs of white space as one."""
    parts = text.replace("_", " ").split(keep) if keep else [text.replace("_", " ")]
    return re.sub(r"\s+", " ", keep.join(part.translate(_PUNCTUATION) for part in parts).lower()).strip()


def _check_prompts(class_names: Sequence[str], templates: Sequence[str | Callable[[str], str]]) -> None:
    """Clear errors for what would otherwise give silently wrong classes (a string where a list
    belongs iterates over its letters; a template without ``{}`` gives every class one prompt)."""
    for name, given in (("class names", class_names), ("templates", templates)):
        if isinstance(given, str):
            raise OpenAlignError(f"the {name} are one string ({given!r}); pass a list of them")
        if not len(given):
            raise OpenAlignError(f"no {name} were given")
    for template in templates:
        if callable(template):
            continue
        try:
            filled = template.format("\0")
        except (IndexError, KeyError, ValueError, AttributeError) as error:
            raise OpenAlignError(f"template {template!r} cannot be filled with a class name ({type(error).__name__}: "
                                 f"{error}); write it with one '{{}}', e.g. 'a photo of a {{}}.'") from None
        if "\0" not in filled:
            raise OpenAlignError(f"template {template!r} has no '{{}}' for the class name, so every class would get "
                                 "the same prompt; e.g. 'a photo of a {}.'")


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy, and the mean over classes present in ``labels`` of per-class recall.

    As CLIP_benchmark, ``acc5`` is NaN with fewer than 5 classes (every label would be in the top
    5). A class scored ``-inf`` is never among the top k (a kNN class no neighbour voted for).
    """
    if logits.ndim != 2:
        raise OpenAlignError(f"classification_metrics takes (N, classes) logits; got shape {tuple(logits.shape)}")
    labels = torch.as_tensor(labels, device=logits.device)
    check_labels("classification_metrics", "labels", labels, logits.shape[0], logits.shape[1], "classes (logit columns)")
    scores, top = logits.topk(min(5, logits.shape[1]), dim=1)
    correct = (top == labels[:, None]) & (scores > float("-inf"))
    predicted = logits.argmax(dim=1)  # as CLIP_benchmark: the first of tied logits, where topk may pick another
    recalls = [(predicted[labels == c] == c).double().mean() for c in labels.unique()]  # fractions exactly
    return {
        "acc1": correct[:, 0].double().mean().item(),
        "acc5": correct.any(dim=1).double().mean().item() if logits.shape[1] >= 5 else math.nan,
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def nearest_neighbour_predict(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor,
                              chunk_size: int = 4096) -> torch.Tensor:
    """The label of each query's most cosine-similar memory item (1-NN, as COYO-ALIGN's ImageNet kNN)."""
    memory_labels = torch.as_tensor(memory_labels, device=memory.device)
    num_classes = int(memory_labels.max()) + 1
    return knn_classify(memory, memory_labels, queries, num_classes, k=1, chunk_size=chunk_size).argmax(dim=1)


def knn_classify(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk_size: int = 4096,
                 memory_chunk_size: int = 16384) -> torch.Tensor:
    """(num_queries, num_classes) weighted k-NN votes: each of a query's ``k`` most cosine-similar
    memory items votes for its label with weight ``exp(similarity / temperature)`` (the weighted
    k=20 kNN of InstDisc/DINO). ``k=1`` is COYO-ALIGN's 1-NN. A query's votes are scaled by
    ``exp(-best similarity / temperature)`` (its nearest neighbour's weight is 1), which ranks the
    classes as before and cannot overflow fp32 at any temperature (unscaled, ``exp(0.99 / 0.01)``
    is infinite and every class would tie); a class with votes scores above 0 even where they
    underflow, so 0 means no neighbour voted for it.

    Blocked top-k: ``chunk_size`` queries are scored against ``memory_chunk_size`` memory items at a
    time, keeping a running top-k, so no similarity block exceeds ``chunk_size × memory_chunk_size``
    (256 MiB of fp32 by default) however large the memory bank (ImageNet: 1.28M × 50k).
    ``memory`` and ``queries`` must be L2-normalised (checked)."""
    memory_labels = torch.as_tensor(memory_labels, device=memory.device)  # a list or array, as the metrics take
    _check_knn_inputs(memory, memory_labels, queries, num_classes, k)
    if k > memory.shape[0]:
        log.warning("kNN: k=%d, but the memory holds %d items: every one of them votes, as with k=%d",
                    k, memory.shape[0], memory.shape[0])
    k, memory_chunk_size = min(k, memory.shape[0]), max(memory_chunk_size, k)  # a block must hold k candidates
    votes = []
    for start in range(0, queries.shape[0], chunk_size):
        similarity, index = _running_topk(queries[start:start + chunk_size], memory, k, memory_chunk_size)
        chunk = torch.zeros(similarity.shape[0], num_classes, dtype=torch.float32, device=similarity.device)
        similarity = similarity.float()  # sorted: column 0 is the best
        labels = memory_labels[index]
        chunk.scatter_add_(1, labels, ((similarity - similarity[:, :1]) / temperature).exp())
        # a class whose votes underflow (neighbours far below the best at a small temperature) still
        # outranks one no neighbour voted for: the smallest positive vote, not 0
        voted = torch.zeros_like(chunk, dtype=torch.bool).scatter_(1, labels, True)
        chunk = torch.where(voted, chunk.clamp(min=torch.finfo(chunk.dtype).tiny), chunk)
        votes.append(chunk)
    return torch.cat(votes)


def _check_knn_inputs(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                      k: int) -> None:
    check_unit_norm("knn_classify", "memory", memory)
    check_unit_norm("knn_classify", "queries", queries)
    if queries.shape[1] != memory.shape[1]:
        raise OpenAlignError(f"knn_classify: the queries are {queries.shape[1]}-d but the memory is {memory.shape[1]}-d")
    check_labels("knn_classify", "memory_labels", memory_labels, memory.shape[0], num_classes, "classes")
    if k < 1:
        raise OpenAlignError(f"knn_classify: k is {k}; vote with at least one neighbour")


def _running_topk(queries: torch.Tensor, memory: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` similarities of each query over all of ``memory`` and their memory indices,
    scoring ``block`` memory rows at a time."""
    best_similarity = best_index = None
    for start in range(0, memory.shape[0], block):
        similarity, index = (queries @ memory[start:start + block].T).topk(min(k, memory.shape[0] - start), dim=1)
        index = index + start
        if best_similarity is not None:
            similarity, order = torch.cat([best_similarity, similarity], dim=1).topk(k, dim=1)
            index = torch.cat([best_index, index], dim=1).gather(1, order)
        best_similarity, best_index = similarity, index
    return best_similarity, best_index
