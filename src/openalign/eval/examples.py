"""A picture of retrieval at work: for a few captions, the top images the model returns.

``openalign eval examples --model M --json dataset_coco.json --out grid.png`` (and every retrieval
task of ``openalign eval suite``) draws one row per caption: the caption, then its top ``k`` images, the right one framed in green and the others
in grey, for a quick visual check that a model or an evaluation set-up is sane.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..data.transforms import to_rgb
from ..distributed import world_info
from .datasets import retrieval_items
from .features import Transform, embed_images, embed_texts, eval_mode, eval_transform

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
# Written into every picture's metadata (PNG Software, PDF/SVG Creator, JPEG comment), so that a
# rerun replaces its own picture and nothing else of that name.
MARK = "openalign retrieval examples"


def retrieval_examples(model: nn.Module, json_path: str | Path, device: torch.device, output: str | Path,
                       split: str = "test", image_root: str | Path | None = None, queries: int = 6, k: int = 5,
                       seed: int = 0, batch_size: int = 256, caption_prefix: str = "",
                       transform: Transform | None = None) -> list[tuple[str, list[Path], Path]]:
    """Draw the grid to ``output`` (PNG) and return, per row, ``(caption, top-k image paths, true image)``.

    The captions are a seeded random sample of the split's captions. ``json_path``,
    ``caption_prefix`` and ``transform`` are as for :func:`~openalign.eval.datasets.evaluate_retrieval`.
    """
    items = retrieval_items(json_path, split, image_root)
    captions = [(caption_prefix + caption, index) for index, item in enumerate(items) for caption in item.captions]
    chosen = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))[:queries].tolist()
    with eval_mode(model):
        image_emb = embed_images(model, transform or eval_transform(model), [item.path for item in items],
                                 device, batch_size, show_progress=False)
        text_emb = embed_texts(model, model.config.build_tokenizer(), [captions[i][0] for i in chosen], device,
                               batch_size, show_progress=False)
    top = (text_emb @ image_emb.T).topk(min(k, len(items)), dim=1).indices
    rows = [(captions[q][0], [items[i].path for i in top[row].tolist()], items[captions[q][1]].path)
            for row, q in enumerate(chosen)]
    if world_info()[0] == 0:  # every rank embeds its share; one draws
        _draw(rows, Path(output))
    return rows


CAPTION_COLUMNS, CAPTION_LINES = 24, 8  # what the first column (2.2 inches at 9 pt) holds


def wrapped_caption(caption: str) -> str:
    """``caption`` in lines that fit the picture's first column, at most :data:`CAPTION_LINES` of them
    (the last cut with an ellipsis): matplotlib's own wrapping runs to the figure's edge, under the
    images beside it."""
    lines = textwrap.wrap(caption, CAPTION_COLUMNS) or [""]
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][:CAPTION_COLUMNS - 1] + "…"
    return "\n".join(lines)


def _draw(rows: list[tuple[str, list[Path], Path]], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(found) for _, found, _ in rows) + 1
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.2 * len(rows)), squeeze=False)
    for axis_row, (caption, found, truth) in zip(axes, rows):
        for axis in axis_row:
            axis.set_xticks([])
            axis.set_yticks([])
        axis_row[0].text(0.0, 0.5, wrapped_caption(caption), fontsize=9, va="center")
        axis_row[0].axis("off")
        for rank, (axis, path) in enumerate(zip(axis_row[1:], found), start=1):
            with Image.open(path) as image:
                axis.imshow(to_rgb(image))
            colour = "tab:green" if path == truth else "0.7"
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4 if path == truth else 1)
            axis.set_title(f"#{rank}", fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    suffix = output.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        options = {"pil_kwargs": {"comment": MARK.encode()}}
    else:
        options = {"metadata": {"Software" if suffix == ".png" else "Creator": MARK}}
    figure.savefig(output, dpi=90, **options)
    plt.close(figure)


def is_examples_picture(path: Path) -> bool:
    """Whether ``path`` is a picture :func:`retrieval_examples` drew (its mark lies in the first or,
    in a PDF, the last 64 KiB)."""
    window = 1 << 16
    with open(path, "rb") as file:
        head = file.read(window)
        file.seek(max(0, file.seek(0, 2) - window))
        return MARK.encode() in head + file.read()
