# device call 5 (nvidia-h200, carry the transformers wheel): chrome traces of generate() (trace_generate.py)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
timeout 200 python3 benchmarks/results/h200/graph_joins/trace_generate.py $R 2>&1 | grep -v Warn | tail -8
ls -la $R; gzip $R/trace_*.json; tar czf $OUT/r.tgz -C $R .
