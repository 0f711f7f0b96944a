"""Typed settings: dataclasses filled from YAML mappings, with dotted overrides.

Every settings object in openalign is a dataclass. :func:`from_dict` fills one from a plain
mapping (parsed YAML), converting and checking every value against the field's type hint, and
rejecting unknown keys with a did-you-mean hint. :func:`apply_overrides` applies command-line
overrides such as ``train.lr=1e-3`` to the mapping first, so overrides are checked the same way.

Families of settings whose concrete class depends on a tag (an image tower is ``type:
efficientnet`` or something else) derive from :class:`Variants`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError
from .files import not_a_file

T = TypeVar("T")


class Variants:
    """Base of a family of config dataclasses told apart by a tag key (``type: efficientnet``).

    A class deriving from ``Variants`` without ``tag`` starts a family; its subclasses declared
    with ``tag="name"`` join it. :func:`from_dict` asked for the family base picks the member
    named by the mapping's ``tag_key`` entry, and :func:`to_dict` writes that entry back.
    """

    tag_key: ClassVar[str] = "type"
    variants: ClassVar[dict[str, type]]
    tag: ClassVar[str | None] = None

    def __init_subclass__(cls, tag: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if tag is None:
            cls.variants = {}
        else:
            cls.tag = tag
            cls.variants[tag] = cls


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """A ``; did you mean 'x'?`` hint, or a list of the valid choices when none is close.

    ``prefix`` (a config path) is put before the suggestion, not compared.
    """
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{join_key(prefix, close[0])}'?"
    return f"; valid: {', '.join(choices)}" if choices else ""


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build settings of type ``cls`` from a mapping, validating every key and value.

    ``path`` is the dotted location of ``data`` in the whole config, used in error messages.
    """
    return _convert(cls, data, path)


def to_dict(obj: Any) -> Any:
    """The plain (YAML-ready) form of settings built by :func:`from_dict`, tags included."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        if isinstance(obj, Variants) and obj.tag is not None:
            out[obj.tag_key] = obj.tag
        for field in dataclasses.fields(obj):
            out[field.name] = to_dict(getattr(obj, field.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping's leaves by dotted key: ``{"train": {"lr": 1}}`` → ``{"train.lr": 1}``."""
    if isinstance(tree, dict):
        return {key: value for name, child in tree.items() for key, value in flatten(child, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, value, path)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"is {value!r}, which is not allowed{did_you_mean(value, get_args(tp))}", path)
    if origin in (list, tuple):
        return _convert_sequence(tp, value, path)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"must be a mapping, got {value!r}{_braces_hint(value)}", path)
        _, value_type = get_args(tp)
        return {str(k): _convert(value_type, v, join_key(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path)
    return _convert_scalar(tp, value, path)


def _convert_union(tp: Any, value: Any, path: str) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:
        return _convert(options[0], value, path)
    for option in options:
        try:
            return _convert(option, value, path)
        except ConfigError:
            continue
    raise ConfigError(f"must be a {_type_name(tp)}, got {value!r}", path)


def _convert_sequence(tp: Any, value: Any, path: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"must be a list, got {value!r}", path)
    args = get_args(tp)
    if get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"must hold {len(args)} values, got {len(value)}", path)
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item_type = args[0] if args else Any
    items = [_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if get_origin(tp) is tuple else items


def _convert_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"must be true or false, got {value!r}", path)
    if tp in (int, float):
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"must be a number, got {value!r}", path) from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"must be a number, got {value!r}", path)
        if not math.isfinite(number):  # no setting means anything by NaN or infinity: null where none is meant
            raise ConfigError(f"must be a finite number, got {value!r}", path)
        if tp is int:
            if float(number) != int(number):
                raise ConfigError(f"must be a whole number, got {value!r}", path)
            return int(number)
        return float(number)
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"must be a string, got {value!r}", path)
    raise TypeError(f"config type {tp!r} at '{path}' is not supported by openalign.config")


