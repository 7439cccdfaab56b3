set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" > $R/device.txt
( time timeout 300 python -m pytest -q -p no:cacheprovider tests/test_prefill_graphs.py tests/test_decoding.py tests/test_pipeline.py -k "cuda" ) > $R/gpu_tests_shared_aux.txt 2>&1
tail -3 $R/gpu_tests_shared_aux.txt
timeout 150 python benchmarks/generate_ttft.py --shape llama-3.2-1b --device cuda --prompt-lens 512,2048,4096 --batch 1 --compare prefill-graphs --out $R/generate_llama-3.2-1b_final.md > $R/generate_final.log 2>&1
echo "generate rc=$?"; tail -6 $R/generate_final.log
tar czf $OUT/r.tgz -C $R .
