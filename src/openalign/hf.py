"""Hugging Face ``AlignModel`` directories: read them into openalign, write openalign models as them.

The mapping (shared spec align-coyo-and-hf.md §6):

- weights: ``vision_model.*`` ↔ ``image_tower.*`` (the EfficientNet already uses HF's names),
  ``text_model.*`` ↔ ``text_tower.bert.*``, ``text_projection.*`` unchanged, and HF's scalar
  ``temperature`` ↔ ``log_temperature = log(temperature)``. HF's text pooler is unused by
  ``AlignModel`` (the embedding is the [CLS] vector): it is dropped on import and written as an
  identity map on export, so ``transformers`` reports no missing weights.
- config: ``AlignVisionConfig`` ↔ the EfficientNet config, ``AlignTextConfig`` ↔ the BERT config,
  ``projection_dim`` ↔ ``embed_dim``. HF's ``batch_norm_momentum=0.99`` is Keras's convention
  handed to PyTorch's BatchNorm unchanged (spec §8, HF item 1); openalign reads a Keras momentum
  m as PyTorch's 1 - m (0.99 as 0.01) and writes 1 - its own back, so a round trip keeps it.
- preprocessing: ``EfficientNetImageProcessor`` (resize 346 bilinear, centre crop 289,
  ``x / 127.5 - 1``) ↔ :class:`~openalign.data.transforms.PreprocessConfig`; the tokenizer is
  the directory's own, padded and truncated to 64 tokens.

HF's ``AlignModel`` has no image projection, so models with one (``align-b3-mini``) cannot be
exported to it; that is an error rather than a silently different model.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, OpenAlignError
from .models import BertTowerConfig, DualEncoderConfig, EfficientNetConfig
from .files import read_json, read_safetensors, read_torch_file, write_safetensors
from .pretrained import HF_CONFIG_FILE, WEIGHTS_FILE, model_config_from_dict

log = logging.getLogger(__name__)

_EFFICIENTNET_FIELDS = ("width_coefficient", "depth_coefficient", "depth_divisor", "kernel_sizes", "strides",
                        "in_channels", "out_channels", "num_block_repeats", "expand_ratios",
                        "squeeze_expansion_ratio", "drop_connect_rate", "batch_norm_eps")
_BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
                "hidden_dropout_prob", "attention_probs_dropout_prob")
_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes; torchvision resizes tensors in these
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
MAX_LENGTH = 64  # AlignProcessor's padding length; positions beyond it were never trained


# ---------------------------------------------------------------------------------------------- reading


def load_hf_directory(directory: Path) -> nn.Module:
    """An openalign model holding the weights of the ``AlignModel`` saved in ``directory``."""
    model = model_config_from_hf(directory).build()
    load_hf_weights(model, directory)
    return model.eval()


def load_hf_weights(model: nn.Module, directory: Path, source: str | None = None) -> None:
    """The weights of the ``AlignModel`` saved in ``directory`` into ``model``; any missing, extra
    or misshapen weight is an error that names it as ``AlignModel`` does (and the ``source``)."""
    state = state_dict_from_hf(read_hf_weights(directory))
    for key, value in model.state_dict().items():  # a counter transformers does not insist on either
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, torch.zeros_like(value))
    from .train.checkpoint import load_state

    load_state(model, state, source or f"'{directory}'", name=hf_key)


def model_config_from_hf(directory: Path) -> DualEncoderConfig:
    """The openalign config equivalent to ``directory``'s ``config.json`` and preprocessor files."""
    raw = read_json(directory / HF_CONFIG_FILE)
    if not isinstance(raw, dict):
        raise OpenAlignError(f"'{directory / HF_CONFIG_FILE}' is not a JSON object: not a model's config")
    if "model_type" not in raw:
        raise OpenAlignError(f"'{directory / HF_CONFIG_FILE}' has no model_type: an AlignModel's config says 'align'")
    if raw.get("model_type") != "align":
        raise OpenAlignError(f"'{directory / HF_CONFIG_FILE}' describes a '{raw.get('model_type')}' model, not ALIGN "
                             "(model_type 'align', transformers.AlignModel)")
    from transformers import AlignConfig

    try:
        hf = AlignConfig.from_pretrained(str(directory))
    except Exception as error:  # values of the wrong type or structure: transformers' own checks fail in many ways
        # transformers' first line may end in a colon, its reason below it: the lines joined, cut at 300 characters
        reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        raise OpenAlignError(f"'{directory / HF_CONFIG_FILE}' is not a valid AlignConfig ({type(error).__name__}: "
                             f"{reason[:300]})") from None
    vision, text = hf.vision_config, hf.text_config
    _require(list(vision.depthwise_padding) == [], "vision_config.depthwise_padding",
             f"is {list(vision.depthwise_padding)}; openalign's EfficientNet implements ALIGN's [] only")
    _require(vision.hidden_act in ("swish", "silu"), "vision_config.hidden_act", f"is '{vision.hidden_act}', not swish")
    _require(vision.pooling_type == "mean", "vision_config.pooling_type", f"is '{vision.pooling_type}', not mean")
    _require(vision.num_channels == 3, "vision_config.num_channels", f"is {vision.num_channels}, not 3")
    _require(getattr(text, "position_embedding_type", "absolute") == "absolute", "text_config.position_embedding_type",
             "is not 'absolute'")
    _require(0 < vision.batch_norm_momentum < 1, "vision_config.batch_norm_momentum",
             f"is {vision.batch_norm_momentum}; a Keras momentum is between 0 and 1 (ALIGN's: 0.99)")
    image = {"type": "efficientnet", **{k: _plain(getattr(vision, k)) for k in _EFFICIENTNET_FIELDS},
             "batch_norm_momentum": round(1.0 - float(vision.batch_norm_momentum), 12), "virtual_batch_size": None}
    has_tokenizer = any((directory / name).is_file() for name in _TOKENIZER_FILES)
    if not has_tokenizer:
        log.warning("'%s' has no tokenizer files: using bert-base-uncased", directory)
    text_dict = {"type": "bert", **{k: _plain(getattr(text, k)) for k in _BERT_FIELDS},
                 "tokenizer": "." if has_tokenizer else "bert-base-uncased",
                 "max_length": _text_length(directory, text.max_position_embeddings, has_tokenizer)}
    model = {"architecture": "dual_encoder", "name": directory.resolve().name, "image": image, "text": text_dict,
             "embed_dim": hf.projection_dim, "image_projection": False,
             "temperature_init": hf.temperature_init_value,
             "preprocess": _preprocess_from_hf(directory, vision.image_size)}
    try:
        return model_config_from_dict(model, directory)
    except ConfigError as error:
        if error.key == "model.embed_dim":  # AlignModel has no image projection: say it in config.json's terms
            raise OpenAlignError(f"'{directory / HF_CONFIG_FILE}': projection_dim is {hf.projection_dim}, but "
                                 "AlignModel takes the vision model's pooled features, unprojected, as image embeddings, and "
                                 f"this vision_config makes them {_vision_width(image)} wide: the two must be equal"
                                 ) from None
        raise OpenAlignError(f"'{directory / HF_CONFIG_FILE}' cannot be represented: {error}") from None


