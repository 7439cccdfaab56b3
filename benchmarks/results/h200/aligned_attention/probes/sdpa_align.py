"""SDPA under a sliding-window mask: odd lengths and unaligned mask rows vs aligned ones (H200, bf16)."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

torch.manual_seed(0)
print(torch.__version__, torch.cuda.get_device_name())


def timed(fn, reps=5):
    fn(); torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)[len(out) // 2]


def masks(n, window):
    i = torch.arange(n, device="cuda")
    dense = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    padded = torch.zeros(n, (n + 63) // 64 * 64, dtype=torch.bool, device="cuda")
    padded[:, :n] = dense
    return dense[None, None], padded[None, None, :, :n]


for heads, kv, d, window in ((4, 1, 256, 512), (32, 8, 128, 4096)):
    for n in (8191, 8192, 31999, 32000):
        q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, kv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        dense, aligned = masks(n, window)
        row = [f"H={heads} KV={kv} D={d} W={window} N={n}:"]
        for name, backends in (("default", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                               ("efficient", [SDPBackend.EFFICIENT_ATTENTION])):
            for mname, m in (("dense", dense), ("aligned", aligned)):
                def run():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
                try:
                    if backends is None:
                        t = timed(run)
                    else:
                        with sdpa_kernel(backends):
                            t = timed(run)
                    row.append(f"{name}/{mname} {t:7.2f}")
                except Exception as e:  # noqa
                    row.append(f"{name}/{mname} n/a ({type(e).__name__})")
        print("  ".join(row), flush=True)
        del q, k, v, dense, aligned
        torch.cuda.empty_cache()
