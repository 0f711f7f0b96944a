"""Shared fixtures: everything is built locally; nothing is fetched from a model hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# CLIPPO renders text with GNU Unifont: Debian's `unifont` package (which .ci/run installs), or $OPENALIGN_UNIFONT
needs_unifont = pytest.mark.skipif(not Path("/usr/share/unifont/unifont.hex").is_file()
                                   and not os.environ.get("OPENALIGN_UNIFONT"),
                                   reason="GNU Unifont is not installed (apt-get install unifont)")


@pytest.fixture(autouse=True)
def _fresh_skip_counts() -> None:
    """Skip counts live per process, and a reason is logged when its count reaches a power of two:
    each test starts from none, so what it logs does not depend on the tests before it."""
    from openalign.data.quality import COUNTS

    COUNTS.clear()


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small built-in dataset: 256 training and 24 test images of 32 px."""
    from openalign.data.shapes import ShapesSpec, build_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    build_shapes_dataset(root, ShapesSpec(num_train=256, num_test=24, image_size=32), show_progress=False)
    return root


def tiny_recipe_overrides(root: Path, output_dir: Path, steps: int = 4) -> list[str]:
    """Overrides that turn the demo recipe into a seconds-long run of ``align-test`` on ``root``."""
    return [
        "model.name=align-test", f"data.train.root={root}", "data.train.num_train=256", "data.train.num_test=24",
        "data.train.image_size=32", "data.num_workers=0", f"train.steps={steps}", "train.batch_size=16",
        "train.warmup_steps=1", f"eval.tasks.0.root={root}", "eval.tasks.0.knn_memory_size=64",
        f"run.output_dir={output_dir}", "run.log_every=1", "run.checkpoint_every=2", "run.keep_checkpoints=5",
    ]


@pytest.fixture
def tiny_overrides():
    return tiny_recipe_overrides


def write_members(path: Path, members: list[tuple[str, bytes | None]], mode: str = "w") -> None:
    """A tar of ``(name, data)`` members in order (None data: a directory entry); ``mode`` as
    ``tarfile.open`` takes it (``w:gz`` compresses)."""
    import io
    import tarfile

    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))


def write_tar_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset tar: each ``(key, {extension: bytes})`` sample's members, in order."""
    write_members(path, [(f"{key}.{extension}", data)
                         for key, members in samples for extension, data in members.items()])


def train_until_preempted(recipe, step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train ``recipe`` until its checkpoint at ``step`` is written, then stop as a preempted job does."""
    from openalign.train import Checkpointer, train

    original_save = Checkpointer.save

    def save_then_crash(self, saved_step, *args):
        path = original_save(self, saved_step, *args)
        if saved_step == step:
            raise KeyboardInterrupt("simulated preemption")
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, show_progress=False)
    monkeypatch.setattr(Checkpointer, "save", original_save)
