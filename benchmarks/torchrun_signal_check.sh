#!/usr/bin/env bash
# Ctrl+C to torchrun: the ranks stop at one step, save there together, and the same command resumes from it. One
# process per GPU (NCCL), or on a machine without one, CPU processes (gloo). Tiny random model, byte tokenizer, this
# repository's Python files as the corpus.
#   bash benchmarks/torchrun_signal_check.sh OUT_DIR [NPROC]
set -u
out=$1; nproc=${2:-2}; mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - "$out" <<'PY'
import sys
from kvpred.data import build_shards
from kvpred.testing import byte_tokenizer, save_tiny_model
save_tiny_model(f"{sys.argv[1]}/tiny", arch="llama")
build_shards(["kvpred"], byte_tokenizer(), f"{sys.argv[1]}/tokens", heldout_fraction=0.1, progress=False)
PY
args=(--nproc-per-node "$nproc" --master-port 29561 -m kvpred.train --model "$out/tiny" --data "$out/tokens"
      --keep-ratio 0.5 --seq-len 64 --batch-size 4 --warmup 10 --log-every 1 --eval-every 0 --save-every 0
      --out "$out/run")
torchrun "${args[@]}" --steps 100000 > "$out/first.log" 2>&1 &
agent=$!
logged() { grep -c '"loss"' "$out/run/metrics.jsonl" 2>/dev/null; }
until [ "$(logged)" -ge 50 ] 2>/dev/null; do sleep 0.2; done
kill -INT $agent
wait $agent; echo "first run: torchrun exit status $?"
grep "kvpred:" "$out/first.log"
stopped=$(python3 -c "import torch; print(torch.load('$out/run/train_state.pt', weights_only=False)['step'])")
echo "checkpoint step $stopped; loss records $(logged)"
torchrun "${args[@]}" --steps $((stopped + 20)) > "$out/resumed.log" 2>&1; echo "resumed run exit status $?"
grep "resumed from" "$out/resumed.log"
echo "loss records after resuming: $(logged) (want $((stopped + 20)))"
