#!/usr/bin/env bash
# Identity init vs `kvpred fit` vs `kvpred compress` vs `kvpred train` along the shipped default's lineage, on the CPU:
# per-layer key/value error, held-out NLL after a predicted prefix, first-token agreement (WikiText-2 test windows).
#   bash benchmarks/lineage_eval.sh TOKEN_SHARDS ROUND1_CHECKPOINT ROUND2_CHECKPOINT [OUT_DIR]
# TOKEN_SHARDS: the training shards (`kvpred data build`); ROUND1_CHECKPOINT: the first-round full-rank model;
# ROUND2_CHECKPOINT: the rank-128 second-round model (the default before rounds 3-4).
set -euo pipefail
data=$1 round1=$2 round2=$3 out=${4:-benchmarks/results/lineage}
runs=$(mktemp -d /tmp/lineage.XXXX)
mkdir -p "$out"
python -c "from kvpred import KVPredictionModel as M
M.from_pretrained('smollm2-135m', keep_layers=[0, 10, 20, 29]).save_pretrained('$runs/identity_kv')"
kvpred fit --model smollm2-135m --keep-layers 0,10,20,29 --source hidden --data "$data" --out "$runs/fit_hidden" \
    --tokens 65536 --batch-size 8
kvpred compress --model "$runs/fit_hidden" --rank 128 --data "$data" --out "$runs/fit_r128" --tokens 65536
for stage in identity_kv:$runs/identity_kv fit_hidden:$runs/fit_hidden fit_r128:$runs/fit_r128 \
             trained_round1:$round1 trained_round2:$round2 trained_shipped:smollm2-135m; do
    name=${stage%%:*} model=${stage#*:}
    kvpred eval --model "$model" --tasks kv,heldout,agreement --modes exact,predicted --limit 32 --batch-size 8 \
        --label "$name" --out "$out/$name.json" --quiet
done
