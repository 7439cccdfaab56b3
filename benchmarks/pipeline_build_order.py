"""Is a PipelinedPrefill built later faster than the first one built on the same cache? (GPU probe; it was not)

In benchmarks/results/h100/pipeline_priority the second pipeline built on a cache looked 1-5% faster than the first,
whatever their stream priorities. This builds --copies pipelines on one cache, one after the other, and times them in
turns over fresh random prompts; then builds one more and times it against the first again.

    python benchmarks/pipeline_build_order.py --shapes llama-3.2-1b,llama-3.1-8b --prompt-lens 2048 --copies 3
"""
import argparse
import statistics
import time

import torch

from kvpred.bench import prompts
from kvpred.decoding import GraphStep
from kvpred.pipeline import PipelinedPrefill
from kvpred.shapes import random_kvp_model


def timed(runs: dict, model, shape: str, n: int, repeats: int, warmup: int, seed: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(warmup + repeats):
        ids = prompts(model.base.config.vocab_size, 1, n, torch.device("cuda"), seed, shape, n, r)
        for name in names[r % len(names):] + names[:r % len(names)]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            runs[name](ids).cpu()
            if r >= warmup:
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    p.add_argument("--prompt-lens", default="2048")
    p.add_argument("--copies", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, bf16, batch 1, random-weight timing models, KVP-LP 1/4; torch "
          f"{torch.__version__}; median ms of {args.repeats} prompts per pipeline, in turns")
    for shape in args.shapes.split(","):
        model = random_kvp_model(shape, aux_keep=0.25, dtype=torch.bfloat16, device="cuda", seed=0)
        for n in (int(x) for x in args.prompt_lens.split(",")):
            cache = model.new_cache(1, -(-(n + 8) // 64) * 64)
            GraphStep(model, cache)  # as generate() and pipeline_compare.py build it first
            runs = {f"built {i + 1}": PipelinedPrefill(model, cache) for i in range(args.copies)}
            first = timed(runs, model, shape, n, args.repeats, args.warmup, args.seed)
            print(f"{shape} N={n}: " + ", ".join(f"{k} {v:.2f}" for k, v in first.items()), flush=True)
            again = {"built 1": runs["built 1"], "built last": PipelinedPrefill(model, cache)}
            second = timed(again, model, shape, n, args.repeats, args.warmup, args.seed + 1)
            print(f"{shape} N={n}, rematch: " + ", ".join(f"{k} {v:.2f}" for k, v in second.items()), flush=True)
            del runs, again, cache
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
