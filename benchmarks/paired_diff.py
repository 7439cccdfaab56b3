"""Paired differences between two models' `kvpred eval` runs on the same items (predicted mode), with bootstrap 95% CIs.

    python benchmarks/paired_diff.py A.items.jsonl B.items.jsonl [DATA_DIR]   # prints B - A per task

Multiple-choice items (arc_easy, piqa) store only each choice's log-likelihood; their gold answers are read from
DATA_DIR (default ../shared/data).
"""
import json
import sys
from pathlib import Path

import numpy as np


def load(path: str) -> dict:
    rows = {}
    for line in open(path):
        item = json.loads(line)
        if item["mode"] in ("predicted", "exact"):
            rows[(item["task"], item["mode"], item["key"])] = item["result"]
    return rows


def choice_accuracy(rows: dict, task: str, data_dir: Path) -> dict[str, float]:
    """Per item of a multiple-choice task: 1 if predicted mode's most likely choice is the gold one."""
    lls: dict[str, dict[int, float]] = {}
    for (t, mode, key), r in rows.items():
        if t == task and mode == "predicted":
            item, choice = key.split(".")
            lls.setdefault(item, {})[int(choice)] = r["ll"]
    if not lls:
        return {}
    gold = [int(json.loads(line)["gold"]) for line in open(data_dir / f"{task}.jsonl")]
    return {item: float(max(ll, key=ll.get) == gold[int(item)]) for item, ll in lls.items()}


def per_item(rows: dict, task: str, data_dir: Path) -> dict[str, float]:
    """The task's primary per-item score in predicted mode: first-token agreement, NLL per token, or accuracy."""
    if task in ("arc_easy", "piqa"):
        return choice_accuracy(rows, task, data_dir)
    out = {}
    for (t, mode, key), r in rows.items():
        if t != task or mode != "predicted":
            continue
        if task in ("agreement", "chat"):
            out[key] = float(r["tokens"][0] == rows[(t, "exact", key)]["tokens"][0])
        elif task in ("heldout", "lambada_nll"):
            out[key] = -r["ll"] / r["n"]
        elif task == "lambada":
            out[key] = float(r["greedy"])
    return out


LABELS = {"agreement": "first-token agreement", "chat": "chat first-token agreement", "heldout": "WikiText NLL",
          "lambada": "LAMBADA acc", "arc_easy": "ARC-Easy acc", "piqa": "PIQA acc"}


def main(a: str, b: str, data_dir: str = "../shared/data") -> None:
    ra, rb = load(a), load(b)
    rng = np.random.default_rng(0)
    for task, label in LABELS.items():
        sa, sb = per_item(ra, task, Path(data_dir)), per_item(rb, task, Path(data_dir))
        keys = sorted(set(sa) & set(sb))
        if not keys:
            continue
        d = np.array([sb[k] - sa[k] for k in keys])
        boot = [d[rng.integers(len(d), size=len(d))].mean() for _ in range(2000)]
        print(f"{label}: {np.mean([sa[k] for k in keys]):.3f} -> {np.mean([sb[k] for k in keys]):.3f}, "
              f"difference {d.mean():+.3f} [{np.percentile(boot, 2.5):+.3f}, {np.percentile(boot, 97.5):+.3f}] "
              f"over {len(keys)} paired items")


if __name__ == "__main__":
    main(*sys.argv[1:4])