def _braces_hint(value: Any) -> str:
    """For text that reads as a mapping (an override ``key=a: b``, which stays text): how to write one."""
    if isinstance(value, str) and ": " in value and not value.lstrip().startswith("{"):
        return f" (text: on the command line a mapping is written in braces, {{{value.strip()}}})"
    return ""


def _convert_dataclass(cls: type, value: Any, path: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"must be a mapping of settings, got {value!r}{_braces_hint(value)}", path or "<root>")
    data = dict(value)
    if issubclass(cls, Variants):
        cls = _pick_variant(cls, data, path)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"is unknown{did_you_mean(str(key), fields, path)}", join_key(path, str(key)),
                              unknown=True)
    kwargs = {}
    for name, field in fields.items():
        key = join_key(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError("is required but missing", key)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        if error.key is None:
            raise
        raise ConfigError(error.message, join_key(path, error.key), error.unknown) from None


def _pick_variant(cls: type, data: dict, path: str) -> type:
    key = cls.tag_key  # type: ignore[attr-defined]
    if cls.tag is not None:  # type: ignore[attr-defined]
        given = data.pop(key, cls.tag)  # type: ignore[attr-defined]
        if given != cls.tag:  # type: ignore[attr-defined]
            raise ConfigError(f"must be '{cls.tag}', got {given!r}", join_key(path, key))  # type: ignore[attr-defined]
        return cls
    if key not in data:
        choices = ", ".join(sorted(cls.variants))  # type: ignore[attr-defined]
        raise ConfigError(f"is required; choose one of: {choices}", join_key(path, key))
    name = data.pop(key)
    if name not in cls.variants:  # type: ignore[attr-defined]
        hint = did_you_mean(name, cls.variants)  # type: ignore[attr-defined]
        raise ConfigError(f"is '{name}', which is unknown{hint}", join_key(path, key))
    return cls.variants[name]  # type: ignore[attr-defined]


class _NoRepeatsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error (PyYAML
    keeps the last one silently: a recipe's first ``lr:`` would be ignored without a word)."""


def _mapping_without_repeats(loader: _NoRepeatsLoader, node: yaml.MappingNode) -> Iterator[dict]:
    first: dict[Any, int] = {}  # key -> its index among the mapping's own keys
    for index, (key_node, _) in enumerate(node.value):
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *defaults': its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            earlier = first.setdefault(key, index)
        except TypeError:  # an unhashable key: the safe loader's own error says so
            continue
        if earlier != index:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice (lines {node.value[earlier][0].start_mark.line + 1} "
                f"and {key_node.start_mark.line + 1}); keep one", key_node.start_mark)
    data: dict = {}
    yield data  # made first and filled after, as the safe loader does: an anchor may refer to its own mapping
    data.update(loader.construct_mapping(node))


_NoRepeatsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def parse_yaml(text: str) -> Any:
    """YAML's safe loading, with a key given twice in one mapping an error."""
    return yaml.load(text, Loader=_NoRepeatsLoader)  # noqa: S506 (a SafeLoader subclass)


# A config openalign saves (a checkpoint's or run's recipe, a model directory's config) opens and
# closes with these lines. A file that opens with the first and lacks the last (anywhere: a note may
# follow it) was cut short (an interrupted copy or save): YAML cut at a line break is still YAML,
# and its missing settings would quietly take their defaults. A file without the opening line
# (hand-written) is read as is.
SAVED_OPENING = "# openalign config: it closes with the line '# end'; a file without it was cut short\n"
SAVED_END = "# end\n"


def dump_saved(data: Mapping[str, Any]) -> str:
    """``data`` as YAML between :data:`SAVED_OPENING` and :data:`SAVED_END`."""
    return SAVED_OPENING + yaml.safe_dump(dict(data), sort_keys=False) + SAVED_END


def cut_short(text: str) -> bool:
    """Whether ``text`` is a saved config (:func:`dump_saved`) that lost its end."""
    return text.startswith(SAVED_OPENING) and SAVED_END.strip() not in map(str.strip, text.splitlines())


def peek_yaml(path: str | Path) -> dict[str, Any] | None:
    """The mapping a YAML file holds, or None for a file that is missing, unreadable or holds none:
    for a look at a file that may not be a recipe (is this a run's directory?), not for loading one."""
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' {not_a_file(path)}")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of settings at the top level")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, merging nested mappings key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` (``a.b[0].c=value`` for a list item) into its key path and its YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like key.path=value, e.g. train.lr=1e-3")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ConfigError(f"override '{text}': the value is not valid YAML ({problem}); close its brackets, "
                          "or quote it to give a string") from None
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):  # "pipe:curl -H 'X-Token: abc' ...": text
        value = raw.strip()  # a mapping on the command line is written {a: 1}; 'a: 1' is its words
    return override_keys(text), value


