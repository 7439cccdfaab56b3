"""Specification of deferred values (kvpred.deferred): predicted mode's first forward attends through the value maps
instead of waiting for them. The same arithmetic in another order, so logits, tokens and the finished cache are the
plain path's."""
import dataclasses

import pytest
import torch

from kvpred import attention
from kvpred.decoding import EagerStep
from kvpred.deferred import PendingValues, deferred_values
from kvpred.generation import encode_prompts
from kvpred.model import KVPredictionModel, cache_kwargs, position_ids_from_mask
from kvpred.predictor import KVPredictor
from conftest import ARCHS

PROMPTS = ["The quick brown fox jumps over", "a", "Hello, world! This prompt is longer than the others."]


def model_with(path: str, kind: str) -> KVPredictionModel:
    """A pruned auxiliary with a random (not identity) predictor, so every value map and bias matters."""
    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(path, keep_ratio=0.5, source="kv" if kind == "kv" else "hidden")
    config = model.predictor.config
    model.predictor = KVPredictor(dataclasses.replace(config, rank=4) if kind == "rank" else config)
    return model


def first_forward(model: KVPredictionModel, ids, mask, cache, tail: int) -> torch.Tensor:
    pos = position_ids_from_mask(mask)[:, -tail:]
    return model.base(input_ids=ids[:, -tail:], attention_mask=mask, position_ids=pos, use_cache=True,
                      **cache_kwargs(model.base, cache)).logits


@pytest.mark.parametrize("kind", ["kv", "hidden", "rank"])
@pytest.mark.parametrize("arch", ARCHS)
def test_first_forward_and_finished_cache_match_the_plain_path(tiny_models, arch, kind):
    model = model_with(tiny_models[arch], kind)
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)  # left-padded; "a" is shorter than a tail of 3
    for tail in (1, 3):
        plain = model.predicted_cache(ids, mask, tail)
        want = first_forward(model, ids, mask, plain, tail)
        deferred = model.predicted_cache(ids, mask, tail, defer_values=True)
        if model.base_window is not None:  # transformers' sliding cache drops early columns: nothing is deferred
            assert deferred.pending_values is None
            continue
        assert deferred.pending_values is not None and plain.pending_values is None
        before = model.base.config._attn_implementation  # kvpred's CPU SDPA, or eager (Gemma 2's soft caps)
        with deferred_values(model.base, deferred.pending_values):
            got = first_forward(model, ids, mask, deferred, tail)
            assert model.base.config._attn_implementation == "kvpred_deferred"
        real = mask[:, -tail:].bool()  # a padded query's logits are whatever each kernel makes of seeing nothing
        # fp32 in another order: up to 1.6e-5 apart on logits of about 5 (mixtral, this suite's CPU); a wrong value
        # map or bias moves them by far more
        torch.testing.assert_close(got[real], want[real], atol=5e-5, rtol=1e-4)
        assert model.base.config._attn_implementation == before  # restored
        columns = mask.bool()  # [B, T]: the cache's real columns, [B, H, T, D] transposed
        for mine, theirs in zip(deferred.layers, plain.layers):  # the context's end wrote the pending values
            for part in ("keys", "values"):
                torch.testing.assert_close(getattr(mine, part).transpose(1, 2)[columns],
                                           getattr(theirs, part).transpose(1, 2)[columns], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decoding_writes_each_layers_values_on_its_next_forward(tiny_models, arch):
    """On the preallocated cache: the first step defers, the second writes the values first; greedy tokens are
    the plain path's."""
    model = model_with(tiny_models[arch], "rank")
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(4))
    tokens = {}
    for defer in (False, True):
        cache = model.new_cache(2, 32)
        model.predict_into(cache, ids, defer_values=defer)
        pending = cache.pending_values
        step = EagerStep(model, cache)
        step.start(ids[:, -1:], torch.full((2, 1), 19), 19)
        with deferred_values(model.base, pending, finish=False):
            tokens[defer] = [step()]
            if defer:
                assert all(pending.attended) and not any(pending.done)
            tokens[defer] += [step() for _ in range(5)]
        if defer:
            assert all(pending.done)
    assert torch.equal(torch.stack(tokens[True]), torch.stack(tokens[False]))


def test_generate_defers_and_matches_the_plain_cache(tiny_llama, monkeypatch):
    model = model_with(tiny_llama, "hidden")
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    attended = []
    attend = PendingValues.attend
    spy = lambda self, layer, *args: attended.append(layer) or attend(self, layer, *args)  # noqa: E731
    monkeypatch.setattr(PendingValues, "attend", spy)
    got = model.generate(ids, mask, mode="predicted", max_new_tokens=8)
    assert attended == list(range(model.base.config.num_hidden_layers))
    plain = model.predicted_cache(ids, mask)
    want = model.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               eos_token_id=None, pad_token_id=model.tokenizer.pad_token_id,
                               **cache_kwargs(model.base, plain))
    assert torch.equal(got, want)
    assert model.base.config._attn_implementation == attention.ATTENTION


