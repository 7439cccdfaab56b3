"""Quality against predictor cost for the factorised predictor (PNG + markdown table).

Quality from `kvpred eval` JSONs (one per variant), cost from the variant's predictor multiply-adds per token and the
CPU time-to-first-token speedup measured by `kvpred bench ttft` on a model of the same shapes (timing does not
depend on the weights).

    python benchmarks/rank_tradeoff.py --out benchmarks/results/h100/round2/rank_tradeoff \\
        --variant "full rank=benchmarks/results/h100/round2/full.json=benchmarks/results/ttft_cpu_quiet_smollm2_k4.json" \\
        --variant "rank 128=...r128.json=...ttft.json" ...
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = (("heldout", "nll", "WikiText held-out NLL"), ("agreement", "first_token", "first-token agreement"),
         ("lambada", "nll", "LAMBADA NLL"), ("arc_easy", "acc", "ARC-Easy acc"), ("piqa", "acc", "PIQA acc"))
LENGTH = 2048


def row(label: str, eval_json: Path, ttft_json: Path) -> dict:
    doc = json.loads(eval_json.read_text())
    ttft = next(r for r in json.loads(ttft_json.read_text())["rows"] if r["prompt_len"] == LENGTH)
    out = {"label": label, "predictor_params": doc["flops"]["predictor_params"], "speedup": ttft["speedup"],
           "pw_pct": ttft["predictor_write_pct"]}
    for task, metric, _ in TASKS:
        cell = doc["tasks"][task]["metrics"][metric]
        out[f"{task}.{metric}"] = {m: cell[m]["value"] for m in ("exact", "aux", "predicted", "truncate")}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", action="append", required=True, help="label=eval.json=ttft.json")
    p.add_argument("--out", type=Path, required=True, help="path stem for .png and .md")
    args = p.parse_args()
    rows = [row(label, Path(e), Path(t)) for label, e, t in (v.split("=") for v in args.variant)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (task, metric, name) in zip(axes, TASKS[:2]):
        key = f"{task}.{metric}"
        ax.plot([r["speedup"] for r in rows], [r[key]["predicted"] for r in rows], marker="o", label="predicted")
        for r in rows:
            ax.annotate(r["label"], (r["speedup"], r[key]["predicted"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        for mode, style in (("exact", "--"), ("truncate", ":")):
            ax.axhline(rows[0][key][mode], color="k", ls=style, lw=1, label=f"{mode} (same for all)")
        ax.set(xlabel=f"measured TTFT speedup over exact, CPU fp32, batch 1, {LENGTH} tokens", ylabel=name)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, 4-layer auxiliary: predictor rank vs quality (H100 eval, 1000 items) and CPU speed")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    head = "| variant | predictor params | CPU TTFT speedup @2048 | predictor+write % | " + " | ".join(
        name for _, _, name in TASKS) + " |"
    lines = [head, "|" + "---|" * (4 + len(TASKS))]
    for r in rows:
        lines.append(f"| {r['label']} | {r['predictor_params'] / 1e6:.2f}M | {r['speedup']:.2f} | {r['pw_pct']:.1f} | "
                     + " | ".join(f"{r[f'{t}.{m}']['predicted']:.3f}" for t, m, _ in TASKS) + " |")
    ref = rows[0]
    lines.append("| (exact base / truncate) | | | | " + " | ".join(
        f"{ref[f'{t}.{m}']['exact']:.3f} / {ref[f'{t}.{m}']['truncate']:.3f}" for t, m, _ in TASKS) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
