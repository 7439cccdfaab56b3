"""Adaptive exact tail: the paper's one exact token, and a longer exact tail only where the first token looks unsure.

For each WikiText window of N tokens this runs predicted mode with an exact tail of one token (its first token and
that token's entropy), predicted mode with each fallback tail W, the exact base, and the exact base on only the last m
tokens (truncation) for a grid of m. The policy it evaluates: when the one-token tail's first token has entropy
>= theta, the base also runs the last W prompt tokens over the same predicted cache, and its token is the answer. The
auxiliary is causal, so the predicted keys and values of the first N - W tokens are those the one-token pass already
made; a fallback costs only the base's pass over W tokens. Sweeping theta gives first-token agreement with the exact
base against the average TTFT-FLOP reduction (matmul rule, `kvpred bench`'s count), beside fixed tails and
truncation. The threshold `kvpred calibrate` saved in the model (measured on held-out training text, not on these
windows) is marked.

    python benchmarks/adaptive_tail.py --length 512 --limit 160 --out benchmarks/results/adaptive_tail
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kvpred import KVPredictionModel  # noqa: E402
from kvpred.bench import Dims, attention_flops, exact_flops, predicted_flops  # noqa: E402
from kvpred.evaluate import confidence_interval  # noqa: E402
from kvpred.tasks import text_windows  # noqa: E402


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def base_tail_flops(config, n: int, w: int) -> float:
    """The base's pass over the last w of n prompt tokens, over a cache of the n - w before them (as
    bench.predicted_flops counts the base's part)."""
    b = Dims.of(config)
    return 2.0 * w * b.linear_params() + attention_flops(b, b.layers, w, n - w) + 2.0 * b.hidden * b.vocab


def first_tokens(model, ids: torch.Tensor, tails: list[int], cuts: list[int]) -> dict[str, torch.Tensor]:
    """Per row of ids [B, N]: the first token of every method, and the one-token tail's entropy."""
    logits, _ = model.prefill(ids, mode="predicted", exact_tail=1)
    out = {"entropy": entropy(logits[:, -1]), "w1": logits[:, -1].argmax(-1),
           "exact": model.prefill(ids, mode="exact")[0][:, -1].argmax(-1)}
    for w in tails:
        out[f"w{w}"] = model.prefill(ids, mode="predicted", exact_tail=w)[0][:, -1].argmax(-1)
    for m in cuts:
        out[f"last{m}"] = model.prefill(ids[:, -m:], mode="exact")[0][:, -1].argmax(-1)
    return out


def point(label: str, agree: list[float], cost: float, exact_cost: float, **extra) -> dict:
    mean, lo, hi = confidence_interval(agree, binary=True)
    return {"label": label, "agreement": mean, "ci": [lo, hi], "reduction": exact_cost / cost, **extra}


def curves(items: dict[str, list], model, n: int, tails: list[int], cuts: list[int], theta: float | None) -> dict:
    base, aux, pc = model.base.config, model.aux.config, model.predictor.config
    exact_cost, one = exact_flops(base, n), predicted_flops(base, aux, pc, n, tail=1)
    same = {k: [float(a == e) for a, e in zip(items[k], items["exact"])] for k in items if k not in ("entropy",
                                                                                                      "exact")}
    fixed = [point(f"W={w}", same[f"w{w}"], predicted_flops(base, aux, pc, n, tail=w), exact_cost, tail=w)
             for w in [1] + tails]
    truncate = [point(f"last {m}", same[f"last{m}"], exact_flops(base, m), exact_cost, tokens=m) for m in cuts]
    ranked = sorted(items["entropy"])
    adaptive = {}
    for w in tails:
        extra = base_tail_flops(base, n, w)
        thresholds = [ranked[min(len(ranked) - 1, round(q / 10 * len(ranked)))] for q in range(10)] + [float("inf")]
        marked = [theta] if theta is not None else []
        adaptive[w] = []
        for t in thresholds + marked:
            back = [h >= t for h in items["entropy"]]
            agree = [b_ if f else a for a, b_, f in zip(same["w1"], same[f"w{w}"], back)]
            share = sum(back) / len(back)
            adaptive[w].append(point(f"W=1, else W={w} at entropy >= {t:.2f}", agree, one + share * extra,
                                     exact_cost, threshold=t, fallback_share=share, calibrated=t in marked))
    return {"fixed": fixed, "truncate": truncate, "adaptive": {str(w): p for w, p in adaptive.items()}}


