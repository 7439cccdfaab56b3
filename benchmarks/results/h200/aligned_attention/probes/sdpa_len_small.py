"""SDPA time against sequence length alignment, with a sliding-window mask and with is_causal (H200, bf16)."""
import torch
import torch.nn.functional as F

print(torch.__version__, torch.cuda.get_device_name())


def timed(fn, reps=5):
    fn(); torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)[len(out) // 2]


for heads, kv, d, window in ((4, 1, 256, 512), (32, 8, 96, 2047)):
    for base in (1024, 2048, 4096):
        row = [f"H={heads} KV={kv} D={d} W={window}:"]
        for n in (base - 3, base - 1, base):
            q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, kv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            if window:
                i = torch.arange(n, device="cuda")
                m = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]
                t = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True))
                pad = -n % 128
                if pad:
                    mp = F.pad(m, (0, pad, 0, pad)); mp[..., n:, 0] = True
                    def padded():
                        qp, kp, vp = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
                        return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mp, enable_gqa=True)[:, :, :n]
                    row.append(f"{n}:{t:.3f}/padded {timed(padded):.3f}")
                    continue
            else:
                t = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            row.append(f"{n}:{t:.3f}")
        print(" ".join(row), flush=True)
