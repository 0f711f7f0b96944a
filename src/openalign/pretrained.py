"""Load and publish trained models: openalign's own directories and Hugging Face ``AlignModel``'s.

``load_pretrained(name_or_path)`` returns ``(model, preprocess, tokenizer)`` from

- an openalign model directory (``config.yaml`` + ``model.safetensors``, as
  :func:`save_pretrained` or a training checkpoint writes it), or a run directory (its latest
  checkpoint);
- a Hugging Face ``AlignModel`` directory (``config.json``, ``model.safetensors`` or
  ``pytorch_model.bin``, tokenizer and preprocessor files);
- a hub id such as ``kakaobrain/align-base``, fetched with ``huggingface_hub`` into its cache;
- a weights file released by a paper's own code, with the ``architecture`` it holds
  (:mod:`openalign.external`: ALIP's open_clip state dict, CLIPPO's big_vision ``.npz``).

Weights are read with safetensors, or ``torch.load(weights_only=True)`` for ``.bin`` files:
no pickled code runs and no ``trust_remote_code``.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import dump_saved, from_dict, peek_yaml, to_dict
from .data.tokenizer import Tokenizer
from .distributed import RANK_ZERO_ONLY, resolve_device
from .data.transforms import ImageTransform
from .errors import OpenAlignError
from .files import filled_whole, read_json, write_safetensors
from .models import ContrastiveModel, ModelConfig
from .registry import list_models, tokenizer_beside

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
HF_CONFIG_FILE = "config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# an AlignModel repo's files, and an openalign model's config.yaml (its format, save_pretrained's default)
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "config.yaml"]
_MODEL_FILES = (CONFIG_FILE, HF_CONFIG_FILE, WEIGHTS_FILE, "pytorch_model.bin", "model.safetensors.index.json")
# the files a model keeps beside its weights (tokenizer, processor): replaced with it, so that none of an
# overwritten model's outlives it (a CLIPPO model, which needs no vocabulary, over a BERT one, say)
_COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "preprocessor_config.json",
                    "processor_config.json")


def load_pretrained(name_or_path: str | Path, device: str | torch.device = "cpu", architecture: str | None = None
                    ) -> tuple[ContrastiveModel, ImageTransform, Tokenizer]:
    """``(model, preprocess, tokenizer)`` of a trained model, the model in eval mode on ``device``
    (``"auto"``: a GPU when one is visible).

    ``preprocess`` maps a PIL image to the model's input tensor (eval transform); ``tokenizer``
    maps a string or a list of strings to ``input_ids`` and ``attention_mask``. ``architecture``
    (a registered model name or config file) is for a weights file without a config: ALIP's
    ``ALIP_YFCC15M_B32.pt`` is ``alip-vit-b32``, CLIPPO's ``clippo_b16_yfcc100m.npz`` ``clippo-b16``.
    """
    device = resolve_device(device)
    file = Path(name_or_path).expanduser()
    if architecture is not None or file.is_file():
        model, path = _load_weights_file(file, architecture), file
    elif _is_hf_directory(path := resolve(name_or_path)):
        from .hf import load_hf_directory

        model = load_hf_directory(path)
        if path != Path(name_or_path).expanduser():  # a hub snapshot: name it by its id, not its hash
            model.config.name = str(name_or_path)
    else:
        from .train.checkpoint import load_checkpoint_model

        path = _checkpoint_directory(path)  # a run's latest checkpoint, named as read (a newer one may follow)
        model = load_checkpoint_model(path)
    _warn_if_not_finite(model, path)
    model = model.to(device).eval()
    model.weights_path = str(path.resolve())
    return model, model.config.build_transform(train=False), model.config.build_tokenizer()


def pretrained_config(name_or_path: str | Path) -> ModelConfig:
    """The config of a trained model found as :func:`load_pretrained` finds a directory or hub id,
    without reading its weights: its preprocessing and tokenizer, say."""
    path = resolve(name_or_path)
    if _is_hf_directory(path):
        from .hf import model_config_from_hf

        return model_config_from_hf(path)
    from .train.checkpoint import checkpoint_model_config

    return checkpoint_model_config(_checkpoint_directory(path))


def load_pretrained_weights(model: nn.Module, name_or_path: str | Path) -> None:
    """The weights of a trained model, found as :func:`load_pretrained` finds them, into ``model``
    (of the same architecture: every weight must match by name and shape), without building a
    second model: for a large model that would double the host memory and the start-up time.
    A weights file released without a config (:mod:`openalign.external`: ALIP's) is read as
    weights of ``model``'s architecture."""
    if Path(name_or_path).expanduser().is_file():
        from .external import load_external_weights

        read = Path(name_or_path).expanduser()
        load_external_weights(model, read)
    elif _is_hf_directory(path := resolve(name_or_path)):
        from .hf import load_hf_weights

        read = path
        load_hf_weights(model, path, f"'{name_or_path}'")
    else:
        from .train.checkpoint import load_weights

        read = _checkpoint_directory(path) / WEIGHTS_FILE  # a run directory: its latest checkpoint
        load_weights(model, read)
    log.info("initialised %s from %s", type(model).__name__, read, extra=RANK_ZERO_ONLY)
    _warn_if_not_finite(model, name_or_path)


def _warn_if_not_finite(model: nn.Module, source: str | Path) -> None:
    """Warn of weights that hold NaN or infinite values (training refuses to checkpoint them; weights
    from elsewhere may): every embedding the model makes would be NaN, far from where it was loaded."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        log.warning("the weights of '%s' hold NaN or infinite values in %d tensor(s) (%s%s): the model's outputs "
                    "will be NaN; were they saved after training diverged?", source, len(bad), ", ".join(bad[:3]),
                    ", ..." if len(bad) > 3 else "", extra=RANK_ZERO_ONLY)  # train.init_from reads on every rank


def _load_weights_file(path: Path, architecture: str | None) -> ContrastiveModel:
    from .external import load_external_weights
    from .factory import create_model

    if not path.exists():
        raise OpenAlignError(f"weights file '{path}' does not exist")
    if not path.is_file():
        raise OpenAlignError(f"'{path}' is not a file: an architecture is named for a weights file (a directory or "
                             "hub id names its own)")
    if architecture is None and (hint := model_directory_hint(path)):
        raise OpenAlignError(f"'{path}' {hint}")
    if path.stat().st_size and not _has_weights_signature(path):  # a photo, a text file: not called corrupt
        raise OpenAlignError(f"'{path}' is not a weights file: openalign reads torch.save files (.pt, .bin), "
                             ".safetensors and big_vision's .npz, or a model directory")
    if architecture is None:
        raise OpenAlignError(f"'{path}' is a weights file without a config: name the architecture it holds, e.g. "
                             f"load_pretrained('{path}', architecture='alip-vit-b32') or 'openalign convert {path} "
                             "DIR --architecture alip-vit-b32' (see 'openalign models'), then use DIR")
    model = create_model(architecture)
    load_external_weights(model, path)
    return model


def _has_weights_signature(path: Path) -> bool:
    """Whether ``path`` begins as a weights file does: a zip (torch.save's format, numpy's .npz), a
    pickle (torch's legacy format), a tar (its oldest) or a safetensors header (a length, then JSON)."""
    with open(path, "rb") as file:
        head = file.read(512)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or head[257:262] == b"ustar" or head[8:9] == b"{"


def model_directory_hint(path: Path) -> str | None:
    """What to name instead of ``path``, a file of a model, checkpoint or run directory (its config or
    weights), which is loaded by its directory; None for a file on its own (a released weights file)."""
    folder = path.parent
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():  # an openalign model's
        is_model = path.name in (CONFIG_FILE, WEIGHTS_FILE)
    else:  # a Hugging Face ALIGN directory's (a released file beside a CLIP config.json is one on its own)
        is_model = path.name in (HF_CONFIG_FILE, WEIGHTS_FILE, "pytorch_model.bin") and _is_hf_directory(folder) \
            and _model_type(folder) == "align"
    if not is_model:
        return None
    kind = "config" if path.name in (CONFIG_FILE, HF_CONFIG_FILE) else "weights"
    return f"is the {kind} file of the model in '{folder}': name that directory, which holds config and weights"


def _model_type(folder: Path) -> Any:
    """The ``model_type`` of ``folder``'s ``config.json``; None where it has none to read."""
    try:
        config = read_json(folder / HF_CONFIG_FILE)
    except OpenAlignError:
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _checkpoint_directory(path: Path) -> Path:
    """The openalign model or checkpoint directory ``path`` names (a run's latest checkpoint). A
    directory of weights without a config is neither kind of model directory: say so, rather than
    that the openalign kind's ``config.yaml`` is missing (its owner may never have had one)."""
    from .train.checkpoint import checkpoint_directory

    if (path / CONFIG_FILE).exists() or (path / "checkpoints").is_dir():
        return checkpoint_directory(path)
    if weights := sorted(name for name in (WEIGHTS_FILE, "pytorch_model.bin", "model.safetensors.index.json")
                         if (path / name).is_file()) or sorted(p.name for p in path.glob("*.safetensors"))[:3]:
        raise OpenAlignError(f"'{path}' holds weights ({', '.join(weights)}) but no config beside them: a Hugging "
                             f"Face AlignModel directory has its {HF_CONFIG_FILE}, an openalign model its "
                             f"{CONFIG_FILE}; copy the model's config there")
    return checkpoint_directory(path)  # its error: neither weights nor checkpoints


def _is_hf_directory(path: Path) -> bool:
    """A Hugging Face ``AlignModel`` directory: a ``config.json`` and no openalign ``config.yaml``."""
    return (path / HF_CONFIG_FILE).is_file() and not (path / CONFIG_FILE).is_file()


def resolve(name_or_path: str | Path) -> Path:
    """A local directory for ``name_or_path``: the path itself, or a hub snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise OpenAlignError(f"'{text}' is a file; expected a model directory (an openalign model or checkpoint "
                             "directory, or a Hugging Face AlignModel directory) or a hub id, or, for a weights "
                             "file, the architecture it holds")
    if not _HUB_ID.match(text):
        hint = (f"; it names an architecture, without trained weights: openalign.create_model('{text}') builds it with "
                "random ones") if text in list_models() else ""
        raise OpenAlignError(f"'{text}' is neither a directory nor a Hugging Face hub id like 'kakaobrain/align-base'"
                             f"{hint or _near_misses(path)}")
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(text, allow_patterns=_HUB_FILES))
        if not any(snapshot.glob("*.safetensors")):  # an older repo, whose weights are pytorch_model.bin only
            snapshot = Path(snapshot_download(text, allow_patterns=[*_HUB_FILES, "*.bin"]))
        return snapshot
    except Exception as error:  # network, authentication, unknown repo: all end here
        raise OpenAlignError(f"'{text}' is no directory here, and as a hub id it could not be fetched from the Hugging "
                             f"Face hub ({type(error).__name__}: {error}); check the path, or set HF_HOME to a cache "
                             f"that holds the model{_near_misses(path)}") from None


def _near_misses(path: Path) -> str:
    """'; did you mean ...' naming the directories beside ``path`` whose names are close to its own."""
    try:
        siblings = [child.name for child in path.parent.iterdir() if child.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(str(path.parent / name)) for name in close)}?" if close else ""


def save_pretrained(model: nn.Module, directory: str | Path, format: str = "openalign", overwrite: bool = False
                    ) -> Path:
    """Write ``model`` (with its tokenizer and preprocessing) to ``directory``.

    ``format="openalign"``: ``config.yaml`` (the model config, preprocessing included),
    ``model.safetensors`` and the tokenizer files; :func:`load_pretrained` reads it back.
    ``format="hf"``: a ``transformers`` ``AlignModel`` directory (``config.json``,
    ``model.safetensors``, tokenizer and processor files) that ``AlignModel.from_pretrained``,
    ``AlignProcessor.from_pretrained`` and the ``zero-shot-image-classification`` pipeline load.

    A directory that already holds a model, or any file of the name of one the save writes (a
    stray ``tokenizer.json``), is an error unless ``overwrite``; then its model files
    (either format's, with their tokenizer and processor files and weight shards) are replaced, so
    that no stale config, vocabulary or processor describes the new weights. The files
    are written to a staging folder inside the directory and moved in once all are written
    (:func:`~openalign.files.filled_whole`): an export that is refused (an architecture ``hf``
    cannot hold) or fails leaves the directory as it was.
    """
    if any(getattr(module, "batch_norm_folded", False) for module in model.modules()):
        raise OpenAlignError("this model was made for inference by optimize_for_inference (its batch norms are "
                             "folded into convolutions), so its weights are not a checkpoint: save the model it "
                             "was made from")
    if format not in ("openalign", "hf"):
        raise OpenAlignError(f"unknown format '{format}': use 'openalign' or 'hf'")
    directory = _named(directory)
    if directory.exists() and not directory.is_dir():
        raise OpenAlignError(f"'{directory}' is a file; a model is saved to a directory")
    if _is_run_directory(directory):  # overwrite or not: its config.yaml is the run's recipe, not a model's
        raise OpenAlignError(f"'{directory}' is a training run's directory: its config.yaml is the run's recipe, "
                             "which a saved model's config would replace; save the model to another directory")
    existing = [name for name in _MODEL_FILES if (directory / name).is_file()]
    if existing and not overwrite:  # found before the export's work; any other file of a name it writes, after
        raise _holds_model_files(directory, existing)
    stale = [*existing, *_COMPANION_FILES, *_weight_shards(directory)] if existing else []
    with filled_whole(directory, replaces=stale) as staging:  # a refused export leaves the old model there
        if format == "hf":
            from .hf import save_hf_directory

            save_hf_directory(model, staging)
        else:
            _save_openalign_directory(model, staging)
        if not overwrite and (found := sorted(path.name for path in staging.iterdir()
                                              if (directory / path.name).exists())):
            raise _holds_model_files(directory, found)  # a stray tokenizer.json, say: never replaced unasked
    return directory


def _is_run_directory(directory: Path) -> bool:
    """A training run's output directory: checkpoints, or a config.yaml holding more than a model."""
    saved = peek_yaml(directory / CONFIG_FILE)
    return (directory / "checkpoints").is_dir() or bool(saved and set(saved) - {"model"})


def _named(directory: str | Path) -> Path:
    """The directory a model is saved to; an empty path is an error, not the working directory."""
    if not str(directory).strip():
        raise OpenAlignError("the directory to save the model to is empty: name one (an empty path would be the "
                             "working directory)")
    return Path(directory)


def _holds_model_files(directory: Path, names: list[str]) -> OpenAlignError:
    return OpenAlignError(f"'{directory}' already holds model or tokenizer files ({', '.join(names)}): choose a new "
                          "directory, or pass overwrite=True (openalign convert --overwrite) to replace them")


def _weight_shards(directory: Path) -> list[str]:
    """The weight files ``model.safetensors.index.json`` in ``directory`` names, if it is there and
    readable: only ``*.safetensors`` files in ``directory`` itself (a damaged index names no other file)."""
    from .hf import shard_names

    index = directory / "model.safetensors.index.json"
    try:
        names = shard_names(index) if index.is_file() else []
    except OpenAlignError:  # damaged, or naming files elsewhere: the overwrite removes it, its shards stay
        return []
    return [name for name in names if not name.startswith(".") and (directory / name).is_file()]


def _save_openalign_directory(model: nn.Module, directory: Path) -> None:
    tokenizer = model.config.build_tokenizer()
    config = to_dict(model.config)
    if isinstance(tokenizer, Tokenizer):  # a vocabulary to keep beside the weights (CLIPPO renders, needs none)
        tokenizer.hf_tokenizer.save_pretrained(str(directory))
        config["text"]["tokenizer"] = "."  # the files beside this config (see _model_config)
        if config["text"].get("pretrained"):
            config["text"]["pretrained"] = None  # the weights are here; the sizes are in the config
    (directory / CONFIG_FILE).write_text(dump_saved({"model": config}))
    write_safetensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                      directory / WEIGHTS_FILE)


def convert(source: str | Path, destination: str | Path, to: str, overwrite: bool = False,
            architecture: str | None = None) -> Path:
    """Load ``source`` (any form :func:`load_pretrained` takes, a weights file with its
    ``architecture``) and write it in format ``to`` to ``destination``, a directory outside the source."""
    origin, target = Path(source).expanduser().resolve(), _named(destination).expanduser().resolve()
    if origin.is_dir() and target.is_relative_to(origin):  # the source, a run's checkpoint, or a new one
        raise OpenAlignError(f"'{destination}' is the source '{source}' or inside it: convert into a directory "
                             "outside it (a model written there could replace the weights being converted or a "
                             "checkpoint, or be taken for one)")
    model, _, _ = load_pretrained(source, architecture=architecture)
    return save_pretrained(model, destination, format=to, overwrite=overwrite)


def model_config_from_dict(model_dict: dict[str, Any], directory: Path) -> ModelConfig:
    """A trained model's config read from ``directory``: a tokenizer given as ``.`` means that
    directory, and the text tower's ``pretrained`` source is cleared (the weights are the directory's)."""
    text = tokenizer_beside(model_dict, directory).get("text")
    if isinstance(text, dict) and text.get("pretrained"):
        text["pretrained"] = None
    return from_dict(ModelConfig, model_dict, "model")
