"""`kvpred bench ttft` on the CPU twice in one process: one-token steps through F.linear (kvpred.matvec off, as
before it existed) and through the blocked matrix-vector product (on, the default). `--order blocked,linear` runs
them the other way round; the other arguments go to the bench, and each run writes its files under --out as
ttft_linear.* and ttft_blocked.*.

    python benchmarks/matvec_compare.py --model smollm2-135m --device cpu --prompt-lens 512,1024,2048 --batch 1 \
        --repeats 5 --warmup 1 --decode-tokens 32 --out benchmarks/results/matvec
"""
import argparse

from kvpred import matvec
from kvpred.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--order", default="linear,blocked")
    args, bench_args = parser.parse_known_args()
    limits = {"linear": 0, "blocked": matvec.MAX_ROWS}
    for name in args.order.split(","):
        matvec.MAX_ROWS = limits[name]
        print(f"===== one-token matmuls: {name} (kvpred.matvec.MAX_ROWS = {limits[name]})", flush=True)
        main(["bench", "ttft", *bench_args, "--name", f"ttft_{name}"])
