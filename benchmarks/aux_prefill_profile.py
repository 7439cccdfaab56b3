"""Why does predicted mode's auxiliary prefill take longer than aux mode's whole TTFT at 32k on gemma-3-1b? Times
the auxiliary's pass five ways on a random-weight shape (CUDA events) and profiles the first two.

    python benchmarks/aux_prefill_profile.py gemma-3-1b 32000   (benchmarks/results/h200/aligned_attention)
"""
import sys, torch
from torch.profiler import profile, ProfilerActivity
from kvpred.shapes import random_kvp_model
from kvpred.model import capture

shape, n = sys.argv[1], int(sys.argv[2])
m = random_kvp_model(shape, aux_keep=0.25)
print(shape, "aux layers", m.config.aux.keep_layers, "layer types", getattr(m.aux.config, "layer_types", None))
ids = torch.randint(0, m.base.config.vocab_size, (1, n), device="cuda")
cache = m.new_cache(1, 1 << (n - 1).bit_length(), mode="aux")


def timed(name, fn, reps=5):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    print(f"{name:60s} {sorted(times)[len(times) // 2]:8.2f} ms")


prefix = ids[:, :-1]
runs = {
    "A predicted: aux_inputs (hooks, stop after last tap, no cache)": lambda: m.aux_inputs(prefix, None, None),
    "B aux mode: prefill_into(BufferCache)": lambda: m.prefill_into(cache, ids, None, mode="aux"),
    "C aux.model(use_cache=False), no hooks": lambda: m.aux.model(input_ids=prefix, use_cache=False),
    "D aux.model(use_cache=True) DynamicCache": lambda: m.aux.model(input_ids=prefix, use_cache=True),
    "E aux.model(use_cache=False) under capture only": lambda: _captured(prefix),
}


def _captured(x):
    with capture(m.aux, m.config.predictor.source):
        m.aux.model(input_ids=x, use_cache=False)


with torch.no_grad():
    for name, fn in runs.items():
        timed(name, fn)
    for name in list(runs)[:2]:  # A and B
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runs[name](); torch.cuda.synchronize()
        print("==", name)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
