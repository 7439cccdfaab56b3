"""Predictor + cache write on the GPU: eager (as `predict_into` runs them) vs torch.compile of the same work.

Random-weight timing models (kvpred.shapes), bf16, KVP-LP auxiliary keeping 1/4 of the layers. Times, per shape,
the predictor and the write of its output into a preallocated cache (RoPE on keys, layout change on values):
eager = `predictor` + `base_kv_into` (out= kernels); compiled = `predictor` + `base_kv` + two copies into the
cache, under torch.compile, which may fuse the RoPE, transposes and copies into one pass.

    python benchmarks/predictor_write_probe.py
"""
import argparse
import time

import torch

from kvpred.rope import rope_runs
from kvpred.shapes import random_kvp_model


def time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="default", help="torch.compile mode")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, bf16, torch {torch.__version__}, compile mode {args.mode}; median ms")
    print("| shape | source | B | T | eager | compiled | max abs diff |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for shape, source, rank, runs in [("llama-3.2-1b", "kv", None, [(1, 8192), (1, 32000), (8, 8192)]),
                                      ("llama-3.2-1b", "hidden", 256, [(1, 8192), (1, 32000)]),
                                      ("llama-3.1-8b", "kv", None, [(1, 8192), (1, 32000)])]:
        model = random_kvp_model(shape, aux_keep=0.25, source=source, rank=rank)

        def eager(key_in, value_in, pos, key_out, value_out):
            keys, values = model.predictor(key_in, value_in)
            model.base_kv_into(keys, values, rope_runs(model.base, pos, key_out.dtype), key_out, value_out)

        def fused(key_in, value_in, pos, key_out, value_out):
            keys, values = model.base_kv(*model.predictor(key_in, value_in), pos)
            key_out.copy_(keys)
            value_out.copy_(values)

        compiled = torch.compile(fused, mode=None if args.mode == "default" else args.mode, dynamic=False)
        for b, t in runs:
            with torch.no_grad():
                ids = torch.randint(0, model.base.config.vocab_size, (b, t), device="cuda")
                key_in, value_in = model.aux_inputs(ids, None, None)
                pos = torch.arange(t, device="cuda").expand(b, t)
                cache = model.new_cache(b, t)
                ko, vo = cache.slices(t)
                eager(key_in, value_in, pos, ko, vo)
                ref = (ko.clone(), vo.clone())
                compiled(key_in, value_in, pos, ko, vo)
                diff = max((ko - ref[0]).abs().max().item(), (vo - ref[1]).abs().max().item())
                t_eager = time_ms(lambda: eager(key_in, value_in, pos, ko, vo))
                t_comp = time_ms(lambda: compiled(key_in, value_in, pos, ko, vo))
            label = source if rank is None else f"{source}, rank {rank}"
            print(f"| {shape} | {label} | {b} | {t} | {t_eager:.2f} | {t_comp:.2f} | {diff:.3g} |", flush=True)
            del cache, key_in, value_in
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
