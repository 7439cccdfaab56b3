"""Time to first token of each turn of a chat: a ChatSession (earlier turns' cache kept and refined, only the new
turn predicted) against `generate` on the whole conversation, exact and predicted, at the same prompts.

Each user turn is a WikiText passage of about --turn-tokens tokens followed by a request to summarise it. The
session answers first (--reply-tokens greedy tokens); then exact and predicted `generate` are timed on the
conversation the session was given at that turn: the first call at that length, as a server meets it, and the median
of --repeats more. Every timing starts before the conversation is rendered with the chat template and tokenized, and
stops when the first new token reaches the streamer on the host.

    python benchmarks/chat_ttft.py --model smollm2-135m --device cpu --turns 5 --out benchmarks/results/chat_ttft_cpu.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from kvpred.bench import _device_name
from kvpred.cli import add_model_arguments, load_model
from kvpred.decoding import synchronize
from kvpred.refine import ChatSession
from kvpred.tasks import default_data_dir, text_windows


class FirstToken:
    """A streamer that notes when the first new token arrives (the prompt comes first)."""

    def __init__(self):
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def generate_ttft(model, session: ChatSession, messages: list[dict], mode: str, repeats: int) -> tuple[float, float]:
    """Seconds from rendering `messages` to generate's first token: the first call, and the median of the others."""
    times = []
    for _ in range(repeats + 1):
        clock = FirstToken()
        synchronize(model.device)
        start = time.perf_counter()
        ids = session.conversation_ids(messages)
        model.generate(ids, mode=mode, max_new_tokens=2, streamer=clock)
        times.append(clock.at - start)
    return times[0], statistics.median(times[1:])


def add_conversation_arguments(parser: argparse.ArgumentParser, turns: int) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", default=str(default_data_dir() / "wikitext2-test.txt"))
    parser.add_argument("--turns", type=int, default=turns)
    parser.add_argument("--turn-tokens", type=int, default=384)


def user_turns(tokenizer, args: argparse.Namespace) -> list[str]:
    """--turns user messages: a WikiText passage of --turn-tokens tokens, then a request to summarise it."""
    windows = text_windows(tokenizer, args.data, args.turn_tokens, args.turns)
    return [f"{tokenizer.decode(w)}\n\nSummarise the passage above in one sentence." for w in windows]


def started_session(model, refine: str) -> ChatSession:
    """A fresh session, after an untimed generation that pays the device's start-up."""
    model.generate(torch.tensor([[1, 2, 3]], device=model.device), max_new_tokens=2)
    return ChatSession(model, system="You are a helpful assistant.", refine=refine)


def write_report(out: Path, lines: list[str], payload: dict) -> None:
    """The markdown table to `out` and stdout, the JSON beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_conversation_arguments(parser, turns=5)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--refine", default="eager", help="the session's refine policy")
    parser.add_argument("--out", required=True, help="markdown report; the JSON goes beside it")
    args = parser.parse_args(argv)

    model = load_model(args)
    session = started_session(model, args.refine)
    rows = []
    for turn, text in enumerate(user_turns(model.tokenizer, args), 1):
        messages = session.messages + [{"role": "user", "content": text}]
        clock = FirstToken()
        synchronize(model.device)
        start = time.perf_counter()
        session.send(text, max_new_tokens=args.reply_tokens, streamer=clock)
        info = session.last_info
        row = {"turn": turn, "prompt_tokens": info["prompt_tokens"], "reused_tokens": info["reused_tokens"],
               "predicted_tokens": info["predicted_tokens"], "session_s": clock.at - start}
        for mode in ("exact", "predicted"):
            row[f"{mode}_s"], row[f"{mode}_again_s"] = generate_ttft(model, session, messages, mode, args.repeats)
        rows.append(row)
        print(f"turn {turn}: {row['prompt_tokens']} tokens, {row['reused_tokens']} reused; TTFT ms exact "
              f"{row['exact_s'] * 1e3:.1f}, predicted {row['predicted_s'] * 1e3:.1f}, session "
              f"{row['session_s'] * 1e3:.1f}", file=sys.stderr)

    command = shlex.join(["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    setup = (f"{_device_name(model.device)}, {str(model.base.dtype).removeprefix('torch.')}, batch 1; "
             f"{args.turns} user turns of {args.turn_tokens} WikiText tokens, replies of {args.reply_tokens} greedy "
             f"tokens; the session refines '{args.refine}'; generate: the first call at each length, and "
             f"(again) the median of {args.repeats} more")
    lines = [f"# Chat TTFT per turn ({args.model})", "", f"`{command}`", "", setup, "",
             "| turn | prompt tokens | reused | predicted | TTFT ms exact (again) | predicted (again) | session | "
             "exact / session |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['turn']} | {r['prompt_tokens']} | {r['reused_tokens']} | {r['predicted_tokens']} | "
                     f"{r['exact_s'] * 1e3:.1f} ({r['exact_again_s'] * 1e3:.1f}) | {r['predicted_s'] * 1e3:.1f} "
                     f"({r['predicted_again_s'] * 1e3:.1f}) | {r['session_s'] * 1e3:.1f} | "
                     f"{r['exact_s'] / r['session_s']:.2f}x |")
    write_report(Path(args.out), lines, {"command": command, "setup": setup, "turns": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
