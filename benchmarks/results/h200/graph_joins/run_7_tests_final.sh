# device call 7 (nvidia-h200, carry the transformers wheel and .carry/serve): after check_inputs' single wait, the server's
# tests in full but the real SmolLM2 one (the openai client carried)
# and every other test with "cuda" in its name, with transformers 5.24
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl .carry/serve/*.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
( time timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_serve.py tests/test_serve_refine.py -m "not smollm" ) \
  > $R/gpu_tests_serve_final.txt 2>&1
tail -4 $R/gpu_tests_serve_final.txt
( time timeout 240 python3 -m pytest -q -p no:cacheprovider tests -k cuda --ignore=tests/test_serve.py \
    --ignore=tests/test_serve_refine.py ) > $R/gpu_tests_cuda_final.txt 2>&1
tail -4 $R/gpu_tests_cuda_final.txt
tar czf $OUT/r.tgz -C $R .
