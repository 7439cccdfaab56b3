"""A narrow KVP-C auxiliary cut out of the base: fewer layers, attention heads and MLP channels.

Depth pruning (KVP-LP) keeps whole layers, so a 3x-cheaper auxiliary of a 30-layer base has 8-10 layers, each standing
in for several of the base's. `narrow_copy` instead keeps more layers and cuts their width, so the auxiliary's layers
stay close to the base layers whose keys and values they feed. What it keeps is chosen on calibration text: MLP
channels and query heads by the mean magnitude of what they write into the residual stream (mean |activation| times
the norm of its output weights), key/value heads by the summed importance of the query heads reading them. The result
is a plain Hugging Face model of the base's architecture (same tokenizer, embeddings and norms), saved as a folder
and used as `aux=` like any separate auxiliary; `kvpred train` then distils it.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from .models import (KVPredError, check_keep_layers, expert_count, keep_layer_fields, load_causal_lm,
                     out_folder)


@dataclass
class Width:
    keep_layers: list[int]  # base layers the auxiliary keeps
    heads: int  # query heads per layer
    kv_heads: int  # key/value heads per layer (heads must be a multiple)
    intermediate: int  # MLP channels per layer


@dataclass
class Importance:
    heads: torch.Tensor  # [layers, query heads]
    channels: torch.Tensor  # [layers, MLP channels]


def check_width(config, width: Width) -> None:
    if expert_count(config):
        raise KVPredError(f"a narrow auxiliary cuts MLP channels out of a dense base; {config.model_type} has "
                          f"mixture-of-experts layers: use a layer-pruned auxiliary or a separate smaller model")
    h, kv, m = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    check_keep_layers(width.keep_layers, config.num_hidden_layers)
    if not 1 <= width.kv_heads <= kv:
        raise KVPredError(f"kv_heads must be in [1, {kv}] (the base has {kv} key/value heads), got {width.kv_heads}")
    if width.heads % width.kv_heads or not width.kv_heads <= width.heads <= width.kv_heads * (h // kv):
        raise KVPredError(f"heads must be a multiple of kv_heads={width.kv_heads} and at most {h // kv} per "
                          f"key/value head (the base's grouping), got {width.heads}")
    if not 1 <= width.intermediate <= m:
        raise KVPredError(f"intermediate must be in [1, {m}] (the base's MLP width), got {width.intermediate}")


@torch.no_grad()
def measure_importance(model: PreTrainedModel, batches: Iterable[torch.Tensor], tokens: int) -> Importance:
    """Mean |input| of every o_proj head and down_proj channel over `tokens` calibration tokens, times the norm of
    the output weights it multiplies: how much each head and channel writes into the residual stream."""
    layers = model.model.layers
    head_dim = layers[0].self_attn.head_dim
    sums = {"o": [0.0] * len(layers), "down": [0.0] * len(layers)}
    hooks = []
    for i, layer in enumerate(layers):
        for name, proj in (("o", layer.self_attn.o_proj), ("down", _mlp_out(layer))):
            def accumulate(module, args, name=name, i=i):
                sums[name][i] = sums[name][i] + args[0].detach().abs().float().flatten(0, -2).sum(0)
            hooks.append(proj.register_forward_pre_hook(accumulate))
    seen, bar = 0, tqdm(total=tokens, desc="narrow: importance", unit="tok")
    try:
        for batch in batches:
            model(input_ids=batch.to(model.device), use_cache=False)
            seen += batch.numel()
            bar.update(min(batch.numel(), tokens - bar.n))
            if seen >= tokens:
                break
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
    if seen == 0:
        raise KVPredError("no calibration tokens to measure importance on")
    heads, channels = [], []
    for i, layer in enumerate(layers):
        o_cols = layer.self_attn.o_proj.weight.float().norm(dim=0)  # [heads * head_dim]
        heads.append((sums["o"][i] / seen * o_cols).view(-1, head_dim).sum(1))
        channels.append(sums["down"][i] / seen * _mlp_out(layer).weight.float().norm(dim=0))
    return Importance(torch.stack(heads).cpu(), torch.stack(channels).cpu())


def _mlp_out(layer: torch.nn.Module) -> torch.nn.Module:
    """A dense decoder layer's MLP output projection: down_proj, or StarCoder2's c_proj."""
    return layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.c_proj


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def choose_heads(scores: torch.Tensor, n_kv: int, width: Width) -> tuple[torch.Tensor, torch.Tensor]:
    """Key/value heads whose query groups matter most, then the best query heads inside each kept group."""
    group = scores.numel() // n_kv
    grouped = scores.view(n_kv, group)
    kv = _top(grouped.sum(1), width.kv_heads)
    per_group = width.heads // width.kv_heads
    q = torch.cat([g * group + _top(grouped[g], per_group) for g in kv.tolist()])
    return q, kv


def _rows(weight: torch.Tensor, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    index = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten().to(weight.device)
    return weight.index_select(0, index)


def narrow_copy(base: PreTrainedModel, width: Width, importance: Importance) -> PreTrainedModel:
    """A new model of the base's architecture holding the chosen layers, heads and MLP channels of the base."""
    check_width(base.config, width)
    config = copy.deepcopy(base.config)
    attn0 = base.model.layers[0].self_attn
    head_dim = attn0.head_dim
    config.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
    keep_layer_fields(config, width.keep_layers)
    config.num_attention_heads, config.num_key_value_heads = width.heads, width.kv_heads
    config.intermediate_size = width.intermediate
    aux = AutoModelForCausalLM.from_config(config, dtype=base.dtype).to(base.device)
    state = {}
    for new, old in enumerate(width.keep_layers):
        src, prefix = base.model.layers[old], f"model.layers.{new}."
        q, kv = choose_heads(importance.heads[old], base.config.num_key_value_heads, width)
        channels = _top(importance.channels[old], width.intermediate).to(base.device)
        for name, tensor in src.state_dict().items():
            if name.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                heads = q if ".q_proj." in name else kv
                tensor = _rows(tensor, heads, head_dim)
            elif name.startswith("self_attn.qkv_proj."):  # Phi-3: the query, key and value rows stacked
                parts = tensor.split([base.config.num_attention_heads * head_dim,
                                      *[base.config.num_key_value_heads * head_dim] * 2])
                tensor = torch.cat([_rows(part, heads, head_dim) for part, heads in zip(parts, (q, kv, kv))])
            elif name.startswith(("self_attn.q_norm.", "self_attn.k_norm.")) and tensor.numel() != head_dim:
                heads = q if ".q_norm." in name else kv
                if tensor.dim() == 2:  # Cohere: a weight per head and dimension
                    tensor = tensor.index_select(0, heads.to(tensor.device))
                else:  # OLMo 2 normalises the whole projection: one weight per row
                    tensor = _rows(tensor[:, None], heads, head_dim)[:, 0]
            elif name == "self_attn.o_proj.weight":
                tensor = _rows(tensor.T, q, head_dim).T
            elif name.startswith(("mlp.gate_proj.", "mlp.up_proj.", "mlp.c_fc.")):  # weights' rows, biases
                tensor = tensor.index_select(0, channels)
            elif name.startswith("mlp.gate_up_proj."):  # Phi-3, GLM: the gate's rows, then the up projection's
                tensor = torch.cat([part.index_select(0, channels) for part in tensor.chunk(2)])
            elif name in ("mlp.down_proj.weight", "mlp.c_proj.weight"):
                tensor = tensor.index_select(1, channels)
            state[prefix + name] = tensor
    for name, tensor in base.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = tensor  # embeddings, final norm, LM head (tied or not)
    shapes = {name: tensor.shape for name, tensor in aux.state_dict().items()}
    if wrong := [name for name, tensor in state.items() if name in shapes and shapes[name] != tensor.shape]:
        # StableLM and Helium size their attention from hidden_size, whatever the config's head counts say
        raise KVPredError(f"{config.model_type} does not take the shape of {wrong[0]} from the config's head counts "
                          f"alone, so kvpred cannot cut its heads: keep all {base.config.num_attention_heads} heads "
                          f"and {base.config.num_key_value_heads} key/value heads, and narrow layers and MLP channels")
    missing, unexpected = aux.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise KVPredError(f"narrow copy does not fit the {config.model_type} layout: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        aux.tie_weights()
    return aux.eval().requires_grad_(False)


# ---------------------------------------------------------------- CLI
def register(subparsers) -> None:
    from .cli import DEFAULT_MODEL, add_calibration_arguments, command_help, layer_list

    p = subparsers.add_parser(
        "narrow", help=command_help("narrow"),
        description="Write a Hugging Face model folder holding the base's most important layers, attention heads "
                    "and MLP channels (measured on token shards), for use as a separate auxiliary (KVP-C): "
                    "`kvpred fit --model BASE --aux FOLDER`, then `kvpred train`.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base: HF folder, hub id, .gguf file or alias")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where there is a GPU)")
    p.add_argument("--keep-layers", type=layer_list, default=None,
                   help="base layers to keep, e.g. 0,2,4 (default: all)")
    p.add_argument("--heads", type=int, required=True, help="query heads per layer")
    p.add_argument("--kv-heads", type=int, required=True, help="key/value heads per layer")
    p.add_argument("--intermediate", type=int, required=True, help="MLP channels per layer")
    p.add_argument("--out", required=True, help="folder for the auxiliary model")
    add_calibration_arguments(p)
    p.set_defaults(func=_narrow_command)


