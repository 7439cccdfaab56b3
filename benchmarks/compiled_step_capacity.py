"""Probe: the one-token CUDA-graph step (kvpred.decoding.GraphStep) eager and after `compile_step`, at several cache
capacities, and the compiled step's heaviest kernels at the largest one. Random-weight timing models, batch 1.
Why: on an H200 Gemma 3 1B's compiled step took 2.0 / 2.8 / 3.8 ms at capacities of 512 / 1024 / 2048 columns where
the eager one took 5.7 at each (benchmarks/results/h200/compiled_parts).

    python benchmarks/compiled_step_capacity.py --shapes gemma-3-1b,llama-3.2-1b --capacities 512,2048,8192
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from kvpred.decoding import GraphStep
from kvpred.shapes import random_kvp_model
from step_compile_probe import replay_ms  # benchmarks/, the script's folder


def step_ms(step: GraphStep, filled: int) -> float:
    ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    return replay_ms(step, ids, torch.full((1, 1), filled, device="cuda"), filled, repeats=20)[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="gemma-3-1b,llama-3.2-1b")
    p.add_argument("--capacities", default="512,2048,8192")
    args = p.parse_args()
    capacities = [int(c) for c in args.capacities.split(",")]
    print(f"{torch.cuda.get_device_name()}, bf16, torch {torch.__version__}, batch 1, cache filled to capacity - 8")
    for shape in args.shapes.split(","):
        model = random_kvp_model(shape, aux_keep=0.25)
        caches = {c: model.new_cache(1, c) for c in capacities}
        for cache in caches.values():
            cache.key_arena.normal_()
            cache.value_arena.normal_()
        eager = {c: step_ms(GraphStep(model, cache), c - 8) for c, cache in caches.items()}
        model.compile_step()
        steps = {c: GraphStep(model, cache) for c, cache in caches.items()}
        compiled = {c: step_ms(step, c - 8) for c, step in steps.items()}
        for c in capacities:
            print(f"{shape} capacity {c}: eager {eager[c]:.2f} ms, compiled {compiled[c]:.2f} ms")
        top = capacities[-1]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                steps[top]()
            torch.cuda.synchronize()
        print(f"{shape}, compiled step at capacity {top}, 3 replays:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=90))
        del model, caches, steps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
