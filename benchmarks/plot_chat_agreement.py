"""Bar chart of first-token agreement with the exact base per mode (95% intervals) for `kvpred eval` chat results.

Each entry is `[SERIES:]GROUP=PATH[@MODES]`: GROUP is a cluster of bars on the x axis (a kind of chat), SERIES names
the checkpoint when several are compared, MODES picks the modes drawn from that file (default predicted,truncate,aux).
Truncation is the base alone on the prompt's end, the same for every checkpoint, so its bars carry no series name.

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


def parse(entry: str) -> tuple[str, str, Path, tuple[str, ...]]:
    """`[SERIES:]GROUP=PATH[@MODES]` -> series, group, path, modes."""
    label, target = entry.split("=", 1)
    series, _, group = label.rpartition(":")
    path, _, modes = target.partition("@")
    return series, group, Path(path), tuple(modes.split(",")) if modes else MODES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="[SERIES:]GROUP=PATH[@MODES] of `kvpred eval` JSON with a `chat` task")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="SmolLM2-135M, shipped default: first token = exact mode's (H100, bf16)")
    args = p.parse_args()
    bars: dict[str, dict[str, tuple[float, float, float]]] = {}  # bar series -> group -> value, ci low, ci high
    groups: list[str] = []
    for series, group, path, modes in map(parse, args.results):
        metric = json.loads(path.read_text())["tasks"]["chat"]["metrics"]["first_token"]
        groups += [group] if group not in groups else []
        for mode in modes:
            name = mode if mode == "truncate" or not series else f"{mode}, {series}"
            bars.setdefault(name, {})[group] = (metric[mode]["value"], *metric[mode]["ci"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(bars)
    for i, (name, by_group) in enumerate(bars.items()):
        ks = [k for k, group in enumerate(groups) if group in by_group]
        values = [by_group[groups[k]][0] for k in ks]
        errors = [[v - by_group[groups[k]][1] for k, v in zip(ks, values)],
                  [by_group[groups[k]][2] - v for k, v in zip(ks, values)]]
        xs = [k + (i - (len(bars) - 1) / 2) * width for k in ks]
        drawn = ax.bar(xs, values, width, yerr=errors, capsize=3, label=name)
        ax.bar_label(drawn, fmt="%.2f", padding=4, fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("first-token agreement with exact mode")
    ax.set_ylim(0, 0.85)  # room above the bars for a one-row legend
    ax.legend(title="mode (same TTFT FLOPs)", fontsize=8, loc="upper center", ncols=len(bars))
    ax.set_title(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
