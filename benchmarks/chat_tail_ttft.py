"""Time to first token of chat prompts (on a GPU, or the CPU) with the template's reply opening as exact tail.

Chat prompts of the shipped default (TriviaQA questions, padded with WikiText text in front to reach each length),
first token through `kvpred.decoding.first_logits` (what `generate` and the server run), medians of fresh prompts
after warm-up: exact mode; predicted with the paper's one-token tail; predicted with the chat tail as now (all but
the last tail token as a captured chunk, the last one through the graph step: `base_tail`); and as before
`base_tail` existed (the whole tail as one eager forward: `prefill_into`).

    python benchmarks/chat_tail_ttft.py --device cuda --dtype bfloat16 --prompt-lens 64,512,2048
"""
import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from kvpred.decoding import first_logits
from kvpred.generation import chat_exact_tail
from kvpred.model import KVPredictionModel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def chat_prompts(model, length: int, count: int, data: Path) -> list[torch.Tensor]:
    tok = model.tokenizer
    words = (data / "wikitext2-test.txt").read_text().split()
    qs = [json.loads(line)["context"].removeprefix("Question: ").removesuffix("\nAnswer:")
          for line in (data / "triviaqa_sm_sub.jsonl").read_text().splitlines()[:count]]
    out = []
    for i, q in enumerate(qs):
        filler, ids = 0, None
        while ids is None or ids.shape[1] < length:
            text = " ".join(words[i * 997:i * 997 + filler]) + ("\n\n" if filler else "") + q
            rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
            ids = tok(rendered, add_special_tokens=False, return_tensors="pt").input_ids
            filler += max(8, (length - ids.shape[1]) // 2)
        out.append(ids[:, -length:].to(model.device) if ids.shape[1] > length else ids.to(model.device))
    return out


def first_token(model, ids: torch.Tensor, how: str, tail: int) -> int:
    pooled = model._steps.get(model, 1, ids.shape[1] + 1)
    mask = torch.ones(1, ids.shape[1] + 1, dtype=torch.long, device=ids.device)
    if how == "before":  # the whole tail as one eager forward, as first_logits ran a tail of more than one token
        logits = model.prefill_into(pooled.cache, ids, None, mode="predicted", exact_tail=tail)[:, -1]
    else:
        logits = first_logits(model, pooled, ids, mask, mode="exact" if how == "exact" else "predicted",
                              exact_tail=tail)
    token = int(logits.argmax(-1)[0])
    pooled.made_step(model)  # as generate does after its first token
    return token


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-lens", default="64,512,2048")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--data-dir", type=Path, default=DATA)
    args = p.parse_args()
    model = KVPredictionModel.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    w = chat_exact_tail(model.tokenizer)
    runs = {"exact": ("exact", 1), "predicted, W=1": ("now", 1), f"predicted, W={w}, now": ("now", w),
            f"predicted, W={w}, before": ("before", w)}
    print(f"# `{shlex.join(['python'] + sys.argv)}`\n")
    print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, {args.dtype}, batch 1, "
          f"torch {torch.__version__}; median [min-max] ms over {args.prompts} chat prompts after 2 warm-ups each\n")
    print("| prompt tokens | " + " | ".join(runs) + " |")
    print("|--:|" + "--:|" * len(runs))
    with torch.no_grad():
        for length in (int(x) for x in args.prompt_lens.split(",")):
            prompts = chat_prompts(model, length, args.prompts + 2, args.data_dir)
            times = {name: [] for name in runs}
            agree = {name: 0 for name in runs}
            for i, ids in enumerate(prompts):
                exact_token = None
                for name, (how, tail) in runs.items():
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    token = first_token(model, ids, how, tail)
                    elapsed = (time.perf_counter() - start) * 1e3
                    exact_token = token if how == "exact" else exact_token
                    if i >= 2:
                        times[name].append(elapsed)
                        agree[name] += token == exact_token
            cells = [f"{statistics.median(t):.1f} [{min(t):.1f}-{max(t):.1f}]" for t in times.values()]
            print(f"| {prompts[-1].shape[1]} | " + " | ".join(cells) + " |")
            print("|  (first token = exact's) | " + " | ".join(f"{agree[n]}/{args.prompts}" for n in runs) + " |")


if __name__ == "__main__":
    main()
