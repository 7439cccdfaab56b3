"""kvpred's SDPA attention: transformers' SDPA, with two cases done faster.

One query per row on a CPU: with bf16 queries, transformers' SDPA took 4x longer than SDPA with the query heads that
share a KV head passed as that head's queries (0.58 against 0.15 ms per SmolLM2 layer over 1024 cached tokens; the
outputs differ by bf16 rounding at most), so one-query forwards attend that way (benchmarks/results/cpu_bf16_step). In
fp32 the gain is small: SmolLM2's eager step took 0.3-0.65 ms less of 34-39 ms at 512-2048 cached tokens, paired in
one process (benchmarks/results/matvec/step_attention_fp32_cpu.txt). With several queries, SDPA as transformers calls
it was as fast.

A long masked prefill on a GPU (sliding-window layers, padded batches): cuDNN's SDPA kernel is the fastest under a
mask, but it takes up to 1.7x longer when the prompt's length is not a multiple of 128 (on an H200, 31.6 ms for one
Gemma 3 1B layer at 31,999 tokens against 19.1 at 32,000; memory-efficient attention took 35-37 ms at either), and
it builds an execution plan for every new shape, which is why `generate` otherwise keeps SDPA off cuDNN
(kvpred.decoding.without_cudnn_attention). So from 2048 tokens such prefills run on cuDNN with queries and keys
padded to a multiple of 128: a plan then serves a whole bucket of 128 lengths (it cost up to 85 ms the first time).
In `generate` on the Gemma 3 1B shape, an exact prefill of 31,000 tokens took 681 instead of 1048 ms, and predicted
mode's first token came after 213 instead of 309 ms (benchmarks/results/h200/aligned_attention).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "kvpred_sdpa"  # the attention implementation name `use_kvpred_attention` gives a model
ALIGN = 128  # long masked prefills on a GPU pad their queries and keys to a multiple of this
MIN_ALIGNED = 2048  # from this many queries; below, padding saved nothing on an H200 and cost time at 1024
# SDPA's backends with cuDNN among them: flash attention takes no mask, and SDPA picks cuDNN before memory-efficient
# attention on an H200
WITH_CUDNN = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_padded_mask: list = [None]  # (weakref to a layer's mask, its padded copy): one copy per forward, not per layer


def use_kvpred_attention(model: PreTrainedModel) -> None:
    """Give `model` kvpred's SDPA attention (`sdpa`), where it uses transformers' SDPA."""
    if model.config._attn_implementation == "sdpa":
        AttentionInterface.register(ATTENTION, sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
        model.config._attn_implementation = ATTENTION


def warm_up_cudnn(device: torch.device, dtype: torch.dtype) -> None:
    """Start cuDNN's attention on `device` with one small masked call: its start-up took about a second on an H200,
    which the first long masked prefill would otherwise pay (KVPredictionModel.warm_up calls this)."""
    query = torch.zeros(1, 1, ALIGN, 64, device=device, dtype=dtype)
    mask = torch.ones(ALIGN, ALIGN, dtype=torch.bool, device=device).tril()[None, None]
    with sdpa_kernel(WITH_CUDNN):
        F.scaled_dot_product_attention(query, query, query, attn_mask=mask)


def sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
         attention_mask: torch.Tensor | None, scaling: float | None = None, softcap: float | None = None,
         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; a single query per row on a CPU runs with the query heads of each KV head as
    that head's queries (the same arithmetic, up to rounding), and a long masked prefill on a GPU on cuDNN with its
    queries and keys padded (`aligned`; not where gradients are on: training keeps SDPA's own choice). Logits
    soft-capped (Gemma 2), which SDPA cannot do, go through `capped_attention`. query [B, Hq, Q, D], key/value
    [B, Hkv, T, D]; returns [B, Q, Hq, Dv]."""
    if softcap is not None:
        return capped_attention(query, key, value, attention_mask, scaling, softcap), None
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    boolean = attention_mask is not None and attention_mask.dtype == torch.bool
    if (q_len >= MIN_ALIGNED and boolean and query.device.type == "cuda" and not torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing()):  # cuDNN failed to allocate inside a graph capture
        return aligned(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if (q_len != 1 or query.device.type != "cpu" or module.training
            or (attention_mask is not None and not boolean)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    mask = None if attention_mask is None else attention_mask.expand(b, 1, hq // hkv, key.shape[2])
    out = F.scaled_dot_product_attention(query.view(b, hkv, hq // hkv, d), key, value, attn_mask=mask, scale=scaling)
    return out.view(b, hq, 1, -1).transpose(1, 2).contiguous(), None  # head h = kv_head * group + r, as repeat_kv


def aligned(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA, cuDNN allowed, over queries and keys padded with zeros to a multiple of ALIGN, under the
    boolean mask [B, 1, Q, T] padded to match: the real queries see no padded key, and each padded query sees the
    first key only (a softmax over nothing would be NaN); their outputs are dropped."""
    q_len, k_len = query.shape[2], key.shape[2]
    pad_q, pad_k = -q_len % ALIGN, -k_len % ALIGN
    mask = attention_mask
    if pad_q or pad_k:
        memo = _padded_mask[0]
        if memo is not None and memo[0]() is attention_mask:  # the layers of one kind share one mask
            mask = memo[1]
        else:
            mask = F.pad(attention_mask, (0, pad_k, 0, pad_q))
            mask[..., q_len:, 0] = True
            _padded_mask[0] = (weakref.ref(attention_mask, _forget), mask)
        query = F.pad(query, (0, 0, 0, pad_q))
        key, value = F.pad(key, (0, 0, 0, pad_k)), F.pad(value, (0, 0, 0, pad_k))
    with sdpa_kernel(WITH_CUDNN):
        out, weights = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    return out[:, :q_len], weights


def _forget(ref: weakref.ref) -> None:
    """Drop the padded copy with the forward's mask (at 32k tokens it is a GB), unless a later one replaced it."""
    if _padded_mask[0] is not None and _padded_mask[0][0] is ref:
        _padded_mask[0] = None


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
