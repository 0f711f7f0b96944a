"""Using a trained model: zero-shot classification, embedding an image folder, and a searchable index.

The index is a parquet file with one row per image (``path``: string, ``embedding``:
list<float32>, L2-normalised) and the model's name, source and probe embedding in the schema
metadata, so any parquet reader can open it and ``openalign search`` can tell which model made it.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data.quality import UNREADABLE_IMAGE_ERRORS
from .data.tokenizer import Tokenizer
from .errors import OpenAlignError
from .files import not_a_file, printable, written_whole
from .eval import embed_texts
from .eval.features import IMAGE_EXTENSIONS, eval_mode
from .eval.features import encode_image_batch as encode_images
from .eval import class_embeddings
from .progress import progress_bar

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

# A prompt ensemble for class names ("cat", "golden retriever"), in the manner of ALIGN paper §5.2.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.",
                     "a cropped photo of a {}.", "a photo of the {}.", "a drawing of a {}.")
FAISS_MIN_ROWS = 100_000  # above this, search uses faiss's exact inner-product index when it is installed
SEARCH_CHUNK_ROWS = 65_536
INDEX_ROW_GROUP = 65_536  # rows per parquet row group
_METADATA_PREFIX = "openalign."

ImageInput = Image.Image | np.ndarray | torch.Tensor | str | Path
Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass
class EmbeddingIndex:
    """The contents of an index file: ``embeddings[i]`` is the embedding of the image at ``paths[i]``."""

    paths: list[str]
    embeddings: torch.Tensor
    model_name: str | None = None
    model_source: str | None = None
    model_probe: list[float] | None = None  # probe_embedding() of the model that embedded the images


def probe_embedding(model: nn.Module, preprocess: Preprocess) -> list[float]:
    """The embedding of a fixed synthetic image (a colour gradient), to tell whether an index's
    images were embedded by a model whose image side is this one's: retrained or replaced
    weights move it, a retrained text side alone (a locked image tower) does not, and another
    device or precision moves it by rounding only."""
    y, x = np.mgrid[0:64, 0:64]
    image = Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8))
    with eval_mode(model), torch.no_grad():
        embedding = encode_images(model, _pixels(image, preprocess)[None])
    return [round(value, 6) for value in embedding[0].float().tolist()]


def same_image_side(probe: Sequence[float], other: Sequence[float]) -> bool:
    """Whether two :func:`probe_embedding` results come from the same image weights (cosine
    similarity above 0.99: rounding and bf16 stay far above it, other weights far below)."""
    first, second = torch.tensor(probe, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    return first.shape == second.shape and F.cosine_similarity(first, second, dim=0).item() > 0.99


def optimize_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` made faster for inference: eval mode, channels-last convolutions, and in EfficientNet
    towers each batch norm folded into the convolution before it.

    Embeddings equal the model's to float rounding. The result is for inference only: it refuses
    training mode and ``save_pretrained`` (keep the original for those). A copy unless ``inplace``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for module in list(model.modules()):
        if callable(getattr(module, "fold_batch_norm", None)):
            module.fold_batch_norm()
    return model.to(memory_format=torch.channels_last)


def zero_shot_classifier(model: nn.Module, tokenizer: Tokenizer, class_names: Sequence[str],
                         templates: Sequence[str | Callable[[str], str]] = DEFAULT_TEMPLATES,
                         batch_size: int = 64) -> torch.Tensor:
    """(num_classes, dim) fp32 class embeddings on the CPU: each class's prompt embeddings averaged
    and renormalised (:func:`openalign.eval.class_embeddings` with ``model``'s text tower)."""
    device = model_device(model)

    def encode_text(texts: list[str]) -> torch.Tensor:
        return embed_texts(model, tokenizer, texts, device, batch_size=batch_size, show_progress=False)

    with eval_mode(model):  # weights held fixed: with an embedding cache, hashed once, not once per class
        return class_embeddings(encode_text, class_names, templates)


@torch.no_grad()
def classify(model: nn.Module, preprocess: Preprocess, tokenizer: Tokenizer, images: Sequence[ImageInput],
             labels: Sequence[str], templates: Sequence[str] | None = None, batch_size: int = 64) -> torch.Tensor:
    """(num_images, num_labels) probabilities: softmax over labels of ``logit_scale`` × cosine similarity.

    The model runs in eval mode (its own mode is restored after).
    ``images`` are PIL images, 8-bit pixels (see ``preprocess``) or paths; PIL images and files are
    turned upright by their EXIF orientation first (:func:`upright`). ``labels`` are embedded as
    written, or, with ``templates`` (format strings such as ``"a photo of a {}."``), as the
    renormalised mean of their prompts. Runs on the model's device and dtype, in bf16 autocast on a
    GPU (as evaluation: :func:`openalign.precision.precision_scope` ``("fp32")`` around the call
    computes in the model's own dtype); similarities are fp32, on the CPU.
    """
    for name, given in (("images", images), ("labels", labels)):
        if isinstance(given, (str, Path, Image.Image)):
            raise OpenAlignError(f"classify's {name} are one {type(given).__name__} ({given!s:.60}); pass a list")
    if not len(images) or not len(labels):
        raise OpenAlignError("classify needs at least one image and one label")
    check_labels(labels, tokenizer=tokenizer)
    with eval_mode(model):  # a model fresh from create_model is in train mode: batch statistics, dropout
        classes = _label_embeddings(model, tokenizer, labels, templates, batch_size)
        batches = (images[start:start + batch_size] for start in range(0, len(images), batch_size))
        image_embeddings = torch.cat([encode_images(model, torch.stack([_pixels(image, preprocess) for image in batch]))
                                      for batch in batches])
    return _probabilities(model, image_embeddings, classes)


def classify_files(model: nn.Module, preprocess: Preprocess, tokenizer: Tokenizer, paths: Sequence[str | Path],
                   labels: Sequence[str], templates: Sequence[str] | None = None, batch_size: int = 64,
                   num_workers: int = 0) -> tuple[list[str], torch.Tensor]:
    """:func:`classify` for image files, as ``openalign classify`` runs it: ``(paths, probabilities)``
    of the files that read as images, in the order given; the others are skipped and counted in a
    logged warning, as :func:`embed_folder` skips them (an error if none reads)."""
    check_labels(labels, tokenizer=tokenizer)
    with eval_mode(model):
        classes = _label_embeddings(model, tokenizer, labels, templates, batch_size)
        kept, image_embeddings = embed_files(model, preprocess, [str(path) for path in paths], batch_size, num_workers,
                                             "classifying images")
    return kept, _probabilities(model, image_embeddings, classes)


def _label_embeddings(model: nn.Module, tokenizer: Tokenizer, labels: Sequence[str],
                      templates: Sequence[str] | None, batch_size: int) -> torch.Tensor:
    """The labels' embeddings, as written or (``templates``) as the renormalised mean of their prompts."""
    if templates:
        return zero_shot_classifier(model, tokenizer, labels, templates, batch_size)
    return embed_texts(model, tokenizer, list(labels), model_device(model), batch_size, show_progress=False)


def _probabilities(model: nn.Module, image_embeddings: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The softmax over labels of ``logit_scale`` × cosine, in fp32 on the CPU."""
    logits = model.logit_scale.detach().float().cpu() * image_embeddings @ classes.T
    return logits.softmax(dim=-1)


def check_labels(labels: Sequence[str], given: str = "classify's labels", tokenizer: Tokenizer | None = None) -> None:
    """Refuse blank labels, and repeated ones, whose copies would split their probability; with
    ``tokenizer``, also labels it reads alike (``a cat`` and ``A Cat`` to an uncased BERT)."""
    if any(not label.strip() for label in labels):
        raise OpenAlignError(f"{given}: a label is blank")
    if repeated := sorted(label for label, times in Counter(labels).items() if times > 1):
        raise OpenAlignError(f"{given}: {', '.join(map(repr, repeated))} given more than once; the probability "
                             "would be split between the copies")
    if tokenizer is None:
        return
    first: dict[bytes, str] = {}
    for start in range(0, len(labels), 64):  # a pixel tokenizer (CLIPPO) renders 600 kB per label
        chunk = list(labels[start:start + 64])
        tensors = [value for value in tokenizer(chunk).values() if isinstance(value, torch.Tensor)]
        for row, label in enumerate(chunk):
            digest = hashlib.sha256(b"".join(tensor[row].numpy().tobytes() for tensor in tensors)).digest()
            if (seen := first.setdefault(digest, label)) != label:
                raise OpenAlignError(f"{given}: {seen!r} and {label!r} are the same text to the model's tokenizer; "
                                     "the probability would be split between them")


def embed_folder(model: nn.Module, preprocess: Preprocess, images: str | Path, batch_size: int = 64,
                 num_workers: int = 0) -> tuple[list[str], torch.Tensor]:
    """``(paths, embeddings)`` of the images in a directory (recursively) or matching a glob pattern.

    Images are turned upright by their EXIF orientation (:func:`upright`). Files that cannot be
    read as images are skipped and counted in a logged warning; the
    returned paths are those of the embedded images, in sorted order, one per embedding row.
    """
    return embed_files(model, preprocess, find_images(images), batch_size, num_workers)


def embed_files(model: nn.Module, preprocess: Preprocess, candidates: Sequence[str], batch_size: int = 64,
                num_workers: int = 0, description: str = "embedding images") -> tuple[list[str], torch.Tensor]:
    """``(paths, embeddings)`` of the image files ``candidates`` that read as images, in their
    order; the others are skipped and counted in a logged warning (an error if none reads)."""
    if not candidates:
        raise OpenAlignError("no image files to embed")
    loader = DataLoader(_ImageFiles(candidates, preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    kept: list[int] = []
    chunks: list[torch.Tensor] = []
    failures: list[tuple[str, str]] = []
    with progress_bar(description, len(candidates)) as advance, eval_mode(model):
        for indices, pixels, errors in loader:
            if indices:
                kept.extend(indices)
                chunks.append(encode_images(model, pixels))
            failures.extend((candidates[index], message) for index, message in errors)
            advance(len(indices) + len(errors))
    if failures:
        path, message = failures[0]
        log.warning("skipped %d of %d files that could not be read as images (first: %s: %s)",
                    len(failures), len(candidates), path, message)
    if not kept:
        path, message = failures[0]
        raise OpenAlignError(f"none of the {len(candidates)} image files could be read (first: {path}: {message})")
    return [candidates[index] for index in kept], torch.cat(chunks)


def find_images(images: str | Path) -> list[str]:
    """Sorted image files (by extension) in directory ``images``, recursively, or matching glob
    ``images`` (``photos/**/*.jpg``, ``~`` expanded; a file whose name holds glob characters is
    itself). As ``glob`` does, both skip hidden files and folders (a pattern lists them where it
    names them: ``.*``). Neither form descends into symlinked directories (a link to ``..`` would list a tree
    over and over); symlinked files are listed, broken ones too, to be counted among the unreadable."""
    text = os.path.expanduser(str(images))
    path = Path(text)
    if path.is_dir():  # hidden files and folders skipped, as a glob skips them (macOS's ._ files, say)
        found: Iterable[Path] = (match for match in path.rglob("*")
                                 if not any(name.startswith(".") for name in match.relative_to(path).parts))
    elif path.is_file() or path.is_symlink() or not glob.has_magic(text):
        found = [path]
    else:
        found = _glob_without_symlinked_folders(path)
    paths = sorted(str(match) for match in found if match.suffix.lower() in IMAGE_EXTENSIONS and not match.is_dir()
                   and (match.is_file() or match.is_symlink()))
    if not paths:
        kinds = ", ".join(sorted(extension.lstrip(".") for extension in IMAGE_EXTENSIONS))
        raise OpenAlignError(f"no image files in '{text}': expected a directory (searched recursively) or a glob "
                             f"pattern matching files with one of the extensions {kinds}")
    return paths


def _glob_without_symlinked_folders(pattern: Path) -> Iterator[Path]:
    """``glob.glob(pattern, recursive=True)``'s matches (``**`` alone: any depth; ``**`` within a
    name: ``*``; no hidden names unless the pattern names some, ``.*``), found through pathlib,
    whose ``**`` does not follow symlinked directories as glob's does."""
    first = next(index for index, part in enumerate(pattern.parts) if glob.has_magic(part))
    root = Path(*pattern.parts[:first]) if first else Path(".")
    parts = [part if part == "**" else part.replace("**", "*") for part in pattern.parts[first:]]
    if parts[-1] == "**":  # glob's 'photos/**' lists files too; pathlib's, folders only
        parts.append("*")
    hidden_allowed = any(part.startswith(".") for part in parts)
    for match in root.glob(str(Path(*parts))):
        if hidden_allowed or not any(name.startswith(".") for name in match.relative_to(root).parts):
            yield match


class _ImageFiles(Dataset):
    """``(index, pixels)`` of each path, or ``(index, error message)`` when it is not a readable image."""

    def __init__(self, paths: Sequence[str], preprocess: Preprocess) -> None:
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            return index, _read_pixels(self.paths[index], self.preprocess)
        except UNREADABLE_IMAGE_ERRORS as error:
            return index, f"{type(error).__name__}: {error}"


def _collate(items: list[tuple[int, torch.Tensor | str]]
             ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A batch of the readable images (indices, stacked pixels) and the (index, message) of the others."""
    loaded = [(index, value) for index, value in items if isinstance(value, torch.Tensor)]
    errors = [(index, value) for index, value in items if isinstance(value, str)]
    pixels = torch.stack([value for _, value in loaded]) if loaded else None
    return [index for index, _ in loaded], pixels, errors


def _non_finite(embeddings: torch.Tensor, paths: Sequence[str]) -> str:
    """'N embedding(s) with NaN or infinite values (the first paths)', or '' when all are finite."""
    broken = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()
    if not broken:
        return ""
    names = ", ".join(str(paths[row]) for row in broken[:3]) + (", ..." if len(broken) > 3 else "")
    return f"{len(broken)} embedding(s) with NaN or infinite values ({names})"


def write_index(path: str | Path, paths: Sequence[str], embeddings: torch.Tensor, model_name: str | None = None,
                model_source: str | None = None, model_probe: Sequence[float] | None = None) -> Path:
    """Write ``paths`` and their ``embeddings`` (N, dim) as a parquet index; the model goes in the metadata.

    The file appears whole or not at all (written beside ``path``, then renamed over it). Paths
    that are not UTF-8 (possible on Linux) are kept with their odd bytes as ``\\xNN`` escapes.
    """
    import pyarrow as pa

    if embeddings.ndim != 2 or embeddings.shape[0] != len(paths):
        raise OpenAlignError(f"{len(paths)} paths but embeddings of shape {tuple(embeddings.shape)}; "
                             "expected one embedding row per path")
    if broken := _non_finite(embeddings, paths):
        raise OpenAlignError(f"the model gave {broken}; nothing was written: are its weights broken?")
    metadata = {"model_name": model_name, "model_source": model_source,
                "model_probe": json.dumps(list(model_probe)) if model_probe is not None else None}
    schema = pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32()))],
                       metadata={_METADATA_PREFIX + key: value for key, value in metadata.items() if value})
    vectors = embeddings.detach().float().cpu().numpy()
    texts = [printable(name) for name in paths]
    if odd := sum(text != name for text, name in zip(texts, paths)):
        log.warning("%d image path(s) are not UTF-8: the index keeps them with \\xNN escapes", odd)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path) as partial:
            _write_rows(partial, schema, texts, vectors)
    except OSError as error:
        raise OpenAlignError(f"cannot write the index '{path}': {error}") from None
    return path


def _write_rows(path: Path, schema: pa.Schema, texts: list[str], vectors: np.ndarray) -> None:
    """The index's rows, in row groups, to ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(texts), INDEX_ROW_GROUP):  # row groups keep list offsets within int32
            rows = vectors[start:start + INDEX_ROW_GROUP]
            offsets = pa.array(np.arange(0, rows.size + 1, vectors.shape[1], dtype=np.int32))
            embedding = pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), type=pa.float32()))
            writer.write_table(pa.table([pa.array(texts[start:start + INDEX_ROW_GROUP], pa.string()), embedding],
                                        schema=schema))


