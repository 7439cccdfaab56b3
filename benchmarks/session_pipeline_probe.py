"""Chat session turns with the first step pipelined behind the auxiliary and without (GPU probe), paired.

Each repeat runs the same conversation (user turns of WikiText passages, as benchmarks/chat_ttft.py makes them) in two
fresh ChatSessions, one with `model.pipelined_first_step` on and one with it off, in alternating order. A session's
first turn has no captured step yet; from the second turn on, the session's cache has its step and, when on, its
pipelined first step (both captured after the previous reply). Prints each turn's median TTFT (ms, from `send` to the
first token on the host) both ways and how many replies were the same token for token.

    python benchmarks/session_pipeline_probe.py --model smollm2-135m --device cuda --dtype bfloat16 --turns 4
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

from chat_ttft import FirstToken, add_conversation_arguments, started_session, user_turns

from kvpred.bench import _device_name
from kvpred.cli import load_model
from kvpred.decoding import synchronize


def run_session(model, turns: list[str], reply_tokens: int, refine: str
                ) -> tuple[list[float], list[list[int]], list[int]]:
    """TTFT (s) of each turn of a fresh session, its replies' tokens, and its prompts' lengths."""
    session = started_session(model, refine)
    ttft, replies, lengths = [], [], []
    for text in turns:
        clock = FirstToken()
        synchronize(model.device)
        start = time.perf_counter()
        session.send(text, max_new_tokens=reply_tokens, streamer=clock)
        ttft.append(clock.at - start)
        n = session.last_info["prompt_tokens"]
        replies.append(session.tokens[0, n:].tolist())
        lengths.append(n)
    return ttft, replies, lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_conversation_arguments(parser, turns=4)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--refine", default="off", help="the sessions' refine policy")
    args = parser.parse_args(argv)
    model = load_model(args)
    turns = user_turns(model.tokenizer, args)
    times: dict[bool, list[list[float]]] = {True: [], False: []}
    replies: dict[bool, list] = {True: [], False: []}
    for r in range(args.repeats + 1):
        for pipelined in ((True, False) if r % 2 else (False, True)):
            model.pipelined_first_step = pipelined
            ttft, said, lengths = run_session(model, turns, args.reply_tokens, args.refine)
            if r > 0:  # the first repeat pays the process's first-time work
                times[pipelined].append(ttft)
                replies[pipelined].append(said)
    print(f"$ {shlex.join(['python', sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}")
    dtype = str(model.base.dtype).removeprefix('torch.')
    print(f"{_device_name(model.device)}, {dtype}, batch 1; {args.turns} turns of "
          f"{args.turn_tokens} WikiText tokens, replies of {args.reply_tokens} greedy tokens, refine '{args.refine}'; "
          f"median TTFT ms of {args.repeats} fresh sessions each way, in alternating order")
    print("| turn | prompt tokens | pipelined | not pipelined | ratio | same replies |")
    print("|--:|--:|--:|--:|--:|--:|")
    for i in range(len(turns)):
        on = statistics.median(t[i] for t in times[True]) * 1e3
        off = statistics.median(t[i] for t in times[False]) * 1e3
        same = sum(a[i] == b[i] for a, b in zip(replies[True], replies[False]))
        print(f"| {i + 1} | {lengths[i]} | {on:.1f} | {off:.1f} | {on / off:.2f} | {same}/{args.repeats} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
