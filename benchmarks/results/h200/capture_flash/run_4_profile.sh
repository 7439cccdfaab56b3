set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
timeout 250 python benchmarks/predicted_pass_profile.py --shape llama-3.2-1b --tokens 4096 --compile-step > $R/profile_llama_4096.txt 2>&1
echo "rc=$?"
grep -v "Warn\|warn" $R/profile_llama_4096.txt | head -120 | cut -c1-190
tar czf $OUT/r.tgz -C $R .
