"""Loading a released big_vision CLIPPO checkpoint (``.npz``): seconds and the process's peak
memory, each load in a fresh process. The checkpoint is synthetic (random parameters of the
released tree and shapes, written as big_vision writes them: tests/big_vision_reference.py), so
the numbers are the loader's, not a download's.

    python benchmarks/weights_loading.py                  # clippo-b16: 93M parameters, 376 MB
    python benchmarks/weights_loading.py --preset clippo-test

Prints a table and writes JSON (``--output``, default runs/benchmarks/weights_loading.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import add_output, environment, report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import big_vision_reference  # noqa: E402  (the tests' writer of big_vision checkpoints)

# make_params sizes of each registered CLIPPO
PRESETS = {"clippo-b16": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=16, image_size=224, embed_dim=768),
           "clippo-test": dict(width=32, depth=1, heads=2, mlp_dim=128, patch=16, image_size=32, embed_dim=16)}

LOAD = """
import json, resource, sys, time
import openalign
start = time.perf_counter()
openalign.load_pretrained(sys.argv[1], architecture=sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="clippo-b16")
    parser.add_argument("--repeats", type=int, default=2, help="loads, each in a fresh process; the best is kept")
    add_output(parser, "weights_loading")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{args.preset}.npz"
        big_vision_reference.save_npz(big_vision_reference.make_params(**PRESETS[args.preset]), path)
        size = path.stat().st_size
        runs = [json.loads(subprocess.run([sys.executable, "-c", LOAD, str(path), args.preset], check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
                for _ in range(args.repeats)]
    best = {key: min(run[key] for run in runs) for key in ("seconds", "peak_rss_gib")}
    row = {"checkpoint": args.preset, "file_gib": size / 2**30, **best}
    report("big_vision checkpoint loading", ["checkpoint", "file GiB", "seconds", "peak RSS GiB"],
           [[args.preset, f"{row['file_gib']:.2f}", f"{best['seconds']:.2f}", f"{best['peak_rss_gib']:.2f}"]], 1,
           {"environment": environment(torch.device("cpu")), "results": [row]}, args.output)


if __name__ == "__main__":
    main()
