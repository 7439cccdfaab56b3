"""Where does a short exact prefill's time go? `prefill_into` (exact mode, the bench's cache) on random-weight shapes
at one prompt length: CUDA-event median, and a profile's top kernels and CPU/CUDA totals.

    python benchmarks/short_prefill_profile.py gemma-3-1b,llama-3.2-1b 1024
"""
import sys, torch
from torch.profiler import profile, ProfilerActivity
from kvpred.shapes import random_kvp_model

n = int(sys.argv[2])
for shape in sys.argv[1].split(","):
    m = random_kvp_model(shape, aux_keep=0.25)
    ids = torch.randint(0, m.base.config.vocab_size, (1, n), device="cuda")
    cache = m.new_cache(1, -(-(n + 32) // 64) * 64)
    run = lambda: m.prefill_into(cache, ids, mode="exact")  # noqa: E731
    with torch.no_grad():
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); run(); b.record(); torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(); torch.cuda.synchronize()
    layers = m.base.config.num_hidden_layers
    print(f"== {shape} N={n}: exact prefill median {sorted(times)[3]:.2f} ms ({layers} layers)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))
