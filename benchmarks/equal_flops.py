"""Operating points at equal TTFT FLOPs on long prompts: predicted mode with an exact tail W against truncation.

For each prompt length N and tail W, predicted mode costs exact/r of the exact prefill's matmul FLOPs
(`kvpred.evaluate.flop_ratio`, the count `kvpred bench` uses: auxiliary layers, predictor, the base over the last W
tokens). Truncation is given the same r: the exact base on the last N/r tokens. Each point is one `kvpred eval` of
WikiText first-token agreement and held-out NLL (64 tokens after the N-token prompt).

    python benchmarks/equal_flops.py --out DIR --device cuda --lengths 512,1024,2048 --limit 400   # runs the evals
    python benchmarks/equal_flops.py --out DIR --summary-only                                      # table + plot
    python benchmarks/equal_flops.py --out DIR --ttft-only --device cpu   # wall-clock TTFT of the same points (ttft.json)

With `--ttft-only`, each point's prompt pass (ids to the first token's id on the host, batch 1, random prompts, median
of `--repeats` after one warm-up) is timed for predicted mode with tail W, for truncation to N/r tokens and for the
exact prefill, so the table shows whether equal FLOPs are also equal time.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TAILS = {512: (1, 64, 128), 1024: (1, 128, 256), 2048: (1, 256, 512)}


def points(model, lengths: str):
    """(N, W, r) for every point: prompt length, exact tail and the matmul FLOP reduction with that tail."""
    from kvpred.evaluate import flop_ratio

    for n in map(int, lengths.split(",")):
        for w in TAILS[n]:
            yield n, w, flop_ratio(model, n, w)["matmul_ratio"]


def run(args: argparse.Namespace) -> None:
    from kvpred import KVPredictionModel

    for n, w, r in points(KVPredictionModel.from_pretrained(args.model), args.lengths):
        cmd = [sys.executable, "-m", "kvpred.cli", "eval", "--model", args.model, "--device", args.device,
               "--tasks", "agreement,heldout", "--modes", "exact,predicted,truncate", "--limit", str(args.limit),
               "--batch-size", str(args.batch_size), "--agreement-prompt", str(n), "--heldout-context", str(n),
               "--exact-tail", str(w), "--truncate-ratio", f"{r:.4f}", "--quiet", "--label", f"N{n} W{w}",
               "--out", str(args.out / f"n{n}_w{w}.json"), *args.extra]
        print(f"N={n} W={w}: matmul ratio {r:.2f}", flush=True)
        subprocess.run(cmd, check=True)


def time_points(args: argparse.Namespace) -> None:
    import statistics
    import time

    import torch

    from kvpred import KVPredictionModel

    model = KVPredictionModel.from_pretrained(args.model, device=args.device)
    torch.manual_seed(0)

    def ttft(n: int, mode: str, tail: int = 1) -> float:
        times = []
        for _ in range(args.repeats + 1):
            ids = torch.randint(1000, 40000, (1, n), device=model.device)
            start = time.perf_counter()
            logits, _ = model.prefill(ids, mode=mode, exact_tail=tail)
            logits[:, -1].argmax(-1).item()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    timed, exact = [], {}
    for n, w, r in points(model, args.lengths):
        if n not in exact:
            exact[n] = ttft(n, "exact")
        predicted, truncate = ttft(n, "predicted", w), ttft(max(1, round(n / r)), "exact")
        timed.append({"n": n, "w": w, "r": r, "exact_s": exact[n], "predicted_s": predicted, "truncate_s": truncate})
        print(f"N={n} W={w} r={r:.2f}: exact {exact[n] * 1e3:.0f} ms, predicted {predicted * 1e3:.0f} ms "
              f"({exact[n] / predicted:.2f}x), truncate to {round(n / r)} tokens {truncate * 1e3:.0f} ms "
              f"({exact[n] / truncate:.2f}x)", flush=True)
    (args.out / "ttft.json").write_text(json.dumps(
        {"device": args.device, "dtype": str(model.base.dtype), "batch": 1, "repeats": args.repeats,
         "command": " ".join(sys.argv), "threads": torch.get_num_threads(), "points": timed}, indent=2))


def summarise(out: Path) -> None:
    rows = []
    for path in sorted(out.glob("n*_w*.json")):
        doc = json.loads(path.read_text())
        n, w = (int(x[1:]) for x in path.stem.split("_"))
        metric = lambda task, name, mode: doc["tasks"][task]["metrics"][name][mode]  # noqa: E731
        rows.append({"n": n, "w": w, "r": doc["truncate_ratio"], "items": doc["tasks"]["agreement"]["n"],
                     **{f"{m}_agree": metric("agreement", "first_token", m) for m in ("predicted", "truncate")},
                     **{f"{m}_nll": metric("heldout", "nll", m) for m in ("exact", "predicted", "truncate")},
                     "command": doc["command"]})
    rows.sort(key=lambda row: (row["n"], row["w"]))
    cell = lambda m: f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"  # noqa: E731
    lines = ["# Equal TTFT FLOPs on long prompts: exact tail W vs truncation (shipped default)", "",
             f"`python benchmarks/equal_flops.py --out {out} ...`; one eval per row, e.g. `{rows[0]['command']}`.",
             "r = exact prefill FLOPs / predicted prefill FLOPs with the tail (matmul rule); truncation keeps the last "
             "N/r tokens, the same FLOPs. Agreement: first-token top-1 agreement with the exact base on WikiText "
             "windows; NLL: 64 continuation tokens after the N-token prompt. 95% CIs.", "",
             "| N | W | r | items | agreement, predicted | agreement, truncate | NLL predicted | NLL truncate | NLL exact |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        lines.append(f"| {row['n']} | {row['w']} | {row['r']:.2f} | {row['items']} | {cell(row['predicted_agree'])} | "
                     f"{cell(row['truncate_agree'])} | {row['predicted_nll']['value']:.3f} | "
                     f"{row['truncate_nll']['value']:.3f} | {row['exact_nll']['value']:.3f} |")
    timing = out / "ttft.json"
    if timing.is_file():
        t = json.loads(timing.read_text())
        lines += ["", f"Measured TTFT, same points (`{t['command']}`; {t['device']}, {t['dtype']}, batch 1, "
                      f"{t['threads']} threads, median of {t['repeats']} random prompts):", "",
                  "| N | W | r | exact ms | predicted ms | speedup | truncate ms | speedup |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for p in t["points"]:
            lines.append(f"| {p['n']} | {p['w']} | {p['r']:.2f} | {p['exact_s'] * 1e3:.0f} | "
                         f"{p['predicted_s'] * 1e3:.0f} | {p['exact_s'] / p['predicted_s']:.2f}x | "
                         f"{p['truncate_s'] * 1e3:.0f} | {p['exact_s'] / p['truncate_s']:.2f}x |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, n in enumerate(sorted({row["n"] for row in rows})):
        part = [row for row in rows if row["n"] == n]
        r = [row["r"] for row in part]
        for ax, key in zip(axes, ("agree", "nll")):
            ax.plot(r, [row[f"predicted_{key}"]["value"] for row in part], "o-", color=f"C{i}",
                    label=f"N={n}: predicted, exact tail W")
            ax.plot(r, [row[f"truncate_{key}"]["value"] for row in part], "s:", color=f"C{i}",
                    label=f"N={n}: truncate to N/r")
            for row in part:
                ax.annotate(f"W={row['w']}", (row["r"], row[f"predicted_{key}"]["value"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    axes[0].set_ylabel("first-token agreement with the exact base")
    axes[1].set_ylabel("held-out NLL (64 tokens after the prompt)")
    for ax in axes:
        ax.set_xlabel("TTFT FLOPs reduction r (matmul rule)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M shipped default: equal-FLOPs operating points on WikiText")
    fig.tight_layout()
    fig.savefig(out / "equal_flops.png", dpi=110)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--ttft-only", action="store_true", help="time the points instead of evaluating them")
    p.add_argument("--repeats", type=int, default=5)
    args, args.extra = p.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ttft_only:
        time_points(args)
    elif not args.summary_only:
        run(args)
    summarise(args.out)


if __name__ == "__main__":
    main()
