"""Time to first token of `KVPredictionModel.generate` (the path `kvpred generate` and `kvpred serve` take) with the
prompt's predicted values written before the first token, against deferred to after it (kvpred.deferred), with the
exact base beside them. Fresh random prompts, medians over repeats after one warm-up, device synchronised by the
streamer's host read of each token.

    python benchmarks/defer_generate.py --model smollm2-135m --device cpu --prompt-lens 512,2048 --out FILE.md
    python benchmarks/defer_generate.py --shape llama-3.2-1b --device cuda --prompt-lens 2048,8192 --batch 1,8
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import PreTrainedTokenizerBase

from kvpred.bench import _device_name, variant_name
from kvpred.generation import TimedStreamer
from kvpred.model import KVPredictionModel
from kvpred.shapes import random_kvp_model

RUNS = (("exact", "exact", None), ("predicted, values first", "predicted", False),
        ("predicted, values deferred", "predicted", True))


def ttft_ms(model: KVPredictionModel, ids: torch.Tensor, mode: str, defer: bool | None) -> float:
    streamer = TimedStreamer(model.tokenizer) if isinstance(model.tokenizer, PreTrainedTokenizerBase) else None
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if streamer is None:  # random-weight models have no tokenizer: time a one-token generate instead
        model.generate(ids, mode=mode, max_new_tokens=1, defer_values=defer)[:, -1].cpu()
        return (time.perf_counter() - start) * 1e3
    model.generate(ids, mode=mode, max_new_tokens=2, streamer=streamer, defer_values=defer)
    return streamer.ttft(start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint or alias (real weights)")
    p.add_argument("--shape", default=None, help="a random-weight timing model of this public shape instead")
    p.add_argument("--source", default="kv")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-lens", default="512,2048")
    p.add_argument("--batch", default="1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="markdown file for the table")
    args = p.parse_args()
    if args.shape:
        model = random_kvp_model(args.shape, aux_keep=0.25, source=args.source, rank=args.rank, device=args.device)
        # no tokenizer: what generate() reads of one (no stop strings here), and no streamer
        model.tokenizer, label = SimpleNamespace(pad_token_id=0, eos_token_id=None), f"{args.shape} (random-weight)"
    else:
        model = KVPredictionModel.from_pretrained(args.model or "smollm2-135m", device=args.device)
        label = args.model or "smollm2-135m"
    vocab = model.base.config.vocab_size
    lines = [f"# generate() TTFT: predicted values written first vs deferred ({label})", "",
             f"`{shlex.join(['python', *sys.argv])}`", "",
             f"{_device_name(model.device)}, {str(model.base.dtype).removeprefix('torch.')}, torch {torch.__version__};"
             f" {variant_name(model)}; median ms over {args.repeats} fresh random prompts after one warm-up.", "",
             "| batch | prompt | exact ms | values first ms | values deferred ms | deferred / first | "
             "speedup first | speedup deferred |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    gen = torch.Generator().manual_seed(0)
    for b in map(int, args.batch.split(",")):
        for n in map(int, args.prompt_lens.split(",")):
            times = {name: [] for name, _, _ in RUNS}
            for r in range(args.repeats + 1):
                for name, mode, defer in RUNS:
                    ids = torch.randint(100, vocab, (b, n), generator=gen).to(model.device)
                    t = ttft_ms(model, ids, mode, defer)
                    if r:
                        times[name].append(t)
            e, f, d = (statistics.median(times[name]) for name, _, _ in RUNS)
            lines.append(f"| {b} | {n} | {e:.1f} | {f:.1f} | {d:.1f} | {d / f:.3f} | {e / f:.2f}x | {e / d:.2f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
