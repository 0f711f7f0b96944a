"""W&B reporting (``run.wandb``): every logged record reaches the W&B run on the optimiser step,
a resumed run continues the same W&B run, and a missing package or bad setting is a config error."""

from __future__ import annotations

import shutil
import sys
import types
from typing import Any

import pytest

from openalign.config import to_dict
from openalign.errors import ConfigError, OpenAlignError
from openalign.recipe import load_recipe
from openalign.train import read_history, train

WANDB = ["run.wandb.project=openalign-tests", "run.wandb.tags=[tiny]"]


class FakeWandb(types.ModuleType):
    """A stand-in ``wandb`` module that records what it is given. Its runs keep W&B's rule on
    ``_step``: a resumed run goes on from its last row, and a row logged at a ``_step`` below the
    run's is dropped (wandb-core: "Tried to log to step %d that is less than the current step")."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []
        self.rows: dict[str, list[dict[str, Any]]] = {}  # by run id, over every init of it
        self.runs: list[FakeRun] = []
        self.exit_codes: list[int | None] = []
        self.preempting = 0

    def init(self, **kwargs: Any) -> FakeRun:
        self.inits.append(kwargs)
        self.runs.append(FakeRun(self, self.rows.setdefault(kwargs["id"], [])))
        return self.runs[-1]


class FakeRun:
    def __init__(self, wandb: FakeWandb, rows: list[dict[str, Any]]) -> None:
        self.wandb, self.rows = wandb, rows
        self.step = rows[-1]["_step"] + 1 if rows else 0
        self.step_metrics: dict[str, str | None] = {}

    def define_metric(self, name: str, step_metric: str | None = None, **kwargs: Any) -> None:
        self.step_metrics[name] = step_metric

    def log(self, data: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        if step is not None and step < self.step:
            return
        self.rows.append({"_step": self.step if step is None else step, **data})
        self.step = self.step + 1 if step is None else step

    def finish(self, exit_code: int | None = None) -> None:
        self.wandb.exit_codes.append(exit_code)

    def mark_preempting(self) -> None:
        self.wandb.preempting += 1


@pytest.fixture
def fake_wandb(monkeypatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def _fail_at_step(step: int, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Raise ``error`` in the training step ``step``, after the steps before it were logged."""
    import openalign.train.loop as loop

    real_step, calls = loop.train_step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise error
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", failing)


def test_wandb_gets_every_record_on_the_optimiser_step_and_a_resumed_run_continues_it(
        tmp_path, shapes_root, tiny_overrides, monkeypatch, fake_wandb):
    """Preempted in step 4, after logging step 3, the run resumes from its checkpoint at step 2:
    the resumed run logs step 3 again, which W&B would drop if it were W&B's own step."""
    output = tmp_path / "tiny-run"
    recipe = load_recipe("demo", tiny_overrides(shapes_root, output, steps=4) + ["eval.every=2"] + WANDB)
    with monkeypatch.context() as patch:
        _fail_at_step(4, patch, KeyboardInterrupt("preempted"))
        with pytest.raises(KeyboardInterrupt):
            train(recipe, show_progress=False)
    train(recipe, resume="latest", show_progress=False)

    run_id = (output / "wandb_id").read_text().strip()
    assert [init["id"] for init in fake_wandb.inits] == [run_id, run_id]
    for init in fake_wandb.inits:
        assert {key: init[key] for key in ("project", "name", "tags", "resume", "dir")} == {
            "project": "openalign-tests", "name": "tiny-run", "tags": ["tiny"], "resume": "allow", "dir": str(output)}
        assert "mode" not in init  # W&B's own (WANDB_MODE, else online)
        assert init["config"] == to_dict(recipe)
    assert fake_wandb.exit_codes == [1, 0]  # the preempted run failed, the resumed one finished
    assert all(run.step_metrics["*"] == "step" for run in fake_wandb.runs)  # charts' x-axis: the optimiser step
    rows = [{key: value for key, value in row.items() if key != "_step"} for row in fake_wandb.rows[run_id]]
    evaluated = [row["step"] for row in rows if "shapes/image_retrieval_recall@1" in row]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 3, 4] and evaluated == [2, 4]
    assert all(record in rows for record in read_history(output))  # the resumed run's records too
    # a run started afresh in the directory (from step 0: its history replaced) is a W&B run of its own
    shutil.rmtree(output / "checkpoints")
    train(load_recipe("demo", tiny_overrides(shapes_root, output, steps=1) + WANDB + ["eval.tasks=[]"]),
          show_progress=False)
    assert fake_wandb.inits[-1]["id"] == (output / "wandb_id").read_text().strip() != run_id


