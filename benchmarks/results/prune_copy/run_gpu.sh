# device call (nvidia-h200; carry the transformers wheel and .carry/serve): the pruned auxiliary's copy, old way and
# new, on random-weight bases of public shapes (bf16, 1/4 of the layers kept), then every CUDA test
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/device.txt
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl .carry/serve/*.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
for shape in llama-3.1-8b llama-3.2-1b; do
  for way in old new; do python3 benchmarks/results/prune_copy/measure.py $way $shape 2>&1 | tail -1; done
done | tee $R/gpu.txt
( time timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_serve.py tests/test_serve_refine.py ) \
  > $R/gpu_tests_serve.txt 2>&1
tail -3 $R/gpu_tests_serve.txt
( time timeout 270 python3 -m pytest -q -p no:cacheprovider tests -k cuda --ignore=tests/test_serve.py \
    --ignore=tests/test_serve_refine.py ) > $R/gpu_tests_cuda.txt 2>&1
tail -3 $R/gpu_tests_cuda.txt
tar czf $OUT/r.tgz -C $R .
