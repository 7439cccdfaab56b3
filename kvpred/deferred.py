"""Deferred values: predicted mode's first token without running the value maps over the prompt.

The base's last prompt token attends to the predicted prefix with weights p_t, and base layer l's predicted values
are linear in what its value map reads, v_t = W x_t + b. So

    sum_t p_t v_t = W (sum_t p_t x_t) + (sum_t p_t) b,

and the first forward can attend over the inputs x_t (the shipped default's rank-128 code) and apply the map once per
query, instead of computing and writing 30 layers x 192 value features for every prompt token first. This is the same
arithmetic in another order, not an approximation. The prefix's values are computed once the first token is out: in
each layer's next forward, or all at once when the `deferred_values` context ends.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property
from typing import Iterator

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .attention import sdpa, soft_cap
from .predictor import KVPredictor

ATTENTION = "kvpred_deferred"
_PENDING: ContextVar["PendingValues | None"] = ContextVar("kvpred_pending_values", default=None)


class PendingValues:
    """The values of a cache's first `length` columns, not yet computed: base layer l's are
    `inputs[index[l]] @ value_weight[l].T + value_bias[l]` (KVPredictor.keys_and_value_inputs)."""

    def __init__(self, predictor: KVPredictor, inputs: torch.Tensor, index: torch.Tensor, cache: Cache,
                 dtype: torch.dtype | None = None):
        self.predictor, self.inputs = predictor, inputs  # inputs [M, B, n, w]
        self.cache = weakref.proxy(cache)  # the cache holds this as its pending_values: no cycle to outlive the pool
        self.dtype = dtype  # what `values` runs the value maps in (KVPredictionModel.predictor_compute_dtype)
        self.index = index.tolist()
        self.length = inputs.shape[2]
        self.attended = [False] * len(self.index)
        self.done = [False] * len(self.index)

    @cached_property
    def _inputs_in_dtype(self) -> torch.Tensor:
        """`inputs` in `dtype`, cast once for all the layers that read them."""
        return self.inputs if self.dtype is None else self.inputs.to(self.dtype)

    def values(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s predicted values in cache layout [B, H, n, Dv]."""
        x = self._inputs_in_dtype[self.index[layer]]  # [B, n, w]
        weight, bias = self.predictor.cast((self.predictor.value_weight, self.predictor.value_bias), self.dtype)
        v = torch.addmm(bias[layer], x.flatten(0, 1), weight[layer].t())
        heads = self.cache.layers[layer].values.shape[1]
        return v.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    @torch.no_grad()
    def materialize(self, layer: int | None = None) -> None:
        """Write the values of `layer` (None: every layer still pending) into the cache."""
        for i in range(len(self.index)) if layer is None else (layer,):
            if not self.done[i]:
                self.cache.layers[i].values[:, :, :self.length].copy_(self.values(i))
                self.done[i] = True

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scaling: float, softcap: float | None = None) -> torch.Tensor:
        """The first forward's attention: query [B, Hq, W, D] over key/value [B, H, n + W, D], whose first n
        value columns are not written yet. Returns [B, W, Hq, Dv] like transformers' sdpa_attention_forward."""
        b, hq, w, d = query.shape
        heads, t, n = key.shape[1], key.shape[2], self.length
        group = hq // heads  # head h = kv_head * group + r, as repeat_kv lays them out
        scores = torch.matmul(query.reshape(b, heads, group * w, d), key.transpose(-1, -2)).float().mul_(scaling)
        if softcap is not None:  # Gemma 2
            scores = soft_cap(scores, softcap)
        if mask is None and w > 1:  # transformers skipped a plainly causal mask: tail token i sees columns <= n + i
            mask = torch.ones(w, t, dtype=torch.bool, device=query.device).tril(t - w)
        if mask is not None:
            visible = mask if mask.dtype == torch.bool else mask == 0  # an additive float mask is 0 where visible
            visible = visible.view(-1, 1, 1, w, t) if visible.dim() == 4 else visible
            # finfo.min, not -inf: a padded query row (exact tail longer than its prompt) sees nothing; no NaN
            scores = scores.view(b, heads, group, w, t).masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1).to(value.dtype).view(b, heads, group * w, t)
        out = torch.matmul(probs[..., n:], value[:, :, n:])  # the tail's own values
        x = self.inputs[self.index[layer]]  # [B, n, w_in]
        # x is shared by the heads: one product over all of them (broadcasting it would copy x once per head)
        mixed = torch.bmm(probs[..., :n].reshape(b, heads * group * w, n), x).view(b, heads, group * w, -1)
        weight = self.predictor.value_weight[layer].view(heads, -1, x.shape[-1])  # [H, Dv, w_in]
        out += torch.matmul(mixed, weight.transpose(1, 2))
        out += probs[..., :n].sum(-1, keepdim=True) * self.predictor.value_bias[layer].view(heads, 1, -1)
        return out.view(b, hq, w, -1).transpose(1, 2).contiguous()


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, softcap: float | None = None,
               **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA, except on a layer whose prefix values are pending: its first forward attends through the value map,
    its next one writes the values first."""
    pending, layer = _PENDING.get(), module.layer_idx
    if pending is not None and not pending.done[layer]:
        if not pending.attended[layer]:
            pending.attended[layer] = True
            return pending.attend(layer, query, key, value, attention_mask, scaling or query.shape[-1] ** -0.5,
                                  softcap), None
        pending.materialize(layer)
    return sdpa(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kwargs)


@contextmanager
def deferred_values(model: PreTrainedModel, pending: PendingValues | None, finish: bool = True) -> Iterator[None]:
    """Inside, `model`'s forwards on `pending.cache` defer its prefix values (see the module docstring); at the end
    (with `finish`) the values still pending are written, so the cache can be used anywhere. No-op for None."""
    if pending is None:
        yield
        return
    AttentionInterface.register(ATTENTION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    config, token = model.config, _PENDING.set(pending)
    previous, config._attn_implementation = config._attn_implementation, ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _PENDING.reset(token)
        if finish:
            pending.materialize()
