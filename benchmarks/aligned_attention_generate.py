"""generate() on a random-weight shape (bf16, batch 1): time to the first token at new prompt lengths, kvpred's
long masked prefills padded on cuDNN ("aligned", the default) against SDPA as before ("before": MIN_ALIGNED out of
reach), one process, alternating per length, first call and again.

    python benchmarks/aligned_attention_generate.py gemma-3-1b 2100,8000,31000
    (benchmarks/results/h200/aligned_attention)
"""
import sys, time, torch
from kvpred import attention
from kvpred.shapes import random_kvp_model
from kvpred.testing import byte_tokenizer

shape, lengths = sys.argv[1], list(map(int, sys.argv[2].split(",")))
m = random_kvp_model(shape, aux_keep=0.25)
m.tokenizer = byte_tokenizer()
print(shape, torch.cuda.get_device_name(), torch.__version__, flush=True)
for mode in ("exact", "predicted"):
    for n in lengths:
        ids = torch.randint(0, m.base.config.vocab_size, (1, n), device="cuda")
        row = []
        for name, smallest in (("before", 10**9), ("aligned", attention.MIN_ALIGNED)):
            attention.MIN_ALIGNED = smallest
            times, tokens = [], []
            for _ in range(2):
                torch.cuda.synchronize()
                start = time.perf_counter()
                tokens.append(m.generate(ids, mode=mode, max_new_tokens=1)[0, -1].item())
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            row.append(f"{name} first {times[0]:7.1f} / again {times[1]:7.1f} ms (token {tokens[-1]})")
        attention.MIN_ALIGNED = 2048
        print(f"{mode:9s} N={n:6d}: " + "; ".join(row), flush=True)
