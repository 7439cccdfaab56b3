"""Rotary position embedding, forwards and backwards, on HF's [batch, heads, seq, head_dim] key layout.

HF Llama-style models cache keys *after* RoPE. kvpred predicts keys in position-free space and rotates them with the
base's own rotary tables (so rope scaling variants such as llama3 or yarn come for free), over the base's rotary
dimensions (all of them, or the first R: partial rotary) and in its pairing of dimensions (`adjacent_pairs`). SmolLM3's
NoPE layers (and Cohere 2's full-attention layers) cache their keys unrotated, so they are left as predicted
(`rotated_layers`); Gemma 3's sliding and full layers rotate with tables of their own (`layer_position_embeddings`).
Where transformers picks the tables by a forward's last position (longrope, dynamic NTK), predicted keys get those of a
forward over the whole prompt (`rope_runs`). Hunyuan normalises its keys after RoPE, not before
(`KEY_NORM_AFTER_ROPE`), and so are predicted keys.
"""
from __future__ import annotations

import inspect

import torch


# Model types whose attention rotates adjacent key dimensions (2i, 2i + 1) together, GPT-J style, rather than i with
# i + R/2 (R the rotary dimensions); Cohere's rotary tables, besides, repeat each frequency twice in a row rather than
# laying out two halves.
ADJACENT_PAIRS = frozenset({"cohere", "cohere2", "ernie4_5", "glm", "glm4", "helium"})
REPEATED_TABLES = frozenset({"cohere", "cohere2"})
# Model types whose layers rotate their keys only where they attend to a sliding window, when they have any
ROPE_ONLY_WHEN_SLIDING = frozenset({"cohere2", "exaone4"})
# Model types whose attention normalises its keys after RoPE rather than before (Hunyuan's key_layernorm)
KEY_NORM_AFTER_ROPE = frozenset({"hunyuan_v1_dense", "hunyuan_v1_moe"})


def rope_types(config) -> set[str]:
    """The RoPE types of a model `config`: one, or one per layer kind (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds = [r for r in rope.values() if isinstance(r, dict)] or [rope]
    return {r.get("rope_type", r.get("type", "default")) for r in kinds}


def tables_follow_forward_length(config) -> bool:
    """Whether transformers picks `config`'s rotary tables by the largest position of each forward call: longrope's
    short or long factors (Phi-3.5, Phi-4-mini), dynamic NTK's base."""
    return any(kind == "longrope" or "dynamic" in kind for kind in rope_types(config))


def adjacent_pairs(config) -> bool:
    """Whether a model `config`'s attention rotates adjacent key dimensions together (see ADJACENT_PAIRS)."""
    return config.model_type in ADJACENT_PAIRS


