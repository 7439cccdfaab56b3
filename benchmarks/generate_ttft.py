"""Time to first token and decode speed of `KVPredictionModel.generate`, the path `kvpred generate` and `kvpred serve`
take, with and without each of its device-specific speed-ups, the exact base beside them:

* `--compare loops` (the default): transformers' generate loop, against kvpred.decoding's loop (on CUDA-graph
  steps on a GPU), in both modes;
* `--compare deferred`: predicted values written before the first token, against deferred to after it
  (kvpred.deferred);
* `--compare pipeline`: predicted mode's first step after the whole prediction, against tap by tap behind the
  auxiliary (`KVPredictionModel.pipelined_first_step`, kvpred.pipeline; GPU);
* `--compare prefill-graphs`: each mode's prompt pass run eagerly, against replayed as a CUDA graph
  (`KVPredictionModel.prefill_graphs`, kvpred.prefill_graphs; GPU).

Fresh random prompts, medians over repeats after one warm-up; times are taken when the streamer receives each token
on the host.

    python benchmarks/generate_ttft.py --model smollm2-135m --device cpu --prompt-lens 512,2048 --out FILE.md
    python benchmarks/generate_ttft.py --shape llama-3.2-1b --device cuda --prompt-lens 2048,8192 --batch 1,8
    python benchmarks/generate_ttft.py --shape smollm2-135m --device cuda --compare pipeline --exact-tail 6
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

from kvpred import prefill_graphs
from kvpred.bench import _device_name, variant_name
from kvpred.model import KVPredictionModel
from kvpred.shapes import random_kvp_model

RUNS = {  # label, mode, generate() arguments (those named "model." set the model's attribute for that run)
    "deferred": [("exact", "exact", {}), ("predicted, values first", "predicted", {"defer_values": False}),
                 ("predicted, values deferred", "predicted", {"defer_values": True})],
    "pipeline": [("exact", "exact", {}), ("predicted", "predicted", {"model.pipelined_first_step": False}),
                 ("predicted, pipelined", "predicted", {"model.pipelined_first_step": True})],
    "prefill-graphs": [("exact", "exact", {"model.prefill_graphs": False}),
                       ("exact, graph", "exact", {"model.prefill_graphs": True}),
                       ("predicted", "predicted", {"model.prefill_graphs": False}),
                       ("predicted, graph", "predicted", {"model.prefill_graphs": True})],
    "loops": [("exact, transformers loop", "exact", {"transformers_loop": True}),
              ("exact, kvpred loop", "exact", {}),
              ("predicted, transformers loop", "predicted", {"transformers_loop": True}),
              ("predicted, kvpred loop", "predicted", {})],
}


def timing_model(shape: str, **kwargs) -> KVPredictionModel:
    """A random-weight timing model of `shape` (a KVP-LP auxiliary keeping 1/4 of the layers; `kwargs` go to
    random_kvp_model) with what generate() reads of a tokenizer: random weights come without one."""
    model = random_kvp_model(shape, aux_keep=0.25, **kwargs)
    model.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    return model


class Clock:
    """A streamer that notes when each put arrives: the prompt first, then one per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run(model: KVPredictionModel, ids: torch.Tensor, mode: str, kwargs: dict, new_tokens: int) -> tuple[float, float]:
    """(TTFT ms, decode tokens/s per row after the first token)."""
    clock = Clock()
    attrs = {k.removeprefix("model."): v for k, v in kwargs.items() if k.startswith("model.")}
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("model.")}
    for name, value in attrs.items():
        setattr(model, name, value)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, mode=mode, max_new_tokens=new_tokens, streamer=clock, **kwargs)
    for name in attrs:
        delattr(model, name)  # back to the class's value
    tokens = clock.times[1:]
    decode = (len(tokens) - 1) / (tokens[-1] - tokens[0]) if len(tokens) > 1 else float("nan")
    return (tokens[0] - start) * 1e3, decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint or alias (real weights; default smollm2-135m)")
    p.add_argument("--shape", default=None, help="a random-weight timing model of this public shape instead")
    p.add_argument("--source", default="kv")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-lens", default="512,2048")
    p.add_argument("--batch", default="1")
    p.add_argument("--new-tokens", type=int, default=33, help="tokens per generate call (decode speed: all but one)")
    p.add_argument("--exact-tail", type=int, default=1, help="predicted mode's exact tail (a chat reply opening: 6)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare", choices=sorted(RUNS), default="loops",
                   help="which speed-up to time (default: %(default)s)")
    p.add_argument("--most-tokens", type=int, default=None,
                   help="override kvpred.prefill_graphs.MOST_TOKENS, the largest pass (batch x bucket) a graph serves")
    p.add_argument("--out", default=None, help="markdown file for the table")
    args = p.parse_args()
    if args.most_tokens:
        prefill_graphs.MOST_TOKENS = args.most_tokens
    if args.shape:
        model = timing_model(args.shape, source=args.source, rank=args.rank, device=args.device)
        label = f"{args.shape} (random-weight)"
    else:
        model = KVPredictionModel.from_pretrained(args.model or "smollm2-135m", device=args.device)
        label = args.model or "smollm2-135m"
    runs = RUNS[args.compare]
    lines = [f"# generate(): TTFT and decode speed ({label})", "",
             f"`{shlex.join(['python', *sys.argv])}`", "",
             f"{_device_name(model.device)}, {str(model.base.dtype).removeprefix('torch.')}, torch {torch.__version__};"
             f" {variant_name(model)}; transformers {transformers.__version__}; graphs serve passes of up to "
             f"{prefill_graphs.MOST_TOKENS} tokens; predicted mode's exact tail {args.exact_tail}; medians over "
             f"{args.repeats} fresh random prompts after one warm-up; "
             f"{args.new_tokens} new tokens a call.", "",
             "| batch | prompt | " + " | ".join(f"{name}: TTFT ms / decode tok/s" for name, _, _ in runs) + " |",
             "|--:|--:|" + "--:|" * len(runs)]
    gen = torch.Generator().manual_seed(0)
    for b in map(int, args.batch.split(",")):
        for n in map(int, args.prompt_lens.split(",")):
            got = {name: [] for name, _, _ in runs}
            for r in range(args.repeats + 1):
                for name, mode, kwargs in runs:
                    ids = torch.randint(100, model.base.config.vocab_size, (b, n), generator=gen).to(model.device)
                    tail = {"exact_tail": args.exact_tail} if mode == "predicted" else {}
                    result = run(model, ids, mode, {**kwargs, **tail}, args.new_tokens)
                    if r:
                        got[name].append(result)
            medians = [[statistics.median(column) for column in zip(*got[name])] for name, _, _ in runs]
            cells = [f"{ttft:.1f} / {decode:.1f}" for ttft, decode in medians]
            lines.append(f"| {b} | {n} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
