set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
( time timeout 100 python -m pytest -q -p no:cacheprovider tests/test_decoding.py -k "cuda or rolling or joining or captured_prompt_pass" ) > $R/gpu_tests_graph_joins.txt 2>&1
tail -3 $R/gpu_tests_graph_joins.txt
tar czf $OUT/r.tgz -C $R .
