# device call 1 (nvidia-h200; carry the transformers wheel, .carry/serve, .carry/tok and .carry/before =
# `git archive fc4438b kvpred`, the code before the warm-up captured join passes):
# (a) the CUDA tests of the pool, rolling batches, joins and warm-up, on this commit;
# (b) a one-row GPU server (--max-batch 1), which since 45f2a8f also captures join passes: lone requests of
#     1024-2048 tokens, before and after (SmolLM2's shape, random weights, SmolLM2's tokenizer);
# (c) the start-up cost of the join warm-up for a larger model: Llama-3.2-1B's shape, before and after.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/device.txt
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl .carry/serve/*.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
( time timeout 200 python3 -m pytest -q -p no:cacheprovider -m "not smollm" tests/test_decoding.py tests/test_serve.py \
    -k "cuda or join or rolling or warm or pool" ) > $R/gpu_tests.txt 2>&1
tail -3 $R/gpu_tests.txt
python3 - <<'PY'
import glob, shutil, torch
from transformers import AutoModelForCausalLM
from kvpred.shapes import shape_config
for shape, out in (("smollm2-135m", "/tmp/rand"), ("llama-3.2-1b", "/tmp/rand1b")):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(shape_config(shape), dtype=torch.bfloat16).save_pretrained(out)
    for f in glob.glob(".carry/tok/*"):
        shutil.copy(f, out)
PY
bench() {  # $1 file, $2 version, rest: serve_bench arguments
  local file=$1 version=$2; shift 2
  local root=$PWD; [ $version = before ] && root=$PWD/.carry/before
  echo "$version: python benchmarks/serve_bench.py $*" | tee -a $R/$file
  PYTHONPATH=/tmp/tf:$root timeout 170 python3 benchmarks/serve_bench.py "$@" 2>&1 | grep -v "Warn\|Loading" \
    | tee -a $R/$file
}
COMMON="--device cuda --dtype bfloat16 --prompt-tokens 2048 --vary-lengths --load-only --requests 32 --concurrency 1 --max-tokens 32"
for v in before after; do bench one_row.txt $v --model /tmp/rand --max-batch 1 $COMMON; done
for v in before after; do bench llama1b.txt $v --model /tmp/rand1b $COMMON; done
tar czf $OUT/r.tgz -C $R .
