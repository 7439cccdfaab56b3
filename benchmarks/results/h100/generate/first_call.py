import torch, time
from types import SimpleNamespace
from kvpred.shapes import random_kvp_model
for shape, src, rank in (("smollm2-135m", "hidden", 128), ("llama-3.2-1b", "kv", None), ("llama-3.1-8b", "kv", None)):
    m = random_kvp_model(shape, aux_keep=0.25, source=src, rank=rank, device="cuda")
    m.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    m.generate(torch.randint(100, 30000, (1, 100), device="cuda"), max_new_tokens=4, cuda_graph=False)  # CUDA init
    for n, graphs in ((2000, False), (2001, False), (2002, True), (2003, True), (2004, True), (3000, False), (3001, True), (3002, True), (6000, False), (6001, True), (6002, True)):
        ids = torch.randint(100, 30000, (1, n), device="cuda")
        torch.cuda.synchronize(); t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=1, cuda_graph=graphs).cpu()
        t1 = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize(); t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=8, cuda_graph=graphs).cpu()
        t8 = (time.perf_counter() - t0) * 1e3
        print(shape, n, "graphs" if graphs else "transformers", f"1 token {t1:.1f} ms, then 8 tokens {t8:.1f} ms", flush=True)
    del m; torch.cuda.empty_cache()
