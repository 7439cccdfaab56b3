"""Chat prompts through predicted mode: how long an exact tail the chat template's reply opening needs.

TriviaQA questions (../shared/data, evaluation only) are asked as single chat turns of the shipped default. Per
exact tail W, predicted mode's greedy reply is compared with exact mode's: first-token agreement, how often the
first token is a newline or the end of the turn, and agreement of the first 16 tokens. Then two-turn ChatSessions
(refinement eager, as `kvpred chat` runs them) count second replies that come back empty.

    python benchmarks/chat_tail_eval.py --questions 100 > benchmarks/results/chat_tail/cpu.md
"""
import argparse
import shlex
import sys

import torch
from chat_quality import DATA, load_questions  # this folder

from kvpred.generation import chat_exact_tail
from kvpred.model import KVPredictionModel
from kvpred.refine import ChatSession


def reply(model, ids: torch.Tensor, mode: str, tail: int, tokens: int) -> list[int]:
    return model.generate(ids, mode=mode, exact_tail=tail, max_new_tokens=tokens)[0, ids.shape[1]:].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--sessions", type=int, default=30)
    args = p.parse_args()
    model = KVPredictionModel.from_pretrained(args.model)
    tok, opening = model.tokenizer, chat_exact_tail(model.tokenizer)
    stops = {tok.convert_tokens_to_ids("\n"), *tok("\n", add_special_tokens=False).input_ids, tok.eos_token_id}
    tails = (1, opening, opening + 8)
    print(f"# `{shlex.join(['python'] + sys.argv)}`\n")
    sample = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    print(f"{args.model}, CPU, {model.base.dtype}; the template's reply opening is {opening} tokens: "
          f"{tok.decode(tok(sample, add_special_tokens=False).input_ids[-opening:])!r}\n")
    qs = [q for q, _ in load_questions(DATA, args.questions)]
    counts = {w: {"first": 0, "newline_or_end": 0, "sequence": 0, "tokens": 0} for w in tails}
    lengths = []
    for q in qs:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True).input_ids
        lengths.append(ids.shape[1])
        exact = reply(model, ids, "exact", 1, args.tokens)
        for w in tails:
            mine, c = reply(model, ids, "predicted", w, args.tokens), counts[w]
            c["first"] += mine[0] == exact[0]
            c["newline_or_end"] += mine[0] in stops
            c["sequence"] += mine == exact
            c["tokens"] += sum(a == b for a, b in zip(mine, exact)) / len(exact)
    n = len(qs)
    print(f"{n} questions, prompts of {min(lengths)}-{max(lengths)} tokens (the template's default system message "
          f"included); {args.tokens} new tokens, greedy.\n")
    print("| exact tail W | first token = exact's | first token newline / end of turn | "
          f"all {args.tokens} tokens = exact's | position-wise token agreement |")
    print("|--:|--:|--:|--:|--:|")
    for w, c in counts.items():
        print(f"| {w} | {c['first'] / n:.2f} | {c['newline_or_end'] / n:.2f} | {c['sequence'] / n:.2f} | "
              f"{c['tokens'] / n:.2f} |")
    print(f"\nTwo-turn sessions ({args.sessions} question pairs, refine eager): second replies that are empty")
    print("\n| exact tail W | empty second replies |\n|--:|--:|")
    for w in (1, opening):
        empty = 0
        for a, b in zip(qs[:args.sessions], qs[args.sessions:2 * args.sessions]):
            session = ChatSession(model, exact_tail=w, refine="eager")
            session.send(a, max_new_tokens=args.tokens)
            empty += not session.send(b, max_new_tokens=args.tokens).strip()
        print(f"| {w} | {empty} / {args.sessions} |")


if __name__ == "__main__":
    main()
