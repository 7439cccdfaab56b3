"""How close predicted mode's chat replies are to the exact base's, for one or more models on the same questions.

TriviaQA questions (../shared/data, evaluation only) are asked as single chat turns, with each model's default chat
exact tail (the template's reply opening) or the --tails given. Per model and tail: first-token agreement with exact
mode, position-wise agreement of the greedy replies, the NLL of exact mode's reply when it follows the predicted prompt
cache (teacher-forced), and how often a reply contains one of the question's answers (exact mode and the auxiliary
alone beside it).

    python benchmarks/chat_quality.py --models smollm2-135m,path/to/other --questions 300 --out results/chat_quality
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from kvpred.generation import chat_exact_tail
from kvpred.model import KVPredictionModel
from kvpred.tasks import _qa_targets, generate, normalize_answer, score

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "triviaqa_sm_sub.jsonl"


def load_questions(path: Path, n: int) -> list[tuple[str, list[str]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [(r["context"].removeprefix("Question: ").removesuffix("\nAnswer:"), _qa_targets(r)) for r in rows]


def replies(model, prompts: list[list[int]], mode: str, tail: int, tokens: int, batch: int) -> list[list[int]]:
    out = [[] for _ in prompts]
    for results in generate(model, prompts, mode, exact_tail=tail, max_new_tokens=tokens, batch_size=batch):
        for i, new in results:
            out[i] = new
    return out


def answered(tokenizer, reply: list[int], answers: list[str]) -> bool:
    text = f" {normalize_answer(tokenizer.decode(reply, skip_special_tokens=True))} "
    return any(f" {normalize_answer(a)} " in text for a in answers if normalize_answer(a))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m", help="comma-separated; all share the base")
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--tokens", type=int, default=48, help="reply length, greedy")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tails", default="chat",
                   help="comma-separated exact tails; 'chat': the chat template's reply opening (chat_exact_tail)")
    p.add_argument("--data", type=Path, default=DATA, help="TriviaQA jsonl (context, answer, aliases)")
    p.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    args = p.parse_args()
    torch.manual_seed(0)
    qs = load_questions(args.data, args.questions)
    rows, exact = [], None
    for name in args.models.split(","):
        model = KVPredictionModel.from_pretrained(name, device=args.device)
        tok = model.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for q, _ in qs]
        prompts = tok(texts, add_special_tokens=False).input_ids

        def reply_nll(mode: str, tail: int = 1) -> float:
            batches = score(model, list(zip(prompts, exact)), mode, exact_tail=tail, batch_size=args.batch_size)
            return sum(-r["ll"] for batch in batches for _, r in batch) / sum(map(len, exact))

        if exact is None:
            exact = replies(model, prompts, "exact", 1, args.tokens, args.batch_size)
            rows.append({"model": "exact base", "exact_reply_nll": reply_nll("exact"),
                         "answered": sum(answered(tok, r, a) for r, (_, a) in zip(exact, qs))})
        aux = replies(model, prompts, "aux", 1, args.tokens, args.batch_size)
        for tail in [chat_exact_tail(tok) if t == "chat" else int(t) for t in args.tails.split(",")]:
            mine = replies(model, prompts, "predicted", tail, args.tokens, args.batch_size)
            rows.append({
                "model": name, "exact_tail": tail,
                "first_token": sum(m[:1] == e[:1] for m, e in zip(mine, exact)),
                "position_agreement": sum(sum(a == b for a, b in zip(m, e)) / max(len(e), 1)
                                          for m, e in zip(mine, exact)),
                "exact_reply_nll": reply_nll("predicted", tail),
                "answered": sum(answered(tok, r, a) for r, (_, a) in zip(mine, qs)),
                "aux_answered": sum(answered(tok, r, a) for r, (_, a) in zip(aux, qs)),
                "examples": [tok.decode(r, skip_special_tokens=True) for r in mine[:5]],
            })
    n = len(qs)
    lines = [f"# `{shlex.join(['python'] + sys.argv)}`", "",
             f"{n} TriviaQA questions as single chat turns; greedy replies of up to {args.tokens} tokens on "
             f"{args.device}.", "",
             "| model | exact tail | first token = exact's | position-wise agreement | NLL of exact's reply after the "
             "predicted prompt (exact base: after its own) | replies with an answer | aux alone: replies with an "
             "answer |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    base = rows[0]
    lines.append(f"| exact base | - | 1.000 | 1.000 | {base['exact_reply_nll']:.3f} | {base['answered'] / n:.3f} | - |")
    for r in rows[1:]:
        lines.append(f"| {r['model']} | {r['exact_tail']} | {r['first_token'] / n:.3f} | "
                     f"{r['position_agreement'] / n:.3f} | {r['exact_reply_nll']:.3f} | {r['answered'] / n:.3f} | "
                     f"{r['aux_answered'] / n:.3f} |")
    lines += ["", "First replies, predicted mode:"]
    for r in rows[1:]:
        lines += [f"* {r['model']}, exact tail {r['exact_tail']}:"] + [f"  * {e!r}" for e in r["examples"]]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "questions": n, "rows": rows,
                                                    "exact_replies": exact}, indent=1, default=str))


if __name__ == "__main__":
    main()
