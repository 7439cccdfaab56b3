"""`kvpred plot`: the paper's Pareto figure from `kvpred eval` results.

x = TTFT FLOPs reduction over the exact base (params rule by default, as the paper), y = accuracy relative to
the base (mode value / exact value, averaged over the chosen tasks' primary metrics where higher is better).
One point per result file and mode; points of the same mode across files (variants) are joined. When a results
file carries measured TTFT speedups (`ttft_speedup`, from `kvpred eval --ttft-speedup`, or taken from a `kvpred bench
ttft` JSON per results file with `--ttft-bench`), a second panel plots accuracy against them.

    kvpred plot --results lp25.json lp50.json --out pareto.png
    kvpred plot --results r128.json --ttft-bench ttft_cpu.json --ttft-length 2048 --out pareto.png
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .models import KVPredError

MODE_STYLE = {"exact": ("black", "*"), "predicted": ("tab:blue", "o"), "aux": ("tab:orange", "s"),
              "truncate": ("tab:green", "^")}
X_RULES = {"param": "param_ratio", "matmul": "matmul_ratio"}
# task kinds that measure task accuracy; agreement (fidelity to the base by construction), held-out loss and
# KV error are left out of the y axis unless named with --tasks
ACCURACY_KINDS = ("lm", "mc", "qa", "humaneval", "retrieval")


def load_results(paths: list[str | Path]) -> list[dict]:
    """`kvpred eval` documents; an entry written LABEL=PATH names its points LABEL instead of the run's label."""
    docs = []
    for entry in map(str, paths):
        label, _, path = entry.partition("=") if "=" in entry and not Path(entry).exists() else ("", "", entry)
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise KVPredError(f"cannot read results {path}: {err}") from err
        if not (isinstance(doc, dict) and isinstance(doc.get("tasks"), dict) and isinstance(doc.get("flops"), dict)):
            raise KVPredError(f"{path} is not a `kvpred eval` results file (no tasks/flops)")
        for name, task in doc["tasks"].items():  # what the figure reads of each task
            if not (isinstance(task, dict) and isinstance(task.get("metrics"), dict) and "primary" in task
                    and isinstance(task.get("higher_is_better"), dict)):
                raise KVPredError(f"{path}: task {name!r} lacks its primary metric, metrics or higher_is_better")
        doc["label"] = label or doc.get("label") or Path(path).stem
        docs.append(doc)
    return docs


def measured_speedups(bench: Path, length: int | None = None) -> dict[str, float]:
    """{"predicted": exact/predicted, "aux": exact/aux} TTFT at batch 1 and `length` tokens (default: the longest)
    from a `kvpred bench ttft` JSON."""
    try:
        rows = [r for r in json.loads(Path(bench).read_text(encoding="utf-8"))["rows"] if r["batch"] == 1]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KVPredError(f"{bench} is not a `kvpred bench ttft` JSON: {err}") from err
    length = length or max((r["prompt_len"] for r in rows), default=0)
    matching = [r for r in rows if r["prompt_len"] == length]
    if not matching:
        raise KVPredError(f"{bench} has no batch-1 row at {length} tokens")
    if len(matching) > 1:  # several auxiliaries (or merged runs) timed at that shape: which one is this model?
        names = ", ".join(f"{r.get('model')} / {r.get('aux')}" for r in matching)
        raise KVPredError(f"{bench} has {len(matching)} batch-1 rows at {length} tokens ({names}): give a benchmark "
                          "of this model alone")
    row = matching[0]
    if not all(isinstance(row.get(k), (int, float)) and row[k] > 0 for k in ("exact_ms", "pred_ms", "aux_ms")):
        raise KVPredError(f"{bench}: the row at {length} tokens lacks positive exact_ms, pred_ms and aux_ms")
    return {"predicted": row["exact_ms"] / row["pred_ms"], "aux": row["exact_ms"] / row["aux_ms"]}


