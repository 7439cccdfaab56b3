# device call 1 (nvidia-h200, carry .carry): environment, the CUDA tests of the rolling batch's graph joins and the
# server, then the lone-join probe on random-weight timing models
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
( python3 --version; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)" ) > $R/device.txt 2>&1
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl .carry/serve/*.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
python3 -c "import transformers, fastapi, openai; print('transformers', transformers.__version__, 'openai', openai.__version__)" >> $R/device.txt 2>&1
cat $R/device.txt
( time timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_decoding.py tests/test_prefill_graphs.py \
    tests/test_serve.py -k "cuda or rolling or joining or join or captured" ) > $R/gpu_tests.txt 2>&1
tail -4 $R/gpu_tests.txt
cd benchmarks
for shape in llama-3.2-1b:1024 llama-3.2-1b:2048 smollm2-135m:512; do
  for mode in predicted exact; do
    timeout 60 python3 rolling_admit_probe.py --shape ${shape%:*} --tokens ${shape#*:} --mode $mode --device cuda \
      --dtype bfloat16 2>&1 | grep -v Warn | tee -a $R/admit_probe.txt
  done
done
cd ..; tar czf $OUT/r.tgz -C $R .
