"""Baselines on chat prompts, first-token agreement with the exact base against predicted mode's, on the same chats:

* truncate: the exact base on the last N/r prompt tokens (r: predicted mode's FLOP ratio, params rule), as
  `kvpred eval`'s `truncate`;
* framing + truncate: the template's framing (the rendered chat up to where the first user message begins: system
  prompt and user header) plus the last N/r - K tokens, where K is the framing's length;
* session (chats of several exchanges): the regime of `kvpred chat` / `ChatSession` / the server's `session`, where
  earlier exchanges keep their exact cache and only the last user message and the reply opening are predicted.

    python benchmarks/chat_truncation.py --chats /tmp/hc/chats > benchmarks/results/chat_round/chat_truncation_cpu.md
"""
import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

from kvpred.data import chat_prefix
from kvpred.decoding import Pooled
from kvpred.evaluate import confidence_interval, flop_ratio
from kvpred.generation import chat_prompts
from kvpred.model import KVPredictionModel, cache_kwargs
from kvpred.refine import _prefill


def first_token(model, ids: list[int], mode: str = "exact") -> int:
    logits, _ = model.prefill(torch.tensor([ids]), mode=mode, exact_tail=model.chat_tail if mode == "predicted" else 1)
    return int(logits[0, -1].argmax())


def session_first_token(model, ids: list[int], history: int) -> int:
    """The first `history` tokens' exact cache, the rest predicted on top of it (as a ChatSession's later turn)."""
    row = torch.tensor([ids])
    cache = model.new_cache(1, len(ids))
    model.base(input_ids=row[:, :history], **cache_kwargs(model.base, cache), use_cache=True, logits_to_keep=1)
    logits, _ = _prefill(model, row, torch.ones_like(row), model.chat_tail, Pooled(cache), kept=history)
    return int(logits[0, -1].argmax())


def user_header(tok) -> str:
    """What the template writes between an assistant message's end and the next user message."""
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    return chat_prefix(tok, turns).removeprefix(tok.apply_chat_template(turns, tokenize=False))


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
    header = user_header(tok)
    hits = {"predicted": [], "truncate": [], "framing + truncate": [], "session": []}
    lengths, predicted_share = [], []
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
            last_user = text.rfind(header)
            if last_user > len(chat_prefix(tok)):  # an earlier exchange: the session regime applies
                history = len(tok(text[:last_user + len(header)], add_special_tokens=False).input_ids)
                hits["session"].append(float(session_first_token(model, ids, history) == exact))
                predicted_share.append((len(ids) - history) / len(ids))
    print(f"# `{shlex.join(['python'] + sys.argv)}`\n")
    print(f"{args.model}, CPU, {model.base.dtype}; {len(lengths)} chats of {min(lengths)}-{max(lengths)} tokens "
          f"(median {sorted(lengths)[len(lengths) // 2]}); r = {ratio:.2f} (params rule); the framing is "
          f"{len(framing)} tokens: {tok.decode(framing)!r}\n")
    print("| prompt as the base sees it | chats | first token = exact's [95% CI] |\n|---|--:|--:|")
    for name, values in hits.items():
        if values:
            mean, lo, hi = confidence_interval(values, binary=True)
            print(f"| {name} | {len(values)} | {mean:.3f} [{lo:.3f}, {hi:.3f}] |")
    if predicted_share:
        print(f"\nsession: the chats with an earlier exchange; their last user message and reply opening are "
              f"{100 * sum(predicted_share) / len(predicted_share):.0f}% of the prompt on average, the rest is exact")


if __name__ == "__main__":
    main()
