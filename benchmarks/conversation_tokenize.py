"""Tokenizing a growing chat conversation at each turn: whole, against from the previous turn's last special token
on (`kvpred.generation.ConversationTokenizer`, as ChatSession and the server's chat endpoint do). No model runs.

Each user turn is a WikiText passage of --turn-tokens tokens (as benchmarks/chat_ttft.py makes them) and each reply a
fixed sentence. At each turn the rendered conversation is tokenized both ways, --repeats times in turns; the ids must
be equal. Prints the median ms per turn.

    python benchmarks/conversation_tokenize.py --turns 8 --out benchmarks/results/chat/conversation_tokenize_cpu.md
"""
from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from kvpred.generation import ConversationTokenizer
from kvpred.models import resolve
from kvpred.tasks import default_data_dir, text_windows

REPLY = "The passage describes how the events unfolded and why they mattered to the people involved."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer and chat template")
    parser.add_argument("--data", default=str(default_data_dir() / "wikitext2-test.txt"))
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="markdown report (also printed)")
    args = parser.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(resolve(args.model))
    windows = text_windows(tok, args.data, args.turn_tokens, args.turns)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    lines = [f"`{shlex.join(['python', sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}`", "",
             f"{args.model} tokenizer, {platform.machine()} CPU; median ms of {args.repeats}",
             "", "| turn | tokens | whole | from the last special token | ratio |", "|--:|--:|--:|--:|--:|"]
    states = [ConversationTokenizer(tok) for _ in range(args.repeats)]  # one per repeat: each sees every turn once
    for turn, window in enumerate(windows, 1):
        messages.append({"role": "user", "content": f"{tok.decode(window)}\n\nSummarise the passage above."})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        whole, cut = [], []
        for state in states:
            start = time.perf_counter()
            ids = tok(text, add_special_tokens=False).input_ids
            whole.append(time.perf_counter() - start)
            start = time.perf_counter()
            got = state(text)
            cut.append(time.perf_counter() - start)
            assert got == ids, f"turn {turn}: the ids differ"
        w, c = statistics.median(whole) * 1e3, statistics.median(cut) * 1e3
        lines.append(f"| {turn} | {len(ids)} | {w:.2f} | {c:.2f} | {c / w:.2f} |")
        messages.append({"role": "assistant", "content": REPLY})
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Tokenizing a growing conversation\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