def _text_length(directory: Path, positions: int, has_tokenizer: bool) -> int:
    """The tokens AlignProcessor pads texts to: its tokenizer's ``max_length`` as transformers
    loads it (``tokenizer_config.json``'s, which openalign's exports write; transformers 5 also
    takes a fixed length from ``tokenizer.json``), else ALIGN's 64."""
    from .data.tokenizer import load_hf_tokenizer

    length = load_hf_tokenizer(str(directory)).init_kwargs.get("max_length") if has_tokenizer else None
    if length is None:
        return min(MAX_LENGTH, positions)
    if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= positions:
        raise OpenAlignError(f"'{directory}': the tokenizer's max_length is {length!r}; the text model reads "
                             f"between 2 and {positions} tokens (max_position_embeddings)")
    return length


def _vision_width(image: dict[str, Any]) -> int:
    """The width of the pooled features of an EfficientNet tower given as a config dict."""
    from .config import from_dict

    return from_dict(EfficientNetConfig, {key: value for key, value in image.items() if key != "type"}).output_dim


def _preprocess_from_hf(directory: Path, image_size: int) -> dict[str, Any]:
    """PreprocessConfig fields from the directory's image processor (align-base's when absent)."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(directory))
    except (OSError, ValueError) as error:
        resize = round(image_size * 346 / 289)
        log.warning("'%s' has no readable image processor (%s): using ALIGN's, resize %d and crop %d",
                    directory, error, resize, image_size)
        return {"image_size": image_size, "resize_size": resize, "interpolation": "bilinear", "random_flip": True,
                "center_crop": "floor"}
    size, crop = processor.size, processor.crop_size
    if size.get("height") is None or size.get("height") != size.get("width") or not processor.do_resize:
        raise OpenAlignError(f"'{directory}': the image processor must resize to a square (it has do_resize="
                             f"{processor.do_resize}, size={dict(size)}), as ALIGN's does")
    if processor.do_center_crop and crop.get("height") != crop.get("width"):
        raise OpenAlignError(f"'{directory}': the image processor crops to {dict(crop)}; openalign's preprocessing "
                             "crops squares only, as ALIGN's does")
    resize = int(size["height"])
    crop_side = int(crop["height"]) if processor.do_center_crop else resize
    resample = int(processor.resample) if processor.resample is not None else 2
    if resample not in _RESAMPLE_NAMES:
        from PIL.Image import Resampling

        raise OpenAlignError(f"'{directory}': the image processor resizes with PIL's {Resampling(resample).name} "
                             f"filter; openalign's preprocessing (torchvision's, on tensors) implements "
                             f"{', '.join(_RESAMPLE_NAMES.values())}")
    offset, factor = bool(getattr(processor, "rescale_offset", False)), float(processor.rescale_factor)
    normalize = bool(processor.do_normalize) or bool(getattr(processor, "include_top", False))
    if processor.do_rescale and offset and not normalize and math.isclose(factor, 1 / 127.5, rel_tol=1e-6):
        mean = std = (0.5, 0.5, 0.5)  # x / 127.5 - 1
    elif processor.do_rescale and not offset and processor.do_normalize and math.isclose(factor, 1 / 255, rel_tol=1e-6) \
            and not getattr(processor, "include_top", False):
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    else:
        raise OpenAlignError(f"'{directory}': image processor rescaling (do_rescale={processor.do_rescale}, factor "
                             f"{factor}, offset={offset}, do_normalize={processor.do_normalize}, include_top="
                             f"{getattr(processor, 'include_top', None)}) is neither ALIGN's x/127.5-1 nor x/255 "
                             "normalised by mean and std")
    return {"image_size": crop_side, "resize_size": resize, "interpolation": _RESAMPLE_NAMES[resample],
            "mean": list(mean), "std": list(std), "random_flip": True, "center_crop": "floor"}


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One ``.safetensors`` file, or a ``torch.save`` file loaded with ``weights_only`` (no pickled code)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = read_torch_file(path)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` (or its shards), else ``pytorch_model.bin`` loaded with ``weights_only``."""
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = shard_names(index)
        state: dict[str, torch.Tensor] = {}
        if missing := [shard for shard in shards if not (directory / shard).is_file()]:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise OpenAlignError(f"'{directory / missing[0]}' is missing{more}: {index.name} lists it; copy or "
                                 "download the model again")
        for shard in shards:
            state.update(read_safetensors(directory / shard))
        return state
    if (directory / "pytorch_model.bin").is_file():
        return read_weights_file(directory / "pytorch_model.bin")
    raise OpenAlignError(f"'{directory}' has no weights: expected model.safetensors, model.safetensors.index.json "
                         "or pytorch_model.bin")


