"""Could the base's one-token step hide behind the auxiliary's prefill on a GPU? An upper bound, for timing only.

At batch 1 the base's step reads every weight once for one token (memory-bound), while the auxiliary's prefill
multiplies whole prompts (compute-bound). In a pipelined predicted mode, base layer l's step could start as soon as
the auxiliary tap it reads is predicted. This probe times, on random-weight shapes:
  A: `predict_into` (auxiliary prefix, predictor, cache write), S: the base's CUDA-graph step,
  A then S on one stream, and A and S launched together on two streams (the step ignores that its cache is being
  written: the numbers are times, not outputs).
If A and S together take about max(A, S), most of the step could hide; if about A + S, none of it can.

    python benchmarks/overlap_probe.py --shapes llama-3.2-1b,llama-3.1-8b --prompt-lens 2048,8192 --out probe.md
"""
import argparse
import statistics
from pathlib import Path

import torch

from kvpred.decoding import make_step
from kvpred.model import BufferCache
from kvpred.shapes import random_kvp_model


def timed(fn, repeats: int) -> float:
    """Median ms of fn() over `repeats`, after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def probe(shape: str, length: int, repeats: int) -> dict:
    model = random_kvp_model(shape, aux_keep=0.25, dtype=torch.bfloat16, device="cuda", seed=0)
    cache = BufferCache(model.base.config, 1, length + 64, dtype=model.base.dtype, device=model.device)
    ids = torch.randint(0, model.base.config.vocab_size, (1, length), device=model.device)
    step, note = make_step(model, cache, True)
    model.predict_into(cache, ids)
    step.start(ids[:, -1:], torch.full((1, 1), length - 1, device=model.device), length - 1)
    side = torch.cuda.Stream()

    def aux() -> None:
        model.predict_into(cache, ids)

    def both() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        aux()
        torch.cuda.current_stream().wait_stream(side)

    a, s = timed(aux, repeats), timed(step, repeats)
    seq, together = timed(lambda: (aux(), step()), repeats), timed(both, repeats)
    return {"shape": shape, "N": length, "A": a, "S": s, "seq": seq, "together": together, "step": note,
            "hidden": (seq - together) / s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--prompt-lens", default="2048,8192")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [f"# {__doc__.splitlines()[0]}", "", f"{torch.cuda.get_device_name()}, bf16, batch 1, KVP-LP 1/4, "
             f"torch {torch.__version__}; medians of {args.repeats} (CUDA events)", "",
             "| shape | N | A: predict_into ms | S: step ms | A then S | A and S on two streams | share of S hidden "
             "| step |", "|---|--:|--:|--:|--:|--:|--:|---|"]
    print("\n".join(lines), flush=True)
    for shape in args.shapes.split(","):
        for n in map(int, args.prompt_lens.split(",")):
            r = probe(shape, n, args.repeats)
            torch.cuda.empty_cache()  # the model went with probe's frame
            lines.append(f"| {r['shape']} | {r['N']} | {r['A']:.2f} | {r['S']:.2f} | {r['seq']:.2f} | "
                         f"{r['together']:.2f} | {r['hidden']:.2f} | {r['step']} |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
