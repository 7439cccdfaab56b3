#!/usr/bin/env bash
# `kvpred bench ttft --compile-step auto` (the one-token CUDA-graph step captured from a torch.compile'd base forward)
# against `--compile-step off`, random-weight timing models on one GPU in one call. Files: $OUT/step_compile.tgz
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=/tmp/step_compile; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run() {  # run NAME ARGS
  local name=$1; shift
  echo "+ kvpred bench ttft --device cuda --dtype bfloat16 --decode-tokens 32 --repeats 5 --warmup 2 $*" > $R/$name.log
  timeout 240 python3 -m kvpred.bench ttft --device cuda --dtype bfloat16 --decode-tokens 32 --repeats 5 --warmup 2 \
     --no-plot --out $R/$name "$@" >> $R/$name.log 2>&1; echo "$name rc=$?"
}
for c in off auto; do
  run ${c}_smollm2 --shape smollm2-135m --aux-keep 0.25 --prompt-lens 2048,8000 --batch 1 --compile-step $c
  run ${c}_1b --shape llama-3.2-1b --aux-keep 0.25 --prompt-lens 2048,8192 --batch 1 --compile-step $c
  run ${c}_8b --shape llama-3.1-8b --aux-keep 0.25 --prompt-lens 2048,8192 --batch 1 --compile-step $c
done
tar czf $OUT/step_compile.tgz -C $R .
