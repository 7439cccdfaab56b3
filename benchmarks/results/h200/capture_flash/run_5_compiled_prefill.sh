set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
timeout 520 python benchmarks/compiled_prefill_probe.py --shape llama-3.2-1b --tokens 2048,4096 > $R/compiled_prefill_llama.txt 2>&1
echo "rc=$?"
grep -v "Warn\|warn" $R/compiled_prefill_llama.txt | grep "^|\|, exact\|, aux\|, predicted\|H200" | cut -c1-300
tar czf $OUT/r.tgz -C $R .
