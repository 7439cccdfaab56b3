"""Specification of the narrow auxiliary: layers, heads and MLP channels cut out of the base (a KVP-C auxiliary)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvpred.cli import main
from kvpred.data import PackedTokens
from kvpred.model import KVPredictionModel
from kvpred.models import KVPredError, load_causal_lm, prune_layers
from kvpred.narrow import Width, choose_heads, measure_importance, narrow_copy

pytestmark = pytest.mark.usefixtures("one_thread")


def importance(base, shards):
    return measure_importance(base, PackedTokens(shards, "train", seq_len=32, batch_size=4), 256)


# olmo2: q/k norms span all heads; phi3: fused q/k/v and gate/up projections; glm: fused gate/up projections;
# starcoder2: an ungated MLP with biases (c_fc, c_proj); nemotron: an ungated MLP (up_proj, down_proj)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "smollm3", "olmo2", "phi3", "glm", "starcoder2",
                                  "nemotron"])
def test_keeping_everything_reproduces_the_base(tiny_models, shards, arch):
    base, _ = load_causal_lm(tiny_models[arch], torch.float32)
    c = base.config
    whole = Width(list(range(c.num_hidden_layers)), c.num_attention_heads, c.num_key_value_heads,
                  c.intermediate_size)
    aux = narrow_copy(base, whole, importance(base, shards))
    ids = torch.randint(3, 259, (2, 12))
    torch.testing.assert_close(aux(ids).logits, base(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "smollm3"])
def test_keeping_every_head_and_channel_of_some_layers_is_the_layer_pruned_copy(tiny_models, shards, arch):
    base, _ = load_causal_lm(tiny_models[arch], torch.float32)
    c = base.config
    aux = narrow_copy(base, Width([0, 3], c.num_attention_heads, c.num_key_value_heads, c.intermediate_size),
                      importance(base, shards))  # smollm3's layer 3 has no RoPE
    ids = torch.randint(3, 259, (2, 12))
    torch.testing.assert_close(aux(ids).logits, prune_layers(base, [0, 3])(ids).logits)


def test_a_mixture_of_experts_base_is_not_narrowed(tiny_models):
    base, _ = load_causal_lm(tiny_models["mixtral"], torch.float32)
    with pytest.raises(KVPredError, match="mixture-of-experts"):
        narrow_copy(base, Width([0, 2], 4, 2, 32), None)


def test_a_narrow_copy_has_the_asked_shape_and_keeps_the_chosen_base_weights(tiny_llama, shards):
    base, _ = load_causal_lm(tiny_llama, torch.float32)  # 4 layers, 4 heads, 2 kv heads, MLP 128
    scores = importance(base, shards)
    aux = narrow_copy(base, Width([0, 2], heads=2, kv_heads=1, intermediate=32), scores)
    c = aux.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (2, 2, 1, 32)
    assert c.head_dim == base.config.head_dim
    q, kv = choose_heads(scores.heads[2], 2, Width([0, 2], 2, 1, 32))
    assert q.tolist() in ([0, 1], [2, 3]) and kv.tolist() == [q[0].item() // 2]  # both query heads of the kept group
    d = c.head_dim
    src, dst = base.model.layers[2].self_attn, aux.model.layers[1].self_attn
    torch.testing.assert_close(dst.k_proj.weight, src.k_proj.weight[kv.item() * d:(kv.item() + 1) * d])
    torch.testing.assert_close(dst.o_proj.weight, src.o_proj.weight[:, q[0] * d:(q[-1] + 1) * d])
    channels = scores.channels[2].topk(32).indices.sort().values
    torch.testing.assert_close(aux.model.layers[1].mlp.down_proj.weight,
                               base.model.layers[2].mlp.down_proj.weight[:, channels])


@pytest.mark.parametrize("arch", ["olmo2", "cohere"])
def test_query_and_key_norms_keep_the_weights_of_the_kept_heads(tiny_models, shards, arch):
    """OLMo 2 normalises the whole query and key projections, with a weight per row of each; Cohere's LayerNorms
    hold a weight per head and dimension."""
    base, _ = load_causal_lm(tiny_models[arch], torch.float32)
    with torch.no_grad():  # distinct weights (a random tiny model's norms are all ones)
        for name, p in base.named_parameters():
            if "_norm" in name or "_layernorm" in name:
                p.copy_(torch.rand_like(p))
    scores, width = importance(base, shards), Width([0, 2], heads=2, kv_heads=1, intermediate=32)
    aux = narrow_copy(base, width, scores)
    q, kv = choose_heads(scores.heads[2], 2, width)
    src, dst = base.model.layers[2].self_attn, aux.model.layers[1].self_attn
    d = aux.config.head_dim
    for norm, heads in (("q_norm", q), ("k_norm", kv)):
        kept = getattr(src, norm).weight.view(-1, d)[heads]
        torch.testing.assert_close(getattr(dst, norm).weight.view(-1, d), kept)
    assert aux(torch.randint(3, 259, (1, 8))).logits.isfinite().all()


@pytest.mark.parametrize("arch", ["stablelm", "helium"])
def test_heads_are_kept_whole_where_attention_is_sized_from_the_hidden_size(tiny_models, shards, arch):
    base, _ = load_causal_lm(tiny_models[arch], torch.float32)
    scores = importance(base, shards)
    with pytest.raises(KVPredError, match="cannot cut its heads: keep all 4 heads and 2 key/value heads"):
        narrow_copy(base, Width([0, 2], heads=2, kv_heads=1, intermediate=32), scores)
    aux = narrow_copy(base, Width([0, 2], heads=4, kv_heads=2, intermediate=32), scores)
    assert aux(torch.randint(3, 259, (1, 8))).logits.isfinite().all()


def test_the_cli_writes_an_auxiliary_that_fit_and_generate_use_as_kvp_c(tiny_llama, shards, tmp_path, capsys):
    common = ["--data", shards, "--device", "cpu", "--seq-len", "32", "--batch-size", "4", "--tokens", "256"]
    assert main(["narrow", "--model", tiny_llama, "--keep-layers", "0,2", "--heads", "2", "--kv-heads", "2",
                 "--intermediate", "32", "--out", str(tmp_path / "aux"), *common]) == 0
    assert "fewer" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "aux").config.intermediate_size == 32
    assert main(["fit", "--model", tiny_llama, "--aux", str(tmp_path / "aux"), "--source", "kv",
                 "--out", str(tmp_path / "fit"), *common]) == 0
    model = KVPredictionModel.from_pretrained(str(tmp_path / "fit"))
    assert model.config.aux.kind == "separate" and model.predictor.config.layer_map == [0, 0, 1, 1]
    assert model.generate(torch.randint(3, 259, (1, 10)), max_new_tokens=3).shape == (1, 13)
    (tmp_path / "aux").rename(tmp_path / "moved")
    with pytest.raises(KVPredError, match="aux' .the \"aux\": \"name_or_path\" field .*does not exist .moved"):
        KVPredictionModel.from_pretrained(str(tmp_path / "fit"))
    # an auxiliary of the same shapes with other weights in its place (narrow run again) is no longer the one
    assert main(["narrow", "--model", tiny_llama, "--keep-layers", "0,1", "--heads", "2", "--kv-heads", "2",
                 "--intermediate", "32", "--out", str(tmp_path / "aux"), *common]) == 0
    with pytest.raises(KVPredError, match="trained with the auxiliary .* its weights changed"):
        KVPredictionModel.from_pretrained(str(tmp_path / "fit"))


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "1024"], "--seq-len 1024 exceeds the model's context limit of 512"),
    (["--out", "BASE"], "already holds a model"),
    (["--out", "CHECKPOINT"], "already holds a model (the base, a kvpred checkpoint"),
    (["--out", "AFILE"], "is a file; give a folder for the narrow auxiliary"),
])
def test_narrow_commands_that_cannot_work_are_clear_errors(tiny_llama, shards, tmp_path, capsys, flags, message):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "kvpred_config.json").write_text("{}")
    places = {"BASE": tiny_llama, "AFILE": str(tmp_path / "afile"), "CHECKPOINT": str(tmp_path / "ckpt")}
    flags = [places.get(flag, flag) for flag in flags]
    argv = ["narrow", "--model", tiny_llama, "--heads", "2", "--kv-heads", "2", "--intermediate", "32", "--data",
            shards, "--device", "cpu", "--tokens", "64", "--seq-len", "32", "--out", str(tmp_path / "aux"), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "aux").exists()


@pytest.mark.parametrize("width, message", [
    (Width([0, 2], heads=3, kv_heads=2, intermediate=8), "multiple of kv_heads"),
    (Width([0, 2], heads=2, kv_heads=3, intermediate=8), "kv_heads must be"),
    (Width([0, 2], heads=2, kv_heads=1, intermediate=999), "intermediate must be"),
    (Width([1, 2], heads=2, kv_heads=1, intermediate=8), "start at 0"),
])
def test_impossible_widths_are_clear_errors(tiny_llama, shards, width, message):
    base, _ = load_causal_lm(tiny_llama, torch.float32)
    with pytest.raises(KVPredError, match=message):
        narrow_copy(base, width, importance(base, shards))


def test_fused_projections_keep_the_rows_of_the_kept_heads_and_channels(tiny_models, shards):
    """Phi-3 stacks its query, key and value rows in one qkv_proj, its MLP's gate and up rows in one gate_up_proj."""
    base, _ = load_causal_lm(tiny_models["phi3"], torch.float32)
    scores, width = importance(base, shards), Width([0, 2], heads=2, kv_heads=1, intermediate=32)
    aux = narrow_copy(base, width, scores)
    q, kv = choose_heads(scores.heads[2], 2, width)
    c, d = base.config, aux.config.head_dim
    src, dst = base.model.layers[2], aux.model.layers[1]

    def rows(heads: torch.Tensor, start: int) -> torch.Tensor:
        return (start + heads[:, None] * d + torch.arange(d)).flatten()
    q_rows, kv_rows = c.num_attention_heads * d, c.num_key_value_heads * d
    kept = torch.cat([rows(q, 0), rows(kv, q_rows), rows(kv, q_rows + kv_rows)])
    torch.testing.assert_close(dst.self_attn.qkv_proj.weight, src.self_attn.qkv_proj.weight[kept])
    channels = scores.channels[2].topk(32).indices.sort().values
    torch.testing.assert_close(dst.mlp.gate_up_proj.weight,
                               src.mlp.gate_up_proj.weight[torch.cat([channels, channels + c.intermediate_size])])
    assert aux(torch.randint(3, 259, (1, 8))).logits.isfinite().all()


def test_an_ungated_mlp_keeps_the_chosen_channels_and_their_biases(tiny_models, shards):
    base, _ = load_causal_lm(tiny_models["starcoder2"], torch.float32)
    scores = importance(base, shards)
    aux = narrow_copy(base, Width([0, 2], heads=2, kv_heads=1, intermediate=32), scores)
    channels = scores.channels[2].topk(32).indices.sort().values
    src, dst = base.model.layers[2].mlp, aux.model.layers[1].mlp
    torch.testing.assert_close(dst.c_fc.weight, src.c_fc.weight[channels])
    torch.testing.assert_close(dst.c_fc.bias, src.c_fc.bias[channels])
    torch.testing.assert_close(dst.c_proj.weight, src.c_proj.weight[:, channels])
    torch.testing.assert_close(dst.c_proj.bias, src.c_proj.bias)