def _pairs(x: torch.Tensor, rotary_dim: int, adjacent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of `x`'s first `rotary_dim` dimensions that RoPE turns together, one pair per frequency."""
    if adjacent:
        return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    return x[..., :rotary_dim // 2], x[..., rotary_dim // 2:rotary_dim]


def _frequencies(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One cos and sin per frequency, [B, 1, T, R/2] (broadcast over heads), from `rope_tables`' [B, T, R]."""
    half = cos.shape[-1] // 2
    return cos[..., :half].unsqueeze(-3), sin[..., :half].unsqueeze(-3)


def _turn(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool, inverse: bool) -> torch.Tensor:
    """`rotate` (or `unrotate`, `inverse`). Dimensions past the tables' width (partial rotary: GLM, StableLM,
    Phi-4-mini) pass through, as HF's apply_rotary_pos_emb leaves them."""
    rotary_dim = cos.shape[-1]
    c, s = _frequencies(cos, sin)
    x1, x2 = _pairs(keys, rotary_dim, adjacent)
    if inverse:  # dividing by cos^2 + sin^2 undoes rope variants that also scale (attention_scaling)
        norm = c * c + s * s
        y1, y2 = (x1 * c + x2 * s) / norm, (x2 * c - x1 * s) / norm
    else:
        y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    turned = torch.stack((y1, y2), dim=-1).flatten(-2) if adjacent else torch.cat((y1, y2), dim=-1)
    return torch.cat((turned, keys[..., rotary_dim:]), dim=-1) if rotary_dim < keys.shape[-1] else turned


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool = False) -> torch.Tensor:
    """keys: [..., B, H, T, D]; cos, sin: [B, T, R] from `rope_tables`, R <= D; `adjacent`: see `adjacent_pairs`."""
    return _turn(keys, cos, sin, adjacent, inverse=False)


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool = False) -> torch.Tensor:
    """Inverse of `rotate`."""
    return _turn(keys, cos, sin, adjacent, inverse=True)


def rotate_into(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                adjacent: bool = False) -> None:
    """out = rotate(keys, cos, sin, adjacent), written pair by pair with out= ops, so no rotated copy is
    materialised on the way into a cache. keys, out: [..., B, H, T, D]; cos, sin: [B, T, R]."""
    rotary_dim = cos.shape[-1]
    c, s = _frequencies(cos, sin)
    (k1, k2), (o1, o2) = _pairs(keys, rotary_dim, adjacent), _pairs(out, rotary_dim, adjacent)
    torch.mul(k1, c, out=o1)
    o1.addcmul_(k2, s, value=-1)
    torch.mul(k2, c, out=o2)
    o2.addcmul_(k1, s)
    if rotary_dim < keys.shape[-1]:
        out[..., rotary_dim:].copy_(keys[..., rotary_dim:])


def rotated_layers(config) -> list[bool]:
    """Per layer of a model `config`, whether its cached keys are rotated: all of them, but for SmolLM3's NoPE
    layers (`no_rope_layers[i] == 0`) and, in Cohere 2 and EXAONE 4 models with sliding layers, the full-attention
    layers (only sliding layers rotate there)."""
    flags = getattr(config, "no_rope_layers", None)
    if flags is not None:
        return [bool(f) for f in flags]
    if config.model_type in ROPE_ONLY_WHEN_SLIDING and getattr(config, "sliding_window", None):
        return [kind == "sliding_attention" for kind in config.layer_types]
    return [True] * config.num_hidden_layers


def rotate_runs(keys: torch.Tensor, runs: list[tuple[slice, torch.Tensor, torch.Tensor]], adjacent: bool = False,
                inverse: bool = False) -> torch.Tensor:
    """`rotate` (`unrotate` if `inverse`) of [L, B, H, T, D] keys, each run of layers with its own tables
    (`rope_runs`), so that no table is copied per layer."""
    turned = [_turn(keys[run], cos, sin, adjacent, inverse) for run, cos, sin in runs]
    return turned[0] if len(turned) == 1 else torch.cat(turned)


def unrotate_layers(keys: torch.Tensor, runs: list[tuple[slice, torch.Tensor, torch.Tensor]], rotated: list[bool],
                    adjacent: bool = False) -> torch.Tensor:
    """`unrotate` of [L, B, H, T, D] keys with `rope_runs`' tables, each of the L layers only where `rotated` says
    so."""
    back = rotate_runs(keys, runs, adjacent, inverse=True)
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
    # kinds with the same RoPE parameters share one table, which `rope_runs` then hands out as one run
    by_parameters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for kind in sorted(set(config.layer_types)):
        parameters = repr(config.rope_parameters.get(kind, kind))
        by_parameters.setdefault(parameters, rotary(x, position_ids, kind))
    return [by_parameters[repr(config.rope_parameters.get(kind, kind))] for kind in config.layer_types]


_PER_KIND: dict[type, bool] = {}  # a plain dict, not functools.cache: torch.compile (compile_step) warns on those


def _tables_per_kind(rotary_type: type) -> bool:
    """Whether a rotary embedding class makes its tables per layer kind (its forward takes a `layer_type`)."""
    if rotary_type not in _PER_KIND:
        _PER_KIND[rotary_type] = "layer_type" in inspect.signature(rotary_type.forward).parameters
    return _PER_KIND[rotary_type]


def rope_runs(model, position_ids: torch.Tensor, dtype: torch.dtype,
              width: int | None = None) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """The rotary tables of `model` (a *ForCausalLM) at the first `width` (default: all) of `position_ids` [B, N], as
    (layers, cos, sin) per run of consecutive decoder layers that share one table, cos and sin [B, T, R], R its rotary
    dimensions: one run for most models; for Gemma 3, whose sliding and full layers have tables of their own (see
    `layer_position_embeddings`), one per stretch of one kind, each table made once and not copied per layer (at 32k
    tokens a table per layer would take as much memory as the KV cache). The tables come in one layout, each
    frequency's entries in two halves.

    `position_ids` are those of a whole forward, of which the T columns are the first: longrope picks its short or
    long frequencies (and dynamic NTK its base) by the largest position of each forward call, so keys predicted for a
    prompt's first columns get the tables a forward over the whole prompt, tail included, would give them."""
    probe = torch.empty(0, device=position_ids.device, dtype=dtype)
    per_layer = layer_position_embeddings(model, probe, position_ids)
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one per distinct table
    runs = []
    for i, table in enumerate(per_layer):
        if runs and per_layer[i - 1] is table:
            runs[-1][0] = slice(runs[-1][0].start, i + 1)
            continue
        if id(table) not in made:
            cos, sin = table
            if model.config.model_type in REPEATED_TABLES:
                cos, sin = (torch.cat((t[..., 0::2],) * 2, dim=-1) for t in (cos, sin))
            made[id(table)] = cos[..., :width, :], sin[..., :width, :]
        runs.append([slice(i, i + 1), *made[id(table)]])
    return [tuple(run) for run in runs]


def rope_tables(model, position_ids: torch.Tensor, dtype: torch.dtype,
                width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_runs`' tables as one cos, sin pair: [B, T, R] where every layer shares one table, else [L, B, T, R], one
    per layer (which `rotate_runs` avoids copying). Either broadcasts against keys [L, B, H, T, D] in `rotate`."""
    runs = rope_runs(model, position_ids, dtype, width)
    if len(runs) == 1:
        return runs[0][1:]
    cos = torch.cat([c.expand(run.stop - run.start, *c.shape) for run, c, _ in runs])
    sin = torch.cat([s.expand(run.stop - run.start, *s.shape) for run, _, s in runs])
    return cos, sin
