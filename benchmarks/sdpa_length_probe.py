"""Masked SDPA as transformers calls it (K/V repeated for GQA, boolean sliding-window mask), per backend, at lengths
off and on a multiple of 128, and padded (H200, bf16).

    python benchmarks/sdpa_length_probe.py   (benchmarks/results/h200/aligned_attention/sdpa_backends.txt)
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

print(torch.__version__, torch.cuda.get_device_name())


def timed(fn, reps=5):
    fn(); torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)[len(out) // 2]


for heads, kv, d, window in ((4, 1, 256, 512), (32, 32, 96, 2047)):
    for n in (4095, 8191, 8192, 31999, 32000):
        q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, kv, n, d, device="cuda", dtype=torch.bfloat16).repeat_interleave(heads // kv, 1)
                for _ in range(2))
        i = torch.arange(n, device="cuda")
        m = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]
        pad = -n % 128
        mp = F.pad(m, (0, pad, 0, pad)); mp[..., n:, 0] = True
        row = [f"H={heads} KV={kv} D={d} W={window} N={n}:"]
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("no-cudnn", None)):
            backends = [backend] if backend else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                  SDPBackend.MATH]
            with sdpa_kernel(backends):
                try:
                    plain = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m))
                    padded = timed(lambda: F.scaled_dot_product_attention(
                        *(F.pad(x, (0, 0, 0, pad)) for x in (q, k, v)), attn_mask=mp)[:, :, :n]) if pad else plain
                    row.append(f"{name} {plain:.2f}/padded {padded:.2f}")
                except Exception as e:  # noqa: BLE001
                    row.append(f"{name} n/a ({type(e).__name__}: {str(e)[:60]})")
        print("  ".join(row), flush=True)
