"""Is the predicted cache's error concentrated on the first prompt positions (attention sinks)? The shipped default's
first-token agreement with the exact base when positions 0..S-1 of every base layer get the exact keys and/or values
instead of the predicted ones. WikiText windows, CPU, float32.

    python benchmarks/sink_probe.py --windows 200 --prompt-tokens 128 > benchmarks/results/sink_probe_cpu.txt
"""
from __future__ import annotations

import argparse
import shlex
import sys

import torch

from kvpred.model import KVPredictionModel, cache_kwargs
from kvpred.tasks import default_data_dir, text_windows

SINKS = (0, 1, 2, 4, 8)
PARTS = ("both", "values", "keys")


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=25)
    args = p.parse_args()
    print(f"`{shlex.join(['python', *sys.argv])}`\n")
    model = KVPredictionModel.from_pretrained(args.model)
    windows = text_windows(model.tokenizer, str(default_data_dir() / "wikitext2-test.txt"), args.prompt_tokens,
                           args.windows)
    ids = torch.tensor(windows)
    stack = lambda cache, part: torch.stack([getattr(layer, part) for layer in cache.layers])  # noqa: E731
    hits = {(s, part): 0 for s in SINKS for part in PARTS}
    for i in range(0, len(ids), args.batch_size):
        x = ids[i:i + args.batch_size]
        exact = model.prefill(x, mode="exact")[0][:, -1].argmax(-1)
        _, true = model.prefill(x[:, :-1], mode="exact")
        predicted = model.predicted_cache(x, torch.ones_like(x))
        for s in SINKS:
            for part in PARTS:
                kv = {name: stack(predicted, name) for name in ("keys", "values")}  # [L, B, H, T, D]
                for name in ("keys", "values"):
                    if part in (name, "both"):
                        kv[name][..., :s, :] = stack(true, name)[..., :s, :]
                cache = model.write_cache(kv["keys"], kv["values"])
                pos = torch.full((len(x), 1), x.shape[1] - 1)
                logits = model.base(input_ids=x[:, -1:], position_ids=pos, use_cache=True, logits_to_keep=1,
                                    **cache_kwargs(model.base, cache)).logits
                hits[s, part] += (logits[:, -1].argmax(-1) == exact).sum().item()
    print(f"{args.model}, {len(ids)} WikiText windows of {args.prompt_tokens} tokens, CPU float32: first-token "
          "agreement with the exact base when the first S positions get exact keys / values / both\n")
    print("| S | exact keys and values | exact values | exact keys |\n|--:|--:|--:|--:|")
    for s in SINKS:
        print(f"| {s} | " + " | ".join(f"{hits[s, part] / len(ids):.3f}" for part in PARTS) + " |")


if __name__ == "__main__":
    main()