def is_index(path: Path) -> bool:
    """Whether ``path`` is a parquet file of exactly an index's columns (``path``, ``embedding``), one
    that ``openalign embed`` may replace; a data table, even a parquet one, is not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return False
    return sorted(names) == ["embedding", "path"]


def model_source(name_or_path: str | Path) -> str:
    """How an index names the model that built it: a local path made absolute, a hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)



def read_index(path: str | Path) -> EmbeddingIndex:
    """The paths, (N, dim) fp32 embeddings and model of an index that :func:`write_index` wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    remedy = ("expected a parquet file with columns 'path' (string) and 'embedding' (list of floats), "
              "as 'openalign embed' writes")
    if not Path(path).is_file():
        raise OpenAlignError(f"index '{path}' {not_a_file(path)}; {remedy}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise OpenAlignError(f"cannot read index '{path}' ({error}); {remedy}") from None
    embeddings = _embedding_matrix(table)
    if isinstance(embeddings, str):
        raise OpenAlignError(f"index '{path}' is malformed ({embeddings}); {remedy}")
    if not len(embeddings):
        raise OpenAlignError(f"index '{path}' holds no embeddings; {remedy}")
    paths = table.column("path").to_pylist()
    if broken := _non_finite(embeddings, paths):
        raise OpenAlignError(f"index '{path}' has {broken}: embed the folder again")
    metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    return EmbeddingIndex(paths=paths, embeddings=embeddings,
                          model_name=metadata.get(_METADATA_PREFIX + "model_name"),
                          model_source=metadata.get(_METADATA_PREFIX + "model_source"),
                          model_probe=_probe(metadata.get(_METADATA_PREFIX + "model_probe")))


def _probe(text: str | None) -> list[float] | None:
    """An index's probe embedding, or None where it has none (or one this reader cannot take)."""
    try:
        probe = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return probe if isinstance(probe, list) and all(isinstance(value, (int, float)) for value in probe) else None


