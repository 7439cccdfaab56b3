set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a $R/device.txt
( time timeout 330 python -m pytest -q -p no:cacheprovider tests -k cuda --ignore=tests/test_serve.py --ignore=tests/test_serve_refine.py ) > $R/gpu_tests.txt 2>&1
tail -4 $R/gpu_tests.txt
timeout 200 python benchmarks/generate_ttft.py --shape gemma-3-1b --device cuda --prompt-lens 1024,2048,4096 --batch 1,4 --compare prefill-graphs --most-tokens 16384 --out $R/generate_gemma-3-1b.md > $R/generate_gemma.log 2>&1
echo "generate rc=$?"; tail -9 $R/generate_gemma.log
tar czf $OUT/r.tgz -C $R .
