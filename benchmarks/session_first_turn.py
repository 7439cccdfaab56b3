"""The first turn of new chat sessions through `kvpred serve` (in-process): a session that starts from a spare cache
(the warm-up's, or a dropped session's, with its CUDA-graph step captured) against one that allocates its own.

Each new session sends one turn. On a GPU the warm-up leaves one spare cache, which the first session takes; with
max_sessions 64 the later ones allocate their own, with max_sessions 1 each takes the cache of the one it drops.
Prints the server's ttft_s per session.

    python benchmarks/session_first_turn.py --device cuda --dtype bfloat16 --sessions 6
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from openai import OpenAI

from kvpred.model import KVPredictionModel
from kvpred.serve import ServeConfig, create_app, serve_in_thread

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from serve_bench import DTYPES, prompt_of  # noqa: E402


def first_turns(model, args, max_sessions: int) -> list[float]:
    """ttft_s of the first turn of `args.sessions` new sessions, in ms."""
    app = create_app(model, ServeConfig(max_sessions=max_sessions, warm_up=(args.capacity,)))
    times = []
    with serve_in_thread(app) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for i in range(args.sessions):
            messages = [{"role": "user", "content": prompt_of(model.tokenizer, args.prompt_tokens, salt=i)}]
            reply = client.chat.completions.create(model="kvpred", messages=messages, max_tokens=args.max_tokens,
                                                   temperature=0, extra_body={"session": f"s{i}"})
            times.append(reply.model_extra["ttft_s"] * 1e3)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--capacity", type=int, default=2048, help="the server's --warm-up")
    args = p.parse_args()
    model = KVPredictionModel.from_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype])
    print(f"$ python {' '.join(sys.argv)}")
    print(f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}, {args.dtype}; "
          f"{args.model}; one user turn of {args.prompt_tokens} tokens per new session, {args.max_tokens} new "
          f"tokens, refine off; warm-up {args.capacity}")
    kept = first_turns(model, args, max_sessions=64)  # only the first session finds the warm-up's spare
    recycled = first_turns(model, args, max_sessions=1)  # each later session takes the one it drops
    print("| session | ttft ms, sessions kept (spare for the first only) | one session kept (spares recycled) |")
    print("|--:|--:|--:|")
    for i, (a, b) in enumerate(zip(kept, recycled)):
        print(f"| {i + 1} | {a:.1f} | {b:.1f} |")
    print(f"| median of 2.. | {statistics.median(kept[1:]):.1f} | {statistics.median(recycled[1:]):.1f} |")


if __name__ == "__main__":
    main()
