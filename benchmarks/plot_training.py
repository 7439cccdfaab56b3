"""Plot held-out quality over training for the runs under benchmarks/results/train (PNG + markdown table).

    python benchmarks/plot_training.py
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).parent / "results" / "train"
RUNS = {"paper": "paper recipe (identity init, K/V input, all-predicted forward)",
        "ours_full": "ours: fit init, hidden input, suffix split + KL, full aux",
        "ours_lora": "ours: same, rank-32 aux adapters (shipped, 18 MB)"}


def evals(run: str) -> list[dict]:
    return [r for r in map(json.loads, open(ROOT / run / "metrics.jsonl")) if "heldout_nll_predicted" in r]


def main() -> None:
    fig, (nll, agree) = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    for run, label in RUNS.items():
        points = evals(run)
        steps = [p["step"] for p in points]
        nll.plot(steps, [p["heldout_nll_predicted"] for p in points], marker="o", label=label)
        agree.plot(steps, [p["first_token_agreement"] for p in points], marker="o", label=label)
        last = points[-1]
        rows.append(f"| {run} | {last['step']} | {last['heldout_nll_predicted']:.3f} | "
                    f"{last['heldout_nll_exact']:.3f} | {last['first_token_agreement']:.3f} |")
    exact = evals("paper")[0]["heldout_nll_exact"]
    nll.axhline(exact, color="k", ls="--", label="exact base")
    nll.set(xlabel="step", ylabel="held-out NLL of last 64 tokens (nats)", title="after a predicted 448-token prefix")
    agree.set(xlabel="step", ylabel="first-token agreement with exact base", ylim=(0, 1),
              title="64 held-out windows")
    nll.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, aux = 8 of 30 layers; H200, bf16, batch 16 x 512 tokens")
    fig.tight_layout()
    fig.savefig(ROOT / "training_curves.png", dpi=120)
    table = ["| run | steps | held-out NLL predicted | exact | first-token agreement |", "|---|---|---|---|---|", *rows]
    (ROOT / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
