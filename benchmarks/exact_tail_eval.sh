#!/usr/bin/env bash
# Issue 7's curve over the exact tail W: lambada, agreement and held-out loss of the shipped default on the CPU,
# predicted mode with W = 1, 4, 16, 64 (exact, aux and truncate run once, at W = 1, and are reused from the item cache).
#   bash benchmarks/exact_tail_eval.sh [OUT_DIR]   # ~20 min on 2 cores; then python benchmarks/exact_tail_plot.py [OUT_DIR]
set -eu
cd "$(dirname "$0")/.."
D=${1:-benchmarks/results/exact_tail}
mkdir -p $D
common=(--model smollm2-135m --device cpu --tasks lambada,agreement,heldout --limit 300 --batch-size 16 --quiet)
kvpred eval "${common[@]}" --out $D/w1.json
for w in 4 16 64; do
  cp $D/w1.items.jsonl $D/w$w.items.jsonl  # exact / aux / truncate results do not depend on W
  kvpred eval "${common[@]}" --exact-tail $w --out $D/w$w.json
done
