"""Class names and prompt templates that openalign ships as data files.

``imagenet1k_classnames.txt``: CLIP's 1,000 readable ImageNet-1k class names, in sorted-wnid order
(the order of ``val/<wnid>/`` folders), as CLIP_benchmark 1.6.2 distributes them (``missile`` and
``sunglasses`` each name two classes, as in CLIP). ``imagenet1k_templates.txt``: CLIP's 80 ImageNet
prompt templates, ``{}`` standing for the class name. ``clip_paper_templates``: those 80 plus
``{}`` alone, big_vision's ``clip_paper`` set that CLIPPO evaluates with (shared spec clippo.md §5.1).

ALIP's zero-shot suite (shared spec alip.md §6.1, ``configs/suites/alip.yaml``): for each dataset
``<key>_classnames.txt``, CLIP's curated class names in torchvision's label order, and
``<key>_templates.txt``, CLIP's prompt templates for it. Sources: OpenAI CLIP's ``data/prompts.md``
(github.com/openai/CLIP), checked against ALIP's ``label.json`` (github.com/deepglint/ALIP); the
templates, and the Pets, Flowers and Caltech-101 names, are CLIP_benchmark 1.6.2's
``en_zeroshot_classification_templates.json`` / ``en_classnames.json`` (its ``{c}`` written ``{}``),
which equal CLIP's.

* ``cifar10`` (10 names, 18 templates), ``cifar100`` (100, 18): the CIFAR label names with ``_`` as
  space, in label order (alphabetical).
* ``food101`` (101, 1): torchvision's order, the sorted ``meta/classes.txt`` (apple pie ... waffles).
* ``pets`` (37, 1): Oxford-IIIT Pet class-id order (breeds alphabetical ignoring case: Abyssinian,
  American Bulldog, ...), torchvision's; CLIP's ``prompts.md`` lists the same breeds sorted
  case-sensitively (cats first) with lower-case dog names, which the lower-casing CLIP tokenizer
  reads the same. ALIP's ``label.json`` has the same list with two typos (``Persian'``,
  ``Yorkshire Terrie``), not copied here.
* ``flowers`` (102, 1): Flowers-102 label order (``imagelabels.mat`` 1..102: pink primrose ...
  blackberry lily).
* ``sun397`` (397, 2): the sorted ``ClassName.txt`` order (abbey ... youth hostel), ``/`` and ``_``
  written as spaces.
* ``cars`` (196, 8): Stanford Cars devkit ``cars_meta.mat`` order (AM General Hummer SUV 2000 ...
  smart fortwo Convertible 2012), torchvision's; not alphabetical.
* ``dtd`` (47, 8): sorted texture names (banded ... zigzagged).
* ``caltech101`` (101, 34): torchvision's order, the case-sensitively sorted
  ``101_ObjectCategories`` folders without ``BACKGROUND_Google`` (Faces, Faces_easy, Leopards,
  Motorbikes, accordion, ... -> off-center face, centered face, leopard, motorbike, accordion, ...);
  CLIP's list starts with ``background``, dropped here as ALIP drops it. ``head of a  crocodile``
  keeps CLIP's double space.
* ``aircraft`` (100, 2): FGVC-Aircraft ``variants.txt`` order (707-320 ... Yak-42).
* ImageNet uses ``imagenet1k_classnames`` and ``imagenet1k_templates`` above.

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