def relative_accuracy(doc: dict, mode: str, tasks: list[str] | None = None) -> float | None:
    """Mean over tasks (default: the accuracy tasks) of value(mode) / value(exact) of each task's primary
    metric, higher-is-better ones only (a loss has no meaningful ratio to accuracy) and where exact scores
    above zero. None when no task qualifies."""
    ratios = []
    for name in averaged_tasks(doc, tasks):
        task = doc["tasks"][name]
        metric = task["primary"]
        by_mode = task["metrics"].get(metric, {})
        if not task["higher_is_better"].get(metric) or mode not in by_mode or "exact" not in by_mode:
            continue
        exact = by_mode["exact"]["value"]
        if exact and exact > 0:
            ratios.append(by_mode[mode]["value"] / exact)
    return sum(ratios) / len(ratios) if ratios else None


def averaged_tasks(doc: dict, tasks: list[str] | None = None) -> list[str]:
    """The tasks of `doc` whose scores the y axis averages: those named, else its accuracy tasks."""
    return [name for name, task in doc["tasks"].items()
            if ((name in tasks) if tasks else (task.get("kind") in ACCURACY_KINDS))]


def pareto_points(docs: list[dict], x_rule: str = "param", tasks: list[str] | None = None) -> list[dict]:
    """[{label, mode, flops_x, ttft_x, y}] for every file and mode with a relative accuracy. Files that average
    different tasks are plotted with a warning: their points do not measure the same thing."""
    missing = sorted(set(tasks or ()) - {name for doc in docs for name in doc["tasks"]})
    if missing:  # a misspelt name would otherwise leave the average silently
        raise KVPredError(f"--tasks names {', '.join(missing)}, which no results file holds")
    averaged = {doc["label"]: sorted(averaged_tasks(doc, tasks)) for doc in docs}
    if len({tuple(names) for names in averaged.values()}) > 1:
        listed = "; ".join(f"{label}: {', '.join(names) or 'none'}" for label, names in averaged.items())
        warnings.warn(f"the results files average different tasks ({listed}): their points are not comparable; "
                      "name the tasks all of them hold with --tasks", stacklevel=2)
    points = []
    for doc in docs:
        speedups = doc.get("ttft_speedup") or {}
        for mode in doc.get("modes", MODE_STYLE):
            y = relative_accuracy(doc, mode, tasks)
            if y is None:
                continue
            # the matmul rule counts what predicted mode runs; aux costs the params rule by construction, and
            # truncate the ratio it kept the last 1/r of each prompt by (the params rule unless --truncate-ratio)
            rule = X_RULES[x_rule] if mode == "predicted" else "param_ratio"
            ratio = doc["flops"].get(rule)
            if mode == "truncate" and isinstance(doc.get("truncate_ratio"), (int, float)):
                ratio = doc["truncate_ratio"]
            if not isinstance(ratio, (int, float)):
                raise KVPredError(f"results {doc['label']!r} have no flops {rule} for the x axis")
            points.append({"label": doc["label"], "mode": mode, "flops_x": 1.0 if mode == "exact" else ratio,
                           "ttft_x": 1.0 if mode == "exact" else speedups.get(mode), "y": y})
    return points


def pareto_front(points: list[dict], key: str) -> list[dict]:
    """The points that no other point beats on both axes (a larger reduction and a higher accuracy), by reduction."""
    def beaten(p: dict) -> bool:
        return any(q[key] >= p[key] and q["y"] >= p["y"] and (q[key] > p[key] or q["y"] > p["y"]) for q in points)

    return sorted((p for p in points if not beaten(p)), key=lambda p: p[key])


def merged_labels(points: list[dict], key: str, span: tuple[float, float], near: float = 0.03
                  ) -> list[tuple[float, float, str]]:
    """(x, y, "a, b") per group of points closer than `near` of the axes' span (x, y): labels that would print over
    each other become one."""
    groups: list[list[dict]] = []
    for p in sorted(points, key=lambda p: (p[key], p["y"])):
        for group in groups:
            if abs(group[0][key] - p[key]) <= near * span[0] and abs(group[0]["y"] - p["y"]) <= near * span[1]:
                group.append(p)
                break
        else:
            groups.append([p])
    return [(g[0][key], g[0]["y"], ", ".join(dict.fromkeys(p["label"] for p in g))) for g in groups]