def shard_names(index: Path) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` names: ``{"weight_map": {weight: file}}``,
    each file a ``.safetensors`` beside it (a name with a folder, or of another kind, is an error:
    an index could otherwise pull weights from another model's directory)."""
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise OpenAlignError(f"'{index}' is malformed: expected {{\"weight_map\": {{weight name: shard file}}}} as "
                             "transformers writes it; copy or download the model again")
    shards = sorted({str(name) for name in weight_map.values()})
    if bad := [name for name in weight_map.values() if not (isinstance(name, str) and Path(name).name == name
                                                            and name.endswith(".safetensors"))]:
        raise OpenAlignError(f"'{index}' names the shard {bad[0]!r}; a shard is a .safetensors file beside the "
                             "index, named without a folder")
    return shards


# openalign's weight names and AlignModel's, as prefixes and whole names
_NAMES = (("image_tower.", "vision_model."), ("text_tower.bert.", "text_model."), ("log_temperature", "temperature"))


def hf_key(key: str, to_hf: bool = True) -> str:
    """An openalign weight's name in ``AlignModel`` (``image_tower.`` → ``vision_model.``, ...),
    or, ``to_hf=False``, the reverse."""
    for ours, theirs in _NAMES:
        source, target = (ours, theirs) if to_hf else (theirs, ours)
        if key.startswith(source):
            return target + key.removeprefix(source)
    return key


def state_dict_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``AlignModel`` names and tensors → openalign's (unknown keys pass through, to be reported)."""
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("text_model.pooler.") or key == "text_model.embeddings.position_ids":
            continue
        if key == "temperature":
            if value.numel() != 1:
                raise OpenAlignError(f"the checkpoint's temperature has shape {tuple(value.shape)}; AlignModel's is "
                                     "one number")
            if not float(value) > 0:
                raise OpenAlignError(f"the checkpoint's temperature is {float(value)}; it must be positive")
            value = value.float().log().reshape(())
        ours[hf_key(key, to_hf=False)] = value
    return ours


# ---------------------------------------------------------------------------------------------- writing


def state_dict_to_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    """openalign names and tensors → HF ``AlignModel``'s, with an identity text pooler."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "log_temperature":  # HF's logits divide by it: the capped scale's inverse
            value = 1 / model.logit_scale
        state[hf_key(key)] = value.detach().contiguous().cpu()
    hidden = model.config.text.hidden_size
    state["text_model.pooler.dense.weight"] = torch.eye(hidden)
    state["text_model.pooler.dense.bias"] = torch.zeros(hidden)
    return state


def hf_config_from_model(config: DualEncoderConfig) -> Any:
    """The ``transformers.AlignConfig`` of an openalign model, or an error naming what HF lacks."""
    from transformers import AlignConfig, AlignTextConfig, AlignVisionConfig

    name = config.name or "this model"
    if not isinstance(config, DualEncoderConfig) or not isinstance(config.image, EfficientNetConfig) \
            or not isinstance(config.text, BertTowerConfig):
        raise OpenAlignError(f"{name} is not an EfficientNet + BERT dual encoder, so it has no AlignModel form: "
                             "save it with format='openalign' (openalign convert --to openalign)")
    if not config.text_projection:
        raise OpenAlignError(f"{name} has no text projection (text_projection: false); Hugging Face's AlignModel "
                             "always has one, so it cannot be exported to 'hf'. Save it with format='openalign'.")
    if config.image_projection:
        raise OpenAlignError(f"{name} projects its image features (image_projection: true); Hugging Face's "
                             "AlignModel has no image projection, so it cannot be exported to 'hf'. "
                             "Save it with format='openalign' (openalign convert --to openalign) instead; a model "
                             "trained with model.image_projection=false (and the embed_dim its error then names) "
                             "exports.")
    pre = config.preprocess
    if pre.resize_mode != "squash":
        raise OpenAlignError(f"{name} resizes images' shorter side (resize_mode: {pre.resize_mode}); the AlignModel "
                             "export writes ALIGN's square resize only")
    if tuple(pre.mean) != (0.5, 0.5, 0.5) or tuple(pre.std) != (0.5, 0.5, 0.5):
        raise OpenAlignError(f"{name} normalises pixels with mean {pre.mean} and std {pre.std}; the AlignModel export "
                             "writes ALIGN's x/127.5-1 only")
    vision = AlignVisionConfig(**{k: _plain(getattr(config.image, k)) for k in _EFFICIENTNET_FIELDS},
                               batch_norm_momentum=1.0 - config.image.batch_norm_momentum,
                               image_size=pre.image_size, hidden_dim=max(640, pre.image_size),
                               depthwise_padding=[], hidden_act="swish", pooling_type="mean")
    text = AlignTextConfig(**{k: getattr(config.text, k) for k in _BERT_FIELDS})
    return AlignConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=config.embed_dim,
                       temperature_init_value=config.temperature_init)


def save_hf_directory(model: nn.Module, directory: Path) -> Path:
    """Write ``config.json``, ``model.safetensors``, the tokenizer and ``AlignProcessor`` files."""
    from transformers import AlignProcessor, EfficientNetImageProcessor

    hf_config = hf_config_from_model(model.config)
    pre = model.config.preprocess
    margin = pre.resize_size - pre.image_size
    if pre.center_crop == "round" and round(margin / 2) != margin // 2:
        log.warning("transformers' AlignProcessor centres the %d px crop of %d px at offset %d, this model's "
                    "preprocessing (center_crop: round) at %d: exported, it sees its evaluation images shifted by a "
                    "pixel", pre.image_size, pre.resize_size, margin // 2, round(margin / 2))
    if pre.antialias == "never":
        log.warning("transformers' AlignProcessor antialiases when it shrinks images, and this model's evaluation "
                    "(antialias: never) does not: exported, it sees slightly smoother images")
    if pre.resize_rounding != "round":
        log.warning("transformers' AlignProcessor rounds resized pixels to the nearest level, and this model's "
                    "preprocessing (resize_rounding: %s) does not: exported, it sees some pixels a level brighter",
                    pre.resize_rounding)
    resample = {name: code for code, name in _RESAMPLE_NAMES.items()}[pre.interpolation]
    tokenizer = copy.deepcopy(model.config.build_tokenizer().hf_tokenizer)
    length = model.config.text.max_length
    tokenizer.model_max_length = length
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the vocabulary's own fixed padding and truncation (128) are not ALIGN's
        backend.no_padding()
        backend.no_truncation()
    # AlignProcessor pads to a tokenizer's max_length over its own 64: this model's length, not the source's 128;
    # model_config_from_hf reads it back
    tokenizer.init_kwargs["max_length"] = length
    image_processor = EfficientNetImageProcessor(
        size={"height": pre.resize_size, "width": pre.resize_size},
        crop_size={"height": pre.image_size, "width": pre.image_size}, resample=resample, do_center_crop=True,
        do_rescale=True, rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False, include_top=False)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config.architectures = ["AlignModel"]
    hf_config.save_pretrained(str(directory))
    write_safetensors(state_dict_to_hf(model), directory / WEIGHTS_FILE, metadata={"format": "pt"})
    AlignProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(directory))
    # kakaobrain/align-base's layout, which transformers 4 reads too: the image processor in
    # preprocessor_config.json; transformers 5's nested processor_config.json breaks 4's loading
    image_processor.save_pretrained(str(directory))
    (directory / "processor_config.json").unlink(missing_ok=True)
    return directory


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise OpenAlignError(f"config key '{key}' {message}: openalign cannot load this AlignModel")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
