set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
if ! PYTHONPATH=/tmp/tf python -c "import transformers" >> $R/pip.txt 2>&1; then
  pip install -q --no-deps --target /tmp/tf .carry/huggingface_hub-1.31.0-py3-none-any.whl >> $R/pip.txt 2>&1
fi
export PYTHONPATH=/tmp/tf:$PWD
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a $R/device.txt
( time timeout 240 python -m pytest -q -x -p no:cacheprovider tests/test_pipeline.py tests/test_decoding.py tests/test_prefill_graphs.py tests/test_refine.py -k cuda ) > $R/gpu_tests.txt 2>&1
tail -2 $R/gpu_tests.txt
timeout 300 python benchmarks/generate_ttft.py --shape llama-3.2-1b --device cuda --prompt-lens 1024,2048,4096 --batch 1,4 --compare prefill-graphs --most-tokens 16384 --out $R/generate_llama-3.2-1b.md > $R/generate_llama.log 2>&1
echo "generate rc=$?"; tail -12 $R/generate_llama.log
tar czf $OUT/r.tgz -C $R .
