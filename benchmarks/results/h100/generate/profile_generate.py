import torch, time, statistics, sys
from types import SimpleNamespace
from kvpred.shapes import random_kvp_model
from kvpred.model import cache_kwargs
from kvpred.bench import GraphStep, EagerStep
torch.set_grad_enabled(False)
def ms(f, reps=7):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); t0 = time.perf_counter(); f(); torch.cuda.synchronize(); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts[1:])
for shape, src, rank, N in (("llama-3.2-1b", "kv", None, 8192), ("smollm2-135m", "hidden", 128, 2048), ("llama-3.1-8b", "kv", None, 8192)):
    m = random_kvp_model(shape, aux_keep=0.25, source=src, rank=rank, device="cuda")
    m.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    ids = torch.randint(100, 30000, (1, N), device="cuda")
    pos = torch.full((1, 1), N - 1, device="cuda")
    r = {}
    r["aux_prefix"] = ms(lambda: m._aux_prefix(ids, None, 1))
    r["predicted_cache"] = ms(lambda: m.predicted_cache(ids, None, 1))
    def first():
        c = m.predicted_cache(ids, None, 1)
        return m.base(input_ids=ids[:, -1:], position_ids=pos, use_cache=True, logits_to_keep=1, **cache_kwargs(m.base, c)).logits[:, -1].argmax(-1).cpu()
    r["predicted_cache+eager_step"] = ms(first)
    r["generate_1tok_pred"] = ms(lambda: m.generate(ids, mode="predicted", max_new_tokens=1).cpu())
    r["generate_1tok_exact"] = ms(lambda: m.generate(ids, mode="exact", max_new_tokens=1).cpu())
    cache = m.new_cache(1, N + 64)
    step = GraphStep(m, cache)
    def graphed():
        m.predict_into(cache, ids); step.start(ids[:, -1:], pos, N - 1); return step().cpu()
    r["predict_into+graph_step"] = ms(graphed)
    r["predict_into"] = ms(lambda: m.predict_into(cache, ids))
    c = m.predicted_cache(ids, None, 1)
    def step_only():
        for l in c.layers: l.keys, l.values = l.keys[:, :, :N-1], l.values[:, :, :N-1]
        return m.base(input_ids=ids[:, -1:], position_ids=pos, use_cache=True, logits_to_keep=1, **cache_kwargs(m.base, c)).logits[:, -1].argmax(-1).cpu()
    r["eager_step_on_dynamic"] = ms(step_only)
    print(shape, N, {k: round(v, 2) for k, v in r.items()}, flush=True)
    del m, cache, step, c; torch.cuda.empty_cache()
