"""Does KVPredictionModel.warm_up take cuDNN's start-up off the first long masked prefill? The gemma-3-1b shape
(random weights, bf16, batch 1; sliding layers put a mask on every prefill): warm_up, then generate at new lengths
past kvpred.attention.MIN_ALIGNED, first call and again; with "skip", warm_up without its cuDNN start.

    python benchmarks/cudnn_warm_up_probe.py [skip]   (benchmarks/results/h200/aligned_attention)
"""
import sys, time, torch
from kvpred import model as model_module
from kvpred.shapes import random_kvp_model
from kvpred.testing import byte_tokenizer

if sys.argv[1:] == ["skip"]:
    model_module.warm_up_cudnn = lambda device, dtype: None
m = random_kvp_model("gemma-3-1b", aux_keep=0.25)
m.tokenizer = byte_tokenizer()
start = time.perf_counter()
m.warm_up()
print(f"{sys.argv[1:] or ['with cuDNN start']}: warm_up {time.perf_counter() - start:.1f} s", flush=True)
for mode, n in (("exact", 2100), ("predicted", 2230), ("exact", 4000)):
    ids = torch.randint(0, m.base.config.vocab_size, (1, n), device="cuda")
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        m.generate(ids, mode=mode, max_new_tokens=1)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    print(f"{mode:9s} N={n}: first call {times[0]:7.1f} ms, again {times[1]:7.1f} ms", flush=True)
