"""Where the first request at a new prompt length spends its extra time: after `warm_up`, torch.profiler over
predicted-mode `generate` calls (one new token each) at prompt lengths not seen before, and over calls at lengths seen
before. Prints the operators whose host (CPU) or device time differs most, per call.

    python benchmarks/length_cost_profile.py --shape smollm2-135m --device cuda
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from types import SimpleNamespace

import torch

from kvpred.shapes import random_kvp_model


def profile(model, lengths: list[int], gen: torch.Generator) -> tuple[Counter, Counter, float]:
    """Per-call host and device microseconds by operator, and the wall milliseconds per call."""
    ids = [torch.randint(100, model.base.config.vocab_size, (1, n), generator=gen).to(model.device) for n in lengths]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for x in ids:
            model.generate(x, max_new_tokens=1)
        end.record()
        torch.cuda.synchronize()
    host, device = Counter(), Counter()
    for e in prof.key_averages():
        host[e.key] += e.self_cpu_time_total / len(ids)
        device[e.key] += e.self_device_time_total / len(ids)
    return host, device, start.elapsed_time(end) / len(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--calls", type=int, default=8)
    args = p.parse_args()
    print("#", shlex.join(["python", *sys.argv]), torch.cuda.get_device_name(), "torch", torch.__version__)
    model = random_kvp_model(args.shape, aux_keep=0.25, device=args.device)
    model.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    model.warm_up()
    gen = torch.Generator().manual_seed(0)
    seen = list(range(150, 150 + args.calls))
    for n in seen:  # these lengths are then seen before
        model.generate(torch.randint(100, 1000, (1, n)).to(model.device), max_new_tokens=1)
    new_host, new_dev, new_ms = profile(model, list(range(180, 180 + args.calls)), gen)
    old_host, old_dev, old_ms = profile(model, seen, gen)
    print(f"per call: new length {new_ms:.1f} ms, seen length {old_ms:.1f} ms (wall, CUDA events)")
    for name, new, old in (("host", new_host, old_host), ("device", new_dev, old_dev)):
        print(f"\n{name} time per call, us: new length / seen length (largest differences)")
        diff = sorted(set(new) | set(old), key=lambda k: -(new[k] - old[k]))
        for key in diff[:15]:
            print(f"  {key[:60]:60s} {new[key]:9.0f} {old[key]:9.0f}")
        print(f"  {'total':60s} {sum(new.values()):9.0f} {sum(old.values()):9.0f}")


if __name__ == "__main__":
    main()
