"""Time to first token of a stateless chat client's turns through `kvpred serve`, with and without --auto-sessions.

The client resends the whole conversation every turn and names no session, as OpenAI clients do. Each user turn is a
WikiText passage of about --turn-tokens tokens and a request to summarise it (as in chat_ttft.py); replies are
--reply-tokens greedy tokens. First a server with --auto-sessions (and --refine as given) answers every turn, building
the conversation from its own replies; then a plain server answers the same requests in predicted and in exact mode.
TTFT is the server's `ttft_s`: from a request's arrival to its first token, tokenization and queueing included.

    python benchmarks/auto_sessions_ttft.py --turns 4 --out benchmarks/results/chat/auto_sessions_cpu.md
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from openai import OpenAI

from chat_ttft import add_conversation_arguments, user_turns, write_report
from kvpred.bench import _device_name
from kvpred.cli import load_model
from kvpred.refine import REFINE_CHOICES
from kvpred.serve import ServeConfig, create_app, serve_in_thread

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def ask(client: OpenAI, messages: list[dict], max_tokens: int, **extra) -> dict:
    resp = client.chat.completions.create(model="kvpred", messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra)
    return {"text": resp.choices[0].message.content, "prompt_tokens": resp.usage.prompt_tokens, **resp.model_extra}


def client_of(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_conversation_arguments(parser, turns=4)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--refine", default="lazy", choices=REFINE_CHOICES, help="the auto-sessions server's --refine")
    parser.add_argument("--out", required=True, help="markdown report; the JSON goes beside it")
    args = parser.parse_args(argv)
    model = load_model(args)

    rows, conversations = [], []
    config = ServeConfig(model_name="kvpred", auto_sessions=True, refine=args.refine)
    with serve_in_thread(create_app(model, config)) as url:
        client, messages = client_of(url), [SYSTEM]
        ask(client, [SYSTEM, {"role": "user", "content": "Hello"}], 2)  # start-up, its own session
        for text in user_turns(model.tokenizer, args):
            messages = messages + [{"role": "user", "content": text}]
            reply = ask(client, messages, args.reply_tokens)
            conversations.append(messages)
            rows.append({"prompt_tokens": reply["prompt_tokens"], "reused_tokens": reply["reused_tokens"],
                         "auto_s": reply["ttft_s"], "session": reply["session"]})
            messages = messages + [{"role": "assistant", "content": reply["text"]}]
    with serve_in_thread(create_app(model, ServeConfig(model_name="kvpred"))) as url:
        client = client_of(url)
        ask(client, [SYSTEM, {"role": "user", "content": "Hello"}], 2)
        for row, messages in zip(rows, conversations):
            for mode in ("predicted", "exact"):
                row[f"{mode}_s"] = ask(client, messages, args.reply_tokens, kv_mode=mode)["ttft_s"]
            print(f"{row['prompt_tokens']} tokens, {row['reused_tokens']} reused: TTFT ms auto "
                  f"{row['auto_s'] * 1e3:.1f}, predicted {row['predicted_s'] * 1e3:.1f}, exact "
                  f"{row['exact_s'] * 1e3:.1f}", file=sys.stderr)

    command = shlex.join(["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    setup = (f"{_device_name(model.device)}, {str(model.base.dtype).removeprefix('torch.')}, batch 1, one request at "
             f"a time; {args.turns} user turns of {args.turn_tokens} WikiText tokens, replies of {args.reply_tokens} "
             f"greedy tokens; auto-sessions server with --refine {args.refine}; TTFT = the server's ttft_s")
    lines = [f"# Stateless chat client through kvpred serve ({args.model})", "", f"`{command}`", "", setup, "",
             "| turn | prompt tokens | reused | TTFT ms --auto-sessions | predicted | exact | exact / auto |",
             "|--:|--:|--:|--:|--:|--:|--:|"]
    for turn, r in enumerate(rows, 1):
        lines.append(f"| {turn} | {r['prompt_tokens']} | {r['reused_tokens']} | {r['auto_s'] * 1e3:.1f} | "
                     f"{r['predicted_s'] * 1e3:.1f} | {r['exact_s'] * 1e3:.1f} | {r['exact_s'] / r['auto_s']:.2f}x |")
    write_report(Path(args.out), lines, {"command": command, "setup": setup, "turns": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
