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

import torch

from chat_ttft import FirstToken  # benchmarks/ is on the path when run as a script
from kvpred.cli import add_model_arguments, load_model
from kvpred.refine import ChatSession
from kvpred.tasks import default_data_dir, text_windows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", default=str(default_data_dir() / "wikitext2-test.txt"))
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-tokens", type=int, default=384)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    model = load_model(args)
    passages = [model.tokenizer.decode(w) for w in text_windows(model.tokenizer, args.data, args.turn_tokens,
                                                                args.turns)]
    model.generate(torch.tensor([[1, 2, 3]], device=model.device), max_new_tokens=2)  # CUDA / cuBLAS start-up
    session = ChatSession(model, system="You are a helpful assistant.")
    for turn, passage in enumerate(passages, 1):
        text = f"{passage}\n\nSummarise the passage above in one sentence."
        profiler = cProfile.Profile()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
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
