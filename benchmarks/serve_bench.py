"""Time to first token through `kvpred serve` (prints, asserts nothing).

    python benchmarks/serve_bench.py --model smollm2-135m --prompt-tokens 128 --requests 16 --concurrency 8

1. Server overhead: the same prompt, one request at a time, rotating between in-process generation (model.generate
   with a TimedStreamer, tokenization included) on the main thread, the same on a persistent second thread, and a
   streaming HTTP request on loopback (time until an httpx client holds the first SSE chunk). Columns after "|" are
   medians of paired differences (robust to the load drifting): overhead = client - main thread, the total the
   server adds (target <= 5 ms); thread = other thread - main thread, what running the model off the main thread
   costs; server = server ttft_s - other thread, the server's own work (parsing, queue, hand-off); HTTP+SSE = client
   - server ttft_s, the chunk's way out; to worker = the mean of the server's kvpred_queue_wait_seconds (arrival,
   parsing, tokenization, queue, until the worker starts). The in-process runs use a second copy of the model, so
   that the server's worker thread stays the only user of the served one.
2. Under load: --concurrency streaming clients keep requests in flight until --requests have run, per KV mode;
   p50/p95 TTFT as the clients see it and as the server reports it (ttft_s: arrival to first token). With --chat
   the requests are chat turns (/v1/chat/completions), whose default exact tail is the model's chat tail
   (`KVPredictionModel.chat_tail`); a mode written `predicted@W` sends exact_tail W.

    python benchmarks/serve_bench.py --device cuda --dtype bfloat16 --chat --load-only --prompt-tokens 512 \
        --modes exact predicted predicted@6
"""
import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from kvpred.cli import DTYPES
from kvpred.generation import TimedStreamer
from kvpred.model import KVPredictionModel
from kvpred.serve import ServeConfig, create_app, parse_capacities, serve_in_thread

TEXT = ("The history of the city begins with a small settlement on the river, where traders stopped to rest and "
        "exchange goods. Over the centuries it grew into a market town, then a centre of learning, and finally the "
        "busy capital we know today, with its bridges, libraries, parks and narrow streets full of small shops. ")


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def paired_ms(a: list[float], b: list[float]) -> float:
    """Median of the differences a[i] - b[i]: robust to drifts in machine load that hit both runs of a pair."""
    return median_ms([x - y for x, y in zip(a, b)])


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def prompt_of(tokenizer, n_tokens: int, salt: int = 0) -> str:
    """English text of exactly `n_tokens` tokens; `salt` varies its start so that no two prompts are the same."""
    words = TEXT.split()
    text = " ".join(words[salt % len(words):] + words * (n_tokens // 20 + 2))
    ids = tokenizer.encode(text, add_special_tokens=False)[:n_tokens]
    return tokenizer.decode(ids)


def in_process_ttft(model, prompt: str, mode: str, max_tokens: int) -> float:
    start = time.perf_counter()
    ids = torch.tensor([model.tokenizer.encode(prompt)])
    streamer = TimedStreamer(model.tokenizer)
    model.generate(ids, mode=mode, max_new_tokens=max_tokens, streamer=streamer)
    return streamer.ttft(start)


async def http_ttft(client: httpx.AsyncClient, prompt: str, mode: str, max_tokens: int,
                    chat: bool = False) -> tuple[float, float]:
    """(client-side TTFT, the server's ttft_s) of one streaming completion, or chat turn; `mode` may end in @W,
    an exact tail."""
    start = time.perf_counter()
    mode, _, tail = mode.partition("@")
    body = {"model": "kvpred", "max_tokens": max_tokens, "temperature": 0, "stream": True, "kv_mode": mode,
            **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}),
            **({"exact_tail": int(tail)} if tail else {})}
    first = None
    async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():  # read to the end, so that requests do not overlap
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - start, json.loads(line.removeprefix("data: "))["ttft_s"]
    if first is not None:
        return first
    raise RuntimeError("the stream had no chunk")


async def queue_wait(client: httpx.AsyncClient, mode: str) -> tuple[float, float]:
    """(sum, count) of the server's kvpred_queue_wait_seconds for `mode`: arrival to the worker taking it up."""
    text = (await client.get("/metrics")).text
    found = dict(re.findall(rf'^kvpred_queue_wait_seconds_(sum|count){{mode="{mode}"}} (\S+)$', text, re.M))
    return float(found.get("sum", 0)), float(found.get("count", 0))


