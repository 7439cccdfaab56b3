#!/usr/bin/env bash
# GPU time-to-first-token benchmark (kvpred issue 5): exact vs aux vs predicted, bf16, on one H100.
#
#   bash benchmarks/gpu_ttft.sh          # from the repo root; writes under $OUT (default benchmarks/results/gpu)
#
# SmolLM2-135M and the Llama-3.2-1B/3B, Qwen2.5-1.5B and Llama-3.1-8B shapes are *random-weight timing
# models*: randomly initialised, exact public shapes (kvpred/shapes.py). Timing does not depend on weights.
# Each base gets a KVP-LP auxiliary keeping 1/4 of its layers and, where a smaller public model shares its
# tokenizer, a KVP-C-shaped one. Every run has a time budget (it skips its costliest shapes rather than overrun)
# and a hard timeout; the timeouts sum to 485 s, so the script ends within 9 minutes. Each run saves its json
# after every shape, so a timeout loses one shape at most.
# Files under $OUT: ttft_gpu.{json,csv,md,png} and ttft_gpu.log. The summary table is printed last.
# Smoke test without a GPU (tiny lengths, one repeat, CPU): KVPRED_SMOKE=1 KVPRED_ONLY="smollm2 qwen1.5b" bash ...
# KVPRED_SET=rank runs the predictor comparison instead (K/V input vs hidden-state full rank vs rank 256), 330 s at most.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-benchmarks/results/gpu}"
PARTS="$(mktemp -d /tmp/kvpred_ttft.XXXXXX)"
LOG="$OUT/ttft_gpu.log"
mkdir -p "$OUT"
: > "$LOG"
START=$SECONDS
DEVICE=cuda LENS=512,2048,8192,32000 SMOLLM_LENS=128,512,2048,8000 RANK_LENS=2048,8192 EXTRA=()
if [ "${KVPRED_SMOKE:-0}" = 1 ]; then
    DEVICE=cpu LENS=16,32 SMOLLM_LENS=16,32 RANK_LENS=16,32 EXTRA=(--repeats 1 --warmup 0 --decode-tokens 2)
fi

bench() {  # bench NAME BUDGET_S TIMEOUT_S ARGS...: one `bench ttft` run, its output in the log
    local name=$1 budget=$2 limit=$3
    shift 3
    if [ -n "${KVPRED_ONLY:-}" ] && [[ " $KVPRED_ONLY " != *" $name "* ]]; then return; fi
    echo "== $name (budget ${budget}s, timeout ${limit}s, t=$((SECONDS - START))s)" | tee -a "$LOG"
    timeout -k 5 "$limit" python3 -m kvpred.bench ttft --device "$DEVICE" --dtype bfloat16 --decode-tokens 32 \
        --time-budget "$budget" --out "$PARTS" --name "$name" --no-plot "$@" "${EXTRA[@]}" >> "$LOG" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || echo "!! $name exited with $rc (124: timeout); its finished shapes are kept" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

if [ "${KVPRED_SET:-shapes}" = rank ]; then
    # the predictor's share: K/V input (paper), hidden-state input with full-rank maps, and factorised at rank 256
    for shape in llama-3.2-1b llama-3.2-3b llama-3.1-8b; do
        bench "${shape}_full" 30 60 --shape $shape --aux-keep 0.25 --source kv --source hidden --prompt-lens $RANK_LENS \
            --batch 1 --repeats 5
        bench "${shape}_r256" 25 50 --shape $shape --aux-keep 0.25 --source hidden --predictor-rank 256 \
            --prompt-lens $RANK_LENS --batch 1 --repeats 5
    done
else
    # K/V input (the paper's predictor) and hidden-state input (the shipped SmolLM2 default's)
    bench smollm2 40 70 --shape smollm2-135m --aux-keep 0.25 --source kv --source hidden --prompt-lens $SMOLLM_LENS \
        --batch 1,8 --max-batch-tokens 65536 --repeats 5
    # the same without the CUDA-graph step: what capturing the base's last-token step buys
    bench smollm2_eager 15 35 --shape smollm2-135m --aux-keep 0.25 --prompt-lens $SMOLLM_LENS --batch 1 \
        --repeats 5 --cuda-graph off --label "smollm2-135m, eager step"
    bench llama1b 40 80 --shape llama-3.2-1b --aux-keep 0.25 --prompt-lens $LENS --batch 1,8 \
        --max-batch-tokens 65536 --repeats 5
    bench qwen1.5b 50 90 --shape qwen2.5-1.5b --aux-keep 0.25 --aux-shape qwen2.5-0.5b --prompt-lens $LENS \
        --batch 1,8 --max-batch-tokens 65536 --repeats 5
    bench llama3b 55 100 --shape llama-3.2-3b --aux-keep 0.25 --aux-shape llama-3.2-1b --prompt-lens $LENS \
        --batch 1,8 --max-batch-tokens 65536 --repeats 4
    bench llama8b 70 110 --shape llama-3.1-8b --aux-keep 0.25 --aux-shape llama-3.2-1b --prompt-lens $LENS \
        --batch 1,8 --max-batch-tokens 16384 --repeats 3
fi

echo "== report (t=$((SECONDS - START))s)" | tee -a "$LOG"
grep -E "^(skipped|!!|kvpred: error|Traceback)" "$LOG" || true
shopt -s nullglob
parts=("$PARTS"/*.json)
if [ ${#parts[@]} -eq 0 ]; then
    echo "no results: see $LOG"; tail -n 40 "$LOG"; exit 1
fi
python3 -m kvpred.bench report "${parts[@]}" --out "$OUT" --name ttft_gpu > "$PARTS/report.txt" 2>&1
rc=$?
cat "$PARTS/report.txt" >> "$LOG"
echo "total $((SECONDS - START)) s; files: $(ls "$OUT" | tr '\n' ' ')"
echo
cat "$PARTS/report.txt"  # targets, then the summary table, last
exit $rc
