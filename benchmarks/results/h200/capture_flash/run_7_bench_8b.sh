set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/r; mkdir -p $R
pip install -q --no-deps --target /tmp/tf .carry/transformers-5.24.0-py3-none-any.whl > $R/pip.txt 2>&1
export PYTHONPATH=/tmp/tf:$PWD
for shape in llama-3.1-8b; do
  name=${shape}_graphs_4096
  args=(--shape $shape --aux-keep 0.25 --device cuda --dtype bfloat16 --prompt-lens 1024,2048,4096 --batch 1
        --repeats 5 --warmup 2 --decode-tokens 32 --pipeline auto --prefill-graphs auto --compile-step auto)
  echo "+ kvpred bench ttft ${args[*]}" > $R/$name.log
  timeout 330 python3 -m kvpred.bench ttft "${args[@]}" --no-plot --out $R/$name >> $R/$name.log 2>&1
  echo "$name rc=$?"
  grep -E "B=[0-9]+ N=" $R/$name.log
done
tar czf $OUT/r.tgz -C $R .
