#!/usr/bin/env bash
# `kvpred bench ttft --compile auto` (predictor + cache write as one torch.compile'd function) against `--compile off`,
# on one GPU in one call, plus benchmarks/predictor_write_probe.py. Files: $OUT/compile_compare.tgz
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=/tmp/res_compile; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 150 python3 benchmarks/predictor_write_probe.py 2>&1 | grep -v -i warn | tee $R/probe.md
run() {  # run NAME ARGS
  local name=$1; shift
  timeout 200 python3 -m kvpred.bench ttft --device cuda --dtype bfloat16 --decode-tokens 32 --repeats 5 --warmup 2 \
     --no-plot --out $R/$name "$@" > $R/$name.log 2>&1; echo "$name rc=$?"
}
for c in off auto; do
  run ${c}_1b --shape llama-3.2-1b --aux-keep 0.25 --prompt-lens 8192,32000 --batch 1,8 --max-batch-tokens 65536 --time-budget 50 --compile $c
  run ${c}_8b --shape llama-3.1-8b --aux-keep 0.25 --prompt-lens 8192,32000 --batch 1 --time-budget 60 --compile $c
done
tar czf $OUT/compile_compare.tgz -C $R .
