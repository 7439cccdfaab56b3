import torch, time
from kvpred.model import KVPredictionModel
m = KVPredictionModel.from_pretrained("smollm2-135m"); torch.set_grad_enabled(False)
P = m.predictor
for n in (512, 1024, 2048):
    ids = torch.randint(0, 49000, (1, n))
    cache = m.new_cache(1, n + 40)
    key_in, value_in, pos = m._aux_prefix(ids, None, 1)
    def full():
        k, v = P(key_in, value_in); m.base_kv_into(k, v, pos, *cache.slices(n-1))
    def keys_only():
        c = P.config; _, b, t, d = key_in.shape
        taps = key_in.index_select(0, P.taps).reshape(len(c.taps), b*t, d)
        code = torch.bmm(taps, P.down.transpose(1, 2))
        kc = code.index_select(0, P.code_of_layer).view(len(c.layer_map), b, t, -1)
        k = P._project(kc, P.key_weight, P.key_bias)
        kk, vv = cache.slices(n-1)
        nl = k.shape[0]
        keys = m._k_norm(k.view(nl, b, t, m.base_kv_heads, m.base_head_dim))
        from kvpred.rope import rope_tables
        from kvpred.model import _rotate_into
        cos, sin = rope_tables(m.base, pos, keys.dtype)
        _rotate_into(keys.transpose(2, 3), cos, sin, kk)
    for f in (full, keys_only, full, keys_only):
        ts = []
        for _ in range(5):
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        ts.sort(); print(n, f.__name__, f"{ts[2]*1e3:.1f} ms")
print("chunked")
for n in (1024, 2048):
    ids = torch.randint(0, 49000, (1, n))
    cache = m.new_cache(1, n + 40)
    key_in, value_in, pos = m._aux_prefix(ids, None, 1)
    for ch in (128, 256, 512, 4096):
        def f():
            kk, vv = cache.slices(n-1)
            for s in range(0, n-1, ch):
                e = min(s+ch, n-1)
                k, v = P(key_in[:, :, s:e], value_in[:, :, s:e]); m.base_kv_into(k, v, pos[:, s:e], kk[:, :, :, s:e], vv[:, :, :, s:e])
        ts = []
        for _ in range(7):
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        ts.sort(); print(n, ch, f"{ts[3]*1e3:.1f} ms")
