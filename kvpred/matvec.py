"""Matrix-vector products for one-token forwards on a CPU: the linear layers' and the attention's.

A one-token step reads every weight once, so it runs at the speed weights stream from memory. On the 2-core test
machine `F.linear` with a single fp32 row streams SmolLM2's layer weights at 16 GB/s, on one thread. The same
products as one batched matmul over row blocks of the weight (views, no copy), `W.view(blocks, -1, in) @ x`,
stream at 38 GB/s on two threads (30 GB/s on one): 11 instead of 26 ms for the step's 210 layer matmuls, and
2.5 instead of 7.2 ms for the LM head. In bf16 `F.linear` is the faster of the two, and with many rows (a prefill)
a matrix-matrix product is what runs, so those keep it. SmolLM2's CPU step takes 27-30 instead of 44-49 ms
(benchmarks/results/matvec).

Attention: with one bf16 query per row, transformers' SDPA on the CPU took 4x longer than SDPA with the query heads
that share a KV head passed as that head's queries (0.58 against 0.15 ms per SmolLM2 layer over 1024 cached tokens;
the outputs differ by bf16 rounding at most), so one-query forwards attend that way (benchmarks/results/cpu_bf16_step).
In fp32 the gain is small: SmolLM2's eager step took 0.3-0.65 ms less of 34-39 ms at 512-2048 cached tokens, paired in
one process (benchmarks/results/matvec/step_attention_fp32_cpu.txt). With several queries, SDPA as transformers calls
it was as fast.
"""
from __future__ import annotations

import math
import types

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "kvpred_cpu"  # the attention implementation name `use_blocked_matvec` gives a model
MAX_ROWS = 16  # up to this many rows (batch x tokens) the blocked product was faster (fp32, 2 cores)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (not 0 < rows <= MAX_ROWS or x.device.type != "cpu" or weight.dtype != torch.float32
            or not weight.is_contiguous()):
        return F.linear(x, weight, self.bias)
    blocks = math.gcd(weight.shape[0], _threads())  # one per thread, where the rows divide evenly
    columns = x.reshape(rows, -1).T.expand(blocks, -1, -1)  # [blocks, in, rows]
    out = torch.bmm(weight.view(blocks, -1, weight.shape[1]), columns)  # [blocks, out / blocks, rows]
    # one row is already in order (the common case: a step at batch 1); more take a small transpose
    out = out.view(*x.shape[:-1], -1) if rows == 1 else out.permute(2, 0, 1).reshape(*x.shape[:-1], -1)
    return out if self.bias is None else out + self.bias


@torch.compiler.assume_constant_result
def _threads() -> int:
    """torch's intra-op threads; a compiled step (KVPredictionModel.compile_step) keeps the count it was traced with,
    since torch.compile cannot put the call itself in a graph."""
    return torch.get_num_threads()


def use_blocked_matvec(model: nn.Module) -> None:
    """Route `model`'s few-row fp32 linear layers on a CPU through the blocked product (module by module: names,
    weights and hooks are unchanged, and every other call still goes to F.linear); its SDPA attention goes through
    `sdpa`."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_forward, module)
    config = getattr(model, "config", None)
    if config is not None and config._attn_implementation == "sdpa":
        AttentionInterface.register(ATTENTION, sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
        config._attn_implementation = ATTENTION


def sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
         attention_mask: torch.Tensor | None, scaling: float | None = None, softcap: float | None = None,
         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; a single query per row on a CPU runs with the query heads of each KV head as
    that head's queries (the same arithmetic, up to rounding). Logits soft-capped (Gemma 2), which SDPA cannot do,
    go through `capped_attention`. query [B, Hq, Q, D], key/value [B, Hkv, T, D]; returns [B, Q, Hq, Dv]."""
    if softcap is not None:
        return capped_attention(query, key, value, attention_mask, scaling, softcap), None
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    if (q_len != 1 or query.device.type != "cpu" or module.training
            or (attention_mask is not None and attention_mask.dtype != torch.bool)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    mask = None if attention_mask is None else attention_mask.expand(b, 1, hq // hkv, key.shape[2])
    out = F.scaled_dot_product_attention(query.view(b, hkv, hq // hkv, d), key, value, attn_mask=mask, scale=scaling)
    return out.view(b, hq, 1, -1).transpose(1, 2).contiguous(), None  # head h = kv_head * group + r, as repeat_kv


def capped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None, softcap: float) -> torch.Tensor:
    """Attention with its logits soft-capped to (-softcap, softcap) by tanh, as Gemma 2's eager attention does.
    query [B, Hq, Q, D], key/value [B, Hkv, T, D], mask [B, 1, Q, T] boolean (True: seen) or additive; returns
    [B, Q, Hq, Dv]."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)  # as repeat_kv lays heads out
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * (scaling or query.shape[-1] ** -0.5)
    scores = soft_cap(scores, softcap)
    if mask is not None:  # finfo.min, not -inf: a padding query that sees nothing gets no NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(-1).to(value.dtype), value).transpose(1, 2).contiguous()


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """`x` squashed into (-cap, cap) by tanh: Gemma 2's soft cap on attention scores and final logits."""
    return torch.tanh(x / cap) * cap
