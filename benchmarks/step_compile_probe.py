"""Probe: the base's one-token CUDA-graph step as transformers' eager forward (GraphStep as it is) against the same
forward torch.compile'd (inductor fuses RMSNorm, RoPE, SiLU and the residual adds into fewer kernels) and then
captured in the same CUDA graph. Random-weight timing models; prints median ms per replay, the compile + capture
time and the largest logit difference between the two.

    python benchmarks/step_compile_probe.py --shapes smollm2-135m,llama-3.2-1b,llama-3.1-8b --batch 1,8
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvpred.decoding import GraphStep
from kvpred.shapes import random_kvp_model


class CompiledGraphStep(GraphStep):
    """GraphStep whose captured body calls a torch.compile'd base forward."""

    def __init__(self, model, cache, forward):
        self.forward = forward
        super().__init__(model, cache)

    def _body(self) -> None:
        self.mask.index_fill_(3, self.slot, True)
        logits = self.forward(input_ids=self.ids, position_ids=self.positions, attention_mask=self.mask,
                              use_cache=True, logits_to_keep=1, **self.cache_kw).logits
        token = logits[:, -1].argmax(-1)
        self.ids.copy_(token[:, None])
        self.positions.add_(1)
        self.slot.add_(1)
        self.captured = token, logits


def replay_ms(step, ids, positions, filled: int, repeats: int) -> tuple[float, torch.Tensor]:
    times, first = [], None
    for i in range(repeats):
        step.start(ids, positions, filled)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
        if first is None:
            first = step.logits.float().clone()
    return statistics.median(times[2:]), first


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b,llama-3.1-8b")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--filled", type=int, default=2048)
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--mode", default="default", help="torch.compile mode")
    p.add_argument("--dynamic", choices=("false", "true"), default="false", help="torch.compile's dynamic")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, bf16, torch {torch.__version__}, compile mode {args.mode}, dynamic "
          f"{args.dynamic}, {args.filled} cached tokens, capacity {args.capacity}")
    print("| shape | B | graph eager ms | graph compiled ms | ratio | compile+capture s | max abs logit diff "
          "| same token |")
    print("|---|--:|--:|--:|--:|--:|--:|---|")
    for shape in args.shapes.split(","):
        model = random_kvp_model(shape, aux_keep=0.25)
        model.base.generation_config.cache_implementation = None
        forward = torch.compile(model.base, dynamic=args.dynamic == "true", mode=args.mode)
        for batch in map(int, args.batch.split(",")):
            cache = model.new_cache(batch, args.capacity)
            cache.key_arena.normal_()
            cache.value_arena.normal_()
            cache.set_length(args.filled)
            ids = torch.randint(0, model.base.config.vocab_size, (batch, 1), device="cuda")
            positions = torch.full((batch, 1), args.filled, device="cuda")
            eager = GraphStep(model, cache)
            eager_ms, eager_logits = replay_ms(eager, ids, positions, args.filled, args.repeats)
            t0 = time.perf_counter()
            compiled = CompiledGraphStep(model, cache, forward)
            torch.cuda.synchronize()
            made_s = time.perf_counter() - t0
            compiled_ms, compiled_logits = replay_ms(compiled, ids, positions, args.filled, args.repeats)
            diff = (eager_logits - compiled_logits).abs().max().item()
            same = bool((eager_logits.argmax(-1) == compiled_logits.argmax(-1)).all())
            print(f"| {shape} | {batch} | {eager_ms:.2f} | {compiled_ms:.2f} | {eager_ms / compiled_ms:.2f} | "
                  f"{made_s:.1f} | {diff:.3g} | {same} |", flush=True)
            del eager, compiled, cache
        del model, forward
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
