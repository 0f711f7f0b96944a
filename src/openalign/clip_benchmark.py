"""Evaluate openalign models with CLIP_benchmark itself (shared spec anchors §6, §8.6).

openalign's own ``eval`` commands compute CLIP_benchmark's metrics and write its records; this
module is for running CLIP_benchmark's code on an openalign model, to compare with numbers
published through it or to use a dataset only it reads::

    python -m openalign.clip_benchmark eval --model_type openalign --model openalign \\
        --pretrained runs/demo --dataset cifar10 --dataset_root /data/cifar10

takes CLIP_benchmark's own command line, with one more ``--model_type``, ``openalign``:

- ``--pretrained``: what :func:`openalign.load_pretrained` reads: an openalign model, checkpoint
  or run directory, a Hugging Face ``AlignModel`` directory or hub id, or a weights file a paper
  released (ALIP's ``ALIP_YFCC15M_B32.pt``);
- ``--model``: for such a weights file, the architecture it holds (``alip-vit-b32``); otherwise
  only the name CLIP_benchmark writes into its records and file names (the model's config names
  the architecture).

CLIP_benchmark calls ``tokenizer(texts).to(device)`` and ``model.encode_text(tokens)``: an
openalign tokenizer's output moves as a whole (:class:`~openalign.data.tokenizer.TextBatch`) and
``encode_text`` takes it as it is, so the ``(model, preprocess, tokenizer)`` triple of
:func:`load_openalign` (:func:`openalign.load_pretrained`'s) is used without a wrapper.
``--model_cache_dir`` is not used: hub ids go to the Hugging Face cache.

CLIP_benchmark 1.6.2's top-k accuracy (zero-shot classification) converts a one-element array
with ``float()``, which numpy 2.4 refuses (a ``TypeError`` for any model): where it fails so,
:func:`register` puts in the same computation, written for numpy 2.

Needs ``pip install clip-benchmark`` (with its dependencies; its command line imports them all).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import OpenAlignError

MODEL_TYPE = "openalign"


def load_openalign(model_name: str, pretrained: str, cache_dir: str | None = None,
                   device: str | torch.device = "cuda") -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)`` as CLIP_benchmark's ``load_clip`` loaders return them:
    ``pretrained`` read by :func:`openalign.load_pretrained`, ``model_name`` the architecture of a
    bare weights file (for a directory or hub id, a name for CLIP_benchmark's records only).
    ``cache_dir`` is taken for the signature's sake: hub downloads use the Hugging Face cache."""
    from .pretrained import load_pretrained

    architecture = model_name if Path(pretrained).expanduser().is_file() else None
    return load_pretrained(pretrained, device=device, architecture=architecture)


def register() -> None:
    """Add ``openalign`` to CLIP_benchmark's model types (its ``load_clip`` and command line)."""
    try:
        from clip_benchmark import models
    except ImportError as error:
        raise OpenAlignError(f"CLIP_benchmark is not installed ({error}): pip install clip-benchmark") from None
    models.TYPE2FUNC[MODEL_TYPE] = load_openalign
    if MODEL_TYPE not in models.MODEL_TYPES:  # the list its command line offers as --model_type choices
        models.MODEL_TYPES.append(MODEL_TYPE)
    try:
        from clip_benchmark.metrics import zeroshot_classification
    except ImportError:  # its datasets' dependencies missing: the command line says so
        return
    try:
        zeroshot_classification.accuracy(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
    except TypeError:
        zeroshot_classification.accuracy = topk_accuracy


def topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """CLIP_benchmark's ``accuracy``: the share of rows of ``output`` (N, C) whose ``target`` is
    among their ``k`` largest (``torch.topk``'s order for ties), for each ``k`` of ``topk``."""
    predicted = output.topk(max(topk), 1, True, True)[1].t()
    correct = predicted.eq(target.view(1, -1).expand_as(predicted))
    return [correct[:k].sum().item() / len(target) for k in topk]


def main(argv: Sequence[str] | None = None) -> int:
    """CLIP_benchmark's command line (``eval``, ``build``) with the ``openalign`` model type; an
    openalign error (CLIP_benchmark or its dependencies missing, a model that does not load) is one
    ``error:`` line and exit status 2, as ``openalign``'s own command line gives it."""
    saved = sys.argv
    try:
        register()
        try:
            from clip_benchmark import cli
        except ImportError as error:
            raise OpenAlignError(f"CLIP_benchmark's command line needs its dependencies ({error}): pip install "
                                 "clip-benchmark, not with --no-deps") from None
        sys.argv = ["clip_benchmark", *(sys.argv[1:] if argv is None else argv)]
        cli.main()
    except OpenAlignError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
