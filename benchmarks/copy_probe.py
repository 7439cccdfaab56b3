"""Can the base copy from a predicted cache? Held-out windows of the training shards whose last `span` tokens repeat
`span` tokens of the window's first half (as `kvpred train --copy-spans` makes them). The prompt (all but the copy)
goes through predicted mode; the base then reads the copy with its own keys/values for it, as an exact tail. Reported:
NLL per token of the copy after its first token (which nothing predicts) and top-1 accuracy there, for the exact base
and predicted mode of each model.

    python benchmarks/copy_probe.py --models smollm2-135m,runs/ship_copy --data mix/ --device cuda
"""
import argparse
import json
import random

import torch
import torch.nn.functional as F

from kvpred.data import heldout_windows
from kvpred.model import KVPredictionModel, cache_kwargs


@torch.no_grad()
def copy_scores(model: KVPredictionModel, ids: torch.Tensor, span: int, mode: str) -> tuple[float, float]:
    prompt, copy = ids[:, :-span], ids[:, -span:]
    _, cache = model.prefill(prompt, mode=mode)
    n = prompt.shape[1]
    pos = torch.arange(n, n + span, device=ids.device).expand(ids.shape[0], span)
    logits = model.base(input_ids=copy, position_ids=pos, use_cache=True, **cache_kwargs(model.base, cache)).logits
    logits, target = logits[:, :-1].float(), copy[:, 1:]  # token i + 1 of the copy from its first i + 1
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).item()
    return nll, (logits.argmax(-1) == target).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="comma-separated")
    p.add_argument("--data", required=True, help="token shards (their held-out split)")
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--span", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    random.seed(0)
    windows = heldout_windows(args.data, args.seq_len, args.windows)
    for row in windows:
        a = random.randint(0, args.seq_len // 2 - args.span)
        row[-args.span:] = row[a:a + args.span].clone()
    results = {}
    for name in args.models.split(","):
        model = KVPredictionModel.from_pretrained(name, device=args.device,
                                                  dtype=torch.bfloat16 if args.device == "cuda" else None)
        for mode in ("exact", "predicted") if not results else ("predicted",):
            scores = [copy_scores(model, windows[i:i + args.batch_size].to(args.device), args.span, mode)
                      for i in range(0, len(windows), args.batch_size)]
            nll, acc = (sum(s[k] for s in scores) / len(scores) for k in (0, 1))
            results[f"{name} {mode}"] = {"copy_nll": round(nll, 4), "copy_top1": round(acc, 4)}
            print(f"{name} {mode}: NLL {nll:.3f}, top-1 {acc:.3f} on the copy's tokens 2-{args.span}", flush=True)
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
