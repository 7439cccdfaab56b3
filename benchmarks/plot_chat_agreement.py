"""Bar chart of first-token agreement with the exact base per mode (95% intervals) for `kvpred eval` chat results.

    python benchmarks/plot_chat_agreement.py --out benchmarks/results/h100/chat_default/chat_agreement.png \
        "single-turn chats (2048)=benchmarks/results/h100/chat_default/shipped_chat.json" \
        "three-exchange chats (1024)=benchmarks/results/h100/chat_default/shipped_chat3.json"
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("predicted", "truncate", "aux")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="LABEL=PATH of `kvpred eval` JSON files with a `chat` task")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="SmolLM2-135M, shipped default: first token = exact mode's (H100, bf16)")
    args = p.parse_args()
    labels, paths = zip(*(entry.split("=", 1) for entry in args.results))
    metrics = [json.loads(Path(path).read_text())["tasks"]["chat"]["metrics"]["first_token"] for path in paths]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        values, errors = [], [[], []]
        for metric in metrics:
            value, (lo, hi) = metric[mode]["value"], metric[mode]["ci"]
            values.append(value)
            errors[0].append(value - lo)
            errors[1].append(hi - value)
        xs = [k + (i - (len(MODES) - 1) / 2) * width for k in range(len(metrics))]
        bars = ax.bar(xs, values, width, yerr=errors, capsize=3, label=mode)
        ax.bar_label(bars, fmt="%.2f", padding=4, fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("first-token agreement with exact mode")
    ax.set_ylim(0, 0.75)
    ax.legend(title="mode (same TTFT FLOPs)", fontsize=8)
    ax.set_title(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
