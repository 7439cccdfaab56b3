"""Tiny random models with a byte-level tokenizer, for tests and CPU examples. Nothing here is downloaded."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]
# A minimal chat template for the byte tokenizer: "<role>content\n" per message, then "<assistant>" to reply.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def byte_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """256 byte tokens + pad/bos/eos: every string round-trips, no files needed. With `add_bos`, encoding puts
    BOS first by default, as Llama's and Mistral's tokenizers do."""
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


# Granite's multipliers away from 1 (its published models use these), Cohere's logit scale too, Gemma 2's soft caps
# low, the sliding windows of Mistral, Gemma 3, OLMo 3, Cohere 2 and EXAONE 4 short (Gemma 3's and OLMo 3's layers of
# both kinds, Gemma 3's with RoPE tables of their own), Phi-3 rotating half of each head's dimensions, StableLM's and
# Cohere's optional LayerNorms on queries and keys on, so that a path which forgets one differs
GRANITE_MULTIPLIERS = dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                           attention_multiplier=0.0078125)
ARCH_EXTRAS = {"granite": GRANITE_MULTIPLIERS, "granitemoe": GRANITE_MULTIPLIERS,
               "gemma2": dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
               "mistral": dict(sliding_window=16),
               "gemma3_text": dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
               "olmo3": dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2),
               "cohere": dict(logit_scale=4.0, use_qk_norm=True),
               "stablelm": dict(qk_layernorm=True),
               "cohere2": dict(sliding_window=16, logit_scale=4.0),
               "exaone4": dict(sliding_window=16),
               "phi3": dict(partial_rotary_factor=0.5)}
# Four small experts, two per token, for the mixture-of-experts architectures
EXPERTS = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
           "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=64),
           "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
           "olmoe": dict(num_experts=4, num_experts_per_tok=2),
           "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
           "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
           # its first layer dense, a shared expert, and the optional per-head k-norm on
           "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                            first_k_dense_replace=1, use_qk_norm=True)}


def tiny_config(arch: str = "llama", layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                head_dim: int | None = None, context: int = 512, **extra):
    """A small config of a supported architecture (kvpred.models.SUPPORTED_MODEL_TYPES) over the byte tokenizer's
    vocabulary."""
    return AutoConfig.for_model(
        arch, vocab_size=259, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads,
        max_position_embeddings=context, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **{"tie_word_embeddings": True, **EXPERTS.get(arch, {}), **ARCH_EXTRAS.get(arch, {}), **extra})


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, add_bos: bool = False,
                    **config_kwargs) -> Path:
    """Write a random tiny model + tokenizer (see `byte_tokenizer`) to `path` as a normal HF folder and return
    the path."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs))
    with torch.no_grad():  # larger than default init so that random models make confident, varied predictions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    path = Path(path)
    model.save_pretrained(path)
    byte_tokenizer(add_bos).save_pretrained(path)
    return path
