"""Specification of kvpred.attention: transformers' SDPA results, with one query per row on a CPU attending with the
query heads of each KV head as its queries (up to rounding), and long masked prefills on a GPU run over queries and
keys padded to a multiple of 128 (the same results)."""
import gc

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpred import attention
from kvpred.model import KVPredictionModel
from kvpred.testing import save_tiny_model


def attention_layer(heads: int = 6, kv_heads: int = 2) -> nn.Module:
    module = nn.Module().eval()  # what SDPA reads of an attention layer
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    return module


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_gives_sdpas_result(dtype, masked):
    torch.manual_seed(0)
    batch, heads, kv_heads, length = 3, 6, 2, 300
    query = torch.randn(batch, heads, 1, 16, dtype=dtype)
    key, value = (torch.randn(batch, kv_heads, length + 5, 16, dtype=dtype)[:, :, :length] for _ in range(2))
    mask = torch.rand(batch, 1, 1, length) > 0.3 if masked else None  # a padded batch's columns
    module = attention_layer(heads, kv_heads)
    got, _ = attention.sdpa(module, query, key, value, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (batch, 1, heads, 16)
    torch.testing.assert_close(got, expected)  # bf16: within 1.6% or 1e-5


def test_the_folded_attention_runs_only_for_one_query(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda *a, **k: calls.append(a[1].shape[2]) or (None, None))
    for dtype, queries in ((torch.float32, 1), (torch.bfloat16, 2), (torch.bfloat16, 1), (torch.float32, 3)):
        kv = torch.randn(1, 2, 8, 16, dtype=dtype)
        attention.sdpa(attention_layer(), torch.randn(1, 6, queries, 16, dtype=dtype), kv, kv, None)
    assert calls == [2, 3]  # several queries go to SDPA as they are


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_model_on_a_cpu_decodes_as_with_sdpa(tiny_llama, dtype):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5, dtype=dtype)
    assert model.base.config._attn_implementation == model.aux.config._attn_implementation == attention.ATTENTION
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a padded row
    runs = {}
    for name in (attention.ATTENTION, "sdpa"):
        model.base.config._attn_implementation = name
        runs[name] = [model.generate(ids, mask, mode=mode, max_new_tokens=6) for mode in ("exact", "predicted")]
    assert all(torch.equal(a, b) for a, b in zip(*runs.values()))


@pytest.mark.parametrize("q_len, k_len", [(2047, 2047), (2049, 4096), (300, 300)])
def test_padded_queries_and_keys_give_sdpas_result(q_len, k_len):
    torch.manual_seed(0)
    query = torch.randn(2, 6, q_len, 16)
    key, value = (torch.randn(2, 2, k_len, 16) for _ in range(2))
    i, j = torch.arange(q_len)[:, None] + k_len - q_len, torch.arange(k_len)
    mask = ((j <= i) & (i - j < 100))[None, None].expand(2, 1, -1, -1).clone()  # a sliding window of 100
    mask[1, ..., :5] = False  # a padded row's first columns
    mask[1, ..., :5, 0] = True  # (whose queries see something, as transformers' masks have it)
    module = attention_layer()
    got, _ = attention.aligned(module, query, key, value, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (2, q_len, 6, 16)
    torch.testing.assert_close(got, expected)


def test_the_padded_mask_is_made_once_per_mask_and_dropped_with_it(monkeypatch):
    pads = []
    pad = attention.F.pad
    monkeypatch.setattr(attention.F, "pad", lambda x, p, *a: pads.append(x.dtype) or pad(x, p, *a))
    query, key = torch.randn(1, 6, 130, 8), torch.randn(1, 2, 130, 8)
    mask = torch.ones(1, 1, 130, 130, dtype=torch.bool).tril()
    for _ in range(3):  # three layers of one forward
        attention.aligned(attention_layer(), query, key, key, mask)
    assert pads.count(torch.bool) == 1
    del mask
    gc.collect()
    assert attention._padded_mask[0] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the padded path runs on a GPU")
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3_text"])
def test_long_masked_prefills_on_a_gpu_give_the_same_tokens_padded(tmp_path, arch, monkeypatch):
    """A left-padded batch puts a mask on every prefill, and so do sliding windows (Mistral, Gemma 3); 2100 tokens
    are past MIN_ALIGNED and off a multiple of 128."""
    path = save_tiny_model(tmp_path / arch, arch=arch, context=4096)
    model = KVPredictionModel.from_pretrained(str(path), keep_ratio=0.5, device="cuda")
    ids = torch.randint(3, 259, (2, 2100), device="cuda")
    mask = torch.ones_like(ids)
    ids[1, :70], mask[1, :70] = model.tokenizer.pad_token_id, 0
    runs = []
    for smallest in (attention.MIN_ALIGNED, 10**9):
        monkeypatch.setattr(attention, "MIN_ALIGNED", smallest)
        runs.append([model.generate(ids, mask, mode=mode, max_new_tokens=4) for mode in ("exact", "aux", "predicted")])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
