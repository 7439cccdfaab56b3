"""Why the static step's attention is matmuls, not SDPA: one query token per row over a long, masked KV buffer.

SDPA under a boolean mask grows to 0.5-0.65 ms per layer at 32k tokens on an H100 (few (batch, KV head) pairs to
spread over the GPU); two matmuls (scores, then weights x values) stay at ~0.1-0.15 ms, which is mostly launch
overhead that a CUDA graph removes. At 2k tokens SDPA is faster eagerly, but inside the captured step the matmuls
are no slower (benchmarks/results/h100/step_attention). This prints both, per layer, eagerly.

    python benchmarks/step_attention_probe.py --device cuda
"""
import argparse
import math

import torch
import torch.nn.functional as F


def sdpa_masked(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def matmuls(q, k, v, mask, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def time_ms(fn, *args, repeats=50):
    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, per-layer ms (median of 50 after warm-up)")
    print("| shape | B | H_kv x group | T | SDPA masked | matmuls | max abs diff |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, hkv, group, d in [("llama-3.2-1b", 8, 4, 64), ("llama-3.1-8b", 8, 4, 128), ("smollm2-135m", 3, 3, 64)]:
        for b, t in [(1, 2048), (1, 8192), (1, 32768), (8, 2048), (8, 8192)]:
            q = torch.randn(b, hkv, group, d, device=args.device, dtype=dtype)
            k = torch.randn(b, hkv, t, d, device=args.device, dtype=dtype)
            v = torch.randn(b, hkv, t, d, device=args.device, dtype=dtype)
            mask = torch.ones(b, 1, 1, t, dtype=torch.bool, device=args.device)
            mask[..., t - 64:] = False  # the unfilled tail of a static buffer
            scale = 1 / math.sqrt(d)
            diff = (sdpa_masked(q, k, v, mask, scale).float() - matmuls(q, k, v, mask, scale).float()).abs().max()
            print(f"| {name} | {b} | {hkv} x {group} | {t} | {time_ms(sdpa_masked, q, k, v, mask, scale):.3f} | "
                  f"{time_ms(matmuls, q, k, v, mask, scale):.3f} | {diff:.2g} |")


if __name__ == "__main__":
    main()
