"""Where KV prediction loses the exact base's first token, and what an exact tail buys against truncation.

Two measurements on WikiText windows, first-token top-1 agreement with the exact base:

* **Exact tail vs truncation at equal cost.** Predicted mode with the base running the last W prompt tokens itself
  (W = 1 is the paper's), against the exact base on only the last k tokens. Each point's TTFT-FLOP reduction is
  `kvpred bench`'s matmul count (attention included), so the two curves compare at equal cost.
* **Which predicted entries hurt.** The predicted cache with one group of base layers' keys and/or values replaced
  by the exact base's: the agreement that comes back is what that group's prediction error costs.

    python benchmarks/error_sources.py --model smollm2-135m --windows 200 --out benchmarks/results/error_sources_cpu_r128
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from kvpred.bench import exact_flops, predicted_flops
from kvpred.model import KVPredictionModel, cache_kwargs
from kvpred.tasks import default_data_dir, text_windows


def first_tokens(model: KVPredictionModel, ids: torch.Tensor, mode: str, tail: int, batch: int) -> torch.Tensor:
    out = [model.prefill(ids[i:i + batch], mode=mode, exact_tail=tail)[0][:, -1].argmax(-1)
           for i in range(0, len(ids), batch)]
    return torch.cat(out)


def tail_vs_truncation(model: KVPredictionModel, ids: torch.Tensor, exact: torch.Tensor, tails: list[int],
                       keeps: list[int], batch: int) -> list[dict]:
    n = ids.shape[1]
    base, aux, pc = model.base.config, model.aux.config, model.predictor.config
    full = exact_flops(base, n)
    rows = []
    for w in tails:
        agree = (first_tokens(model, ids, "predicted", w, batch) == exact).float().mean().item()
        rows.append({"method": "predicted, exact tail", "tokens": w, "agreement": agree,
                     "flop_reduction": full / predicted_flops(base, aux, pc, n, tail=w)})
    for k in keeps:
        agree = (first_tokens(model, ids[:, -k:], "exact", 1, batch) == exact).float().mean().item()
        rows.append({"method": "truncate", "tokens": k, "agreement": agree, "flop_reduction": full / exact_flops(base, k)})
    return rows


def swapped_layers(model: KVPredictionModel, ids: torch.Tensor, exact: torch.Tensor, groups: dict[str, list[int]],
                   batch: int) -> dict[str, dict[str, float]]:
    """Agreement when the given base layers get the exact keys, values or both instead of the predicted ones."""
    hits = {g: {"keys": 0, "values": 0, "both": 0} for g in groups}
    n = ids.shape[1]
    stack = lambda cache, part: torch.stack([getattr(layer, part) for layer in cache.layers])  # noqa: E731
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        _, true = model.prefill(x[:, :-1], mode="exact")
        predicted = model.predicted_cache(x, torch.ones_like(x))  # once per batch; each variant edits a copy
        exact_kv = {name: stack(true, name) for name in ("keys", "values")}
        for group, layers in groups.items():
            for part in ("keys", "values", "both"):
                kv = {name: stack(predicted, name) for name in ("keys", "values")}  # [L, B, H, T, D], fresh
                for name in ("keys", "values"):
                    if part in (name, "both") and layers:
                        kv[name][layers] = exact_kv[name][layers]
                cache = model.write_cache(kv["keys"], kv["values"])
                pos = torch.full((len(x), 1), n - 1)
                logits = model.base(input_ids=x[:, -1:], position_ids=pos, use_cache=True, logits_to_keep=1,
                                    **cache_kwargs(model.base, cache)).logits
                hits[group][part] += (logits[:, -1].argmax(-1) == exact[i:i + batch]).sum().item()
    return {g: {p: v / len(ids) for p, v in parts.items()} for g, parts in hits.items()}


def layer_groups(n_layers: int, size: int) -> dict[str, list[int]]:
    groups = {"none": [], "all": list(range(n_layers))}
    for start in range(0, n_layers, size):
        end = min(start + size, n_layers)
        groups[f"{start}-{end - 1}"] = list(range(start, end))
    return groups


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("predicted, exact tail", "o"), ("truncate", "s")):
        pts = sorted((r["flop_reduction"], r["agreement"], r["tokens"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
        for x, y, t in pts:
            ax.annotate(str(t), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ticks = [1, 1.5, 2, 3, 4, 6, 8, 12, 16]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("TTFT-FLOP reduction over the exact prefill (matmul count)")
    ax.set_ylabel("first-token agreement with the exact base")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(doc: dict) -> str:
    lines = [f"# Where predicted mode loses the first token ({doc['model']}, {doc['device']}, float32)", "",
             f"`{doc['command']}`", "",
             f"{doc['windows']} windows of {doc['prompt_tokens']} tokens of {doc['data']}; first-token top-1 "
             f"agreement with the exact base on the full window. {doc['seconds']:.0f} s.", "",
             "## Exact tail vs truncation at equal TTFT FLOPs", "",
             "| method | tokens the base runs | TTFT-FLOP reduction | agreement |", "|---|--:|--:|--:|"]
    for r in doc["tail_vs_truncation"]:
        lines.append(f"| {r['method']} | {r['tokens']} | {r['flop_reduction']:.2f}x | {r['agreement']:.3f} |")
    lines += ["", "## Agreement with one group of base layers given its exact keys / values / both", "",
              "| base layers | exact keys | exact values | both |", "|---|--:|--:|--:|"]
    for g, parts in doc["swapped_layers"].items():
        lines.append(f"| {g} | {parts['keys']:.3f} | {parts['values']:.3f} | {parts['both']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(default_data_dir() / "wikitext2-test.txt"))
    p.add_argument("--windows", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--tails", default="1,4,8,16,24,32,48,64")
    p.add_argument("--keeps", default="8,16,24,32,40,48,64,96")
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="output stem: STEM.json, STEM.md, STEM.png")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model = KVPredictionModel.from_pretrained(args.model)
    ids = torch.tensor(text_windows(model.tokenizer, args.data, args.prompt_tokens, args.windows))
    exact = first_tokens(model, ids, "exact", 1, args.batch_size)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    curve = tail_vs_truncation(model, ids, exact, ints(args.tails), ints(args.keeps), args.batch_size)
    swaps = swapped_layers(model, ids, exact, layer_groups(model.base.config.num_hidden_layers, args.group_size),
                           args.batch_size)
    doc = {"command": shlex.join(["python", *sys.argv]), "model": args.model, "device": "cpu",
           "data": Path(args.data).name, "windows": len(ids), "prompt_tokens": args.prompt_tokens,
           "seconds": time.time() - start, "tail_vs_truncation": curve, "swapped_layers": swaps}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    plot(curve, out.with_suffix(".png"), f"{args.model}: {len(ids)} WikiText windows of {args.prompt_tokens} tokens")
    print(markdown(doc))


if __name__ == "__main__":
    main()
