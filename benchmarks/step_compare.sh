#!/usr/bin/env bash
# Static-step attention, old (SDPA under a mask, the patch in results/h100/step_attention) vs new (matmuls) vs
# transformers' eager step, on one GPU in one call: bash benchmarks/step_compare.sh  (files: $OUT/step_compare.tgz)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/res; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/step_attention_probe.py > $R/probe.md 2>&1; cat $R/probe.md
rm -rf /tmp/old && cp -r . /tmp/old && (cd /tmp/old && patch -s -R -p1 < benchmarks/results/h100/step_attention/old_step.patch) || exit 1
run() {  # run TREE NAME ARGS
  local tree=$1 name=$2; shift 2
  (cd $tree && timeout 200 python3 -m kvpred.bench ttft --device cuda --dtype bfloat16 --decode-tokens 32 --repeats 5 \
     --warmup 2 --no-plot --out $R/$name "$@" > $R/$name.log 2>&1; echo "$name rc=$?")
}
python3 -m pytest -q tests/test_bench.py -k graph 2>&1 | tail -3
for v in old:/tmp/old new:. eager:.; do
  tag=${v%%:*} tree=${v#*:} extra=()
  [ $tag = eager ] && extra=(--cuda-graph off)
  run $tree ${tag}_1b --shape llama-3.2-1b --aux-keep 0.25 --prompt-lens 2048,8192,32000 --batch 1,8 --max-batch-tokens 65536 --time-budget 50 "${extra[@]}"
  run $tree ${tag}_8b --shape llama-3.1-8b --aux-keep 0.25 --prompt-lens 2048,8192,32000 --batch 1 --time-budget 60 "${extra[@]}"
done
tar czf $OUT/step_compare.tgz -C $R .
