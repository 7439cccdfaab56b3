"""Predicted mode's TTFT with and without `kvpred.pipeline`, interleaved in one process on one GPU.

For each random-weight timing shape and prompt length: exact mode's prefill, the plain predicted path
(`predict_into`, then the base's CUDA-graph step) and the pipelined one (the step tap by tap on a second stream),
taking turns over fresh random prompts after warm-up. Prints medians [p10-p90] of the time from prompt ids on the GPU
to the first token's id on the host, and how often the two predicted paths give the same token.

    python benchmarks/pipeline_compare.py --shapes llama-3.2-1b,llama-3.1-8b --prompt-lens 1024,2048,8192 \
        [--source hidden --predictor-rank 128 --aux-keep 0.134] --out table.md
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from kvpred.bench import prompts
from kvpred.decoding import GraphStep
from kvpred.pipeline import PipelinedPrefill
from kvpred.shapes import random_kvp_model


def quantiles(times: list[float]) -> str:
    cuts = statistics.quantiles(times, n=10)
    return f"{statistics.median(times):.2f} [{cuts[0]:.2f}-{cuts[-1]:.2f}]"


def compare(shape: str, lengths: list[int], args) -> list[str]:
    model = random_kvp_model(shape, aux_keep=args.aux_keep, source=args.source, rank=args.predictor_rank,
                             dtype=torch.bfloat16, device="cuda", seed=0)
    lines = []
    for n in lengths:
        lines.append(time_length(model, shape, n, args))
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()  # the length's cache and graphs went with time_length's frame
    return lines


def time_length(model, shape: str, n: int, args) -> str:
    cache = model.new_cache(1, -(-(n + 8) // 64) * 64)
    step, pipelined = GraphStep(model, cache), PipelinedPrefill(model, cache)
    urgent = None if args.priority is None else PipelinedPrefill(model, cache, priority=args.priority)
    last = torch.full((1, 1), n - 1, device="cuda")

    def plain(ids: torch.Tensor) -> torch.Tensor:
        model.predict_into(cache, ids)
        step.start(ids[:, -1:], last, n - 1)
        return step()

    runs = {"exact": lambda ids: model.prefill_into(cache, ids, mode="exact")[:, -1].argmax(-1),
            "plain": plain, "pipelined": pipelined}
    if urgent is not None:
        runs["urgent"] = urgent
    times: dict[str, list[float]] = {name: [] for name in runs}
    same = 0
    for r in range(args.warmup + args.repeats):
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
        ids = prompts(model.base.config.vocab_size, 1, n, torch.device("cuda"), args.seed, shape, n, r)
        tokens = {}
        for name in order:
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens[name] = runs[name](ids).cpu()
            if r >= args.warmup:
                times[name].append(1e3 * (time.perf_counter() - start))
        same += r >= args.warmup and torch.equal(tokens["plain"], tokens["pipelined"])
    exact, plain_ms, piped = (statistics.median(times[k]) for k in ("exact", "plain", "pipelined"))
    line = (f"| {shape} | {model.predictor.config.source} | {n} | {quantiles(times['exact'])} | "
            f"{quantiles(times['plain'])} | {quantiles(times['pipelined'])} | {exact / plain_ms:.2f} | "
            f"{exact / piped:.2f} | {piped / plain_ms:.3f} | {len(pipelined.groups)} | {same}/{args.repeats} |")
    if urgent is not None:
        fast = statistics.median(times["urgent"])
        line += f" {quantiles(times['urgent'])} | {exact / fast:.2f} | {fast / piped:.3f} |"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--prompt-lens", default="1024,2048,8192")
    parser.add_argument("--aux-keep", type=float, default=0.25)
    parser.add_argument("--source", default="kv", choices=("kv", "hidden"))
    parser.add_argument("--predictor-rank", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--priority", type=int, default=None,
                        help="also time the pipeline with its step's stream at this CUDA priority (e.g. -1, "
                             "higher than the default pipeline's and the auxiliary's 0)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    head = [f"{torch.cuda.get_device_name()}, bf16, batch 1, random-weight timing models, KVP-LP keeping "
            f"{args.aux_keep} of the layers, {args.source} predictor input"
            + (f" (rank {args.predictor_rank})" if args.predictor_rank else "")
            + f"; torch {torch.__version__}; ms, median [p10-p90] of {args.repeats} prompts per path, in turns", "",
            "| shape | input | N | exact | predicted, plain | predicted, pipelined | speedup, plain | pipelined "
            "| pipelined / plain | groups | same token |"
            + (f" pipelined, step at priority {args.priority} | its speedup | its time / pipelined |"
               if args.priority is not None else ""),
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|" + ("--:|--:|--:|" if args.priority is not None else "")]
    print("\n".join(head), flush=True)
    lines = head + [line for shape in args.shapes.split(",")
                    for line in compare(shape, [int(n) for n in args.prompt_lens.split(",")], args)]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
