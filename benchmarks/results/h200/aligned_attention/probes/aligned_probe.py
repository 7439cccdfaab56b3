"""Prototype: masked SDPA prefill with queries/keys padded to a multiple of 128 (gemma-3-1b shape, H200)."""
import sys, weakref, torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from kvpred.shapes import random_kvp_model

ALIGN = 128
_memo = [None]


def aligned(module, query, key, value, attention_mask, **kwargs):
    q_len, k_len = query.shape[2], key.shape[2]
    pad_q, pad_k = -q_len % ALIGN, -k_len % ALIGN
    if (attention_mask is None or attention_mask.dtype != torch.bool or query.device.type != "cuda"
            or q_len < ALIGN or not (pad_q or pad_k)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    memo = _memo[0]
    if memo is not None and memo[0]() is attention_mask:
        mask = memo[1]
    else:
        mask = F.pad(attention_mask, (0, pad_k, 0, pad_q))
        mask[..., q_len:, 0] = True
        _memo[0] = (weakref.ref(attention_mask), mask)
    query = F.pad(query, (0, 0, 0, pad_q))
    key, value = F.pad(key, (0, 0, 0, pad_k)), F.pad(value, (0, 0, 0, pad_k))
    out, weights = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    return out[:, :q_len], weights


AttentionInterface.register("aligned", aligned)
ALL_MASK_ATTENTION_FUNCTIONS.register("aligned", sdpa_mask)
shape = sys.argv[1]
m = random_kvp_model(shape, aux_keep=0.25)


def timed(fn, reps=5):
    fn(); torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)[len(out) // 2]


with torch.no_grad():
    for n in map(int, sys.argv[2].split(",")):
        ids = torch.randint(0, m.base.config.vocab_size, (1, n), device="cuda")
        cap = 1 << (n - 1).bit_length()
        exact_cache = m.new_cache(1, cap)
        row = [f"{shape} N={n}:"]
        for impl in ("sdpa", "aligned"):
            m.aux.config._attn_implementation = m.base.config._attn_implementation = impl
            a = timed(lambda: m.aux_inputs(ids[:, :-1], None, None))
            e = timed(lambda: m.prefill_into(exact_cache, ids, None, mode="exact"))
            e1 = timed(lambda: m.prefill_into(exact_cache, ids[:, :-3], None, mode="exact"))
            row.append(f"{impl}: aux prefix {a:.2f} ms, exact N {e:.2f} ms, exact N-3 {e1:.2f} ms;")
        k1, _ = None, None
        m.aux.config._attn_implementation = "sdpa"
        ki, vi = m.aux_inputs(ids[:, :-1], None, None)
        m.aux.config._attn_implementation = "aligned"
        ka, va = m.aux_inputs(ids[:, :-1], None, None)
        row.append(f"max |diff| taps {(ki - ka).abs().max().item():.3g} {(vi - va).abs().max().item():.3g}")
        print(" ".join(row), flush=True)
