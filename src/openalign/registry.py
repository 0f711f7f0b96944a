"""The registry of architectures and recipes: YAML files shipped in ``openalign/configs``.

``configs/models/NAME.yaml`` describes one architecture; ``configs/recipes/NAME.yaml`` one
experiment (model + loss + data + training + evaluation). Anywhere a name is accepted, a path
to a YAML file of the same shape is accepted too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import deep_merge, did_you_mean, load_yaml
from .errors import ConfigError
from .files import not_a_file

CONFIG_ROOT = Path(__file__).parent / "configs"


def _names(kind: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_ROOT / kind).glob("*.yaml"))


def list_models() -> list[str]:
    """Names of the registered architectures (``align-b7-base``, ...)."""
    return _names("models")


def list_suites() -> list[str]:
    """Names of the shipped evaluation suites (``align``, ``clippo-fewshot``, ...)."""
    return _names("suites")


def list_recipes() -> list[str]:
    """Names of the shipped experiment recipes (``align-b3-mini-cc3m``, ...)."""
    return _names("recipes")


def find_config(kind: str, name_or_path: str | Path) -> Path:
    """The YAML file of a registered ``kind`` ("models", "recipes", "suites") entry, or a given path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return path
        raise ConfigError(f"config file '{path}' {not_a_file(path)}")
    candidate = CONFIG_ROOT / kind / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    noun = kind.removesuffix("s")
    trained = "; a trained model's directory or hub id loads with openalign.load_pretrained" if kind == "models" \
        and "/" in str(name_or_path) else ""
    raise ConfigError(f"unknown {noun} '{name_or_path}'{did_you_mean(str(name_or_path), _names(kind))}{trained}")


def resolve_model_dict(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """The full model mapping for ``spec``: a registry name, ``{name: ..., <overrides>}``, or a complete mapping.

    Registry entries keep their ``name``, so reports and result files can say which model ran.
    """
    if isinstance(spec, (str, Path)):
        spec = {"name": str(spec)}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"must be a model name or a mapping of model settings, got {spec!r}", "model")
    spec = dict(spec)
    if "architecture" in spec or "name" not in spec:
        return spec  # a complete model config, e.g. one saved with a checkpoint
    name = str(spec["name"])
    path = find_config("models", name)
    loaded = load_yaml(path)
    if isinstance(loaded.get("model"), (Mapping, str)) and "architecture" not in loaded:
        return _model_section(loaded["model"], path, {k: v for k, v in spec.items() if k != "name"})
    return {**deep_merge(loaded, spec), "name": name}


def _model_section(section: Mapping[str, Any] | str, path: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The model of a recipe, or of a saved model's ``config.yaml``."""
    return deep_merge(tokenizer_beside(resolve_model_dict(section), path.parent), overrides)


def tokenizer_beside(model: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``model`` (changed in place) with a tokenizer named ``.``, as a saved config names the files
    beside it, read from ``directory``."""
    text = model.get("text")
    if isinstance(text, dict) and text.get("tokenizer") == ".":
        text["tokenizer"] = str(directory)
    return model