def _narrow_command(args: argparse.Namespace) -> int:
    from .data import PackedTokens, check_tokenizer

    out_path = Path(args.out)
    if out_path.resolve() == Path(args.model).resolve() or any((out_path / name).is_file()
                                                                 for name in ("config.json", "kvpred_config.json")):
        raise KVPredError(f"--out {args.out} already holds a model (the base, a kvpred checkpoint, or a narrow run "
                          "that stopped part-way: delete it to start over); give a new folder")
    out = out_folder(args.out, "the narrow auxiliary", make=False)  # found now, not after the importance pass
    base, tokenizer = load_causal_lm(args.model, torch.float32, args.device)
    check_tokenizer(args.data, tokenizer)
    if args.seq_len > base.config.max_position_embeddings:  # importance of positions the model never serves
        raise KVPredError(f"--seq-len {args.seq_len} exceeds the model's context limit of "
                          f"{base.config.max_position_embeddings} tokens")
    keep = args.keep_layers or list(range(base.config.num_hidden_layers))
    width = Width(keep, args.heads, args.kv_heads, args.intermediate)
    check_width(base.config, width)
    batches = PackedTokens(args.data, "train", seq_len=args.seq_len, batch_size=args.batch_size)
    aux = narrow_copy(base, width, measure_importance(base, batches, args.tokens))
    out.mkdir(parents=True, exist_ok=True)
    aux.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ours, theirs = decoder_parameters(aux), decoder_parameters(base)
    print(f"saved {args.out}: {len(keep)} layers, {args.heads} heads / {args.kv_heads} kv heads, "
          f"{args.intermediate} MLP channels; decoder parameters {ours / 1e6:.2f}M of the base's "
          f"{theirs / 1e6:.2f}M ({theirs / ours:.1f}x fewer)")
    return 0


def decoder_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".layers." in name)
