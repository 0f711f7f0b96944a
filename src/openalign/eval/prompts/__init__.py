"""Class names and prompt templates that openalign ships as data files.

``imagenet1k_classnames.txt``: CLIP's 1,000 readable ImageNet-1k class names, in sorted-wnid order
(the order of ``val/<wnid>/`` folders), as CLIP_benchmark 1.6.2 distributes them (``missile`` and
``sunglasses`` each name two classes, as in CLIP). ``imagenet1k_templates.txt``: CLIP's 80 ImageNet
prompt templates, ``{}`` standing for the class name. ``clip_paper_templates``: those 80 plus
``{}`` alone, big_vision's ``clip_paper`` set that CLIPPO evaluates with (shared spec clippo.md §5.1).

A task setting that takes a file (``classnames``, ``templates_file``) also takes these names
without the ``.txt``: ``classnames: imagenet1k_classnames``.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent
_DERIVED = {"clip_paper_templates": ("imagenet1k_templates", ["{}"])}


def shipped_names() -> list[str]:
    """The names :func:`shipped_lines` accepts."""
    return sorted([path.stem for path in _HERE.glob("*.txt")] + list(_DERIVED))


def shipped_lines(name: str) -> list[str] | None:
    """The lines of a shipped list, or None if openalign ships no list of that name."""
    if name in _DERIVED:
        base, extra = _DERIVED[name]
        return shipped_lines(base) + extra
    path = _HERE / f"{name}.txt"
    return [line for line in path.read_text().splitlines() if line] if path.is_file() else None
