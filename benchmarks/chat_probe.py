"""Where a chat turn's time to first token goes: benchmarks/chat_ttft.py's conversation with two-token replies, each
turn's send() under cProfile (the refinement finished after the reply included), printing the functions with the
most cumulative time.

    python benchmarks/chat_probe.py --model smollm2-135m --device cuda --turns 6
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

from chat_ttft import FirstToken, add_conversation_arguments, started_session, user_turns  # benchmarks/ is on the path
from kvpred.cli import load_model
from kvpred.decoding import synchronize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_conversation_arguments(parser, turns=6)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--warm-up", action="store_true", help="KVPredictionModel.warm_up() first, as kvpred serve")
    args = parser.parse_args()
    model = load_model(args)
    if args.warm_up:
        model.warm_up()
    session = started_session(model, "eager")
    for turn, text in enumerate(user_turns(model.tokenizer, args), 1):
        profiler = cProfile.Profile()
        synchronize(model.device)
        start = time.perf_counter()
        clock = FirstToken()
        profiler.enable()
        session.send(text, max_new_tokens=2, streamer=clock)
        profiler.disable()
        ttft, whole = clock.at - start, time.perf_counter() - start
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
        info = {k: v for k, v in session.last_info.items() if k in ("prompt_tokens", "reused_tokens",
                                                                     "predicted_tokens", "refined_after_reply")}
        print(f"===== turn {turn}: TTFT {ttft * 1e3:.1f} ms, send {whole * 1e3:.1f} ms; {info}")
        print("\n".join(line[:160] for line in out.getvalue().splitlines() if line.strip())[-9000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
