"""The openalign command line, in process and through its console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from openalign.cli import main
from openalign.train import read_history


def test_models_and_recipes_are_listed(capsys):
    assert main(["models"]) == 0
    assert "align-b7-base" in capsys.readouterr().out.split()
    assert main(["recipes"]) == 0
    assert "align-b3-mini-cc3m" in capsys.readouterr().out.split()


def test_config_prints_the_resolved_recipe_with_overrides(capsys):
    assert main(["config", "align-b3-mini-cc3m", "train.lr=1e-3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["lr"] == 1e-3
    assert resolved["model"]["image"]["width_coefficient"] == 1.2  # the registry entry is inlined


def test_model_name_over_a_resolved_recipe_selects_that_model(tmp_path, capsys):
    """'openalign config demo > my_recipe.yaml' is a template: model.name=align-b3-mini on it must
    build B3-mini, not relabel the inlined align-tiny; later model overrides apply to B3-mini."""
    from openalign.recipe import load_recipe

    assert main(["config", "demo"]) == 0
    (tmp_path / "my_recipe.yaml").write_text(capsys.readouterr().out)
    assert load_recipe(tmp_path / "my_recipe.yaml").model.name == "align-tiny"
    recipe = load_recipe(tmp_path / "my_recipe.yaml", ["model.name=align-b3-mini", "model.temperature_init=0.5"])
    reference = load_recipe("demo", ["model=align-b3-mini", "model.temperature_init=0.5"]).model
    assert recipe.model == reference and recipe.model.embed_dim == 640 and recipe.model.preprocess.image_size == 289
    edited = (tmp_path / "my_recipe.yaml").read_text().replace("name: align-tiny", "name: align-b3-mini", 1)
    (tmp_path / "edited.yaml").write_text(edited)  # the name edited in the file, then given again: B3-mini still
    assert load_recipe(tmp_path / "edited.yaml", ["model.name=align-b3-mini"]).model.embed_dim == 640


def test_model_name_of_another_family_names_the_recipes_own_model_setting_and_the_fix():
    """The demo sets align-tiny's image.batch_norm_momentum; model.name=alip-tiny keeps it, and
    ALIP's ViT has no such key: the error says where the key came from and how to drop it."""
    from openalign.errors import ConfigError
    from openalign.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"'model.image.batch_norm_momentum' is unknown; .*The recipe sets it for its "
                                          r"own model.*replace the whole model section, model=alip-tiny"):
        load_recipe("demo", ["model.name=alip-tiny"])
    assert load_recipe("demo", ["model=alip-tiny"]).model.name == "alip-tiny"
    with pytest.raises(ConfigError) as typed:  # a key the user typed: no word about the recipe
        load_recipe("demo", ["model.name=align-test", "model.image.foo=1"])
    assert "recipe sets it" not in str(typed.value)