async def overhead(url: str, model, args) -> None:
    prompt = prompt_of(model.tokenizer, args.prompt_tokens)
    on_thread = ThreadPoolExecutor(max_workers=1)  # a persistent thread, as the server's worker is
    print(f"  {'mode':9s} {'main thread':>11s} {'other thread':>12s} {'server ttft_s':>13s} {'client':>8s} | "
          f"{'overhead':>8s} {'thread':>8s} {'server':>8s} {'HTTP+SSE':>8s} | {'to worker':>9s}")
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for mode in args.modes:
            before = await queue_wait(client, mode)
            runs: dict[str, list[float]] = {"main": [], "thread": [], "server": [], "client": []}
            for i in range(args.requests + 2):  # the first two are warm-up
                main = in_process_ttft(model, prompt, mode, args.max_tokens)
                thread = on_thread.submit(in_process_ttft, model, prompt, mode, args.max_tokens).result()
                client_ttft, server_ttft = await http_ttft(client, prompt, mode, args.max_tokens)
                if i >= 2:
                    for key, value in zip(runs, (main, thread, server_ttft, client_ttft)):
                        runs[key].append(value)
            main, thread, server, seen = runs.values()
            after = await queue_wait(client, mode)
            to_worker = (after[0] - before[0]) / (after[1] - before[1]) * 1e3
            print(f"  {mode:9s} {median_ms(main):11.1f} {median_ms(thread):12.1f} {median_ms(server):13.1f} "
                  f"{median_ms(seen):8.1f} | {paired_ms(seen, main):+8.1f} {paired_ms(thread, main):+8.1f} "
                  f"{paired_ms(server, thread):+8.1f} {paired_ms(seen, server):+8.1f} | {to_worker:9.2f}")
    on_thread.shutdown()


async def load(url: str, served, args) -> None:
    rng = random.Random(0)
    lengths = [rng.randint(args.prompt_tokens // 2, args.prompt_tokens) if args.vary_lengths else args.prompt_tokens
               for _ in range(args.requests)]
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        for mode in args.modes:
            gate, results, made = asyncio.Semaphore(args.concurrency), [], served._steps.made

            async def one(i: int) -> None:
                async with gate:
                    results.append(await http_ttft(client, prompt_of(served.tokenizer, lengths[i], i), mode,
                                                   args.max_tokens, args.chat))

            start = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(args.requests)))
            wall = time.perf_counter() - start
            seen, reported = [r[0] * 1e3 for r in results], [r[1] * 1e3 for r in results]
            print(f"  {mode:9s} client TTFT p50 {quantile(seen, .5):7.1f} ms  p95 {quantile(seen, .95):7.1f} ms | "
                  f"server ttft_s p50 {quantile(reported, .5):7.1f} ms  p95 {quantile(reported, .95):7.1f} ms | "
                  f"{args.requests} requests in {wall:.1f} s | {served._steps.made - made} new pooled caches")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=8, help="new tokens per request")
    p.add_argument("--requests", type=int, default=16, help="timed requests per mode, in each part")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight under load")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--modes", nargs="+", default=["exact", "predicted"])
    p.add_argument("--vary-lengths", action="store_true",
                   help="under load, prompts of random lengths between half --prompt-tokens and all of it")
    p.add_argument("--warm-up", type=parse_capacities, default="256,512,1024,2048",
                   help="the server's --warm-up ('none' to skip)")
    p.add_argument("--no-continuous-batching", action="store_true", help="the server's --no-continuous-batching")
    p.add_argument("--load-only", action="store_true", help="skip part 1 (server overhead)")
    p.add_argument("--chat", action="store_true", help="under load, send chat turns instead of completions")
    p.add_argument("--compile-step", action="store_true", help="the server's --compile-step (GPU only)")
    p.add_argument("--no-pipeline", action="store_true",
                   help="predicted mode's first step not pipelined behind the auxiliary (server and in-process)")
    args = p.parse_args()

    load_model = lambda: KVPredictionModel.from_pretrained(args.model, dtype=DTYPES[args.dtype],  # noqa: E731
                                                           device=args.device)
    served, local = load_model(), load_model()
    if args.compile_step:
        served.compile_step()
    served.pipelined_first_step = local.pipelined_first_step = not args.no_pipeline
    print(f"$ python {' '.join(sys.argv)}")
    print(f"model {args.model} ({served.base.config.num_hidden_layers} base layers, "
          f"{served.aux.config.num_hidden_layers} aux layers), device {args.device}, dtype {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens, greedy, batch 1 in-process; "
          f"server max_batch {args.max_batch}, continuous batching {not args.no_continuous_batching}, "
          f"warm-up {','.join(map(str, args.warm_up)) or 'none'}, compiled step {args.compile_step}, "
          f"pipelined first step {not args.no_pipeline}"
          + (f"; under load, prompts of {args.prompt_tokens // 2}-{args.prompt_tokens} tokens" if args.vary_lengths
             else "")
          + (f"; {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    config = ServeConfig(max_queue=max(64, args.requests), max_batch=args.max_batch,
                         continuous_batching=not args.no_continuous_batching,
                         warm_up=args.warm_up)
    started = time.perf_counter()
    with serve_in_thread(create_app(served, config)) as url:
        print(f"the server took {time.perf_counter() - started:.1f} s to start (its warm-up included)")
        if not args.load_only:
            print(f"\n1. server overhead on TTFT: {args.requests} sequential requests per mode, each paired with "
                  "in-process runs (medians, ms)")
            asyncio.run(overhead(url, local, args))
        kind = " (chat turns)" if args.chat else ""
        print(f"\n2. TTFT under load: {args.concurrency} concurrent streaming clients{kind}, "
              f"{args.requests} requests per mode")
        asyncio.run(load(url, served, args))
    print(f"\nload average {os.getloadavg()[0]:.1f} at end (other processes share these CPUs when it exceeds "
          f"{os.cpu_count()})")


if __name__ == "__main__":
    main()
