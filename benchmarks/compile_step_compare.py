"""`kvpred bench ttft` twice in one process: the base's one-token step eager (on a CPU the default, with predicted
mode's values deferred) and through the compiled forward (`--compile-step auto`: KVPredictionModel.compile_step).
`--order compiled,eager` runs them the other way round; the other arguments go to the bench, and each run writes its
files under --out as ttft_eager.* and ttft_compiled.*.

    python benchmarks/compile_step_compare.py --model smollm2-135m --device cpu --aux-dtype model \
        --prompt-lens 512,1024,2048 --batch 1 --repeats 5 --warmup 1 --decode-tokens 32 \
        --out benchmarks/results/cpu_compiled_step
"""
import argparse

from kvpred.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--order", default="eager,compiled")
    args, bench_args = parser.parse_known_args()
    for name in args.order.split(","):
        print(f"===== one-token step: {name}", flush=True)
        main(["bench", "ttft", *bench_args, "--compile-step", "auto" if name == "compiled" else "off",
              "--name", f"ttft_{name}"])