@pytest.mark.parametrize("kind", ["kv", "rank"])
def test_bf16_predictor_arithmetic_stays_within_its_rounding_of_fp32(tiny_llama, kind):
    """What `predictor_dtype="auto"` picks on CPUs with bf16 dot products: the cache stays fp32, keys and values move
    by bf16's rounding (2^-8 relative, so 1% in norm is ample), and the deferred first forward sees the same cache."""
    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        return got.dtype == want.dtype and ((got - want).norm() / want.norm()).item() < 1e-2

    model = model_with(tiny_llama, kind)
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    want = model.predicted_cache(ids, mask)
    model.predictor_dtype = torch.bfloat16
    got = model.predicted_cache(ids, mask)
    columns = mask[:, :-1].bool()
    for mine, theirs in zip(got.layers, want.layers):
        assert close(mine.keys.transpose(1, 2)[columns], theirs.keys.transpose(1, 2)[columns])
        assert close(mine.values.transpose(1, 2)[columns], theirs.values.transpose(1, 2)[columns])
    deferred = model.predicted_cache(ids, mask, defer_values=True)
    with deferred_values(model.base, deferred.pending_values):
        logits = first_forward(model, ids, mask, deferred, 1)
    assert close(logits, first_forward(model, ids, mask, want, 1))
    n = columns.shape[1]  # both caches hold the last prompt token too now
    for mine, theirs in zip(deferred.layers, want.layers):  # the values written at the context's end
        assert close(mine.values[:, :, :n].transpose(1, 2)[columns], theirs.values[:, :, :n].transpose(1, 2)[columns])


def test_auto_predictor_and_aux_arithmetic_changes_only_an_fp32_model_on_a_cpu(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5, dtype=torch.bfloat16)
    model.predictor_dtype = model.aux_dtype = "auto"
    assert model.predictor_compute_dtype is model.aux_compute_dtype is None  # a bf16 model keeps its own dtype
    model = model.float()
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert model.predictor_compute_dtype == model.aux_compute_dtype == (torch.bfloat16 if native else None)


def test_a_bf16_auxiliary_prefill_stays_within_its_rounding_of_fp32(tiny_llama):
    """What `aux_dtype="auto"` picks on CPUs with bf16 dot products: the auxiliary's prefill under bf16 autocast. The
    predictor's inputs keep the model's dtype and move by a few times bf16's rounding; aux mode's logits too."""
    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        return got.dtype == want.dtype and ((got - want).norm() / want.norm()).item() < 3e-2

    model = model_with(tiny_llama, "rank")
    ids = torch.tensor([model.tokenizer.encode(PROMPTS[0])])
    want = model.aux_inputs(ids, None, None), model.prefill(ids, mode="aux")[0]
    model.aux_dtype = torch.bfloat16
    got = model.aux_inputs(ids, None, None), model.prefill(ids, mode="aux")[0]
    assert all(close(g, w) for g, w in zip(got[0], want[0])) and close(got[1], want[1])
    assert not torch.equal(got[0][0], want[0][0]) and not torch.equal(got[1], want[1])  # both did run in bf16
    cache = model.new_cache(1, 64, "aux")
    assert close(model.prefill_into(cache, ids, mode="aux"), want[1])  # the fast path too



def test_aux_mode_under_a_bf16_auxiliary_scores_with_its_lm_head_in_the_models_dtype(tiny_llama):
    """bf16 logits are 0.06 apart at magnitude 8: a bf16 head would shift every log-likelihood by up to that, by
    batch. The layers run in bf16, the head does not, so the logits are not bf16 numbers and equal the head's
    fp32 output of the last hidden state."""
    model = model_with(tiny_llama, "rank")
    model.aux_dtype = torch.bfloat16
    ids = torch.tensor([model.tokenizer.encode(PROMPTS[0])])
    logits = model.prefill(ids, mode="aux", exact_tail=3)[0]
    assert logits.dtype == torch.float32 and not torch.equal(logits, logits.bfloat16().float())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.aux.base_model(input_ids=ids).last_hidden_state[:, -3:]
    assert torch.allclose(logits, model.aux.lm_head(hidden.float()), atol=1e-5)
    cache = model.new_cache(1, 64, "aux")
    assert torch.equal(model.prefill_into(cache, ids, mode="aux", exact_tail=3), logits)  # the fast path too
