# device call 3 (nvidia-h200, carry .carry): lone requests through `kvpred serve` (HTTP, the openai client), with
# continuous batching (a lone join replays its captured prompt pass) and without it (generate()), on a random-weight
# timing model of SmolLM2-135M's shape with SmolLM2's tokenizer (the base wrapped with kvpred's identity-initialised
# pruned auxiliary)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl .carry/serve/*.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
python3 - <<'PY'
import shutil, glob, torch
from transformers import AutoModelForCausalLM
from kvpred.shapes import shape_config
torch.manual_seed(0)
AutoModelForCausalLM.from_config(shape_config("smollm2-135m"), dtype=torch.bfloat16).save_pretrained("/tmp/rand")
for f in glob.glob(".carry/tok/*"):
    shutil.copy(f, "/tmp/rand")
PY
for n in 512 2048; do
  for flags in "" "--no-continuous-batching"; do
    echo "\$ python benchmarks/serve_bench.py --model /tmp/rand --device cuda --dtype bfloat16 --prompt-tokens $n --requests 24 --concurrency 1 --max-tokens 32 $flags" >> $R/serve_lone.txt
    timeout 130 python3 benchmarks/serve_bench.py --model /tmp/rand --device cuda --dtype bfloat16 --prompt-tokens $n \
      --requests 24 --concurrency 1 --max-tokens 32 $flags 2>&1 | grep -v "Warn\|Loading" >> $R/serve_lone.txt
  done
done
cat $R/serve_lone.txt
tar czf $OUT/r.tgz -C $R .