def test_overrides_may_follow_options(monkeypatch, capsys):
    """'openalign train demo --resume latest train.steps=2000' extends a run: argparse alone refused it."""
    seen = []
    monkeypatch.setattr("openalign.cli._cmd_train", lambda args: seen.append((args.overrides, args.resume)))
    assert main(["train", "demo", "train.lr=1e-3", "--resume", "latest", "train.steps=2000"]) == 0
    assert seen == [(["train.lr=1e-3", "train.steps=2000"], "latest")]
    with pytest.raises(SystemExit):
        main(["train", "demo", "--resume", "latest", "--bogus", "train.steps=2000"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus train.steps=2000" in err
    assert err.startswith("usage: openalign train ")  # the command's usage, not openalign's


def test_a_setting_given_twice_is_refused_naming_both(monkeypatch, capsys):
    """An unquoted shard pattern is expanded by the shell into one override per shard, and the last
    alone was trained on; a key given twice in a row (also as eval.tasks[0].k and eval.tasks.0.k) is
    refused. Apart, the later wins: a script's shared settings, then a run's own."""
    monkeypatch.setattr("openalign.cli._cmd_train", lambda args: pytest.fail("ran"))
    for argv, given in (
            (["train", "demo", "data.train.urls=shards/00000.tar", "data.train.urls=shards/00001.tar"],
             "data.train.urls is given twice in a row ('data.train.urls=shards/00000.tar', then "
             "'data.train.urls=shards/00001.tar')"),
            (["config", "demo", "eval.tasks[0].k=3", "--", "eval.tasks.0.k=4"],
             "eval.tasks.0.k is given twice in a row ('eval.tasks[0].k=3', then 'eval.tasks.0.k=4')")):
        with pytest.raises(SystemExit):
            main(argv)
        err = " ".join(capsys.readouterr().err.split())
        assert given in err and "needs its quotes" in err and err.startswith(f"usage: openalign {argv[0]} ")
    assert main(["config", "demo", "train.lr=1", "train.steps=300", "train.lr=2"]) == 0
    assert "\n  lr: 2.0\n" in capsys.readouterr().out.split("\ntrain:\n", 1)[1]


def test_bad_settings_exit_2_with_a_message_and_no_traceback(capsys):
    assert main(["config", "demo", "train.batch_sze=3"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "config key 'train.batch_sze' is unknown; did you mean 'train.batch_size'?" in " ".join(err.split())
    assert "Traceback" not in err and captured.out == ""  # `config demo ... > my_recipe.yaml` gets no header


def test_paths_that_are_not_files_are_said_to_be_what_they_are_and_os_errors_name_the_option(tmp_path, capsys):
    import os

    from openalign.data.karpathy import read_karpathy
    from openalign.data.shards import expand_shards
    from openalign.errors import OpenAlignError

    (tmp_path / "recipe.yaml").mkdir()
    os.mkfifo(tmp_path / "captions.json")
    (tmp_path / "shards").mkdir()
    assert main(["config", str(tmp_path / "recipe.yaml")]) == 2
    assert "recipe.yaml' is a directory, not a file" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(OpenAlignError, match="captions.json' is not a regular file"):  # not "does not exist"
        read_karpathy(tmp_path / "captions.json", "test")
    with pytest.raises(OpenAlignError, match=r"1 shard\(s\) not found: .*shards \(is a directory, not a file\)"):
        expand_shards([str(tmp_path / "shards")])
    (tmp_path / "a_file").write_text("")
    assert main(["data", "shapes", "--out", str(tmp_path / "a_file" / "sub"), "--train", "2", "--test", "1",
                 "--image-size", "16"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: --out: Not a directory" in err and "Traceback" not in err
    # the nearest path given names the option: not --images, which holds --out's folder
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "index.parquet").mkdir()
    from openalign.cli import _argument_of, build_parser

    parser = build_parser()
    args = parser.parse_args(["embed", "--model", str(tmp_path), "--images", str(tmp_path / "photos"), "--out",
                              str(tmp_path / "photos" / "index.parquet" / "x")])
    assert _argument_of(str(tmp_path / "photos" / "index.parquet" / "x"), args) == "--out"
    assert _argument_of(str(tmp_path / "photos" / "a.jpg"), args) == "--images"
    # the eval tasks share one function: each still names its own options
    args = parser.parse_args(["eval", "retrieval", "--model", "m", "--json", str(tmp_path / "karpathy.json")])
    assert _argument_of(str(tmp_path / "karpathy.json"), args) == "--json"
    args = parser.parse_args(["eval", "knn", "--model", "m", "--train", str(tmp_path / "t"), "--val",
                              str(tmp_path / "v")])
    assert _argument_of(str(tmp_path / "v" / "cat" / "1.jpg"), args) == "--val"
    # an override names its key (run.output_dir=/sys/x: "Operation not permitted" said nothing of where)
    args = parser.parse_args(["train", "demo", f"run.output_dir={tmp_path / 'run'}", "train.steps=1"])
    assert _argument_of(str(tmp_path / "run" / "checkpoints"), args) == "run.output_dir"
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert main(["data", "shapes", "--out", str(tmp_path / "loop1" / "sub"), "--train", "2", "--test", "1"]) == 2
    assert "Traceback" not in capsys.readouterr().err  # a symbolic-link loop is an error like any other


def test_data_shapes_writes_the_dataset(tmp_path, capsys):
    # --num-train / --num-test: the recipes' names (num_train), which the shapes errors point at
    assert main(["data", "shapes", "--out", str(tmp_path), "--num-train", "8", "--num-test", "2", "--image-size",
                 "16"]) == 0
    assert (tmp_path / "dataset_shapes.json").is_file() and len(list((tmp_path / "images" / "train").iterdir())) == 8
    capsys.readouterr()
    for option, value, message in (("--image-size", "0", "--image-size must be at least 16, got 0"),
                                   ("--image-size", "100000", "--image-size must be at most 1024, got 100000"),
                                   ("--train", "-3", "--train must be at least 1, got -3"),
                                   ("--alt-text-noise", "2", "--alt-text-noise must be a fraction in [0, 1], got 2")):
        assert main(["data", "shapes", "--out", str(tmp_path / "bad"), option, value]) == 2
        assert message in capsys.readouterr().err
    from openalign.cli import build_parser
    from openalign.recipe import load_recipe

    defaults = build_parser().parse_args(["data", "shapes", "--out", "runs/demo/data"])
    demo = load_recipe("demo").data.train  # so that a dataset built ahead is the one the demo accepts
    assert (defaults.train, defaults.test, defaults.image_size) == (demo.num_train, demo.num_test, demo.image_size)


def test_train_then_eval_through_the_console_script(tmp_path, shapes_root, tiny_overrides):
    run = tmp_path / "run"
    script = Path(sys.executable).parent / "openalign"  # installed beside this interpreter
    assert script.is_file(), "the openalign console script is not installed"
    result = subprocess.run([script, "train", "demo", *tiny_overrides(shapes_root, run, steps=2)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shapes/image_retrieval_recall@1" in json.loads(result.stdout)
    # no --root: the shapes dataset the run trained on (its config.yaml says which), not runs/demo/data
    result = subprocess.run([script, "eval", "shapes", "--checkpoint", str(run), "--output",
                             str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["task"] == "shapes" and set(record) >= {"dataset", "model", "pretrained", "metrics", "language"}


def test_demo_refuses_to_start_afresh_in_another_runs_directory(tmp_path, capsys):
    """The demo deletes its own directory's checkpoints to train from step 0, never another run's."""
    other = tmp_path / "my-run"
    (other / "checkpoints" / "step_00001000").mkdir(parents=True)
    (other / "config.yaml").write_text("data: {train: {type: webdataset, urls: /data/{0..9}.tar}}\n")
    assert main(["demo", "--out", str(other)]) == 2
    assert "holds a run that 'openalign demo' did not make" in " ".join(capsys.readouterr().err.split())
    assert (other / "checkpoints" / "step_00001000").is_dir()
    from openalign.demo import _is_demo_run

    earlier_demo = tmp_path / "demo"  # made by a version without the marker: its config names its own data
    earlier_demo.mkdir()
    (earlier_demo / "config.yaml").write_text(f"data: {{train: {{type: shapes, root: {earlier_demo / 'data'}}}}}\n")
    assert _is_demo_run(earlier_demo) and not _is_demo_run(other)


def test_demo_refuses_a_run_output_dir_other_than_its_out(tmp_path, capsys):
    """The run would train there while the report (curves of an empty history) and clean-up use --out."""
    assert main(["demo", "--out", str(tmp_path / "out"), f"run.output_dir={tmp_path / 'elsewhere'}"]) == 2
    assert f"pass --out {tmp_path / 'elsewhere'} instead" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()


def test_errors_print_square_brackets_as_written(capsys):
    """The console reads [..] as markup: an error's "[low, high]" or "[text, caption]" vanished."""
    assert main(["config", "demo", "model.preprocess.random_area=[0.0, 1.0]"]) == 2
    assert "must be [low, high] with 0 < low <= high <= 1" in " ".join(capsys.readouterr().err.split())


def test_version_and_the_shipped_suites_in_the_help(capsys):
    import openalign
    from openalign.registry import list_suites

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"openalign {openalign.__version__}\n"
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "clippo-fewshot" in list_suites() and ", ".join(list_suites()) in " ".join(capsys.readouterr().out.split())


def test_demo_writes_its_report(tmp_path, shapes_root, capsys):
    shutil.copytree(shapes_root, tmp_path / "data")
    overrides = ["model.name=align-test", "data.train.num_train=256", "data.train.num_test=24",
                 "data.train.image_size=32", "data.num_workers=0", "train.steps=3", "train.batch_size=16",
                 "train.warmup_steps=1", "eval.tasks.0.knn_memory_size=32", "run.log_every=1"]
    assert main(["demo", "--out", str(tmp_path), *overrides]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report["chance"]) <= set(report["metrics"]) and report["train"]["steps"] == 3
    assert (tmp_path / "curves.png").stat().st_size > 1000
    markdown = (tmp_path / "report.md").read_text()
    assert "| text→image R@1 |" in markdown and "× chance" in markdown
    elsewhere = [f"data.train.root={shapes_root}", f"eval.tasks.0.root={shapes_root}"]  # not <out>/data
    # with a weight average, the report still shows the model's own metrics, not the average's
    assert main(["demo", "--out", str(tmp_path / "elsewhere"), *overrides, *elsewhere, "train.ema_decay=0.5"]) == 0
    shown = json.loads((tmp_path / "elsewhere" / "metrics.json").read_text())
    assert shown["chance"] == report["chance"]
    final = read_history(tmp_path / "elsewhere")[-1]
    assert shown["metrics"] == {key.removeprefix("shapes/"): value for key, value in final.items()
                                if key.startswith("shapes/")} != {}
    assert "ema/shapes/knn_shape_acc1" in final
    assert main(["demo", "--out", str(tmp_path / "bare"), *overrides, "eval.tasks=[]"]) == 2  # before training
    assert "keep a 'shapes' task in eval.tasks" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "bare" / "checkpoints").exists()


def test_output_paths_are_checked_before_the_work_and_filesystem_errors_are_one_line(tmp_path, shapes_root,
                                                                                     tiny_overrides, capsys,
                                                                                     monkeypatch):
    import openalign
    import openalign.cli as cli

    model_dir = openalign.create_model("align-test").save_pretrained(tmp_path / "model")
    evaluate = ["eval", "shapes", "--model", str(model_dir), "--root", str(shapes_root)]
    assert main(evaluate + ["--output", str(tmp_path / "new" / "folder" / "shapes.json")]) == 0
    record = json.loads((tmp_path / "new" / "folder" / "shapes.json").read_text())
    assert json.loads(capsys.readouterr().out) == record  # printed too

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(cli, "_inference_model", no_work)
    (tmp_path / "a_file").write_text("")
    for arguments, message in (
            (evaluate + ["--output", str(tmp_path)], "is a directory; name a file in it"),
            (evaluate + ["--output", str(tmp_path / "a_file" / "shapes.json")], "a_file' is a file, not a directory"),
            (["eval", "examples", "--model", str(model_dir), "--json", str(shapes_root / "dataset_shapes.json"),
              "--out", str(tmp_path / "examples.txt")], "the output must end in .png or .jpg"),
            # a folder that refuses new files, even to root (sysfs, where there is one)
            *[(["embed", "--model", str(model_dir), "--images", str(shapes_root), "--out", f"{folder}/index.parquet"],
               "cannot be written: its folder refuses new files")
              for folder in ("/sys/kernel",) if Path(folder).is_dir()]):
        assert main(arguments) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert message in err and "Traceback" not in err
    monkeypatch.undo()
    train = ["train", "demo", *tiny_overrides(shapes_root, tmp_path / "a_file"), "eval.tasks=[]"]
    assert main(train) == 2  # run.output_dir is a file: the OSError is one line naming the path
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and "a_file" in err and "Traceback" not in err


def test_a_command_that_succeeds_destroys_the_process_group(tmp_path, capsys):
    """torchrun reported ranks that exited with a live gloo group as failed ("terminate called without an
    active exception", exit -6), after runs that had succeeded."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert main(["recipes"]) == 0 and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_sigterm_stops_a_command_as_ctrl_c_does_and_says_so(monkeypatch, capsys):
    """A scheduler preempting a job sends SIGTERM: Python's default ended the run without a word or
    any clean-up; it now unwinds as Ctrl-C does, says how to go on, and exits 143 (128 + 15)."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    cleaned = []

    def preempted(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        finally:
            cleaned.append(True)

    monkeypatch.setattr("openalign.cli._cmd_models", preempted)
    assert main(["models"]) == 143
    assert cleaned == [True] and capsys.readouterr().err.strip() == "terminated (SIGTERM)"  # nothing to resume
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler back

    def preempted_while_unwinding(args):  # a loader worker's death reported by torch as the run unwinds
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    monkeypatch.setattr("openalign.cli._cmd_train", preempted_while_unwinding)
    assert main(["train", "demo"]) == 143
    assert "terminated (SIGTERM): --resume latest continues from the last checkpoint" in capsys.readouterr().err


def test_a_warning_every_rank_makes_alike_is_shown_once(tmp_path):
    """torchrun: 'train.steps changed ...' came once per rank; rank 1 now leaves it to rank 0, and
    still shows its own warnings."""
    script = ("import logging; from openalign.cli import _setup_logging; from openalign.distributed import "
              "RANK_ZERO_ONLY; _setup_logging(False); log = logging.getLogger('openalign'); "
              "log.warning('alike on every rank', extra=RANK_ZERO_ONLY); log.warning('this rank only')")
    for rank, shown in (("0", ["alike on every rank", "this rank only"]), ("1", ["[rank 1] this rank only"])):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                env={**os.environ, "RANK": rank, "COLUMNS": "200"})
        assert [line.split("WARNING")[1].strip() for line in result.stderr.splitlines() if "WARNING" in line] == shown


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`openalign config demo | head -1`: the command's output past what the reader took has nowhere
    to go; it ends as a shell tool that SIGPIPE ended (141), without 'error: Broken pipe'."""
    import subprocess
    import sys

    command = subprocess.Popen([sys.executable, "-m", "openalign", "config", "demo"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    command.stdout.close()  # more than nothing is more than this reader takes
    err = command.stderr.read().decode()
    assert command.wait(timeout=120) == 141 and err == ""


def test_the_shipped_vocabulary_is_announced_once(monkeypatch, caplog):
    import transformers

    from openalign.data import tokenizer

    real = transformers.AutoTokenizer.from_pretrained

    def offline(name, *args, local_files_only=False, **kwargs):
        if local_files_only:
            raise OSError("not in the cache")  # as on a machine without the hub's copy
        return real(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(tokenizer, "_ANNOUNCED", set())
    with caplog.at_level("INFO", logger="openalign"):
        tokenizer.load_hf_tokenizer("bert-base-uncased")
        tokenizer.load_hf_tokenizer("bert-base-uncased")
    assert caplog.text.count("using the 'bert-base-uncased' vocabulary shipped in") == 1
