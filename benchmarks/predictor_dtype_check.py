"""Does running the predictor's matmuls in bf16 (KVPredictionModel.predictor_dtype "auto" on a CPU with bf16 dot
products) change what predicted mode says? On WikiText windows (the `agreement` task's 128-token prompts), the first
token of predicted mode with an fp32 predictor and with a bf16 one: how often they agree with each other and with the
exact base, the largest first-token logit gap between them, and the keys' relative error.

    python benchmarks/predictor_dtype_check.py --windows 200 --out benchmarks/results/predictor_bf16/agreement_cpu.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kvpred.model import KVPredictionModel
from kvpred.tasks import text_windows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def first_logits(model: KVPredictionModel, ids: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    """Predicted mode's first-token logits [V] and the predicted keys of every layer, with the predictor in `dtype`."""
    model.predictor_dtype = dtype
    logits, cache = model.prefill(ids, mode="predicted")
    return logits[0, -1], torch.stack([layer.keys for layer in cache.layers])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=200)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(args.model)
    counts = {"fp32_agrees_with_exact": 0, "bf16_agrees_with_exact": 0, "bf16_agrees_with_fp32": 0}
    gaps, key_errors = [], []
    with torch.no_grad():
        for window in tqdm(text_windows(model.tokenizer, str(DATA), args.length, args.windows), desc="windows"):
            ids = torch.tensor([window])
            exact = model.prefill(ids, mode="exact")[0][0, -1].argmax().item()
            fp32, keys32 = first_logits(model, ids, torch.float32)
            bf16, keys16 = first_logits(model, ids, torch.bfloat16)
            counts["fp32_agrees_with_exact"] += fp32.argmax().item() == exact
            counts["bf16_agrees_with_exact"] += bf16.argmax().item() == exact
            counts["bf16_agrees_with_fp32"] += bf16.argmax().item() == fp32.argmax().item()
            gaps.append((bf16 - fp32).abs().max().item())
            key_errors.append(((keys16 - keys32).norm() / keys32.norm()).item())
    n = args.windows
    result = {"command": shlex.join(["python"] + sys.argv), "model": args.model, "windows": n,
              "prompt_tokens": args.length, "device": "cpu", "threads": torch.get_num_threads(),
              **{k: v / n for k, v in counts.items()},
              "max_first_token_logit_gap": max(gaps), "mean_first_token_logit_gap": sum(gaps) / n,
              "mean_key_relative_l2_error": sum(key_errors) / n}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
