"""The benchmark scripts run end to end at tiny sizes: the GPU runbook (benchmarks/gpu/run.sh) has
minutes on a lent machine, not time to find a script broken by a library change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import openalign

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

TINY = {
    "inference_throughput.py": ["--preset", "small", "--device", "cpu", "--warmup", "1", "--iterations", "1",
                                "--batch-size", "4"],
    "train_throughput.py": ["--models", "align-test", "--batch-sizes", "16", "--steps", "1", "--warmup", "1",
                            "--device", "cpu", "--accum-steps", "1", "2", "--grad-checkpointing", "off", "on"],
    "eval_throughput.py": ["--device", "cpu", "--images", "50", "--knn-memory", "200", "--knn-queries", "20",
                           "--classes", "10"],
    "render_throughput.py": ["--texts", "20", "--repeats", "1"],
    "transform_throughput.py": ["--model", "clippo-test", "--images", "2", "--repeats", "1"],
    "weights_loading.py": ["--preset", "clippo-test", "--repeats", "1"],
    "data_throughput.py": ["--shards", "1", "--samples-per-shard", "16", "--model", "align-test", "--batch-size", "8",
                           "--workers", "0", "--batches", "1", "--warmup", "1"],
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_the_benchmark_runs_and_writes_its_table(script, tmp_path):
    # without --output the JSON goes to scratch under the working directory, never to the recorded
    # benchmarks/results/ that docs/benchmarks.md cites
    recorded = {path: path.read_bytes() for path in (BENCHMARKS / "results").rglob("*.json")}
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *TINY[script]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    output = Path("runs") / "benchmarks" / script.replace(".py", ".json")
    assert f"wrote {output}" in result.stdout
    output = tmp_path / output
    assert {path: path.read_bytes() for path in (BENCHMARKS / "results").rglob("*.json")} == recorded
    written = json.loads(output.read_text())
    rows = written.get("rows") or written.get("results")
    assert rows and "environment" in written
    if script == "inference_throughput.py":  # the same weights in both libraries give the same embeddings
        assert {row["library"] for row in rows} == {"openalign", "transformers"}
        assert max(written["parity_relative_max_diff_fp32"].values()) < 1e-4
    if script == "train_throughput.py":
        assert [row["accum_steps"] for row in rows] == [1, 1, 2, 2]
        assert all(row["samples_per_second"] > 0 for row in rows)
        held = [row["held_for_backward_mib"] for row in rows]  # off, on, off, on
        assert held[1] < 0.5 * held[0] and held[3] < 0.5 * held[2]


def test_the_training_benchmark_compares_optimisers_on_a_pixel_model(tmp_path):
    """CLIPPO's rendered captions as the synthetic text, and each train.optimizer in turn, without
    and with a weight average (train.ema_decay)."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "train_throughput.py"), "--models", "clippo-test",
                             "--batch-sizes", "4", "--steps", "1", "--warmup", "1", "--device", "cpu",
                             "--optimizers", "adamw", "adafactor", "--ema", "off", "on",
                             "--output", str(tmp_path / "out.json")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [(row["optimizer"], row["ema"]) for row in rows] == [("adamw", False), ("adamw", True),
                                                                ("adafactor", False), ("adafactor", True)]
    model = openalign.create_model("clippo-test")  # the average: a copy of every weight and float buffer
    copy_mib = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    assert [row["ema_mib"] for row in rows] == [0.0, pytest.approx(copy_mib), 0.0, pytest.approx(copy_mib)]


def test_a_configuration_out_of_memory_is_a_row_and_the_others_still_run(monkeypatch, tmp_path):
    """align-b7-base at 256 a device holds more for its backward pass than an 80 GB GPU has: that
    configuration is reported as out of memory, and the others of the same run are still measured."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch
    import train_throughput

    measured = train_throughput._measure

    def measure(name, batch_size, *args):
        if batch_size == 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 118.00 GiB")
        return measured(name, batch_size, *args)

    monkeypatch.setattr(train_throughput, "_measure", measure)
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--models", "align-test", "--batch-sizes", "32", "16",
                                      "--steps", "1", "--warmup", "1", "--device", "cpu",
                                      "--output", str(tmp_path / "out.json")])
    train_throughput.main()
    rows = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [(row["batch_size"], row["out_of_memory"]) for row in rows] == [(32, True), (16, False)]
    assert rows[0]["samples_per_second"] is None and rows[1]["samples_per_second"] > 0


def test_disagreeing_embeddings_stop_the_inference_benchmark_before_timing(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "inference_throughput.py"),
                             *TINY["inference_throughput.py"], "--max-fp32-diff", "0",
                             "--output", str(tmp_path / "out.json")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "the embeddings disagree, nothing timed: fp32 image difference" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_the_gpu_runbook_parses_and_refuses_an_unknown_part_before_doing_anything(tmp_path):
    run = BENCHMARKS / "gpu" / "run.sh"
    for script in (run, BENCHMARKS / "gpu" / "prepare.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    result = subprocess.run(["bash", str(run), "check", "inferense"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}, timeout=60)
    assert result.returncode == 2 and "unknown part 'inferense'" in result.stdout
    assert not (tmp_path / "out").exists()