def _embedding_matrix(table: pa.Table) -> torch.Tensor | str:
    """The (N, dim) fp32 ``embedding`` column, or why the table is not an index (wrong columns or
    types, missing values, rows of different lengths)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if missing := [name for name in ("path", "embedding") if name not in table.schema.names]:
        return f"no column {' or '.join(repr(name) for name in missing)}; it has {', '.join(table.schema.names)}"
    path_type = table.schema.field("path").type
    if not (pa.types.is_string(path_type) or pa.types.is_large_string(path_type)):
        return f"column 'path' holds {path_type}, not strings"
    column = table.column("embedding")  # lists of any of arrow's kinds, as pyarrow or polars may write them
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)) or not pa.types.is_floating(column.type.value_type):
        return f"column 'embedding' holds {column.type}, not lists of floats"
    if column.null_count or table.column("path").null_count:
        return "rows without a path or an embedding"
    lengths = np.unique(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    if len(lengths) > 1:
        return f"embeddings of different lengths ({', '.join(map(str, lengths[:5]))})"
    values = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    dim = int(lengths[0]) if len(lengths) else 0
    return torch.from_numpy(np.concatenate(values or [np.empty(0)]).astype(np.float32).reshape(len(column), dim))


def search(index_embeddings: torch.Tensor, query_embedding: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-``k``: ``(scores, indices)`` of shape (k,) for a (dim,) query or (Q, k) for (Q, dim).

    Chunked over the index with ``torch.topk``; an index of more than :data:`FAISS_MIN_ROWS`
    rows goes through faiss's ``IndexFlatIP`` (exact too) when faiss is installed.
    """
    if k < 1:
        raise OpenAlignError(f"k is {k}; ask for at least one result")
    single = query_embedding.ndim == 1
    queries = F.normalize(query_embedding.float().reshape(-1, query_embedding.shape[-1]).cpu(), dim=-1)
    if index_embeddings.ndim != 2 or index_embeddings.shape[1] != queries.shape[1]:
        raise OpenAlignError(f"the query is {queries.shape[1]}-d but the index has shape "
                             f"{tuple(index_embeddings.shape)}: embed the query with the model that built the index")
    k = min(k, index_embeddings.shape[0])
    found = _faiss_search(index_embeddings, queries, k) if index_embeddings.shape[0] > FAISS_MIN_ROWS else None
    scores, indices = found if found is not None else _torch_search(index_embeddings, queries, k)
    return (scores[0], indices[0]) if single else (scores, indices)


