# device call 8 (nvidia-h200, carry the transformers wheel, .carry/serve, .carry/tok and .carry/before =
# `git archive fc4438b kvpred`, the code before the warm-up captured join passes): CUDA tests of the side cache and
# the join warm-up, then lone requests of 1024-2048 tokens through the server, before and after
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl .carry/serve/*.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
( time timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not smollm" tests/test_decoding.py tests/test_serve.py \
    -k "cuda or join or rolling or warm or pool" ) > $R/gpu_tests_side_cache.txt 2>&1
tail -3 $R/gpu_tests_side_cache.txt
python3 - <<'PY'
import glob, shutil, torch
from transformers import AutoModelForCausalLM
from kvpred.shapes import shape_config
torch.manual_seed(0)
AutoModelForCausalLM.from_config(shape_config("smollm2-135m"), dtype=torch.bfloat16).save_pretrained("/tmp/rand")
for f in glob.glob(".carry/tok/*"):
    shutil.copy(f, "/tmp/rand")
PY
for version in before after; do
  root=$PWD; [ $version = before ] && root=$PWD/.carry/before
  cmd="python benchmarks/serve_bench.py --model /tmp/rand --device cuda --dtype bfloat16 --prompt-tokens 2048 --vary-lengths --load-only --requests 32 --concurrency 1 --max-tokens 32"
  echo "$version: $cmd" | tee -a $R/serve_warm_joins.txt
  PYTHONPATH=/tmp/tf:$root timeout 150 python3 ${cmd#python } 2>&1 | grep -v "Warn\|Loading" | tee -a $R/serve_warm_joins.txt
done
tar czf $OUT/r.tgz -C $R .
