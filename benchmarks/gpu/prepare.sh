#!/usr/bin/env bash
# Stage, on a machine where pip works, what a GPU machine without network access lacks, into
# .gpu/ (kept out of git; copy it along with the checkout): wheels of the pure-Python packages the
# benchmarks import that the image does not hold, at the versions of this checkout's .venv, and
# the bert-base-uncased vocabulary as a stub of the package openalign finds it in (the package
# itself is 83 MB with its model).
#
#   bash benchmarks/gpu/prepare.sh          # then, on the GPU machine: bash benchmarks/gpu/run.sh check inference
#
# .gpu/ is git-ignored: the device tool sends it only where its `carry` names it (about 7 MB of the 64 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's openalign, whichever the venv installed
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qsx '/.gpu/' "$exclude" || echo '/.gpu/' >> "$exclude"
rm -rf .gpu && mkdir -p .gpu/whl .gpu/site
requirements=$("$PYTHON" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in
               ("webdataset", "braceexpand", "open_clip_torch", "ftfy", "wcwidth")))
PY
)
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl $requirements
"$PYTHON" - <<'PY'
import shutil
from pathlib import Path

from openalign.data.tokenizer import _PACKAGED_COPIES, _packaged_copy

package, subdir = _PACKAGED_COPIES["bert-base-uncased"]
source = _packaged_copy("bert-base-uncased")
if source is None:
    raise SystemExit(f"{package} is not installed here: make install first")
stub = Path(".gpu/site") / package
(stub / subdir).mkdir(parents=True)
(stub / "__init__.py").write_text('"""The bert-base-uncased vocabulary alone (see prepare.sh)."""\n')
for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (source / name).is_file():
        shutil.copy(source / name, stub / subdir / name)
PY
# the Unifont hex files CLIPPO's renderer reads here, numbered in their order (a later file's glyph
# wins); run.sh points OPENALIGN_UNIFONT at them where the machine has no Unifont of its own
"$PYTHON" - <<'PY'
import shutil
from pathlib import Path

from openalign.data.render import resolve_font_paths

fonts = [path for path in resolve_font_paths() if Path(path).is_file()]
if not fonts:
    print("no Unifont here (apt-get install unifont): the CLIPPO benchmark in run.sh's train part needs one")
for number, path in enumerate(fonts):
    Path(".gpu/unifont").mkdir(exist_ok=True)
    shutil.copy(path, f".gpu/unifont/{number}-{Path(path).name}")
PY
du -sh .gpu
