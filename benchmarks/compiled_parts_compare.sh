#!/usr/bin/env bash
# `kvpred bench ttft --compile-step auto` against `off`, with prompt passes as CUDA graphs and the first step
# pipelined: since the pipelined first step's parts take the compiled layers too, predicted mode's floor on a GPU
# (the auxiliary's pass plus the base's one-token step) is what compile_step changes. Random-weight timing models,
# one GPU, one call: bash benchmarks/compiled_parts_compare.sh SHAPE [BATCHES]. Files: $OUT/compiled_parts_SHAPE.tgz
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
shape=$1 batches=${2:-1}
R=/tmp/compiled_parts; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
for c in off auto; do
  name=${shape}_step_$c
  args=(--shape $shape --aux-keep 0.25 --device cuda --dtype bfloat16 --prompt-lens 512,1024,2048 --batch $batches
        --repeats 5 --warmup 2 --decode-tokens 32 --pipeline auto --prefill-graphs auto --compile-step $c)
  echo "+ kvpred bench ttft ${args[*]}" > $R/$name.log
  timeout 280 python3 -m kvpred.bench ttft "${args[@]}" --no-plot --out $R/$name >> $R/$name.log 2>&1
  echo "$name rc=$?"
  grep -E "B=[0-9]+ N=" $R/$name.log
done
tar czf $OUT/compiled_parts_$shape.tgz -C $R .
