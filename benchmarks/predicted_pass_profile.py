"""Where does predicted mode's captured prompt pass spend what the auxiliary's layers do not? Each mode's whole
prompt pass as a CUDA graph (kvpred.prefill_graphs, as `generate` and `bench ttft --prefill-graphs auto` replay it)
on a random-weight timing model at batch 1: median replay ms per mode, then the predicted graph's kernels by total
time. Why: on an H200 at 4096 tokens Llama-3.2-1B's predicted pass took 6.1 ms where the FLOP count gives it 4.3
(benchmarks/results/h200/capture_flash).

    python benchmarks/predicted_pass_profile.py --shape llama-3.2-1b --tokens 4096 --compile-step
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from kvpred.prefill_graphs import PrefillGraph, bucket
from kvpred.shapes import random_kvp_model


def replay_ms(graph: PrefillGraph, ids: torch.Tensor, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph(ids)
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times[3:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--compile-step", action="store_true", help="KVPredictionModel.compile_step first")
    args = p.parse_args()
    model = random_kvp_model(args.shape, aux_keep=0.25)
    if args.compile_step:
        model.compile_step()
    ids = torch.randint(0, model.base.config.vocab_size, (1, args.tokens), device="cuda")
    graphs = {mode: PrefillGraph(model, model.new_cache(1, bucket(args.tokens) + 64, mode), mode, 1,
                                 bucket(args.tokens)) for mode in ("exact", "aux", "predicted")}
    print(f"{torch.cuda.get_device_name()}, bf16, torch {torch.__version__}, {args.shape} (random weights), batch 1, "
          f"{args.tokens} tokens, compiled step {args.compile_step}; layers base {model.base.config.num_hidden_layers}"
          f", auxiliary {model.aux.config.num_hidden_layers}")
    for mode, graph in graphs.items():
        print(f"{mode}: {replay_ms(graph, ids):.2f} ms a replay")
    for mode in ("aux", "predicted"):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                graphs[mode](ids)
            torch.cuda.synchronize()
        print(f"{mode} pass, 3 replays, kernels by total time:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=100))


if __name__ == "__main__":
    main()