def test_a_preempted_run_is_marked_preempted_in_wandb(tmp_path, shapes_root, tiny_overrides, monkeypatch,
                                                      fake_wandb):
    from openalign.errors import Terminated

    _fail_at_step(2, monkeypatch, Terminated("after step 1, checkpointed"))
    with pytest.raises(Terminated):
        train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + WANDB), show_progress=False)
    assert fake_wandb.preempting == 1 and fake_wandb.exit_codes == [1]


def test_a_run_that_fails_marks_its_wandb_run_failed(tmp_path, shapes_root, tiny_overrides, monkeypatch, fake_wandb):
    _fail_at_step(2, monkeypatch, OpenAlignError("broken"))
    with pytest.raises(OpenAlignError, match="broken"):
        train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + WANDB), show_progress=False)
    assert fake_wandb.exit_codes == [1] and fake_wandb.preempting == 0


def test_wandb_not_installed_is_a_config_error_before_training(tmp_path, shapes_root, tiny_overrides, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    _fail_at_step(1, monkeypatch, AssertionError("trained without wandb"))
    with pytest.raises(ConfigError, match=r"'run.wandb.project' is set, but the wandb package is not installed: "
                                          r"pip install 'openalign\[wandb\]'"):
        train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + WANDB), show_progress=False)
    assert not (tmp_path / "history.jsonl").exists() and not (tmp_path / "config.yaml").exists()


def test_wandb_refusing_to_start_is_a_config_error_before_training(tmp_path, shapes_root, tiny_overrides,
                                                                    monkeypatch, fake_wandb):
    def refuse(**kwargs: Any) -> None:
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(fake_wandb, "init", refuse)
    _fail_at_step(1, monkeypatch, AssertionError("trained without its W&B run"))
    with pytest.raises(ConfigError, match=r"'run.wandb.project' is set, but W&B could not start the run \(No API key "
                                          r"configured.*\): log in with 'wandb login', or set run.wandb.mode=offline"):
        train(load_recipe("demo", tiny_overrides(shapes_root, tmp_path) + WANDB), show_progress=False)


@pytest.mark.parametrize("override, message", [
    ("run.wandb.mode=local", r"'run.wandb.mode' is 'local', which is not allowed; valid: disabled, offline, online"),
    ("run.wandb.project=''", r"'run.wandb.project' is empty")])
def test_a_bad_wandb_setting_is_a_config_error_naming_it(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("demo", [override])


def test_wandb_settings_round_trip_through_openalign_config(tmp_path, capsys):
    from openalign.cli import main

    assert main(["config", "demo", *WANDB, "run.wandb.mode=offline"]) == 0
    (tmp_path / "recipe.yaml").write_text(capsys.readouterr().out)
    assert load_recipe(tmp_path / "recipe.yaml") == load_recipe("demo", [*WANDB, "run.wandb.mode=offline"])
    assert load_recipe("demo").run.wandb.project is None  # off unless asked for


def test_a_real_offline_wandb_run_is_written_under_the_run_directory(tmp_path, shapes_root, tiny_overrides,
                                                                     monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))  # nothing written outside the test's folder
    for name in ("WANDB_SILENT", "WANDB_DISABLE_GIT", "WANDB_DISABLE_CODE", "WANDB_X_DISABLE_STATS"):
        monkeypatch.setenv(name, "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the recipe's mode alone: no W&B server here
    output = tmp_path / "run"
    train(load_recipe("demo", tiny_overrides(shapes_root, output, steps=2) + WANDB + ["run.wandb.mode=offline",
                                                                                      "eval.tasks=[]"]),
          show_progress=False)
    run_id = (output / "wandb_id").read_text().strip()
    runs = list((output / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").is_file()
