"""Predicted entries after an exact prefix: the regime of a chat's later turns (kvpred.refine.ChatSession).

Each window of `--context + --continuation` tokens: the base's exact cache for the first P tokens (an earlier,
refined turn), predicted keys/values for tokens [P, context - 1) (the auxiliary reads the whole context), the
base on the last context token, then the continuation teacher-forced through the base. Reported per P: NLL of
the continuation and first-token agreement with the exact base. P = 0 is plain predicted mode; "exact" is the
base alone. A predictor trained only on P = 0 windows (`kvpred train` without --exact-prefix) has never seen the
seam between exact and predicted entries.

    python benchmarks/multiturn_eval.py --model smollm2-135m --windows 64 --out benchmarks/results/multiturn_cpu_r128.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from kvpred.decoding import Pooled
from kvpred.model import KVPredictionModel, cache_kwargs
from kvpred.refine import _prefill
from kvpred.tasks import default_data_dir, text_windows


@torch.no_grad()
def continuation_scores(model: KVPredictionModel, ids: torch.Tensor, context: int,
                        prefix: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: mean NLL of ids[:, context:] and the greedy first token after the context. prefix None = exact."""
    base, mask = model.base, torch.ones_like(ids)
    if prefix is None:
        logits = base(input_ids=ids, use_cache=False).logits[:, context - 1:-1].float()
    else:
        cache = model.new_cache(*ids.shape)
        if prefix:
            base(input_ids=ids[:, :prefix], **cache_kwargs(base, cache), use_cache=True, logits_to_keep=1)
        first, _ = _prefill(model, ids[:, :context], mask[:, :context], 1, Pooled(cache), kept=prefix)
        pos = torch.arange(context, ids.shape[1] - 1, device=ids.device).expand(len(ids), -1)
        rest = base(input_ids=ids[:, context:-1], position_ids=pos, **cache_kwargs(base, cache), use_cache=True).logits
        logits = torch.cat([first[:, -1:], rest.float()], 1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, context:], reduction="none").mean(-1)
    return nll.cpu(), logits[:, 0].argmax(-1).cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(default_data_dir() / "wikitext2-test.txt"))
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--context", type=int, default=448)
    p.add_argument("--continuation", type=int, default=64)
    p.add_argument("--prefixes", default="0,128,256,384")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    start = time.time()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = KVPredictionModel.from_pretrained(args.model, device=args.device, dtype=dtype)
    windows = text_windows(model.tokenizer, args.data, args.context + args.continuation, args.windows)
    ids = torch.tensor(windows, device=model.device)
    settings = {"exact": None, **{f"exact prefix {q}": int(q) for q in args.prefixes.split(",")}}
    scores = {}
    for name, prefix in settings.items():
        parts = [continuation_scores(model, ids[i:i + args.batch_size], args.context, prefix)
                 for i in range(0, len(ids), args.batch_size)]
        scores[name] = (torch.cat([n for n, _ in parts]), torch.cat([t for _, t in parts]))
    exact_first = scores["exact"][1]
    rows = {name: {"nll": nll.mean().item(), "nll_se": (nll.std() / len(nll) ** 0.5).item(),
                   "first_token_agreement": (first == exact_first).float().mean().item()}
            for name, (nll, first) in scores.items()}
    doc = {"command": shlex.join(["python", *sys.argv]), "model": args.model, "device": args.device,
           "dtype": str(dtype).removeprefix("torch."), "windows": len(ids), "context": args.context,
           "continuation": args.continuation, "seconds": time.time() - start, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"{args.model}: {len(ids)} windows, context {args.context}, continuation {args.continuation}, "
          f"{args.device} {doc['dtype']}")
    for name, r in rows.items():
        print(f"  {name:18} NLL {r['nll']:.3f} +- {r['nll_se']:.3f}   first-token agreement {r['first_token_agreement']:.3f}")


if __name__ == "__main__":
    main()