def _torch_search(index_embeddings: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each chunk of the index, merged with the best so far."""
    best_scores = torch.empty(queries.shape[0], 0)
    best_indices = torch.empty(queries.shape[0], 0, dtype=torch.long)
    for start in range(0, index_embeddings.shape[0], SEARCH_CHUNK_ROWS):
        chunk = F.normalize(index_embeddings[start:start + SEARCH_CHUNK_ROWS].float().cpu(), dim=-1)
        scores, indices = (queries @ chunk.T).topk(min(k, chunk.shape[0]), dim=1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_indices = torch.cat([best_indices, indices + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_indices = merged_indices.gather(1, order)
    return best_scores, best_indices


def _faiss_search(index_embeddings: torch.Tensor, queries: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact inner-product search with faiss over the normalised index, or None without faiss."""
    try:
        import faiss
    except ImportError:
        return None
    vectors = F.normalize(index_embeddings.float().cpu(), dim=-1).numpy()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, indices = index.search(np.ascontiguousarray(queries.numpy()), k)
    return torch.from_numpy(scores), torch.from_numpy(indices).long()


def _pixels(image: ImageInput, preprocess: Preprocess) -> torch.Tensor:
    """The preprocessed pixels of an image (PIL or 8-bit pixels) or an image file, PIL images and
    files turned upright; a bad file is an error that names it."""
    if isinstance(image, Image.Image):
        return preprocess(upright(image))
    if not isinstance(image, (str, Path)):
        return preprocess(image)
    try:
        return _read_pixels(image, preprocess)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise OpenAlignError(f"cannot read image '{image}': {error}") from None


def _read_pixels(path: str | Path, preprocess: Preprocess) -> torch.Tensor:
    """The preprocessed pixels of an image file, turned upright. PIL warns of an image over
    ``MAX_IMAGE_PIXELS`` (89.5 MP) on stderr, in the middle of a progress bar: the user's own
    files, a 108 MP phone photo say, are read without it (PIL's own error, over twice that, is
    raised); training and ``data convert``, reading the web's images, skip them at the warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return preprocess(upright(image))


def upright(image: Image.Image) -> Image.Image:
    """``image`` as it is meant to be seen: rotated or mirrored as its EXIF orientation says (a
    camera's portrait photo is stored sideways), as transformers' ``load_image`` and pipelines do.

    Only inference does this; evaluation datasets are read as the papers' loaders read them,
    without it. An image without an orientation is returned as it is, not yet decoded, so that
    preprocessing can still decode a large JPEG at reduced size."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # EXIF of a camera or editor gone wrong (struct.error, TypeError, ...): the pixels still read
        return image
    method = _ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None
    # transposed here rather than by ImageOps.exif_transpose, which also rewrites the (possibly malformed) EXIF
    return image if method is None else image.transpose(method)


# EXIF orientation → the transposition that shows the image upright (EXIF 2.3, as Pillow's exif_transpose)
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device
