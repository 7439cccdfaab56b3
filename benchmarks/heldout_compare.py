"""Held-out NLL and first-token agreement of several kvpred checkpoints on several token-shard held-out splits,
side by side on the CPU (the trainer's held-out measure: NLL of the last 64 tokens after a predicted prefix).

    python benchmarks/heldout_compare.py --models k4=path k8=path --data code=tokens/ mix=mix/ --out result.json
"""
import argparse
import json

import torch
import torch.nn.functional as F

from kvpred import KVPredictionModel
from kvpred.data import heldout_windows


def pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="label=checkpoint")
    p.add_argument("--data", nargs="+", required=True, help="label=token shard folder")
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    tail, result = 64, {"command": "python benchmarks/heldout_compare.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items())}
    models = {label: KVPredictionModel.from_pretrained(path, dtype=torch.float32)
              for label, path in pairs(args.models).items()}
    for name, folder in pairs(args.data).items():
        ids = heldout_windows(folder, args.seq_len, args.windows)
        rows, exact_first = {}, None
        for label, model in models.items():
            for mode in (["exact"] if exact_first is None else []) + ["predicted"]:
                with torch.no_grad():
                    logits, _ = model.prefill(ids, mode=mode, exact_tail=tail + 1)
                logits = logits[:, :-1].float()
                nll = F.cross_entropy(logits.flatten(0, 1), ids[:, -tail:].flatten()).item()
                if mode == "exact":
                    exact_first, rows["exact_nll"] = logits[:, 0].argmax(-1), round(nll, 3)
                else:
                    agree = (logits[:, 0].argmax(-1) == exact_first).float().mean().item()
                    rows[label] = {"nll": round(nll, 3), "first_token_agreement": round(agree, 3)}
            print(name, label, rows[label], "exact nll", rows["exact_nll"], flush=True)
        result[name] = rows
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