def override_keys(text: str) -> list[str]:
    """The key path of ``key.path=value``, a list item as errors name it (``eval.tasks[0].root``) or
    dotted (``eval.tasks.0.root``)."""
    return re.sub(r"\[(-?\d+)\]", r".\1", text.partition("=")[0].strip()).split(".")


def require_at_least(settings: Any, minimum: int, *names: str) -> None:
    """A ConfigError naming the first of ``names`` whose value in ``settings`` is below ``minimum``."""
    for name in names:
        value = getattr(settings, name)
        if value < minimum:
            raise ConfigError(f"must be at least {minimum}, got {value}", name)


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str],
                    overridden: set[tuple[str, ...]] | None = None) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.path=value`` override set (list items by index).

    An override that changes a section's variant (``data.train.type=webdataset`` where the recipe
    has ``type: shapes``) starts that section afresh: the recipe's other settings of it, which
    belong to the old variant, are dropped; those set by overrides are kept, in any order.
    ``overridden`` (updated) holds the key paths earlier overrides set, for one applied at a time."""
    result = copy.deepcopy(dict(data))
    overridden = set() if overridden is None else overridden
    tag_keys = _tag_keys()
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = result
        for depth, key in enumerate(keys[:-1]):
            where = _key_path(keys[: depth + 1])
            if isinstance(node, dict) and node.get(key) is None and keys[depth + 1].isdigit():
                raise ConfigError(f"is not set in this recipe, so it has no item {keys[depth + 1]}: give the whole "
                                  f"list, e.g. {where}=[...]", where)
            node = _child(node, key, where)
        if isinstance(node, dict) and keys[-1] in tag_keys and keys[-1] in node and node[keys[-1]] != value:
            section = tuple(keys[:-1])
            for other in [key for key in node if key != keys[-1]]:
                if not any(path[:len(section) + 1] == (*section, other) for path in overridden):
                    del node[other]
        _set(node, keys[-1], value, _key_path(keys))
        overridden.add(tuple(keys))
    return result


def _tag_keys() -> set[str]:
    """The keys that name a variant in any family of settings (``type``, ``task``, ...)."""
    found, families = set(), [Variants]
    while families:
        family = families.pop()
        found.add(family.tag_key)
        families += family.__subclasses__()
    return found


def _child(node: Any, key: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, where)]
    if node.get(key) is None:
        node[key] = {}
    if not isinstance(node[key], (dict, list)):
        raise ConfigError(f"is a value ({node[key]!r}), not a section of settings", where)
    return node[key]


def _set(node: Any, key: str, value: Any, where: str) -> None:
    if isinstance(node, list):
        node[_index(node, key, where)] = value
    else:
        node[key] = value


def _key_path(keys: list[str]) -> str:
    """Keys as errors name them: ``eval.tasks[0].root``."""
    return "".join(f"[{key}]" if key.lstrip("-").isdigit() else f".{key}" for key in keys).lstrip(".")


def _index(node: list, key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"does not exist: the list has {len(node)} item(s), numbered from 0", where)
    return int(key)
