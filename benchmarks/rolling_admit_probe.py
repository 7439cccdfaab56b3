"""Where a lone request's first token goes in the server's rolling batch, against `generate()` (GPU probe).

For fresh random prompts of --tokens tokens, one at a time, in turns: `model.generate(ids)`'s time to first token
(the pooled cache written in place, the pipelined first step), and the rolling batch as `kvpred serve` runs a lone
request (a RollingBatch of --max-batch rows, the prompt admitted, one step), split into its parts: pipelined (the
default on a GPU: the admit only books the row, the step runs the prefill behind it), plain (prefilled apart,
copied into the row, then the step) and through the captured prompt pass (`RollingBatch.admit_prefilled`, the
default for a lone join on a GPU once the pass is captured: the first token comes from the pass). The plain admit's
prefill is also timed alone with and without its all-ones attention mask. Medians in ms, synchronised.

    python benchmarks/rolling_admit_probe.py --device cuda --dtype bfloat16 --tokens 512 --mode predicted
    python benchmarks/rolling_admit_probe.py --shape llama-3.2-1b --tokens 2048 --mode exact   # random weights
"""
import argparse
import statistics
import time

import torch
import transformers
from generate_ttft import Clock, timing_model

from kvpred import KVPredictionModel
from kvpred.cli import DTYPES
from kvpred.decoding import RollingBatch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", default=None, help="a random-weight timing model of this public shape instead")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--mode", default="predicted", choices=("exact", "predicted"))
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if args.shape:
        model = timing_model(args.shape, dtype=DTYPES[args.dtype], device=args.device)
    else:
        model = KVPredictionModel.from_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype])
    n, rows = args.tokens, args.max_batch
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {}

    def clock(name: str, start: float) -> float:
        sync()
        now = time.perf_counter()
        times.setdefault(name, []).append(1e3 * (now - start))
        return now

    for r in range(args.repeats + 3):
        ids = torch.randint(1000, 40000, (1, n), device=model.device)
        mask = torch.ones_like(ids)
        sync()
        start = time.perf_counter()
        streamer = Clock()  # with one new token the step would never be captured
        model.generate(ids, mode=args.mode, max_new_tokens=args.max_new, streamer=streamer)
        times.setdefault("generate(), first token", []).append(1e3 * (streamer.times[1] - start))
        # the server's lone request (Scheduler._roll / _join)
        need = n + args.max_new
        pooled = model._steps.get(model, rows, max(min(model.context_length, 2 * need), n + args.max_new))
        slot = max(n - 1, min(pooled.cache.capacity // 2, pooled.cache.capacity - args.max_new))
        for name, pipelined in (("rolling", None), ("rolling plain", False)):
            sync()
            start = time.perf_counter()
            batch = RollingBatch(model, pooled, slot, pipelined)
            t = clock(f"{name}: new batch", start)
            joined = batch.admit(ids, mask, args.mode, 1)
            t = clock(f"{name}: admit", t)
            logits = batch()
            int(logits[joined[0]].float().argmax())
            clock(f"{name}: first step + token", t)
            clock(f"{name}: total", start)
        sync()
        start = time.perf_counter()
        batch = RollingBatch(model, pooled, slot, graph_joins=True)
        t = clock("rolling graph join: new batch", start)
        joined = batch.admit_prefilled(ids, args.mode, 1, lambda logits: logits.argmax(-1))
        if joined is None:  # the first repeat (a warm-up): no pass captured yet
            batch.capture_missed()
        else:
            int(joined[2][0])
            clock("rolling graph join: first token", t)
            clock("rolling graph join: total", start)
        if args.mode == "predicted":
            for name, m in (("predicted_cache, all-ones mask", mask), ("predicted_cache, no mask", None)):
                sync()
                start = time.perf_counter()
                model.predicted_cache(ids, m, 1)
                clock(name, start)
        if r < 3:  # warm-up: captures and first calls
            for v in times.values():
                v.clear()
    label = f"{args.shape} (random-weight timing model)" if args.shape else args.model
    print(f"{label}; {torch.cuda.get_device_name() if model.device.type == 'cuda' else 'cpu'}, {args.dtype}, "
          f"{args.mode}, transformers {transformers.__version__}, "
          f"{n}-token prompts, rolling batch of {rows} rows; median ms of {args.repeats}")
    for name, v in times.items():
        print(f"  {name:34s} {statistics.median(v):7.2f}")


if __name__ == "__main__":
    main()