def plot(result: dict, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    fixed, trunc = result["fixed"], result["truncate"]
    ax.plot([p["reduction"] for p in fixed], [p["agreement"] for p in fixed], "o-", color="C0",
            label="predicted, fixed exact tail W")
    for p in fixed:
        ax.annotate(p["label"], (p["reduction"], p["agreement"]), fontsize=7, textcoords="offset points",
                    xytext=(3, -9))
    ax.plot([p["reduction"] for p in trunc], [p["agreement"] for p in trunc], "s:", color="C2",
            label="exact base on the last m tokens (truncation)")
    for i, (w, pts) in enumerate(result["adaptive"].items()):
        swept = [p for p in pts if not p["calibrated"]]
        ax.plot([p["reduction"] for p in swept], [p["agreement"] for p in swept], ".-", color=f"C{3 + i}",
                label=f"adaptive: W=1, else W={w} above an entropy threshold")
        for p in pts:
            if p["calibrated"]:
                ax.plot(p["reduction"], p["agreement"], "*", ms=13, color=f"C{3 + i}")
    ax.axhline(0.75, color="grey", lw=0.6, ls="--")
    ax.axvline(2.5, color="grey", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("average TTFT-FLOP reduction (matmul rule, x)")
    ax.set_ylabel("first-token agreement with the exact base")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict, meta: dict) -> str:
    row = lambda p: (f"| {p['label']} | {p['reduction']:.2f}x | {p['agreement']:.3f} "  # noqa: E731
                     f"[{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] |")
    lines = [f"# Adaptive exact tail ({meta['model']}, {meta['windows']} WikiText windows of {meta['length']} tokens)",
             "", f"`{meta['command']}`", "", f"{meta['device']}, {meta['dtype']}, {meta['seconds']:.0f} s. Calibrated "
             f"entropy threshold (from the model's config): {meta['theta']}.", "",
             "| method | TTFT-FLOP reduction | first-token agreement [95% CI] |", "|---|--:|--:|"]
    lines += [row(p) for p in result["fixed"] + result["truncate"]]
    for w, pts in result["adaptive"].items():
        lines += ["", f"Adaptive, fallback tail W={w} (* the calibrated threshold):", "",
                  "| threshold | fallback share | average TTFT-FLOP reduction | first-token agreement [95% CI] |",
                  "|--:|--:|--:|--:|"]
        lines += [f"| {p['threshold']:.2f}{' *' if p['calibrated'] else ''} | {p['fallback_share']:.2f} | "
                  f"{p['reduction']:.2f}x | {p['agreement']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] |" for p in pts]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/wikitext2-test.txt")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--limit", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tails", default="64,128,171", help="fallback tails W")
    p.add_argument("--cuts", default="32,48,64,96,128,160,192,256", help="truncation lengths m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    start = time.time()
    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(args.model, device=args.device)
    tails, cuts = [int(x) for x in args.tails.split(",")], [int(x) for x in args.cuts.split(",")]
    windows = text_windows(model.tokenizer, args.data, args.length, args.limit)
    items: dict[str, list] = {}
    with torch.no_grad():
        for i in tqdm(range(0, len(windows), args.batch_size), desc="windows", unit="batch"):
            ids = torch.tensor(windows[i:i + args.batch_size], device=model.device)
            for k, v in first_tokens(model, ids, tails, cuts).items():
                items.setdefault(k, []).extend(v.tolist())
    saved = model.config.refine_thresholds or {}
    theta = saved.get("eager_above") if saved.get("signal") == "entropy" else None
    result = curves(items, model, args.length, tails, cuts, theta)
    meta = {"command": shlex.join(["python"] + sys.argv), "model": args.model, "length": args.length,
            "windows": len(windows), "device": args.device, "dtype": str(model.base.dtype), "theta": theta,
            "seconds": time.time() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"adaptive_tail_n{args.length}"
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "result": result, "items": items}, indent=1))
    (args.out / f"{name}.md").write_text(markdown(result, meta))
    plot(result, args.out / f"{name}.png", f"{args.model}: first token with an adaptive exact tail, "
                                           f"{len(windows)} WikiText windows of {args.length} tokens")
    print(markdown(result, meta))


if __name__ == "__main__":
    main()
