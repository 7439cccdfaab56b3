"""Probe: would compiling the prompt passes pay? Each mode's captured prompt pass (kvpred.prefill_graphs) on a
random-weight timing model at batch 1, with the compiled step (`compile_step`), and with torch.compile'd modules
(dynamic shapes) in both models, eager otherwise:

* `none`: as `bench ttft --compile-step auto` runs today;
* `norms-mlps`: every RMSNorm and MLP module's forward compiled (fuses the norm's casts, power, mean and product, and
  SiLU with its product);
* `layers`: every decoder layer's forward compiled (also RoPE and the residual adds).

Prints median replay ms per mode and length, the speedup and efficiency against the full FLOP ratio (as `bench ttft`
counts it), and the largest logit difference from the `none` run's. Why: on an H200 the eager layers spent almost as
long in elementwise kernels as in their matmuls (benchmarks/results/h200/capture_flash).

    python benchmarks/compiled_prefill_probe.py --shape llama-3.2-1b --tokens 2048,4096
"""
from __future__ import annotations

import argparse
import time

import torch

from kvpred.bench import flop_ratio_full
from kvpred.prefill_graphs import PrefillGraph, bucket
from kvpred.shapes import random_kvp_model
from predicted_pass_profile import replay_ms  # benchmarks/, the script's folder

MODES = ("exact", "aux", "predicted")


def compile_modules(model, which: str) -> None:
    for net in (model.base, model.aux):
        for module in net.modules():
            name = type(module).__name__
            wanted = (name.endswith("RMSNorm") or name.endswith("MLP")) if which == "norms-mlps" else \
                name.endswith("DecoderLayer")
            if wanted:
                module.forward = torch.compile(module.forward, dynamic=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--tokens", default="2048,4096")
    p.add_argument("--variants", default="none,norms-mlps,layers")
    args = p.parse_args()
    lengths = [int(n) for n in args.tokens.split(",")]
    torch._dynamo.config.cache_size_limit = 256
    print(f"{torch.cuda.get_device_name()}, bf16, torch {torch.__version__}, {args.shape} (random weights), batch 1; "
          "median ms a replay")
    print("| variant | N | exact | aux alone | predicted | speedup | efficiency (full) | made s | max logit diff |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    reference = {}
    for variant in args.variants.split(","):
        model = random_kvp_model(args.shape, aux_keep=0.25)
        model.compile_step()
        if variant != "none":
            compile_modules(model, variant)
        for n in lengths:
            ids = torch.randint(0, model.base.config.vocab_size, (1, n), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(n))
            t0 = time.perf_counter()
            graphs = {}
            for mode in MODES:
                try:
                    graphs[mode] = PrefillGraph(model, model.new_cache(1, bucket(n) + 64, mode), mode, 1, bucket(n))
                except Exception as error:  # noqa: BLE001 - a probe: say what failed and go on
                    print(f"{variant}, {mode}, {n}: {type(error).__name__}: {str(error)[:300]}")
            made = time.perf_counter() - t0
            ms = {mode: replay_ms(graph, ids) for mode, graph in graphs.items()}
            cells = " | ".join(f"{ms[mode]:.2f}" if mode in ms else "failed" for mode in MODES)
            if "predicted" in graphs and "exact" in graphs:
                logits = graphs["predicted"].logits.float().clone()
                diff = (logits - reference[n]).abs().max().item() if n in reference else 0.0
                reference.setdefault(n, logits)
                ratio = flop_ratio_full(model.base.config, model.aux.config, model.predictor.config, n)
                speedup = ms["exact"] / ms["predicted"]
                tail = f"{speedup:.2f} | {speedup / ratio:.2f} | {made:.0f} | {diff:.3g}"
            else:
                tail = f"- | - | {made:.0f} | -"
            print(f"| {variant} | {n} | {cells} | {tail} |", flush=True)
            del graphs
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
