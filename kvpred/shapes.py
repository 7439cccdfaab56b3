"""Public model shapes, written out by hand, for *random-weight timing models*.

Time to first token does not depend on weight values, so on machines that cannot download checkpoints kvpred
times randomly initialised models with the exact shapes of public ones. Their outputs are meaningless: label every
number measured on them "random-weight timing model". Sources: each model's published config.json.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from . import models
from .models import KVPredError

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the real base model of this project, for GPU timing without its GGUF
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0},
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0},
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rope_parameters={**_LLAMA3_ROPE, "factor": 8.0},
                         rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Qwen/Qwen2.5-0.5B: the KVP-C auxiliary for Qwen2.5-1.5B (same tokenizer)
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False),
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False),
    # HuggingFaceTB/SmolLM3-3B: every fourth layer without RoPE (NoPE)
    "smollm3-3b": dict(model_type="smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
                       max_position_embeddings=65536, rope_parameters={"rope_type": "default", "rope_theta": 5e6},
                       rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False),
    # Qwen/Qwen3-0.6B: the KVP-C auxiliary for Qwen3-30B-A3B (same tokenizer)
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False),
    # Qwen/Qwen1.5-MoE-A2.7B: 60 experts, 4 per token, and a shared expert (14.3B parameters, 2.7B active)
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                              num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                              num_experts_per_tok=4, max_position_embeddings=8192,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
                              tie_word_embeddings=False, use_sliding_window=False),
    # Qwen/Qwen3-30B-A3B: 128 experts, 8 per token (30.5B parameters, 3.3B active)
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                          rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False),
    # google/gemma-3-1b-pt: five sliding layers (512-token window, RoPE base 10k) to one full layer (RoPE base 1M)
    "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
                       layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
                       rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    # microsoft/Phi-3-mini-4k-instruct: fused projections, no grouped-query attention (32 KV heads), a 2047-token
    # sliding window
    "phi-3-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    # microsoft/phi-4: fused q/k/v and gate/up projections (14.7B parameters)
    "phi-4": dict(model_type="phi3", vocab_size=100352, hidden_size=5120, intermediate_size=17920,
                  num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                  max_position_embeddings=16384, original_max_position_embeddings=16384,
                  rope_parameters={"rope_type": "default", "rope_theta": 250000.0}, rms_norm_eps=1e-5,
                  tie_word_embeddings=False),
}

# A public model of the same family and tokenizer that can serve as a KVP-C auxiliary (METHOD 2)
KVP_C_AUX = {"llama-3.2-3b": "llama-3.2-1b", "llama-3.1-8b": "llama-3.2-1b", "qwen2.5-1.5b": "qwen2.5-0.5b",
             "qwen3-30b-a3b": "qwen3-0.6b"}


def shape_config(name: str) -> PretrainedConfig:
    """The transformers config of public model shape `name` (see SHAPES)."""
    if name not in SHAPES:
        raise KVPredError(f"unknown model shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}")
    fields = dict(SHAPES[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_causal_lm(config: PretrainedConfig, dtype: torch.dtype, device: str | torch.device):
    """A randomly initialised *ForCausalLM with SDPA attention, built directly on `device` (an 8B model never
    passes through host memory)."""
    models.check_supported(config, config.model_type)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def random_kvp_model(shape: str, *, aux_keep: float | None = None, aux_shape: str | None = None,
                     source: str = "kv", rank: int | None = None, dtype: torch.dtype = torch.bfloat16,
                     device: str | torch.device = "cuda", seed: int = 0, base=None):
    """A random-weight timing model: KVPredictionModel around a random base of `shape`, with a layer-pruned
    (KVP-LP, `aux_keep` of the layers) or separate random (KVP-C, `aux_shape`) auxiliary and a predictor reading
    its keys and values (source "kv", the paper's) or hidden states ("hidden"; `rank` makes it factorised). Pass
    `base` to share one base between several auxiliaries."""
    from .model import AuxSpec, KVPConfig, KVPredictionModel, _predictor_config, default_layer_map
    from .predictor import KVPredictor

    if (aux_keep is None) == (aux_shape is None):
        raise KVPredError("give exactly one of aux_keep (KVP-LP) or aux_shape (KVP-C)")
    torch.manual_seed(seed)
    base = base if base is not None else random_causal_lm(shape_config(shape), dtype, device)
    if aux_keep is not None:
        keep = models.keep_layers_for_ratio(base.config.num_hidden_layers, aux_keep)
        aux, spec = models.prune_layers(base, keep), AuxSpec(kind="pruned", keep_layers=keep)
    else:
        aux_config = shape_config(aux_shape)
        if aux_config.vocab_size != base.config.vocab_size:
            raise KVPredError(f"{aux_shape} ({aux_config.vocab_size} tokens) cannot read {shape}'s prompts "
                              f"({base.config.vocab_size} tokens): KVP-C needs a shared tokenizer")
        aux, spec = random_causal_lm(aux_config, dtype, device), AuxSpec(kind="separate", name_or_path=aux_shape)
    try:
        pconf = _predictor_config(base, aux, default_layer_map(base, aux, spec, source), source, rank)
    except ValueError as err:
        raise KVPredError(str(err)) from err
    predictor = KVPredictor(pconf)
    if aux_keep is not None and source == "kv":
        predictor.set_identity()
    config = KVPConfig(base=f"random-weight:{shape}", base_fingerprint="random-weight timing model", aux=spec,
                       predictor=pconf)
    return KVPredictionModel(base, aux, predictor.to(device, dtype), None, config)
