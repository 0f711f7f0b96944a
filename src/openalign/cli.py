"""The ``openalign`` command line: train, eval, embed, classify, search, convert, demo, data, models, recipes, config."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from rich.logging import RichHandler
from rich.markup import escape

from . import __version__
from .errors import ConfigError, OpenAlignError, Terminated
from .files import not_a_file, replaceable, starts_with
from .precision import PRECISIONS, precision_name, precision_scope
from .progress import console
from .registry import list_suites

log = logging.getLogger("openalign")


def _cmd_models(args: argparse.Namespace) -> None:
    from .registry import list_models

    print("\n".join(list_models()))


def _cmd_recipes(args: argparse.Namespace) -> None:
    from .registry import list_recipes

    print("\n".join(list_recipes()))


def _cmd_config(args: argparse.Namespace) -> None:
    from .config import to_dict
    from .recipe import load_recipe

    resolved = yaml.safe_dump(to_dict(load_recipe(args.recipe, args.overrides)), sort_keys=False)  # checked first:
    # nothing is printed for a recipe with a mistake (`openalign config demo ... > my_recipe.yaml`)
    print(f"# openalign config {args.recipe}: every setting resolved. The model's are inlined: to train another "
          "model,\n# replace the whole model section by 'model: NAME' (or pass model.name=NAME), not its name alone.")
    print(resolved, end="")


DEMO_DATA = "runs/demo/data"


def _cmd_train(args: argparse.Namespace) -> None:
    from .distributed import world_info
    from .recipe import load_recipe
    from .train import train

    allowed = [name.strip() for given in args.allow_change for name in given.split(",") if name.strip()]
    result = train(load_recipe(args.recipe, args.overrides), resume=args.resume, allow_changes=allowed)
    if result.metrics and world_info()[0] == 0:  # every rank has them; one prints
        print(json.dumps(result.metrics, indent=2))


# the eval options whose names are not their task setting's
_EVAL_OPTIONS = {"train_root": "--train", "val_root": "--val", "sweep_root": "--sweep",
                 "batch_size": "--probe-batch-size", "templates": "--template"}


def _eval_task(args: argparse.Namespace) -> Any:
    """The task an ``openalign eval TASK`` command runs."""
    from .eval import (ClipBenchmarkProbeEvalConfig, FewShotEvalConfig, KnnEvalConfig, LinearProbeEvalConfig,
                       RetrievalEvalConfig, SentencePairEvalConfig, SentenceZeroShotEvalConfig, ShapesEvalConfig,
                       ZeroShotEvalConfig)

    if args.task == "shapes":
        from .demo import trained_shapes_root

        return ShapesEvalConfig(root=args.root or trained_shapes_root(args.model) or DEMO_DATA)
    if args.task == "retrieval":
        return RetrievalEvalConfig(json=args.json, split=args.split, image_root=args.image_root,
                                   recall_k=tuple(args.recall_k), contrastive_batch=args.contrastive_batch)
    if args.task in ("zeroshot", "zeroshot_sentences"):
        prompts = {"classnames": args.classnames, "templates_file": args.templates_file,
                   "canonicalize": args.canonicalize, **({"templates": tuple(args.template)} if args.template else {})}
        if args.task == "zeroshot":
            return ZeroShotEvalConfig(root=args.root, split=args.split, **prompts)
        return SentenceZeroShotEvalConfig(val=args.val, **prompts)
    if args.task == "knn":
        given = {"temperature": args.temperature} if args.temperature is not None else {}
        return KnnEvalConfig(train_root=args.train, val_root=args.val, k=args.k, **given)
    if args.task == "fewshot":
        return FewShotEvalConfig(train_root=args.train, val_root=args.val, shots=args.shots)
    if args.task == "sentence_pairs":
        return SentencePairEvalConfig(train=args.train, val=args.val, epochs=args.epochs, lr=args.lr,
                                      head_lr=args.head_lr, seed=args.seed, regression=args.regression)
    if args.task == "clip_benchmark_probe":
        return ClipBenchmarkProbeEvalConfig(train_root=args.train, val_root=args.val, sweep_root=args.sweep,
                                            sweep_proportion=args.sweep_proportion, fewshot_k=args.fewshot_k,
                                            lr=args.lr, epochs=args.epochs, batch_size=args.probe_batch_size,
                                            seed=args.seed)
    return LinearProbeEvalConfig(train_root=args.train, val_root=args.val, c=args.c, standardize=args.standardize)


def _cmd_eval(args: argparse.Namespace) -> None:
    from .eval.suite import is_record_file, list_settings, make_record

    try:
        task = _eval_task(args)
        if getattr(args, "preprocess", None):
            task = dataclasses.replace(task, preprocess=_eval_preprocess(args.preprocess))
    except ConfigError as error:  # named as the option that set it
        option = _EVAL_OPTIONS.get(error.key or "", f"--{(error.key or '').replace('_', '-')}")
        raise OpenAlignError(f"{option} {error.message}") from None
    # checked before the work
    output = replaceable(_output_file(args.output), is_record_file, "an openalign result") if args.output else None
    model, _, _ = _inference_model(args, optimize=not task.fine_tunes)
    try:  # before the work (--preprocess against this model, named as the option)
        task.check_model(model)
    except ConfigError as error:
        if not (error.key or "").startswith("preprocess"):
            raise
        name = error.key.removeprefix("preprocess").lstrip(".")
        raise OpenAlignError(f"--preprocess {name + ' ' if name else ''}{error.message}") from None
    device, listed = next(model.parameters()).device, list_settings(task)
    with precision_scope(args.precision):
        metrics = task.run(model, device, args.batch_size)
    record = make_record(task.dataset, model.config.name, str(args.model), args.task, metrics, task,
                         getattr(model, "weights_path", None), precision_name(device, args.precision), listed)
    print(json.dumps(record, indent=2))
    if output:
        output.write_text(json.dumps(record, indent=2))


def _eval_preprocess(settings: list[str]) -> Any:
    """``--preprocess key=value ...`` as the task's :class:`~openalign.eval.tasks.EvalPreprocess`."""
    from .config import apply_overrides, from_dict
    from .eval.tasks import EvalPreprocess

    try:
        return from_dict(EvalPreprocess, apply_overrides({}, settings))
    except ConfigError as error:
        raise OpenAlignError(f"--preprocess: {error}") from None


