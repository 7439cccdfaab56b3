"""Where predicted mode's predictor + cache write spend their time on a CPU: torch.profiler over
`predict_kv_into` (keys only, values deferred, as `kvpred bench ttft` runs it on a CPU) for one prompt, with the
predictor's matmuls in fp32 and in bf16. Prints per-call milliseconds of the top operators.

    python benchmarks/predictor_profile_cpu.py --tokens 2048 > benchmarks/results/predictor_bf16/profile_cpu.txt
"""
import argparse
import shlex
import sys

import torch

from kvpred.model import KVPredictionModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--calls", type=int, default=10)
    args = p.parse_args()
    print("#", shlex.join(["python"] + sys.argv), f"({torch.get_num_threads()} threads)")
    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(args.model)
    ids = torch.randint(0, model.base.config.vocab_size, (1, args.tokens))
    with torch.no_grad():
        key_in, value_in, pos = model._aux_prefix(ids, None, 1)
        cache = model.new_cache(1, args.tokens)
        keys, values = cache.slices(key_in.shape[2])
        for dtype in (torch.float32, torch.bfloat16):
            model.predictor_dtype = dtype
            for _ in range(3):
                model.predict_kv_into(key_in, value_in, pos, keys, values, defer_values=True)
            with torch.profiler.profile() as prof:
                for _ in range(args.calls):
                    model.predict_kv_into(key_in, value_in, pos, keys, values, defer_values=True)
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in ops) / args.calls / 1e3
            print(f"\npredictor matmuls in {dtype}: {total:.1f} ms per call ({args.tokens - 1} predicted tokens)")
            for e in ops[:8]:
                ms = e.self_cpu_time_total / args.calls / 1e3
                print(f"  {e.key:24s} {ms:6.2f} ms  ({e.count // args.calls} calls)")


if __name__ == "__main__":
    main()
