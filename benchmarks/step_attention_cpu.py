"""The CPU's eager one-token step with transformers' SDPA against kvpred.attention's grouped one-query call (each KV
head's query heads passed as that head's queries), alternating in one process over the same filled cache.

    python benchmarks/step_attention_cpu.py --tokens 512,1024,2048 --steps 120
"""
import argparse
import shlex
import statistics
import sys
import time

import torch

from kvpred import attention
from kvpred.decoding import EagerStep
from kvpred.model import KVPredictionModel, cache_kwargs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", default="512,1024,2048")
    p.add_argument("--steps", type=int, default=120)
    args = p.parse_args()
    print("#", shlex.join(["python"] + sys.argv), f"({torch.get_num_threads()} threads, {args.model}, fp32, batch 1)")
    model = KVPredictionModel.from_pretrained(args.model)
    config = model.base.config
    for n in map(int, args.tokens.split(",")):
        ids = torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            cache = model.new_cache(1, 2 * n)
            model.base.model(input_ids=ids[:, :-1], **cache_kwargs(model.base.model, cache), use_cache=True)
            step = EagerStep(model, cache)
            times, logits = {"sdpa": [], attention.ATTENTION: []}, {}
            for i in range(args.steps):
                for name in (("sdpa", attention.ATTENTION) if i % 2 else (attention.ATTENTION, "sdpa")):
                    config._attn_implementation = name
                    cache.set_length(n - 1)
                    step.start(ids[:, -1:], torch.tensor([[n - 1]]), n - 1)
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
                    logits[name] = step.logits
            config._attn_implementation = attention.ATTENTION
        ms = {name: statistics.median(t[5:]) * 1e3 for name, t in times.items()}
        diff = (logits["sdpa"] - logits[attention.ATTENTION]).abs().max().item()
        print(f"{n} cached tokens: step median {ms['sdpa']:.2f} ms with transformers' SDPA, "
              f"{ms[attention.ATTENTION]:.2f} ms grouped ({ms['sdpa'] - ms[attention.ATTENTION]:+.2f}); "
              f"max |d logit| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
