"""Where a chat session turn's time to first token goes (GPU probe), against `generate` on the same conversation.

Runs fresh ChatSessions over the same user turns (as benchmarks/chat_ttft.py makes them) and times, synchronised,
each step of `ChatSession.send` before its first token: rendering and tokenizing the conversation, checking it,
finding the reusable columns, making room, the prefill (`kvpred.refine._prefill`) and the first token out of
`decode`. Then `generate` in predicted mode on the same conversation, for comparison. Medians in ms per turn.

    python benchmarks/session_turn_probe.py --model smollm2-135m --device cuda --dtype bfloat16 --turns 4
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections import defaultdict

from chat_ttft import FirstToken, add_conversation_arguments, started_session, user_turns

import kvpred.refine as refine
from kvpred.bench import _device_name
from kvpred.cli import load_model
from kvpred.decoding import synchronize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_conversation_arguments(parser, turns=4)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--profile", action="store_true",
                        help="after the timings, torch.profiler tables of the last turn and of generate() on its ids")
    args = parser.parse_args(argv)
    model = load_model(args)
    turns = user_turns(model.tokenizer, args)
    times: dict[tuple[int, str], list[float]] = defaultdict(list)
    state = {"turn": 0, "last": 0.0, "active": False}  # active: inside send, before its first token

    def mark(name: str) -> None:
        if not state["active"]:
            return
        synchronize(model.device)
        now = time.perf_counter()
        times[(state["turn"], name)].append(1e3 * (now - state["last"]))
        state["last"] = now

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            out = fn(*a, **kw)
            mark(name)
            return out
        return wrapper

    refine._prefill = timed("prefill", refine._prefill)
    for r in range(args.repeats + 1):
        session = started_session(model, "off")
        for name in ("conversation_ids", "_reusable", "_room"):
            setattr(session, name, timed(name, getattr(session, name)))
        session.model.check_inputs = timed("check_inputs", model.check_inputs)
        for i, text in enumerate(turns):
            state["turn"] = i + 1 if r else 0
            clock = FirstToken()
            first = clock.put

            def put(value, first=first, clock=clock) -> None:
                first(value)
                if clock.at is not None and state["active"]:
                    state["active"] = False
                    times[(state["turn"], "first token out of decode")].append(1e3 * (clock.at - state["last"]))

            clock.put = put
            synchronize(model.device)
            state["last"] = start = time.perf_counter()
            state["active"] = True
            session.send(text, max_new_tokens=args.reply_tokens, streamer=clock)
            times[(state["turn"], "session TTFT")].append(1e3 * (clock.at - start))
            ids = session.tokens[:, :session.last_info["prompt_tokens"]]
            clock = FirstToken()
            synchronize(model.device)
            start = time.perf_counter()
            model.generate(ids, mode="predicted", max_new_tokens=2, streamer=clock)
            times[(state["turn"], "generate() predicted, same ids")].append(1e3 * (clock.at - start))
        del model.check_inputs  # the class's method again
    print(f"$ {shlex.join(['python', sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}")
    dtype = str(model.base.dtype).removeprefix("torch.")
    print(f"{_device_name(model.device)}, {dtype}, batch 1; {args.turns} turns of {args.turn_tokens} WikiText tokens, "
          f"replies of {args.reply_tokens} tokens, refine 'off', pipelined first step {model.pipelined_first_step}; "
          f"median ms of {args.repeats} fresh sessions")
    names = list(dict.fromkeys(name for (turn, name) in times if turn > 0))
    print("| part | " + " | ".join(f"turn {i + 1}" for i in range(len(turns))) + " |")
    print("|---|" + "--:|" * len(turns))
    for name in names:
        cells = [f"{statistics.median(times[(i + 1, name)]):.2f}" for i in range(len(turns))]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.profile:
        profile(model, turns, args.reply_tokens)
    return 0


def profile(model, turns: list[str], reply_tokens: int) -> None:
    """torch.profiler tables (by self CPU time) of a fresh session's last turn and of generate() on its ids."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    session = started_session(model, "off")
    for text in turns[:-1]:
        session.send(text, max_new_tokens=reply_tokens)
    runs = {"session turn": lambda: session.send(turns[-1], max_new_tokens=1)}
    runs["generate() on its ids"] = lambda: model.generate(session.tokens[:, :session.last_info["prompt_tokens"]],
                                                           mode="predicted", max_new_tokens=1)
    for name, run in runs.items():
        synchronize(model.device)
        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            synchronize(model.device)
        print(f"\n## {name}\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
