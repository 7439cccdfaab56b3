"""Progressive refinement and adaptive fallback (issue 7): quality vs TTFT for exact tails W and refinement policies.

    python benchmarks/refine_eval.py --model smollm2-135m --device cpu --prompts 10 --prompt-tokens 256 \
        --new-tokens 128 --tails 1,4,16,64 --out benchmarks/results/refine_cpu_smollm2

For each exact tail W and policy (off = plain predicted mode, eager, lazy), greedy decoding of --new-tokens tokens
for --prompts windows of held-out text (WikiText-2 test by default), batched, compared with the exact base:
* per_position / prefix: greedy agreement with the exact base's own output (kvpred eval's "agreement" metrics);
* teacher_forced: fraction of generated tokens equal to the exact base's argmax given the same prefix
  (per-step fidelity, free of compounding: after the switch to an exact cache it is 1 by construction);
* exact_from (token index of the switch), decode s/token before the switch (while refining) vs after it and vs
  plain predicted decoding (policy off);
* TTFT at batch 1 (median over --ttft-prompts prompts after a warm-up): `generate(max_new_tokens=1)` in exact and
  predicted mode, generate_refined (eager; its first token is predicted mode's, on the same pooled cache and step)
  and refine="auto" (adds the confidence signal, and runs the tail eagerly);
* the adaptive-fallback trade-off: for thresholds over each confidence signal, fraction of requests refined vs
  mean per_position agreement (from the per-request off/eager results).
Writes <out>.json (everything, with the command), <out>.md (tables) and <out>.png (quality vs TTFT).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kvpred.cli import add_model_arguments, load_model
from kvpred.decoding import eos_token_ids, synchronize
from kvpred.refine import (confidence, generate_refined, prefix_agreement, token_agreement,
                           tradeoff_curve)
from kvpred.tasks import default_data_dir, text_windows


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, new: torch.Tensor, eos: set[int]) -> list[float]:
    """Per row: the fraction of generated tokens (through the first eos) equal to the exact base's argmax given
    the prompt and the tokens before them. One row at a time: [new, vocab] logits only."""
    out = []
    for row in range(ids.shape[0]):
        tokens = new[row].tolist()
        n = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        seq = torch.cat([ids[row], new[row, :n]])[None]
        logits = model.base(input_ids=seq[:, :-1], logits_to_keep=n).logits[0]  # [n, V]
        out.append((logits.argmax(-1) == new[row, :n]).double().mean().item())
    return out


def time_ttft(model, prompts: torch.Tensor, tail: int, device: torch.device) -> dict[str, float]:
    """Median seconds to the first token at batch 1, after a warm-up of a few tokens on the first prompt: a server's
    steady state, whose pooled cache and CUDA-graph step for this shape exist (a shape's graph is captured after
    its first request's first token, so a one-token warm-up would leave every timed first token eager)."""
    warm = {"max_new_tokens": 4, "exact_tail": tail}
    for mode in ("exact", "predicted"):
        model.generate(prompts[:1], mode=mode, **warm)
    generate_refined(model, prompts[:1], **warm)
    generate_refined(model, prompts[:1], refine="auto", **warm)
    timings: dict[str, list[float]] = {"exact": [], "predicted": [], "refined": [], "auto": []}
    for prompt in prompts:
        row = prompt[None]
        for mode in ("exact", "predicted"):  # generate's own path: pooled cache, CUDA-graph step on a GPU
            synchronize(device)
            start = time.perf_counter()
            model.generate(row, mode=mode, exact_tail=tail, max_new_tokens=1)[:, -1].tolist()  # on the host
            timings[mode].append(time.perf_counter() - start)
        timings["refined"].append(generate_refined(model, row, exact_tail=tail, max_new_tokens=1)[1]["ttft_s"])
        timings["auto"].append(generate_refined(model, row, exact_tail=tail, max_new_tokens=1,
                                                refine="auto")[1]["ttft_s"])
    return {k: statistics.median(v) for k, v in timings.items()}


def run_config(model, ids, exact_new, tail: int, policy: str, args, eos: set[int], pad: int) -> dict:
    start = time.perf_counter()
    out, info = generate_refined(model, ids, exact_tail=tail, max_new_tokens=args.new_tokens, refine=policy,
                                 chunk_size=args.chunk_size)
    wall = time.perf_counter() - start
    new = out[:, ids.shape[1]:]
    return {"tail": tail, "policy": policy, "exact_from": info["exact_from"],
            "per_position": token_agreement(new, exact_new, pad).tolist(),
            "prefix": prefix_agreement(new, exact_new, pad).tolist(),
            "teacher_forced": teacher_forced(model, ids, new, eos),
            "decode_s_before_exact": info["decode_s_before_exact"],
            "decode_s_after_exact": info["decode_s_after_exact"],
            "decode_s_mean": mean(info["step_s"]), "refined_per_step": info["refined_per_step"],
            "batch_ttft_s": info["ttft_s"], "wall_s": wall}


def markdown(doc: dict) -> str:
    s = doc["setup"]
    lines = [f"# Refinement: quality vs TTFT ({s['model']}, {s['device']}, {s['dtype']})", "",
             f"`{doc['command']}`", "",
             f"{s['prompts']} prompts x {s['prompt_tokens']} tokens ({s['data']}), {s['new_tokens']} greedy new "
             f"tokens, generation batch {s['prompts']}, refinement chunk {s['chunk_size']} (lazy: a quarter). "
             f"TTFT: batch 1, median of {s['ttft_prompts']} prompts. Device: {s['device_name']}.", "",
             *([f"Note: {s['note']}", ""] if s.get("note") else []),
             "| W | policy | per-position agr. | prefix agr. | teacher-forced | exact from token | "
             "decode ms/token: while refining / after / plain predicted | TTFT ms (batch 1) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        plain = next((x["decode_s_mean"] for x in doc["runs"] if x["tail"] == r["tail"] and x["policy"] == "off"),
                     None)
        ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"
        ttft = doc["ttft"][str(r["tail"])]["predicted" if r["policy"] == "off" else "refined"]
        lines.append(f"| {r['tail']} | {r['policy']} | {mean(r['per_position']):.3f} | {mean(r['prefix']):.3f} | "
                     f"{mean(r['teacher_forced']):.3f} | {r['exact_from'] if r['exact_from'] is not None else '-'} | "
                     f"{ms(r['decode_s_before_exact']) if r['policy'] != 'off' else '-'} / "
                     f"{ms(r['decode_s_after_exact'])} / {ms(plain)} | {ttft * 1e3:.1f} |")
    lines += ["", "| W | TTFT ms exact | predicted | generate_refined | auto (with signal) |", "|---|---|---|---|---|"]
    for tail, t in doc["ttft"].items():
        lines.append(f"| {tail} | {t['exact'] * 1e3:.1f} | {t['predicted'] * 1e3:.1f} | {t['refined'] * 1e3:.1f} "
                     f"| {t['auto'] * 1e3:.1f} |")
    lines += ["", "Adaptive fallback: refine (eager) the requests whose signal exceeds the threshold, trust the "
              "prediction for the others:", "",
              "| W | signal | threshold | fraction refined | per-position agr. | teacher-forced |",
              "|---|---|---|---|---|---|"]
    for tail, curves in doc["tradeoff"].items():
        for name, rows in curves.items():
            for row in rows:
                lines.append(f"| {tail} | {name} | {row['threshold']:.3f} | {row['fraction_refined']:.2f} | "
                             f"{row['agreement']:.3f} | {row['teacher_forced']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Two panels over batch-1 TTFT: greedy agreement with the exact base, and teacher-forced agreement."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["setup"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    styles = {"off": ("o", "predicted (no refinement)"), "eager": ("s", "refine eager"), "lazy": ("^", "refine lazy")}
    exact_ttft = statistics.median(t["exact"] for t in doc["ttft"].values()) * 1e3
    panels = (("per_position", f"greedy agreement with exact base ({s['new_tokens']} tokens)"),
              ("teacher_forced", "teacher-forced agreement (exact argmax, same prefix)"))
    for ax, (metric, ylabel) in zip(axes, panels):
        for policy, (marker, label) in styles.items():
            runs = [r for r in doc["runs"] if r["policy"] == policy]
            if not runs:
                continue
            xs = [doc["ttft"][str(r["tail"])]["predicted" if policy == "off" else "refined"] * 1e3 for r in runs]
            ys = [mean(r[metric]) for r in runs]
            ax.plot(xs, ys, marker=marker, linestyle="-", label=label)
            for x, y, r in zip(xs, ys, runs):
                ax.annotate(f"W={r['tail']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.plot([exact_ttft], [1.0], marker="*", markersize=12, linestyle="", color="k", label="exact base")
        ax.set_xlabel("TTFT, ms (batch 1)")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{s['model']} on {s['device_name']}, {s['dtype']}, prompt {s['prompt_tokens']}, "
                 f"{s['prompts']} prompts, refinement chunk {s['chunk_size']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tradeoffs(doc: dict) -> dict:
    """Per W and signal: for thresholds at every observed signal value, the fraction of requests refined (eager)
    and the mean agreement (per-position and teacher-forced) when the others stay unrefined (off)."""
    result = {}
    for tail, signals in doc["signals"].items():
        runs = {r["policy"]: r for r in doc["runs"] if str(r["tail"]) == tail}
        if "off" not in runs or "eager" not in runs:
            continue
        result[tail] = {}
        for name, values in signals.items():
            v = sorted(set(values))
            thresholds = [v[0] - 1e-6] + v  # from refining every request to refining none
            rows = tradeoff_curve(values, runs["off"]["per_position"], runs["eager"]["per_position"], thresholds)
            forced = tradeoff_curve(values, runs["off"]["teacher_forced"], runs["eager"]["teacher_forced"],
                                    thresholds)
            result[tail][name] = [{**row, "teacher_forced": f["agreement"]} for row, f in zip(rows, forced)]
    return result


def write_outputs(doc: dict, out: str) -> None:
    doc["tradeoff"] = tradeoffs(doc)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(doc, indent=1))
    Path(f"{out}.md").write_text(markdown(doc))
    plot(doc, Path(f"{out}.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", default=str(default_data_dir() / "wikitext2-test.txt"),
                        help="text file the prompt windows come from")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tails", default="1,4,16,64", help="exact tails W, comma-separated")
    parser.add_argument("--policies", default="off,eager,lazy")
    parser.add_argument("--chunk-size", type=int, default=64, help="columns refined per decode step (eager)")
    parser.add_argument("--ttft-prompts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results/refine_cpu_smollm2", help="output path prefix")
    parser.add_argument("--note", default="", help="a remark stored with the results (e.g. machine load)")
    parser.add_argument("--replot", action="store_true", help="only rewrite <out>.md and <out>.png from <out>.json")
    parser.add_argument("--eager-chunks", action="store_true",
                        help="refine with eager forwards even on a GPU (no GraphChunk), to compare against")
    args = parser.parse_args(argv)
    if args.replot:
        write_outputs(json.loads(Path(f"{args.out}.json").read_text()), args.out)
        return 0
    tails = [int(t) for t in args.tails.split(",")]
    policies = args.policies.split(",")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eager_chunks:
        from kvpred.decoding import Pooled
        Pooled.run_chunk = lambda *args, **kwargs: False
    model = load_model(args)
    device = model.device
    windows = text_windows(model.tokenizer, args.data, args.prompt_tokens, args.prompts)
    ids = torch.tensor(windows, device=device)  # [P, T]: equal lengths, no padding
    eos = set(eos_token_ids(model).tolist())
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else min(eos)
    t0 = time.perf_counter()
    exact_new = model.generate(ids, mode="exact", max_new_tokens=args.new_tokens)[:, ids.shape[1]:]
    print(f"exact reference: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    for policy in policies:  # warm-up, untimed: the batch's pooled cache and graph, the refiner's kernels
        generate_refined(model, ids, exact_tail=tails[0], max_new_tokens=8, refine=policy, chunk_size=args.chunk_size)
    runs, ttft, signals_by_tail = [], {}, {}
    for tail in tails:
        for policy in policies:
            run = run_config(model, ids, exact_new, tail, policy, args, eos, pad)
            runs.append(run)
            print(f"W={tail} {policy}: per_position {mean(run['per_position']):.3f} teacher_forced "
                  f"{mean(run['teacher_forced']):.3f} exact_from {run['exact_from']} ({run['wall_s']:.1f} s)",
                  file=sys.stderr)
        signals_by_tail[str(tail)] = {k: v.tolist() for k, v in confidence(model, ids, None, tail).items()}
        ttft[str(tail)] = time_ttft(model, ids[:args.ttft_prompts], tail, device)
        print(f"W={tail} TTFT ms: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in ttft[str(tail)].items()),
              file=sys.stderr)

    threads = f"CPU, {torch.get_num_threads()} thread(s)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    doc = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
           "setup": {"model": args.model, "device": str(device), "device_name": device_name,
                     "dtype": str(model.base.dtype).replace("torch.", ""), "prompts": len(windows),
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "data": args.data,
                     "chunk_size": args.chunk_size, "ttft_prompts": args.ttft_prompts, "note": args.note},
           "runs": runs, "ttft": ttft, "signals": signals_by_tail}
    write_outputs(doc, args.out)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
