#!/usr/bin/env bash
# The GPU measurements docs/benchmarks.md is waiting for, on a CUDA machine, from the repo root.
# A machine without network access needs .gpu/ (benchmarks/gpu/prepare.sh, run where pip works)
# copied along; one with openalign's dependencies installed does not. One part per run, each a few
# minutes; results (JSON, the log, the GPU's name) land in $OUT:
#
#   bash benchmarks/gpu/run.sh inference   # align-base sizes vs transformers, bf16, eager and --compile
#   bash benchmarks/gpu/run.sh train       # align-b3-mini / align-b7-base steps/s and memory, bf16;
#                                          # clippo-b16 with AdamW and with Adafactor
#   bash benchmarks/gpu/run.sh train-memory  # align-b7-base with accumulation and with activation checkpointing
#   bash benchmarks/gpu/run.sh eval        # ImageNet-size kNN and COCO-size retrieval metrics
#   bash benchmarks/gpu/run.sh check       # the environment, and the small inference preset as a smoke test
#
# DEVICE=cpu runs the same commands on the CPU (to try the script; slow at these sizes).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if [ -d .gpu/whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl || { echo "installing .gpu/whl failed: run benchmarks/gpu/prepare.sh again"; exit 1; }
fi
export PYTHONPATH="$PWD/src:/tmp/site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".gpu/unifont/*.hex" > /dev/null && [ ! -f /usr/share/unifont/unifont.hex ] \
        && [ -z "${OPENALIGN_UNIFONT:-}" ]; then
    OPENALIGN_UNIFONT=$(ls "$PWD"/.gpu/unifont/*.hex | sort -V | paste -sd:)  # CLIPPO renders its captions with them
    export OPENALIGN_UNIFONT
fi
LOG="$OUT/log.txt"

bench() {  # bench NAME SCRIPT ARGS...: one benchmark, its JSON at $OUT/NAME.json, its output in the log
    local name=$1 script=$2
    shift 2
    echo "== $name: python3 benchmarks/$script $*" | tee -a "$LOG"
    python3 "benchmarks/$script" "$@" --output "$OUT/$name.json" 2>&1 | grep -v '^Writing model shards' | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/environment.txt"
python3 -c "
import open_clip, webdataset, openalign
from openalign.data.tokenizer import load_hf_tokenizer
assert len(load_hf_tokenizer('bert-base-uncased')) == 30522
print('imports and the bert-base-uncased vocabulary: ok')" 2>&1 | tee -a "$LOG" | grep -q ': ok$' || exit 1
python3 -c "
from openalign.data.render import TextRenderer
TextRenderer().batch(['ok'])
print('Unifont: ok')" > /dev/null 2>&1 || echo "no Unifont: the CLIPPO benchmark in 'train' will fail" | tee -a "$LOG"

case ${1:-check} in
    check)
        bench inference_small inference_throughput.py --device "$DEVICE" --warmup 1 --iterations 2 ;;
    inference)
        bench inference_align_base inference_throughput.py --preset align-base --device "$DEVICE"
        bench inference_align_base_compile inference_throughput.py --preset align-base --device "$DEVICE" --compile ;;
    train)
        bench train train_throughput.py --models align-b3-mini align-b7-base --batch-sizes 128 256 --device "$DEVICE"
        bench train_standard_bn train_throughput.py --models align-b7-base --batch-sizes 256 --device "$DEVICE" \
            --standard-bn
        bench train_clippo_optimizers train_throughput.py --models clippo-b16 --batch-sizes 256 \
            --optimizers adamw adafactor --device "$DEVICE"
        bench train_ema train_throughput.py --models align-b7-base --batch-sizes 256 --ema off on \
            --device "$DEVICE" ;;
    train-memory)
        bench train_accum train_throughput.py --models align-b7-base --batch-sizes 256 --accum-steps 1 2 4 \
            --device "$DEVICE"
        bench train_checkpointing train_throughput.py --models align-b7-base --batch-sizes 256 \
            --grad-checkpointing off on --device "$DEVICE" ;;
    eval)
        bench eval_imagenet eval_throughput.py --device "$DEVICE" --knn-memory 1281167 --knn-queries 50000 ;;
    *) echo "unknown part '$1': check, inference, train, train-memory or eval"; exit 2 ;;
esac