def plot(docs: list[dict], out: Path, x_rule: str = "param", tasks: list[str] | None = None,
         title: str | None = None) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = pareto_points(docs, x_rule, tasks)
    if not points:
        raise KVPredError("no task with a higher-is-better primary metric and an exact-mode value to plot; "
                          "evaluate accuracy tasks (lambada, arc_easy, piqa, triviaqa, ...) in exact mode")
    panels = [("flops_x", f"TTFT FLOPs reduction ({x_rule} rule)")]
    if any(p["ttft_x"] is not None and p["mode"] != "exact" for p in points):
        panels.append(("ttft_x", "measured TTFT speedup"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, xlabel) in zip(axes[0], panels):
        shown = [p for p in points if p[key] is not None]
        xs, ys = [p[key] for p in shown], [p["y"] for p in shown]
        span = (max(xs) - min(xs) or 1.0, max(ys) - min(ys) or 1.0)
        for mode, (colour, marker) in MODE_STYLE.items():
            mine = [p for p in shown if p["mode"] == mode]
            if not mine:
                continue
            ax.plot([p[key] for p in mine], [p["y"] for p in mine], marker=marker, color=colour, label=mode,
                    linestyle="none", markersize=9 if mode == "exact" else 6)
            if mode == "exact":
                continue
            front = pareto_front(mine, key)
            ax.plot([p[key] for p in front], [p["y"] for p in front], color=colour, linewidth=1)
            for x, y, text in merged_labels(mine, key, span):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
        ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy relative to the base")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="lines: Pareto fronts", title_fontsize=7)
    fig.suptitle(title or "KV prediction: accuracy vs TTFT reduction"
                 + (f" ({', '.join(tasks)})" if tasks else " (mean over accuracy tasks)"))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return points


def register(subparsers) -> None:
    from .cli import command_help

    p = subparsers.add_parser("plot", help=command_help("plot"),
                              description="One point per results file and mode: x = TTFT FLOPs reduction, y = "
                                          "accuracy relative to the exact base; a second panel against measured "
                                          "TTFT speedup when the results carry one.")
    p.add_argument("--results", nargs="+", required=True,
                   help="`kvpred eval` JSON files; LABEL=PATH names a file's points LABEL")
    p.add_argument("--out", type=Path, default=Path("pareto.png"), help="PNG to write")
    p.add_argument("--x", choices=sorted(X_RULES), default="param",
                   help="FLOPs rule for the x axis (param: the paper's params(base)/params(aux))")
    p.add_argument("--tasks", default=None, help="comma-separated tasks to average (default: all accuracy tasks)")
    p.add_argument("--title", default=None, help="figure title (default: none)")
    p.add_argument("--ttft-bench", nargs="+", type=Path, default=None,
                   help="one `kvpred bench ttft` JSON per results file (same order): its measured batch-1 speedups "
                        "of predicted and aux mode feed the second panel")
    p.add_argument("--ttft-length", type=int, default=None, help="prompt length of those speedups (default: longest)")
    p.set_defaults(func=_plot_cli)


def _plot_cli(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() not in (".png", ".svg", ".pdf"):  # matplotlib would add .png, or refuse, otherwise
        raise KVPredError(f"--out {args.out}: name a .png (or .svg, .pdf) file")
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    docs = load_results(args.results)
    if args.ttft_bench:
        if len(args.ttft_bench) != len(docs):
            raise KVPredError(f"--ttft-bench needs one file per results file: {len(args.ttft_bench)} for {len(docs)}")
        for doc, bench in zip(docs, args.ttft_bench):
            doc["ttft_speedup"] = measured_speedups(bench, args.ttft_length)
    points = plot(docs, args.out, args.x, tasks, args.title)
    if all(p["mode"] == "exact" for p in points):
        print("note: only exact mode has results here, so the figure has nothing to compare with it "
              "(evaluate --modes exact,aux,predicted,truncate)", file=sys.stderr)
    for p in points:
        ttft = "" if p["ttft_x"] is None else f"  ttft x{p['ttft_x']:.2f}"
        print(f"{p['label']:>24} {p['mode']:>9}  flops x{p['flops_x']:.2f}{ttft}  relative accuracy {p['y']:.3f}")
    print(f"wrote {args.out}")
    return 0
