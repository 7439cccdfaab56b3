"""Rotary position embedding, forwards and backwards, on HF's [batch, heads, seq, head_dim] key layout.

HF Llama-style models cache keys *after* RoPE. kvpred predicts keys in position-free space and rotates them with
the base's own rotary tables (so rope scaling variants such as llama3 or yarn come for free). SmolLM3's NoPE layers
cache their keys unrotated, so they are left as predicted (`rotated_layers`); Gemma 3's sliding and full layers
rotate with tables of their own (`layer_position_embeddings`).
"""
from __future__ import annotations

import functools
import inspect

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """keys: [..., B, H, T, D]; cos, sin: [B, T, D] from the model's rotary_emb."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # [B, 1, T, D]: broadcast over heads
    return keys * cos + rotate_half(keys) * sin


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate`. Dividing by cos^2 + sin^2 undoes rope variants that also scale (attention_scaling)."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    return (keys * cos - rotate_half(keys) * sin) / (cos * cos + sin * sin)


def rotated_layers(config) -> list[bool]:
    """Per layer of a model `config`, whether its cached keys are rotated: all of them, but for SmolLM3's NoPE
    layers (`no_rope_layers[i] == 0`)."""
    flags = getattr(config, "no_rope_layers", None)
    return [bool(f) for f in flags] if flags is not None else [True] * config.num_hidden_layers


def unrotate_layers(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated: list[bool]) -> torch.Tensor:
    """`unrotate` of [L, B, H, T, D] keys, each of the L layers only where `rotated` says so."""
    back = unrotate(keys, cos, sin)
    if all(rotated):
        return back
    return torch.where(torch.tensor(rotated, device=keys.device).view(-1, 1, 1, 1, 1), back, keys)


def layer_position_embeddings(model, x: torch.Tensor, position_ids: torch.Tensor
                              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer of `model` (a *ForCausalLM), its rotary (cos, sin) [B, T, head_dim] at `position_ids`
    [B, T], in `x`'s dtype: one table for every layer, or one per layer kind where the tables differ by kind
    (Gemma 3's sliding and full layers have their own RoPE bases)."""
    rotary, config = model.model.rotary_emb, model.config
    if not _tables_per_kind(type(rotary)):
        return [rotary(x, position_ids)] * config.num_hidden_layers
    # kinds with the same RoPE parameters (OLMo 3's) share one table, which `rope_tables` then need not stack per layer
    by_parameters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for kind in sorted(set(config.layer_types)):
        parameters = repr(config.rope_parameters.get(kind, kind))
        by_parameters.setdefault(parameters, rotary(x, position_ids, kind))
    return [by_parameters[repr(config.rope_parameters.get(kind, kind))] for kind in config.layer_types]


@functools.cache
def _tables_per_kind(rotary_type: type) -> bool:
    """Whether a rotary embedding class makes its tables per layer kind (its forward takes a `layer_type`)."""
    return "layer_type" in inspect.signature(rotary_type.forward).parameters


def rope_tables(model, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] of `model` (a *ForCausalLM) at `position_ids` [B, T]; [L, B, T, head_dim], one per
    layer, where its layer kinds have tables of their own (see `layer_position_embeddings`). Either broadcasts
    against keys [L, B, H, T, D] in `rotate`."""
    probe = torch.empty(0, device=position_ids.device, dtype=dtype)
    per_layer = layer_position_embeddings(model, probe, position_ids)
    if all(table is per_layer[0] for table in per_layer):
        return per_layer[0]
    return torch.stack([cos for cos, _ in per_layer]), torch.stack([sin for _, sin in per_layer])
