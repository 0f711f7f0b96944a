#!/usr/bin/env bash
# The GPU measurements docs/benchmarks.md is waiting for, on a CUDA machine, from the repo root.
# A machine without network access needs .gpu/ (benchmarks/gpu/prepare.sh, run where pip works)
# copied along (.gpu is git-ignored: the device tool takes it only where `carry` names it); one with
# openalign's dependencies installed does not. One or more parts per run; results (JSON, the log, the
# GPU's name) land in $OUT (the device tool returns at most 8 files, the log and environment.txt two of them:
# parts whose JSON files add up to 6 at most; check writes 3, train 4, train-memory 2, the others 1):
#
#   bash benchmarks/gpu/run.sh check       # the environment; small inference (embeddings checked), train, eval
#   bash benchmarks/gpu/run.sh inference   # align-base sizes vs transformers, bf16, eager
#   bash benchmarks/gpu/run.sh inference-compile  # the same under torch.compile, large batch only (compiling)
#   bash benchmarks/gpu/run.sh train       # align-b3-mini / align-b7-base steps/s and memory, bf16;
#                                          # clippo-b16 with AdamW and with Adafactor
#   bash benchmarks/gpu/run.sh train-memory  # align-b7-base with accumulation and with activation checkpointing
#   bash benchmarks/gpu/run.sh train-compile # align-b3-mini / align-b7-base under torch.compile
#   bash benchmarks/gpu/run.sh eval        # ImageNet-size kNN and COCO-size retrieval metrics
#   bash benchmarks/gpu/run.sh check inference   # parts in turn, in one command
#
# Each benchmark runs under `timeout`, within BUDGET seconds (default 570) of the whole command, so that
# it returns inside the device tool's 10 minutes with the results so far; a failed, out-of-memory or
# timed-out one does not stop the others, and the exit status is 1 if any failed (listed at the end).
# DEVICE=cpu runs the same commands on the CPU (to try the script; slow at these sizes).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1  # the repo root: .gpu, src and benchmarks are found from there
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-570}
parts=("${@:-check}")
for part in "${parts[@]}"; do
    case $part in
        check|inference|inference-compile|train|train-memory|train-compile|eval) ;;
        *) echo "unknown part '$part': check, inference, inference-compile, train, train-memory, train-compile" \
               "or eval"; exit 2 ;;
    esac
done
mkdir -p "$OUT"
if [ -d .gpu/whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl || { echo "installing .gpu/whl failed: run benchmarks/gpu/prepare.sh again"; exit 1; }
fi
export PYTHONPATH="$PWD/src:/tmp/site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export COLUMNS=${COLUMNS:-160}  # the tables' width in the log (rich takes 80 columns where output is no terminal)
if compgen -G ".gpu/unifont/*.hex" > /dev/null && [ ! -f /usr/share/unifont/unifont.hex ] \
        && [ -z "${OPENALIGN_UNIFONT:-}" ]; then
    # CLIPPO renders its captions with them
    OPENALIGN_UNIFONT=$(printf "%s\n" "$PWD"/.gpu/unifont/*.hex | sort -V | paste -sd:)
    export OPENALIGN_UNIFONT
fi
LOG="$OUT/log.txt"
failed=()

bench() {  # bench NAME SCRIPT ARGS...: one benchmark, its JSON at $OUT/NAME.json, its output in the log
    local name=$1 script=$2 left=$((BUDGET - SECONDS)) status
    shift 2
    if [ "$left" -lt 30 ]; then
        echo "== $name: not run, the command's ${BUDGET} s are spent" | tee -a "$LOG"
        failed+=("$name (not run)")
        return
    fi
    echo "== $name: python3 benchmarks/$script $*" | tee -a "$LOG"
    timeout -k 10 "$left" python3 "benchmarks/$script" "$@" --output "$OUT/$name.json" 2>&1 \
        | grep -v '^Writing model shards' | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        [ "$status" -eq 124 ] && status="$status: out of time"
        echo "== $name: FAILED (exit $status)" | tee -a "$LOG"
        failed+=("$name")
    fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/environment.txt"
python3 -c "
import open_clip, webdataset, openalign
from openalign.data.tokenizer import load_hf_tokenizer
assert len(load_hf_tokenizer('bert-base-uncased')) == 30522
print('imports and the bert-base-uncased vocabulary: ok')" 2>&1 | tee -a "$LOG" | grep -q ': ok$' || exit 1
if [ "$DEVICE" = cuda ] && ! python3 -c "import torch; assert torch.cuda.is_available()" > /dev/null 2>&1; then
    echo "torch sees no CUDA device (DEVICE=cpu to try the script on the CPU)" | tee -a "$LOG"
    exit 1
fi
python3 -c "
from openalign.data.render import TextRenderer
TextRenderer().batch(['ok'])
print('Unifont: ok')" > /dev/null 2>&1 \
    || echo "no Unifont: the CLIPPO benchmarks in 'check' and 'train' will fail" | tee -a "$LOG"

# the embeddings must agree before anything is timed: fp32 to float rounding, bf16 to a cosine of 0.99
# (0.9976 and 0.9999 on the CPU for the small and align-base presets)
agree=(--min-cosine 0.99 --max-fp32-diff 1e-3)
# align-b7-base holds about 470 MiB a sample for its backward pass in bf16 (counted on the CPU): 256 a
# device is about 118 GiB, over an 80 GB H100 (reported as out of memory), which is what train-memory's
# accumulation and checkpointing are for; its other runs take 128
for part in "${parts[@]}"; do
    case $part in
        check)
            bench check_inference inference_throughput.py --device "$DEVICE" --warmup 1 --iterations 2 "${agree[@]}"
            bench check_train train_throughput.py --models align-test clippo-test --batch-sizes 32 --steps 2 \
                --warmup 1 --device "$DEVICE"
            bench check_eval eval_throughput.py --device "$DEVICE" --images 500 --knn-memory 20000 \
                --knn-queries 1000 ;;
        inference)
            bench inference_align_base inference_throughput.py --preset align-base --device "$DEVICE" "${agree[@]}" ;;
        inference-compile)
            bench inference_align_base_compile inference_throughput.py --preset align-base --device "$DEVICE" \
                --compile --no-latency "${agree[@]}" ;;
        train)
            bench train train_throughput.py --models align-b3-mini align-b7-base --batch-sizes 128 256 \
                --device "$DEVICE"
            bench train_standard_bn train_throughput.py --models align-b7-base --batch-sizes 128 --device "$DEVICE" \
                --standard-bn
            bench train_clippo_optimizers train_throughput.py --models clippo-b16 --batch-sizes 256 \
                --optimizers adamw adafactor --device "$DEVICE"
            bench train_ema train_throughput.py --models align-b7-base --batch-sizes 128 --ema off on \
                --device "$DEVICE" ;;
        train-memory)
            bench train_accum train_throughput.py --models align-b7-base --batch-sizes 256 --accum-steps 1 2 4 \
                --device "$DEVICE"
            bench train_checkpointing train_throughput.py --models align-b7-base --batch-sizes 256 \
                --grad-checkpointing off on --device "$DEVICE" ;;
        train-compile)
            bench train_compile train_throughput.py --models align-b3-mini align-b7-base --batch-sizes 128 \
                --compile --device "$DEVICE" ;;
        eval)
            bench eval_imagenet eval_throughput.py --device "$DEVICE" --knn-memory 1281167 --knn-queries 50000 ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" | tee -a "$LOG"
    exit 1
fi
echo "all benchmarks of ${parts[*]} ran: $OUT" | tee -a "$LOG"
