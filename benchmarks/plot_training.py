"""Plot held-out quality over training for a folder of runs (PNG + markdown table).

    python benchmarks/plot_training.py     # benchmarks/results/train (the first default's runs, H200)
    python benchmarks/plot_training.py --root benchmarks/results/h100/train --runs k4="k4 (shipped)" k6=k6 k8=k8 \
        --title "SmolLM2-135M, prose+code shards; one H100 per run, bf16, batch 32 x 512 tokens, 8 min"
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).parent / "results" / "train"
RUNS = {"paper": "paper recipe (identity init, K/V input, all-predicted forward)",
        "ours_full": "ours: fit init, hidden input, suffix split + KL, full aux",
        "ours_lora": "ours: same, rank-32 aux adapters (shipped, 18 MB)"}


def evals(root: Path, run: str) -> list[dict]:
    return [r for r in map(json.loads, open(root / run / "metrics.jsonl")) if "heldout_nll_predicted" in r]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--runs", nargs="+", default=[f"{k}={v}" for k, v in RUNS.items()], help="folder=label")
    p.add_argument("--title", default="SmolLM2-135M, aux = 8 of 30 layers; H200, bf16, batch 16 x 512 tokens")
    args = p.parse_args()
    runs = dict(r.split("=", 1) for r in args.runs)
    fig, (nll, agree) = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    for run, label in runs.items():
        points = evals(args.root, run)
        steps = [p["step"] for p in points]
        nll.plot(steps, [p["heldout_nll_predicted"] for p in points], marker="o", label=label)
        agree.plot(steps, [p["first_token_agreement"] for p in points], marker="o", label=label)
        last = points[-1]
        rows.append(f"| {run} | {last['step']} | {last['heldout_nll_predicted']:.3f} | "
                    f"{last['heldout_nll_exact']:.3f} | {last['first_token_agreement']:.3f} |")
    exact = evals(args.root, next(iter(runs)))[0]["heldout_nll_exact"]
    nll.axhline(exact, color="k", ls="--", label="exact base")
    nll.set(xlabel="step", ylabel="held-out NLL of last 64 tokens (nats)", title="after a predicted 448-token prefix")
    agree.set(xlabel="step", ylabel="first-token agreement with exact base", ylim=(0, 1),
              title="64 held-out windows")
    nll.legend(fontsize=7)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.root / "training_curves.png", dpi=120)
    table = ["| run | steps | held-out NLL predicted | exact | first-token agreement |", "|---|---|---|---|---|", *rows]
    (args.root / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