def _output_file(path: str, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` made ready for writing (its folder created), or an error now rather than after the work."""
    output = Path(path).expanduser()
    if suffixes and output.suffix.lower() not in suffixes:
        raise OpenAlignError(f"'{path}': the output must end in {' or '.join(suffixes)}")
    if output.is_dir():
        raise OpenAlignError(f"'{path}' is a directory; name a file in it")
    existing = next(parent for parent in output.parents if parent.exists())
    if not existing.is_dir():
        raise OpenAlignError(f"'{path}' cannot be written: '{existing}' is a file, not a directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OpenAlignError(f"cannot create the folder of '{path}': {error.strerror or error}") from None
    try:  # the output is written whole under a temporary name beside it: that must be possible too
        tempfile.TemporaryFile(dir=output.parent).close()
    except OSError as error:
        raise OpenAlignError(f"'{path}' cannot be written: its folder refuses new files ({error.strerror or error})"
                             ) from None
    return output


def _cmd_eval_examples(args: argparse.Namespace) -> None:
    from .eval.examples import PICTURE_SUFFIXES, is_examples_picture, retrieval_examples

    out = replaceable(_output_file(args.out, PICTURE_SUFFIXES), is_examples_picture, "an openalign examples picture")
    model, _, _ = _inference_model(args)
    with precision_scope(args.precision):
        rows = retrieval_examples(model, args.json, next(model.parameters()).device, out, args.split,
                                  args.image_root, args.queries, args.k, args.seed)
    hits = sum(truth in found for _, found, truth in rows)
    print(f"wrote {out}: {len(rows)} captions, {hits} with their image in the top {args.k}")


def _cmd_eval_suite(args: argparse.Namespace) -> None:
    from .eval.suite import load_suite, run_suite

    suite = load_suite(args.suite)
    model, _, _ = _inference_model(args, optimize=not any(task.fine_tunes for task in suite.tasks))
    for record in run_suite(suite, model, str(args.model), args.out, next(model.parameters()).device,
                            precision=args.precision):
        print(json.dumps(record))
    print(f"results in {args.out}; merge them with: openalign eval report {args.out}")


def _cmd_eval_report(args: argparse.Namespace) -> None:
    from .eval.suite import collect_examples, collect_records, report_files, write_report

    if not Path(args.out).name:
        raise OpenAlignError(f"--out '{args.out}' names no file: give a prefix, e.g. results/report")
    markdown, table, _ = report_files(args.out)
    for path, opening in ((markdown, b"# openalign evaluation report"), (table, b"model,pretrained,dataset,task,")):
        replaceable(path, starts_with(opening), "an openalign report")
    markdown, table = write_report(collect_records(args.paths), args.out, collect_examples(args.paths))
    print(markdown.read_text())
    print(f"wrote {markdown} and {table}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, tuple(args.overrides))


def _cmd_data_shapes(args: argparse.Namespace) -> None:
    from .data.shapes import ShapesSpec, build_shapes_dataset

    try:
        spec = ShapesSpec(num_train=args.train, num_test=args.test, image_size=args.image_size, seed=args.seed,
                          alt_text_noise=args.alt_text_noise)
    except ConfigError as error:  # named as the option that set it
        option = {"num_train": "train", "num_test": "test"}.get(error.key or "", error.key or "")
        raise OpenAlignError(f"--{option.replace('_', '-')} {error.message}") from None
    print(build_shapes_dataset(args.out, spec))


def _cmd_data_caption(args: argparse.Namespace) -> None:
    from .data.caption import caption_shards
    from .data.shards import expand_shards

    summary = caption_shards(args.shards, args.captioner, args.out, batch_size=args.batch_size, device=args.device,
                             max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, prompt=args.prompt,
                             field=args.field, no_repeat_ngram_size=args.no_repeat_ngram_size)
    totals = summary["totals"]
    print(f"{args.out}: {totals['shards']} shards, {totals['captioned']} of {totals['samples']} samples captioned, "
          f"{totals['skipped']} skipped (no or undecodable image, or an empty caption); summary in "
          f"{Path(args.out) / 'captions.json'}")
    mine = {source.name for source in expand_shards(args.shards)}  # an earlier run's failures are not this run's
    if earlier := sorted(set(summary["failed_shards"]) - mine):
        log.warning("%s also lists %d shard(s) that an earlier run could not read and this one was not given (%s): "
                    "pass them again to retry", Path(args.out) / "captions.json", len(earlier), ", ".join(earlier[:3]))
    if failed := [entry for name, entry in summary["failed_shards"].items() if name in mine]:
        listed = "; ".join(f"{entry['source']} ({entry['error']})" for entry in failed)
        raise OpenAlignError(f"{len(failed)} shard(s) could not be read and were skipped: {listed}")
    if totals["samples"] and not totals["captioned"]:
        empty = sum(len(entry.get("skipped_empty_caption", [])) for entry in summary["shards"].values())
        why = (" (the captioner wrote an empty caption for every image: is --captioner a captioning model, and "
               "--prompt one it takes?)" if empty == totals["samples"] else "")
        raise OpenAlignError(f"no sample got a caption: see why in {Path(args.out) / 'captions.json'}{why}")


def _cmd_data_caltech101(args: argparse.Namespace) -> None:
    from .data.splits import caltech101_split

    count = caltech101_split(args.root, args.out, args.split, args.seed, args.copy)
    print(f"{args.out}: ALIP's Caltech-101 {args.split} split, {count} images; evaluate it with "
          f"openalign eval zeroshot --root {args.out} --classnames caltech101_classnames "
          "--templates-file caltech101_templates")


def _cmd_data_inspect(args: argparse.Namespace) -> None:
    from .data.inspect import format_summary, inspect_shards

    summary = inspect_shards(args.shards, args.text_key, show_progress=not args.json,
                             min_image_side=args.min_image_side, drop_non_descriptive=args.drop_non_descriptive)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if not summary["usable"]:  # a script's check before a long job: training would stop on these shards
        given = " ".join(args.shards) if len(args.shards) <= 3 else f"the {len(args.shards)} shard patterns given"
        raise OpenAlignError(f"no usable sample in {given}: training would skip every one (the reasons are above)")


def _cmd_data_convert(args: argparse.Namespace) -> None:
    from .data.convert import convert_table
    from .data.sources import TableSourceConfig

    extra = dict(args.extra_column)
    table = TableSourceConfig(path=args.table, image_column=args.image_column, text_column=args.text_column,
                              extra_columns=extra, image_root=args.image_root)
    sizes = convert_table(table, args.out, args.samples_per_shard)
    print(f"wrote {len(sizes)} shard(s), {sum(sizes.values())} samples, to {args.out} (sizes.json beside them); "
          f"train on them with data.train.type=webdataset "
          f"data.train.urls='{Path(args.out) / ('{00000..%05d}.tar' % (len(sizes) - 1))}'")


def _inference_model(args: argparse.Namespace, optimize: bool = True) -> tuple[Any, Any, Any]:
    """``load_pretrained(args.model)`` on ``args.device``, the model optimised for inference unless
    ``optimize`` is false (a task that fine-tunes a copy)."""
    from .inference import optimize_for_inference
    from .pretrained import load_pretrained

    model, preprocess, tokenizer = load_pretrained(args.model, device=args.device)
    return (optimize_for_inference(model, inplace=True) if optimize else model), preprocess, tokenizer


_OTHER_FORMATS = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".npy", ".npz", ".pt", ".pth", ".safetensors", ".h5",
                  ".arrow", ".feather", ".pkl")


def _cmd_embed(args: argparse.Namespace) -> None:
    from .inference import embed_folder, is_index, model_source, probe_embedding, write_index

    # checked now, not after embedding every image; a link's target written; only an index replaced
    if Path(args.out).suffix.lower() in _OTHER_FORMATS:  # Parquet written under another format's name
        raise OpenAlignError(f"--out '{args.out}': embed writes a Parquet file; name it .parquet")
    out = replaceable(_output_file(args.out).resolve(), is_index, "an index of embeddings")
    model, preprocess, _ = _inference_model(args)
    with precision_scope(args.precision):
        paths, embeddings = embed_folder(model, preprocess, args.images, args.batch_size, args.num_workers)
    write_index(out, paths, embeddings, model_name=model.config.name, model_source=model_source(args.model),
                model_probe=probe_embedding(model, preprocess))
    print(f"wrote {len(paths)} embeddings ({embeddings.shape[1]}-d) to {args.out}")


def _cmd_classify(args: argparse.Namespace) -> None:
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .inference import DEFAULT_TEMPLATES, check_labels, classify_files, find_images

    if args.labels_file:
        try:
            lines = Path(args.labels_file).read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is no text
        except (OSError, UnicodeDecodeError) as error:
            raise OpenAlignError(f"cannot read --labels-file '{args.labels_file}': {error}") from None
        labels, given = [line.strip() for line in lines if line.strip()], f"--labels-file '{args.labels_file}'"
    else:
        labels, given = [label.strip() for label in args.labels.split(",") if label.strip()], f"--labels '{args.labels}'"
    if not labels:
        raise OpenAlignError(f"{given} names no label; give comma-separated labels ('a cat,a dog') or a file of "
                             "one label per line (--labels-file)")
    check_labels(labels, given)  # before the model loads, as the images are
    # a directory (recursively) or a glob pattern: its image files, as embed takes them; a file as it is
    given = [os.path.expanduser(image) for image in args.images]
    # a file whose name holds glob characters ('a[1].jpg') is itself
    named = [image for image in given
             if not (Path(image).is_dir() or (glob.has_magic(image) and not Path(image).exists()))]
    if missing := [image for image in named if not Path(image).is_file()]:
        raise OpenAlignError(f"{len(missing)} of the {len(named)} images are not files: "
                             f"{', '.join(f'{image!r} {not_a_file(image)}' for image in missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
    images = list(dict.fromkeys(path for image in given  # each once, where arguments overlap
                                for path in ([image] if image in named else find_images(image))))
    model, preprocess, tokenizer = _inference_model(args)
    templates = DEFAULT_TEMPLATES if args.templates == "default" else None
    with precision_scope(args.precision):
        images, probabilities = classify_files(model, preprocess, tokenizer, images, labels, templates,
                                               args.batch_size, args.num_workers)
    if args.format != "table":
        _print_records(args.format, [{"image": image, "probabilities": dict(zip(labels, row))}
                                     for image, row in zip(images, probabilities.tolist())])
        return
    console = Console()
    table = Table(title=Text(f"zero-shot probabilities ({model.config.name})"))
    wide = max(cell_len(_shown(image)) for image in images) + sum(
        max(cell_len(_shown(label)), 5) + 3 for label in labels) + 4  # terminal cells: a CJK character takes two
    if wide <= console.width:  # a column per label
        table.add_column("image", overflow="fold")
        for label in labels:
            table.add_column(Text(_shown(label)), justify="right", no_wrap=True)
        for image, row in zip(images, probabilities.tolist()):
            table.add_row(Text(_shown(image)), *(f"{p:.3f}" for p in row))
    else:  # too many labels for the width: a row per label, most probable first, never squeezed to '0.…'
        for column, justify in (("image", "left"), ("label", "left"), ("probability", "right")):
            table.add_column(column, justify=justify, overflow="fold", no_wrap=column == "probability")
        for image, row in zip(images, probabilities.tolist()):
            ranked = sorted(zip(row, labels), key=lambda pair: -pair[0])
            for place, (p, label) in enumerate(ranked):
                table.add_row(Text(_shown(image) if place == 0 else ""), Text(_shown(label)), f"{p:.3f}",
                              end_section=place == len(row) - 1)
    console.print(table)


def _print_records(form: str, records: list[dict[str, Any]]) -> None:
    """``records`` on stdout for a script, a line each, never folded: as JSON objects (``jsonl``), or
    as tab-separated values under a header (``tsv``; a nested mapping's keys become columns, and a
    tab or line break in a path or label is written as an escape)."""
    if form == "jsonl":
        for record in records:
            print(json.dumps(record))  # ASCII: a file name's undecodable bytes (surrogates) included
        return
    for number, record in enumerate(records):
        cells = [(name, value) for key, value in record.items()
                 for name, value in (value.items() if isinstance(value, dict) else [(key, value)])]
        if number == 0:  # a label named 'image' is one more column, not the image's
            print("\t".join(_shown(name) for name, _ in cells))
        print("\t".join(f"{value:.6f}" if isinstance(value, float) else _shown(str(value)) for _, value in cells))


def _shown(text: str) -> str:
    """``text`` safe for the terminal: control characters (an escape sequence or a line break in a
    file name or an index someone else made) written as escapes, not sent to the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _cmd_search(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .eval import embed_texts
    from .inference import model_source, probe_embedding, read_index, same_image_side, search

    if not args.query.strip():
        raise OpenAlignError("the search query is blank: give the text to search for, e.g. \"a red car\"")
    index = read_index(args.index)
    model, preprocess, tokenizer = _inference_model(args)
    source = model_source(args.model)
    if (index.model_name and index.model_name != model.config.name) or \
            (index.model_source and model_source(index.model_source) != source):
        log.warning("the index was built with model '%s' (%s), but the query is embedded with '%s' (%s): "
                    "scores are meaningful only with the model that built the index",
                    index.model_name, index.model_source, model.config.name, source)
    elif index.model_probe and not same_image_side(index.model_probe, probe_embedding(model, preprocess)):
        log.warning("the model '%s' embeds images otherwise than when it built the index (retrained or replaced "
                    "since?): scores are meaningful only with the weights that built it; embed the images again",
                    args.model)
    with precision_scope(args.precision):
        query = embed_texts(model, tokenizer, [args.query], next(model.parameters()).device, show_progress=False)
    scores, indices = search(index.embeddings, query[0], args.k)
    if args.format != "table":
        ranked = enumerate(zip(scores.tolist(), indices.tolist()), start=1)
        _print_records(args.format, [{"rank": rank, "score": score, "path": index.paths[position]}
                                     for rank, (score, position) in ranked])
        return
    table = Table(title=Text(f"'{_shown(args.query)}' in {_shown(args.index)}"))
    for column, justify in (("rank", "right"), ("score", "right"), ("path", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for rank, (score, position) in enumerate(zip(scores.tolist(), indices.tolist()), start=1):
        table.add_row(str(rank), f"{score:.4f}", Text(_shown(index.paths[position])))
    Console().print(table)


def _cmd_convert(args: argparse.Namespace) -> None:
    from .pretrained import convert

    print(f"wrote {convert(args.source, args.destination, args.to, args.overwrite, args.architecture)} "
          f"({args.to} format)")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum`` (a batch size, a count of workers)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def _field_column(text: str) -> tuple[str, str]:
    """An argparse type: ``FIELD=COLUMN``."""
    field, _, column = text.partition("=")
    if not field.strip() or not column.strip():
        raise argparse.ArgumentTypeError(f"'{text}' is not FIELD=COLUMN, e.g. caption=synthetic_caption")
    return field.strip(), column.strip()


def _runs(command: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int | None]) -> None:
    """Make ``func`` the command's action, and record the command's own parser in what it parses, for
    ``_argument_of`` (the eval tasks share one function)."""
    command.set_defaults(func=func, command_parser=command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openalign", description="Train, evaluate and use ALIGN-family models.")
    parser.add_argument("--version", action="version", version=f"openalign {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _runs(commands.add_parser("models", help="list registered architectures"), _cmd_models)
    _runs(commands.add_parser("recipes", help="list shipped recipes"), _cmd_recipes)

    config = commands.add_parser("config", help="print a recipe with overrides applied, fully resolved")
    config.add_argument("recipe", help="recipe name (see 'openalign recipes') or YAML path")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-3")
    _runs(config, _cmd_config)

    train = commands.add_parser("train", help="train from a recipe (launch with torchrun for several GPUs)")
    train.add_argument("recipe", help="recipe name (see 'openalign recipes') or YAML path")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-3 train.batch_size=256")
    train.add_argument("--resume", metavar="latest|PATH",
                       help="'latest' (this run's newest checkpoint, if any), a checkpoint or a run directory")
    train.add_argument("--allow-change", metavar="KEY", action="append", default=[],
                       help="with --resume: a setting that may differ from the checkpoint's, e.g. data.train.root "
                       "for a dataset moved to another path (repeat it, or separate keys with commas)")
    _runs(train, _cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a model (CLIP_benchmark's metrics and result schema)")
    tasks = evaluate.add_subparsers(dest="task", required=True, metavar="TASK")
    precision_help = "auto (default): bf16 autocast on GPU, fp32 on CPU; bf16, fp16 or fp32 anywhere"
    shapes = tasks.add_parser("shapes", help="retrieval, zero-shot and 1-NN on the built-in shapes dataset")
    shapes.add_argument("--root", help=f"the shapes dataset directory (default: the one a run given as --model "
                        f"trained on, else {DEMO_DATA})")
    retrieval = tasks.add_parser("retrieval", help="image-text retrieval R@1/5/10 on a Karpathy-split JSON")
    retrieval.add_argument("--json", required=True, help="dataset_coco.json, dataset_flickr30k.json, ..., or a "
                                                         "CLIP_benchmark webdataset root (wds_mscoco_captions/)")
    retrieval.add_argument("--split", default="test")
    retrieval.add_argument("--image-root", help="the folder the JSON's filepath/filename are relative to "
                                                "(default: the JSON's folder)")
    retrieval.add_argument("--recall-k", nargs="+", type=int, default=[1, 5, 10], metavar="K",
                           help="the k of recall@k (default 1 5 10; CLIP_benchmark's --recall_k)")
    retrieval.add_argument("--contrastive-batch", type=int, metavar="N",
                           help="also the contrastive loss and in-batch accuracy of each image with its first "
                                "caption, in batches of N (open_clip's validation loss)")
    zeroshot = tasks.add_parser("zeroshot", help="zero-shot classification of a folder of class subfolders")
    zeroshot.add_argument("--root", required=True, help="class folders (imagenet/val/<class>/<image>) or a "
                                                        "CLIP_benchmark webdataset root (wds_imagenet1k/)")
    zeroshot.add_argument("--split", help="the split of a CLIP_benchmark webdataset root (default: test); class "
                          "folders have none")
    _prompt_options(zeroshot, "one name per class folder (sorted order; numbers by value), a JSON list/mapping, or "
                              "a shipped list "
                              "(imagenet1k_classnames)", "imagenet1k_templates, clip_paper_templates")
    sentences = tasks.add_parser("zeroshot_sentences", help="zero-shot classification of a file of sentences "
                                                            "(SST-2's dev.tsv: sentence, label)")
    sentences.add_argument("--val", required=True, help="a TSV with a header (sentence, label) or JSONL")
    _prompt_options(sentences, "one name per label, in the labels' sorted order (a file, JSON list/mapping, or a "
                               "shipped list: sst2_classnames); default the labels", "sst2_templates")
    knn = tasks.add_parser("knn", help="kNN classification: train folders are the memory, val folders the queries")
    knn.add_argument("--train", required=True, help="e.g. imagenet/train")
    knn.add_argument("--val", required=True, help="e.g. imagenet/val")
    knn.add_argument("--k", type=_at_least(1), default=1, help="1: COYO-ALIGN's 1-NN; 20: weighted voting")
    knn.add_argument("--temperature", type=float,
                     help="the votes' weight exp(cosine / temperature) (default: the task's, 0.07 as DINO)")
    fewshot = tasks.add_parser("fewshot", help="CLIPPO's few-shot ridge probe on pre-projection image features (its "
                                               "images: --preprocess resize_size=256 image_size=224, as the clippo "
                                               "suite sets)")
    fewshot.add_argument("--train", required=True, help="class folders to sample the shots from")
    fewshot.add_argument("--val", required=True, help="class folders to score")
    fewshot.add_argument("--shots", type=_at_least(1), default=10)
    probe = tasks.add_parser("linear_probe", help="full-data logistic-regression probe on pre-projection features")
    probe.add_argument("--train", required=True, help="class folders to fit on")
    probe.add_argument("--val", required=True, help="class folders to score")
    probe.add_argument("--c", type=float, default=None,
                       help="inverse L2 strength (scikit-learn's C); default: chosen on a held-out 20%% of the "
                            "training images by CLIP's search over 1e-6..1e6")
    probe.add_argument("--standardize", action="store_true",
                       help="standardise the features first (default: as they are, as CLIP's probe)")
    lp = tasks.add_parser("clip_benchmark_probe", help="CLIP_benchmark's linear probe: AdamW on normalised "
                                                       "image embeddings, a weight-decay sweep")
    lp.add_argument("--train", required=True, help="class folders to fit on")
    lp.add_argument("--val", required=True, help="class folders to score (CLIP_benchmark's test split)")
    sweep = lp.add_mutually_exclusive_group()
    sweep.add_argument("--sweep", help="class folders to choose the weight decay on (CLIP_benchmark's --val_split); "
                                       "without this or --sweep-proportion the weight decay is 0")
    sweep.add_argument("--sweep-proportion", type=float, help="choose it on this random share of the training "
                                                               "images instead (CLIP_benchmark's --val_proportion)")
    lp.add_argument("--fewshot-k", type=int, default=-1, help="training images per class; -1 (default): all")
    lp.add_argument("--lr", type=float, default=0.1, help="AdamW's peak learning rate (cosine to 0)")
    lp.add_argument("--epochs", type=_at_least(1), default=10)
    lp.add_argument("--probe-batch-size", type=_at_least(1), default=64, help="the probe's training batch")
    lp.add_argument("--seed", type=int, default=0, help="the few-shot sample, held-out share, initialisation, "
                                                        "shuffling")
    pairs = tasks.add_parser("sentence_pairs", help="GLUE-style sentence(-pair) classification or regression (STS-B): "
                                                    "fine-tune a copy of a pixel model (CLIPPO) with a linear head, "
                                                    "score the val split")
    pairs.add_argument("--train", required=True, help="a TSV with a header (sentence1 or sentence, optional "
                                                      "sentence2, label) or JSONL with those keys")
    pairs.add_argument("--val", required=True, help="the split to score, in the same format (e.g. SST-2/dev.tsv)")
    pairs.add_argument("--epochs", type=_at_least(1), default=3, help="passes over the training split")
    pairs.add_argument("--lr", type=float, default=1e-4, help="the encoder's learning rate (AdamW)")
    pairs.add_argument("--head-lr", type=float, default=1e-3, help="the new linear head's learning rate")
    pairs.add_argument("--seed", type=int, default=0, help="the head's initialisation and the shuffling")
    pairs.add_argument("--regression", action="store_true", help="the labels are scores (STS-B): a one-output head "
                                                                 "trained by squared error, scored by Pearson's "
                                                                 "and Spearman's correlation")
    for task in (shapes, retrieval, zeroshot, sentences, knn, fewshot, probe, lp, pairs):
        task.add_argument("--model", "--checkpoint", dest="model", required=True,
                          help="an openalign model, checkpoint or run directory, an AlignModel directory or a hub id")
        task.add_argument("--batch-size", type=_at_least(1), default=32 if task is pairs else 256,
                          help="the fine-tuning (and scoring) batch" if task is pairs else None)
        task.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        task.add_argument("--precision", default="auto", choices=PRECISIONS, help=precision_help)
        task.add_argument("--output", help="also write the result JSON here")
        if task not in (sentences, pairs, shapes):  # images a paper preprocesses otherwise than the model
            task.add_argument("--preprocess", nargs="+", action="extend", metavar="KEY=VALUE",
                              help="the task's own image preprocessing in place of the model's (e.g. resize_size=256 "
                                   "image_size=224; keys: image_size, resize_size, resize_mode, interpolation, "
                                   "center_crop, antialias)")
        if task is not pairs:  # fine-tuning changes the weights: nothing to cache
            task.add_argument("--cache-dir", help="reuse image embeddings across runs (keyed by weights, "
                                                  "preprocessing, files)")
        _runs(task, _cmd_eval)
    examples = tasks.add_parser("examples", help="a PNG grid of captions and the top images a model retrieves")
    examples.add_argument("--model", "--checkpoint", dest="model", required=True)
    examples.add_argument("--json", required=True, help="a Karpathy-style JSON (dataset_coco.json, ...)")
    examples.add_argument("--split", default="test")
    examples.add_argument("--image-root")
    examples.add_argument("--queries", type=_at_least(1), default=6, help="captions to show (a seeded random sample)")
    examples.add_argument("-k", "--k", type=_at_least(1), default=5, help="images per caption")
    examples.add_argument("--seed", type=int, default=0)
    examples.add_argument("--out", default="retrieval_examples.png")
    examples.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    examples.add_argument("--precision", default="auto", choices=PRECISIONS, help=precision_help)
    _runs(examples, _cmd_eval_examples)
    suite = tasks.add_parser("suite", help=f"run a list of tasks from a suite file (shipped: "
                                           f"{', '.join(list_suites())})")
    suite.add_argument("suite", help="a shipped suite name or a suite YAML file")
    suite.add_argument("--model", "--checkpoint", dest="model", required=True)
    suite.add_argument("--out", required=True, help="directory for one result JSON per task")
    suite.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    suite.add_argument("--precision", choices=PRECISIONS, help="as for a task; default: the suite's "
                                                              "(shipped: fp32 for alip, as the paper; auto otherwise)")
    suite.add_argument("--cache-dir", help="reuse image embeddings across runs (keyed by weights, preprocessing, files)")
    _runs(suite, _cmd_eval_suite)
    report = tasks.add_parser("report", help="merge result JSON files into a markdown table and a CSV, "
                                                      "with the suites' retrieval example pictures")
    report.add_argument("paths", nargs="+", help="result files or directories holding them (searched recursively)")
    report.add_argument("--out", default="report", help="output path without extension (default: report)")
    _runs(report, _cmd_eval_report)

    demo = commands.add_parser("demo", help="build the shapes dataset, train a tiny ALIGN on CPU, evaluate, report")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo recipe")
    _runs(demo, _cmd_demo)

    model_help = "a model directory, run directory, Hugging Face AlignModel directory or hub id"
    inference_precision = ("auto (default): bf16 autocast on GPU, fp32 on CPU; fp32: the model's own dtype (fp32 "
                           "weights: transformers' numbers); bf16 or fp16 autocast anywhere")
    embed = commands.add_parser("embed", help="embed a folder of images into a parquet index")
    embed.add_argument("--model", required=True, help=model_help)
    embed.add_argument("--images", required=True, help="a directory (searched recursively) or a glob pattern")
    embed.add_argument("--out", required=True, help="the parquet file to write, e.g. embeddings.parquet")
    embed.add_argument("--batch-size", type=_at_least(1), default=64)
    embed.add_argument("--num-workers", type=_at_least(0), default=0, help="image-decoding worker processes")
    embed.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    embed.add_argument("--precision", default="auto", choices=PRECISIONS, help=inference_precision)
    _runs(embed, _cmd_embed)

    classify = commands.add_parser("classify", help="zero-shot probabilities of labels for images")
    classify.add_argument("images", nargs="+", metavar="IMAGE",
                          help="image files, directories (searched recursively) or glob patterns; files that do not "
                               "read as images are skipped and counted")
    classify.add_argument("--model", required=True, help=model_help)
    labels = classify.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated labels, e.g. 'a cat,a dog'")
    labels.add_argument("--labels-file", help="a text file of labels, one per line (labels may hold commas)")
    classify.add_argument("--templates", default="none", choices=("default", "none"),
                          help="'none' (default): embed the labels as written; 'default': average prompts "
                               "such as 'a photo of a {label}.', for labels that are class names ('cat,dog')")
    classify.add_argument("--batch-size", type=_at_least(1), default=64)
    classify.add_argument("--num-workers", type=_at_least(0), default=0, help="image-decoding worker processes")
    classify.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    classify.add_argument("--precision", default="auto", choices=PRECISIONS, help=inference_precision)
    classify.add_argument("--format", default="table", choices=("table", "tsv", "jsonl"),
                          help="'table' (default) to read; 'tsv' or 'jsonl' for a script: a line per image, "
                               "paths never folded")
    _runs(classify, _cmd_classify)

    convert = commands.add_parser("convert", help="rewrite a model as a Hugging Face AlignModel or openalign directory")
    convert.add_argument("source", help=model_help)
    convert.add_argument("destination", help="the directory to write")
    convert.add_argument("--to", required=True, choices=("hf", "openalign"), help="the format to write")
    convert.add_argument("--overwrite", action="store_true", help="replace a model already in the destination")
    convert.add_argument("--architecture", metavar="MODEL",
                         help="for a weights file released without a config: the architecture it holds, e.g. "
                              "alip-vit-b32 for ALIP's ALIP_YFCC15M_B32.pt, clippo-b16 for CLIPPO's .npz files")
    _runs(convert, _cmd_convert)

    search = commands.add_parser("search", help="the images of an index closest to a text query")
    search.add_argument("query", help="the text to search for, e.g. 'a red car'")
    search.add_argument("--index", required=True, help="a parquet index written by 'openalign embed'")
    search.add_argument("--model", required=True, help=f"{model_help}; the one that built the index")
    search.add_argument("-k", type=_at_least(1), default=5, help="how many results (default 5)")
    search.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    search.add_argument("--precision", default="auto", choices=PRECISIONS, help=inference_precision)
    search.add_argument("--format", default="table", choices=("table", "tsv", "jsonl"),
                        help="'table' (default) to read; 'tsv' or 'jsonl' for a script: a line per result, "
                             "paths never folded")
    _runs(search, _cmd_search)

    data = commands.add_parser("data", help="datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    from .data.shapes import ShapesSpec  # its defaults, which a recipe's shapes data shares

    build = data_commands.add_parser("shapes", help="write the built-in shapes dataset")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--train", "--num-train", dest="train", type=int, default=ShapesSpec.num_train,
                       help=f"training images (default {ShapesSpec.num_train}, as the recipes)")
    build.add_argument("--test", "--num-test", dest="test", type=int, default=ShapesSpec.num_test,
                       help=f"test images, 5 captions each (default {ShapesSpec.num_test})")
    build.add_argument("--image-size", type=int, default=ShapesSpec.image_size,
                       help=f"image side in pixels (default {ShapesSpec.image_size}: the demo's; clippo-shapes "
                            "takes 96)")
    build.add_argument("--alt-text-noise", type=float, default=ShapesSpec.alt_text_noise,
                       help="share of training captions replaced by web noise (ALIP experiments; default 0)")
    build.add_argument("--seed", type=int, default=ShapesSpec.seed)
    _runs(build, _cmd_data_shapes)
    caption = data_commands.add_parser("caption", help="copy webdataset shards, adding a synthetic caption per image "
                                                       "(ALIP's OFA captions) from a transformers captioning model")
    caption.add_argument("shards", nargs="+", metavar="SHARDS", help="tar paths, globs or brace patterns "
                                                                     "('shards/{00000..00009}.tar')")
    caption.add_argument("--captioner", required=True, help="a model directory or hub id that AutoModelForImageText"
                                                            "ToText loads (Salesforce/blip-image-captioning-base, "
                                                            "microsoft/git-base-coco, ...)")
    caption.add_argument("--out", required=True, help="directory for the new shards and captions.json; "
                                                      "shards already there are skipped (resume)")
    caption.add_argument("--batch-size", type=_at_least(1), default=16)
    caption.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    caption.add_argument("--max-new-tokens", type=_at_least(1), default=16, help="ALIP's OFA: 16 (the default)")
    caption.add_argument("--num-beams", type=_at_least(1), default=5, help="ALIP's OFA: 5 (the default; 1: greedy)")
    caption.add_argument("--no-repeat-ngram-size", type=_at_least(0), default=3,
                         help="ALIP's OFA: 3 (the default; 0: off)")
    caption.add_argument("--prompt", help="text the caption starts from, e.g. 'a picture of' for BLIP")
    caption.add_argument("--field", default="caption", help="the new member is KEY.<field>.txt (default caption)")
    _runs(caption, _cmd_data_caption)
    inspect = data_commands.add_parser("inspect", help="count samples, skips by reason, caption lengths and image "
                                                       "sizes in webdataset shards or TFRecord files")
    inspect.add_argument("shards", nargs="+", metavar="SHARDS",
                         help="tar or .tfrecord files: paths, globs, brace patterns, s3:// or pipe: URLs")
    inspect.add_argument("--text-key", default="txt", help="the caption member's extension (default txt; several, "
                                                           "';'-separated: the first usable one)")
    inspect.add_argument("--drop-non-descriptive", action="store_true",
                         help="count captions without a letter, or camera file names, as unusable (training's "
                              "drop_non_descriptive)")
    inspect.add_argument("--min-image-side", type=int, default=10,
                         help="images with a shorter side under this are skipped, as training's min_image_side")
    inspect.add_argument("--json", action="store_true", help='print {"samples": N, "skipped": {reason: count}, ...}')
    _runs(inspect, _cmd_data_inspect)
    convert = data_commands.add_parser("convert", help="a CSV/TSV/parquet table of local images and captions -> "
                                                       "webdataset shards (for URLs, use img2dataset)")
    convert.add_argument("table", help="a .csv, .tsv or .parquet file, or a glob of them")
    convert.add_argument("--out", required=True, help="the directory for the shards and sizes.json (created if need "
                                                      "be; one holding shards or a sizes.json is refused)")
    convert.add_argument("--image-column", default="image", help="image paths (or bytes, in parquet)")
    convert.add_argument("--text-column", default="caption")
    convert.add_argument("--extra-column", action="append", default=[], metavar="FIELD=COLUMN", type=_field_column,
                         help="also write COLUMN as KEY.FIELD.txt (.cls for whole numbers, .json for other values; "
                              "repeatable), e.g. caption=synthetic_caption")
    convert.add_argument("--image-root", help="what image paths are relative to (default: the table's folder)")
    convert.add_argument("--samples-per-shard", type=_at_least(1), default=10000)
    _runs(convert, _cmd_data_convert)
    caltech = data_commands.add_parser("caltech101", help="ALIP's random Caltech-101 evaluation split as class "
                                                          "folders (the alip suite's data/caltech101/alip_test)")
    caltech.add_argument("--root", required=True, help="the folder of 101_ObjectCategories (or torchvision's root)")
    caltech.add_argument("--out", required=True, help="a new folder for the split's class folders")
    caltech.add_argument("--split", default="test", choices=("test", "train"),
                         help="test: ALIP's 5,677 evaluation images (default); train: the other 3,000")
    caltech.add_argument("--seed", type=int, default=3072, help="random_split's generator seed (ALIP's: 3072)")
    caltech.add_argument("--copy", action="store_true", help="copy the images (default: symbolic links)")
    _runs(caltech, _cmd_data_caltech101)
    return parser


def _setup_logging(verbose: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    handler = RichHandler(console=console, show_path=False, log_time_format="[%X]")
    if rank:  # a warning every rank makes alike is shown once, by rank 0
        handler.addFilter(lambda record: not getattr(record, "rank_zero_only", False))
    logging.basicConfig(level=level, format=f"{'' if rank == 0 else f'[rank {rank}] '}%(message)s", handlers=[handler])
    for noisy in ("httpx", "urllib3", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _distributed() -> ModuleType | None:
    """:mod:`openalign.distributed`, or None where the command never imported torch.distributed (a listing, a
    usage error): no process group can exist then, and learning so need not import torch (seconds)."""
    if "torch.distributed" not in sys.modules:
        return None
    from . import distributed

    return distributed


def _world_info() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) without one."""
    distributed = _distributed()
    return distributed.world_info() if distributed else (0, 1)


def _shutdown() -> None:
    """Destroy the default process group, if there is one (see :func:`openalign.distributed.shutdown`)."""
    if distributed := _distributed():
        distributed.shutdown()


def _rank() -> str:
    """``rank N: `` in a run of several processes, so that each line says whose error it is."""
    rank, world_size = _world_info()
    return f"rank {rank}: " if world_size > 1 else ""


# what a collective raises when another rank's process has ended: gloo's "Connection closed by peer", and the
# words of NCCL's and torch's errors that blame the remote side; a rank's own failure (NCCL out of memory) says none
_PEER_GONE = ("closed by peer", "reset by peer", "remote process exited", "remote worker")


def _peer_stopped(error: RuntimeError) -> bool:
    """Whether ``error`` is a collective's, raised because another rank's process ended."""
    text = str(error).lower()
    return _world_info()[1] > 1 and any(words in text for words in _PEER_GONE)


def _message(error: OpenAlignError) -> str:
    """The error's own message; one raised in a DataLoader worker arrives wrapped in the worker's
    traceback, whose last line is the message (prefixed with the error's type)."""
    text = str(error)
    if "DataLoader worker process" in text and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _argument_of(filename: Any, args: argparse.Namespace) -> str | None:
    """The option (``--out``) or argument (``DESTINATION``) of the command that ran whose path is
    ``filename`` or a folder holding it, to name in an OS error; None if none is."""
    try:
        target = Path(os.fsdecode(filename)).expanduser().resolve()
    except (OSError, RuntimeError, TypeError, ValueError):  # a symbolic-link loop, a number for a name
        return None
    closest: tuple[int, str] | None = None  # the path given that is nearest the file: the most parts
    for action in args.command_parser._actions:  # argparse has no public list of a parser's arguments
        values = getattr(args, action.dest, None)
        for value in values if isinstance(values, list) else [values]:
            if not (isinstance(value, str) and value.strip()):
                continue
            key, is_override, path = value.partition("=")  # an override names its key: run.output_dir=/sys/x
            try:
                given = Path(path if is_override else value).expanduser().resolve()
            except (OSError, RuntimeError, ValueError):
                continue
            if (target == given or given in target.parents) and (closest is None or len(given.parts) > closest[0]):
                name = (max(action.option_strings, key=len) if action.option_strings else action.dest.upper()) \
                    if not is_override else key.strip()
                closest = (len(given.parts), name)
    return closest[1] if closest else None


def _repeated_override(overrides: Sequence[str]) -> str | None:
    """Why ``overrides`` cannot be taken as given, where one key is set in two arguments in a row: the
    shell makes an argument of each name of an unquoted pattern (data.train.urls=shards/{00000..00099}.tar),
    and the last alone would be trained on. Apart, the later wins, as in a script's shared settings
    followed by a run's own (and in the Python API)."""
    from .config import override_keys

    previous: tuple[tuple[str, ...], str] | None = None
    for text in (text for text in overrides if "=" in text):  # the others: refused as no override, later
        keys = tuple(override_keys(text))
        if previous is not None and previous[0] == keys:
            return (f"{'.'.join(keys)} is given twice in a row ('{previous[1]}', then '{text}'): give it once. A "
                    "pattern of names, such as data.train.urls='shards/{00000..00099}.tar', needs its quotes, or "
                    "the shell makes an argument of each name")
        previous = (keys, text)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides after an option (train demo --resume latest train.steps=2000): argparse gives
    # the positional list only the words before it
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:  # with the usage of the command given, not of openalign's
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if repeated := _repeated_override(getattr(args, "overrides", ())):
        getattr(args, "command_parser", parser).error(repeated)
    _setup_logging(args.verbose)
    if getattr(args, "cache_dir", None):
        from .eval.cache import CACHE_ENV

        os.environ[CACHE_ENV] = args.cache_dir
    previous = _stop_on_sigterm()
    try:
        try:
            args.func(args)
            _shutdown()  # after a success only: after an error a peer may still be inside a collective
        except Exception as error:
            # raised as the command unwound from SIGTERM (torch on a loader worker it ended), or, before a stop it
            # asked for, for want of something the signal ended; an error openalign explains (a diverged loss, a
            # full disk under the checkpoint, a peer's failure) is reported as itself
            if Terminated.received or (Terminated.requested and not isinstance(error, (OpenAlignError, OSError))):
                raise Terminated() from None
            raise
    except OpenAlignError as error:
        distributed = _distributed()  # a peer failure (raised by it only) names the ranks itself
        who = "" if distributed and isinstance(error, distributed.PeerFailure) else _rank()
        # unwrapped (soft_wrap), so that a long path stays whole to copy, in a terminal or a log file; and unhighlighted,
        # so that "[text, caption]" stays as written
        console.print(f"[bold red]error:[/] {who}{escape(_message(error))}", highlight=False, soft_wrap=True)
        return 2
    except RuntimeError as error:
        if not _peer_stopped(error):
            raise
        # a rank's error outside a fail_together block (a data stream failing on it alone): its own error is the
        # one to read; the others' is only that their next collective lost it
        console.print(f"[bold red]error:[/] {_rank()}another rank stopped while this one waited for it in a "
                      "collective (its error is above, or in the launcher's log): this rank stops too", highlight=False,
                      soft_wrap=True)
        return 1
    except OSError as error:  # a path that is a file, a folder that cannot be written, a full disk...
        if isinstance(error, BrokenPipeError) and _reader_left():
            return 141  # as a shell tool that SIGPIPE ended: what the reader took was written
        where = f" ('{error.filename}')" if error.filename else ""
        given = _argument_of(error.filename, args) if error.filename else None
        message = f"{given + ': ' if given else ''}{error.strerror or error}{where}"
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        return 2
    except Terminated as stopped:
        rank = _world_info()[0]
        if str(stopped):  # training stopped where every rank agreed to: none is inside a collective
            _shutdown()
        return _terminated(args, stopped, rank)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    finally:
        if previous is not _NOT_SET:  # None: a handler installed outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


def _reader_left() -> bool:
    """Whether stdout's reader has gone (``openalign data inspect --json | head``). Its unwritten output
    then goes to /dev/null, which Python's exit would otherwise fail to flush, with a traceback. (A
    pipe with no reader polls as an error on its writing end.)"""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no poll (Windows), stdout replaced or closed
        return False
    return True


def _prompt_options(parser: argparse.ArgumentParser, classnames: str, shipped_templates: str) -> None:
    """The zero-shot tasks' class names and prompts."""
    parser.add_argument("--classnames", help=classnames)
    parser.add_argument("--template", action="append", help="a prompt with {} (repeatable; default 'a photo of a {}.')")
    parser.add_argument("--templates-file", help=f"prompts, one per line, or a shipped list ({shipped_templates})")
    parser.add_argument("--canonicalize", action="store_true",
                        help="prompts as big_vision writes them: a class's first name only, no punctuation, "
                             "lower case (CLIPPO's protocol)")


_NOT_SET = object()  # no handler was replaced (off the main thread)


def _stop_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` (Python's default ends the process without a word or
    any clean-up); returns the handler it replaced (None: one installed outside Python), or
    ``_NOT_SET`` off the main thread, where no handler can be installed."""
    Terminated.received = Terminated.requested = False  # left set by an earlier command or openalign.train
    if threading.current_thread() is not threading.main_thread():
        return _NOT_SET

    def stop(signum: int, frame: Any) -> None:
        Terminated.received = True
        raise Terminated()

    return signal.signal(signal.SIGTERM, stop)


def _terminated(args: argparse.Namespace, stopped: Terminated, rank: int) -> int:
    # training that checkpointed the step it stopped after says so in the message, alike on every rank:
    # rank 0 prints it; otherwise the last periodic checkpoint is where a resumed run starts
    if str(stopped) and rank:
        return 143
    resume = f" {stopped}" if str(stopped) else \
        ": --resume latest continues from the last checkpoint" if args.func is _cmd_train else ""
    console.print(f"[yellow]terminated[/] (SIGTERM){escape(resume)}", soft_wrap=True)
    return 143


if __name__ == "__main__":
    sys.exit(main())
