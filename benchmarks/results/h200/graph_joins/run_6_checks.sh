# device call 6 (nvidia-h200, carry the transformers wheel and .carry/before = `git archive ebdadcf kvpred`):
# generate()'s time to first token before and after check_inputs waits on the device once, alternating
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
for round in 1 2; do
  for version in before after; do
    root=$PWD; [ $version = before ] && root=$PWD/.carry/before
    for run in llama-3.2-1b:1024 smollm2-135m:512; do
      echo "$version (round $round): python benchmarks/generate_host_profile.py --shape ${run%:*} --tokens ${run#*:} --plain --calls 40" | tee -a $R/checks_ab.txt
      PYTHONPATH=/tmp/tf:$root timeout 100 python3 benchmarks/generate_host_profile.py --shape ${run%:*} \
        --tokens ${run#*:} --plain --calls 40 2>&1 | grep "TTFT" | tee -a $R/checks_ab.txt
    done
  done
done
tar czf $OUT/r.tgz -C $R .
