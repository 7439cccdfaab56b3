"""Truncation baselines on chat prompts at the FLOP ratio of predicted mode (params rule): the exact base on the last
N/r prompt tokens (`kvpred eval`'s `truncate`), and on the template's framing (the rendered chat up to where the
user's message begins: system prompt and user header) plus the last N/r - K tokens, where K is the framing's length.
First-token agreement with the exact base, against predicted mode's, on the same chats.

    python benchmarks/chat_truncation.py --chats /tmp/hc/chats > benchmarks/results/chat_round/chat_truncation_cpu.md
"""
import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

from kvpred.data import chat_prefix
from kvpred.evaluate import confidence_interval, flop_ratio
from kvpred.generation import chat_prompts
from kvpred.model import KVPredictionModel


def first_token(model, ids: list[int], mode: str = "exact") -> int:
    logits, _ = model.prefill(torch.tensor([ids]), mode=mode, exact_tail=model.chat_tail if mode == "predicted" else 1)
    return int(logits[0, -1].argmax())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--chats", required=True, help=".jsonl chats (file or folder)")
    p.add_argument("--limit", type=int, default=192)
    args = p.parse_args()
    model = KVPredictionModel.from_pretrained(args.model)
    tok = model.tokenizer
    ratio = flop_ratio(model)["param_ratio"]
    files = sorted(Path(args.chats).glob("*.jsonl")) if Path(args.chats).is_dir() else [Path(args.chats)]
    framing = tok(chat_prefix(tok), add_special_tokens=False).input_ids
    hits = {"predicted": [], "truncate": [], "framing + truncate": []}
    lengths = []
    with torch.no_grad():
        for text in chat_prompts(files, tok, args.limit):
            ids = tok(text, add_special_tokens=False).input_ids
            keep = max(1, math.ceil(len(ids) / ratio))
            exact = first_token(model, ids)
            lengths.append(len(ids))
            hits["predicted"].append(float(first_token(model, ids, "predicted") == exact))
            hits["truncate"].append(float(first_token(model, ids[-keep:]) == exact))
            framed = ids[:len(framing)] + ids[len(framing):][-max(1, keep - len(framing)):]
            hits["framing + truncate"].append(float(first_token(model, framed) == exact))
    print(f"# `{shlex.join(['python'] + sys.argv)}`\n")
    print(f"{args.model}, CPU, {model.base.dtype}; {len(lengths)} chats of {min(lengths)}-{max(lengths)} tokens "
          f"(median {sorted(lengths)[len(lengths) // 2]}); r = {ratio:.2f} (params rule); the framing is "
          f"{len(framing)} tokens: {tok.decode(framing)!r}\n")
    print("| prompt as the base sees it | first token = exact's [95% CI] |\n|---|--:|")
    for name, values in hits.items():
        mean, lo, hi = confidence_interval(values)
        print(f"| {name} | {mean:.3f} [{lo:.3f}, {hi:.3f}] |")


if __name__ == "__main__":
    main()
