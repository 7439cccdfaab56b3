# device call 4 (nvidia-h200, carry the transformers wheel): where generate()'s time to first token goes beyond the
# GPU's work, random-weight timing models, batch 1
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
cd benchmarks
for run in ${RUNS:-llama-3.2-1b:1024 smollm2-135m:512}; do
  echo "\$ python benchmarks/generate_host_profile.py --shape ${run%:*} --tokens ${run#*:}" > $R/host_profile_${run%:*}.txt
  timeout 200 python3 generate_host_profile.py --shape ${run%:*} --tokens ${run#*:} 2>&1 | grep -v Warn \
    >> $R/host_profile_${run%:*}.txt
  grep "TTFT" $R/host_profile_${run%:*}.txt
done
cd ..; tar czf $OUT/r.tgz -C $R .
# second call: RUNS=llama-3.2-1b:1024 bash run_4_host_profile.sh, then (same call) the captured passes alone
if [ -n "${PASSES:-}" ]; then
  mkdir -p /tmp/r2; cd benchmarks
  echo "\$ python benchmarks/predicted_pass_profile.py --shape llama-3.2-1b --tokens 1024" > /tmp/r2/pass_profile_1024.txt
  timeout 120 python3 predicted_pass_profile.py --shape llama-3.2-1b --tokens 1024 2>&1 | grep -v Warn >> /tmp/r2/pass_profile_1024.txt
  head -12 /tmp/r2/pass_profile_1024.txt; cd ..; cp $R/host_profile_llama-3.2-1b.txt /tmp/r2/host_profile_llama-3.2-1b_kernels.txt
  tar czf $OUT/r2.tgz -C /tmp/r2 .
fi
