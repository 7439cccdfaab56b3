"""A chrome trace of two `generate(max_new_tokens=2)` calls per mode after warm-up, Llama-3.2-1B's shape (random
weights), 1024-token prompts, batch 1: kernels in order, to see what a call runs beyond its captured prompt pass."""
import sys
import time
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, "benchmarks")
from generate_host_profile import FirstToken  # noqa: E402

from kvpred.shapes import random_kvp_model  # noqa: E402

model = random_kvp_model("llama-3.2-1b", aux_keep=0.25, device="cuda")
model.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)
for mode in ("predicted", "exact"):
    for _ in range(6):
        model.generate(torch.randint(100, 100000, (1, 1024), device="cuda"), mode=mode, max_new_tokens=2)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            ids = torch.randint(100, 100000, (1, 1024), device="cuda")
            torch.cuda.synchronize()
            streamer = FirstToken()
            t = time.perf_counter()
            with record_function(f"generate {mode}"):
                model.generate(ids, mode=mode, max_new_tokens=2, streamer=streamer)
            print(mode, f"{1e3 * (streamer.first - t):.2f} ms to the first token")
    prof.export_chrome_trace(f"{sys.argv[1]}/trace_{mode}.json")
