"""One-query attention on the CPU: transformers' SDPA against `kvpred.attention.sdpa`, which passes the query heads that
share a KV head as that head's queries.

First a probe: SmolLM2's attention shapes (9 query heads, 3 KV heads, head dim 64), 30 layers' caches of N tokens in
one arena, timed each way in fp32 (where `kvpred.attention.sdpa` is SDPA itself) and bf16, and the largest difference
between the two outputs. Then `kvpred bench ttft` twice in one process, with the folding off (as before it existed:
`ttft_sdpa.*`) and on (`ttft_folded.*`); `--order folded,sdpa` runs them the other way round, `--order ""` only
probes, and the other arguments go to the bench.

    python benchmarks/cpu_attention_compare.py --model smollm2-135m --device cpu --dtype bfloat16 \
        --prompt-lens 512,1024,2048 --batch 1 --repeats 5 --warmup 1 --decode-tokens 32 \
        --out benchmarks/results/cpu_bf16_step
"""
import argparse
import time

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpred import attention, deferred
from kvpred.cli import main

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def _median_ms(fn, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def probe(lengths: list[int]) -> None:
    module = nn.Module().eval()  # what transformers' SDPA reads of an attention layer
    module.num_key_value_groups, module.is_causal = HEADS // KV_HEADS, True
    print("| dtype | cached tokens | SDPA ms / layer | folded ms / layer | max abs difference / max abs output |")
    print("|---|--:|--:|--:|--:|")
    for dtype in (torch.float32, torch.bfloat16):
        for n in lengths:
            shape = (LAYERS, 1, KV_HEADS, n + 64, HEAD_DIM)  # an arena with spare capacity, as BufferCache keeps
            keys, values = torch.randn(shape, dtype=dtype)[..., :n, :], torch.randn(shape, dtype=dtype)[..., :n, :]
            query = torch.randn(1, HEADS, 1, HEAD_DIM, dtype=dtype)
            runs = {name: lambda f=f: [f(module, query, keys[i], values[i], None, scaling=0.125)[0] for i in
                                       range(LAYERS)] for name, f in (("sdpa", sdpa_attention_forward),
                                                                      ("folded", attention.sdpa))}
            pairs = list(zip(runs["sdpa"](), runs["folded"]()))
            diff = max((a.float() - b.float()).abs().max().item() / a.float().abs().max().item() for a, b in pairs)
            ms = {name: _median_ms(run) / LAYERS for name, run in runs.items()}
            print(f"| {str(dtype).removeprefix('torch.')} | {n} | {ms['sdpa']:.3f} | {ms['folded']:.3f} | {diff:.1e} |",
                  flush=True)


def _plain_sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--order", default="sdpa,folded")
    parser.add_argument("--probe-lengths", default="512,1024,2048")
    args, bench_args = parser.parse_known_args()
    torch.manual_seed(0)
    probe([int(n) for n in args.probe_lengths.split(",")])
    folded = attention.sdpa
    for name in filter(None, args.order.split(",")):
        # KVPredictionModel registers `attention.sdpa` when the bench builds the model; deferred calls its own import
        attention.sdpa = deferred.sdpa = folded if name == "folded" else _plain_sdpa
        print(f"===== one-query attention: {name}", flush=True)
        main(["bench", "ttft", *bench_args, "--name", f"ttft_{name}"])
    attention.sdpa = deferred.sdpa = folded
