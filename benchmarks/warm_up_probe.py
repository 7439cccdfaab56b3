"""The first requests after start-up, with and without `KVPredictionModel.warm_up` (what `kvpred serve` runs before
it takes requests). Each condition runs in a fresh process and sends the same predicted-mode requests, of lengths
that fall into new capacity buckets and then repeat. For each request the script times TTFT and the gap to the
second token, as a client sees them. That gap is where a new shape's CUDA graph is captured.

    python benchmarks/warm_up_probe.py --device cpu --out benchmarks/results/warm_up/warm_up_cpu.md
    python benchmarks/warm_up_probe.py --shape llama-3.2-1b --device cuda --out FILE.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from generate_ttft import Clock  # benchmarks/ is on the path
from kvpred.bench import _device_name, variant_name
from kvpred.decoding import capacity_bucket
from kvpred.model import KVPredictionModel
from kvpred.shapes import random_kvp_model

CONDITIONS = ("cold", "warmed up")


def load(args: argparse.Namespace) -> tuple[KVPredictionModel, str]:
    if args.shape:
        model = random_kvp_model(args.shape, aux_keep=0.25, device=args.device)
        model.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)  # what generate() reads of one
        return model, f"{args.shape} (random-weight timing model)"
    return KVPredictionModel.from_pretrained(args.model, device=args.device), args.model


def child(args: argparse.Namespace) -> None:
    """One condition in this fresh process: prints one JSON object."""
    started = time.perf_counter()
    model, label = load(args)
    out = {"label": label, "variant": variant_name(model), "device": _device_name(model.device),
           "dtype": str(model.base.dtype).removeprefix("torch."), "load_s": time.perf_counter() - started}
    if args.child == "warmed up":
        started = time.perf_counter()
        out["warmed"] = model.warm_up()
        out["warm_up_s"] = time.perf_counter() - started
    gen, out["requests"] = torch.Generator().manual_seed(0), []
    for n in map(int, args.requests.split(",")):
        ids = torch.randint(100, model.base.config.vocab_size, (1, n), generator=gen).to(model.device)
        mask = torch.ones_like(ids)
        if args.pad_multiple:  # left-pad to a multiple: fewer distinct shapes
            pad = -n % args.pad_multiple
            ids = torch.cat([ids.new_zeros(1, pad), ids], 1)
            mask = torch.cat([mask.new_zeros(1, pad), mask], 1)
        clock = Clock()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, mask, max_new_tokens=args.new_tokens, streamer=clock)
        first, second = clock.times[1:3]
        out["requests"].append({"tokens": n, "ttft_ms": (first - start) * 1e3, "gap_ms": (second - first) * 1e3,
                                "total_ms": (clock.times[-1] - start) * 1e3,
                                "capacity": capacity_bucket(n + args.new_tokens, model.context_length)})
    print(json.dumps(out))


def table(args: argparse.Namespace, runs: dict[str, dict]) -> str:
    cold, warm = runs["cold"], runs["warmed up"]
    lines = [f"# First requests after start-up, cold and warmed up ({cold['label']})", "",
             f"`{shlex.join(['python', *sys.argv])}`", "",
             f"{cold['device']}, {cold['dtype']}, batch 1, torch {torch.__version__}; {cold['variant']}; predicted "
             f"mode, {args.new_tokens} new tokens a request; each condition in a fresh process.",
             f"Loading took {cold['load_s']:.1f} s / {warm['load_s']:.1f} s; the warm-up (capacities "
             f"{', '.join(map(str, warm['warmed']))}) took {warm['warm_up_s']:.2f} s before the first request.", "",
             "| request | prompt tokens | capacity | TTFT ms cold | TTFT ms warmed up | 2nd-token gap ms cold | "
             "2nd-token gap ms warmed up | whole request ms cold | warmed up |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for i, (c, w) in enumerate(zip(cold["requests"], warm["requests"]), 1):
        lines.append(f"| {i} | {c['tokens']} | {c['capacity']} | "
                     f"{c['ttft_ms']:.1f} | {w['ttft_ms']:.1f} | {c['gap_ms']:.1f} | {w['gap_ms']:.1f} | "
                     f"{c['total_ms']:.1f} | {w['total_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="checkpoint or alias (real weights)")
    p.add_argument("--shape", default=None, help="a random-weight timing model of this public shape instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", default="200,200,400,400,900,900,1900,1900", help="prompt lengths, in order")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--pad-multiple", type=int, default=0, help="left-pad each prompt to a multiple of this")
    p.add_argument("--out", default=None, help="markdown file for the table")
    p.add_argument("--child", choices=CONDITIONS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    runs = {}
    for condition in CONDITIONS:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", condition], check=True,
                              stdout=subprocess.PIPE, text=True)
        runs[condition] = json.loads(done.stdout.strip().splitlines()[-1])
    text = table(args, runs)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
