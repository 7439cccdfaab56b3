"""generate() on the gemma-3-1b shape (random weights, bf16, batch 1), the time to the first token at new prompt
lengths: its masked prefills padded to a multiple of 128 on the backends generate allows (no cuDNN), or with cuDNN
allowed for the padded calls ("cudnn" argument)."""
import sys, time, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from kvpred import attention
from kvpred.shapes import random_kvp_model
from kvpred.testing import byte_tokenizer

if sys.argv[1] == "cudnn":
    padded = attention.aligned

    def with_cudnn(*args, **kwargs):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH]):
            return padded(*args, **kwargs)
    attention.aligned = with_cudnn
m = random_kvp_model("gemma-3-1b", aux_keep=0.25)
m.tokenizer = byte_tokenizer()
print(sys.argv[1], flush=True)
for mode in ("exact", "predicted"):
    for n in map(int, sys.argv[2].split(",")):
        ids = torch.randint(0, m.base.config.vocab_size, (1, n), device="cuda")
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            m.generate(ids, mode=mode, max_new_tokens=1)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        print(f"{mode:9s} N={n:6d}: first call {times[0]:8.1f} ms, again {times[1]:8.1f} ms", flush=True)
