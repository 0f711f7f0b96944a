"""The ``openalign`` command line: train, eval, demo, data, models, recipes, config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from rich.logging import RichHandler

from .progress import console

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

    print(yaml.safe_dump(to_dict(load_recipe(args.recipe, args.overrides)), sort_keys=False), end="")


def _cmd_train(args: argparse.Namespace) -> None:
    from .recipe import load_recipe
    from .train import train

    result = train(load_recipe(args.recipe, args.overrides), resume=args.resume)
    if result.metrics:
        print(json.dumps(result.metrics, indent=2))


def _cmd_eval_shapes(args: argparse.Namespace) -> None:
    from .distributed import init_distributed
    from .eval.shapes import evaluate_shapes
    from .train import load_checkpoint_model

    device = init_distributed(args.device).device
    model = load_checkpoint_model(args.checkpoint).to(device)
    metrics = evaluate_shapes(model, args.root, device, batch_size=args.batch_size)
    record = {"dataset": "shapes", "model": model.config.name, "pretrained": str(args.checkpoint),
              "task": "shapes", "metrics": metrics, "language": "en"}
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, tuple(args.overrides))


def _cmd_data_shapes(args: argparse.Namespace) -> None:
    from .data.shapes import ShapesSpec, build_shapes_dataset

    spec = ShapesSpec(num_train=args.train, num_test=args.test, image_size=args.image_size, seed=args.seed)
    print(build_shapes_dataset(args.out, spec))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openalign", description="Train, evaluate and use ALIGN-family models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("models", help="list registered architectures").set_defaults(func=_cmd_models)
    commands.add_parser("recipes", help="list shipped recipes").set_defaults(func=_cmd_recipes)

    config = commands.add_parser("config", help="print a recipe with overrides applied, fully resolved")
    config.add_argument("recipe", help="recipe name (see 'openalign recipes') or YAML path")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-3")
    config.set_defaults(func=_cmd_config)

    train = commands.add_parser("train", help="train from a recipe (launch with torchrun for several GPUs)")
    train.add_argument("recipe", help="recipe name (see 'openalign recipes') or YAML path")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-3 train.batch_size=256")
    train.add_argument("--resume", metavar="latest|PATH",
                       help="'latest' (this run's newest checkpoint, if any), a checkpoint or a run directory")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint")
    tasks = evaluate.add_subparsers(dest="task", required=True, metavar="TASK")
    shapes = tasks.add_parser("shapes", help="retrieval, zero-shot and 1-NN on the built-in shapes dataset")
    shapes.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory (its latest)")
    shapes.add_argument("--root", default="runs/demo/data", help="the shapes dataset directory")
    shapes.add_argument("--batch-size", type=int, default=256)
    shapes.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    shapes.add_argument("--output", help="also write the result JSON here")
    shapes.set_defaults(func=_cmd_eval_shapes)

    demo = commands.add_parser("demo", help="build the shapes dataset, train a tiny ALIGN on CPU, evaluate, report")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo recipe")
    demo.set_defaults(func=_cmd_demo)

    data = commands.add_parser("data", help="datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    build = data_commands.add_parser("shapes", help="write the built-in shapes dataset")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--train", type=int, default=20000, help="training images (default 20000)")
    build.add_argument("--test", type=int, default=500, help="test images, 5 captions each (default 500)")
    build.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=_cmd_data_shapes)
    return parser


def _setup_logging(verbose: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    handler = RichHandler(console=console, show_path=False, log_time_format="[%X]")
    logging.basicConfig(level=level, format=f"{'' if rank == 0 else f'[rank {rank}] '}%(message)s", handlers=[handler])
    for noisy in ("httpx", "urllib3", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .errors import OpenAlignError

    try:
        args.func(args)
    except OpenAlignError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
