"""`kvpred bench ttft`, its FLOP accounting, the random-weight shapes and the fast path it times."""
import csv
import json

import pytest
import torch

from kvpred import bench
from kvpred.bench import (
    CSV_FIELDS,
    Dims,
    EagerStep,
    exact_flops,
    flop_ratio_full,
    flop_ratio_params,
    param_count,
    predicted_flops,
)
from kvpred.cli import main as cli_main
from kvpred import model as model_module
from kvpred.model import KVPredictionModel, cache_kwargs
from kvpred.models import KVPredError
from kvpred.predictor import PredictorConfig
from kvpred.shapes import SHAPES, random_causal_lm, random_kvp_model, shape_config
from kvpred.testing import save_tiny_model, tiny_config
from conftest import ARCHS



@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", arch="qwen2")


# ---------------------------------------------------------------- the command line
def test_cli_writes_table_and_files(tiny_path, tmp_path):
    rc = cli_main(["bench", "ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", "8,24",
                   "--batch", "1,2", "--repeats", "2", "--warmup", "0", "--decode-tokens", "3",
                   "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} == {"t.json", "t.csv", "t.md", "t.png"}
    with (tmp_path / "t.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_FIELDS
        rows = list(reader)
    assert sorted((int(r["batch"]), int(r["prompt_len"])) for r in rows) == [(1, 8), (1, 24), (2, 8), (2, 24)]
    for r in rows:
        for key in ("exact_ms", "aux_ms", "pred_ms", "pred_aux_ms", "decode_exact_tok_s", "decode_pred_tok_s",
                    "first_step_exact_ms", "first_step_pred_ms", "flop_ratio_params", "flop_ratio_full",
                    "predictor_flops_pct", "mem_pred_gib"):
            assert float(r[key]) > 0, key
        assert float(r["pred_p10_ms"]) <= float(r["pred_ms"]) <= float(r["pred_p90_ms"])
        assert abs(float(r["speedup"]) - float(r["exact_ms"]) / float(r["pred_ms"])) < 0.01 * float(r["speedup"])
        assert r["step"] == "eager (cpu), values deferred" and r["weights"] == "real weights"
    md = (tmp_path / "t.md").read_text()
    assert "| model | aux | B | N | exact ms | aux ms | predicted ms | speedup |" in md
    assert "| aux prefill | predictor | cache write | base step |" in md
    assert "kvpred bench ttft --model" in md and "## Targets" in md
    # the phases of predicted mode add up to its TTFT, run by run
    data = json.loads((tmp_path / "t.json").read_text())
    assert len(data["rows"]) == 4 and data["meta"][0]["command"].startswith("kvpred bench ttft")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile_step", ["off", "auto"])
def test_cli_on_a_gpu_times_a_checked_graph_step(tiny_path, tmp_path, compile_step):
    rc = cli_main(["bench", "ttft", "--model", str(tiny_path), "--device", "cuda", "--prompt-lens", "24",
                   "--batch", "2", "--repeats", "2", "--warmup", "0", "--decode-tokens", "3", "--no-plot",
                   "--compile-step", compile_step, "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    with (tmp_path / "t.csv").open() as f:
        step = next(csv.DictReader(f))["step"]
    assert step.startswith("cuda-graph (max|d logit| vs its eager run" if compile_step == "off"
                           else "cuda-graph, compiled (max|d logit| vs its eager run"), step


def test_cli_on_a_cpu_times_the_compiled_step_when_asked(tiny_path, tmp_path):
    rc = cli_main(["bench", "ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", "24",
                   "--repeats", "2", "--warmup", "1", "--decode-tokens", "3", "--no-plot", "--compile-step", "auto",
                   "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    with (tmp_path / "t.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["step"] == "compiled (cpu)" and float(row["pred_ms"]) > 0  # values not deferred: not the eager path


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_pipelined_bench_needs_the_graph_step_and_says_which_it_ran(tiny_path, tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    rc = cli_main(["bench", "ttft", "--model", str(tiny_path), "--device", device, "--prompt-lens", "24",
                   "--repeats", "2", "--warmup", "0", "--decode-tokens", "3", "--no-plot", "--pipeline", "auto",
                   "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    with (tmp_path / "t.csv").open() as f:
        row = next(csv.DictReader(f))
    if device == "cpu":
        assert "not pipelined (that needs the CUDA-graph step)" in row["step"]
        assert float(row["pred_predictor_ms"]) > 0
    else:
        assert "pipelined behind the auxiliary" in row["step"] and "not pipelined" not in row["step"]
        assert float(row["pred_ms"]) > 0 and row["pred_predictor_ms"] == "nan"  # overlapping phases: no breakdown


def test_report_merges_runs(tiny_path, tmp_path):
    for name, lens in (("a", "8"), ("b", "16")):
        assert bench.main(["ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", lens,
                           "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--out", str(tmp_path / "parts"),
                           "--name", name, "--no-plot"]) == 0
    assert not (tmp_path / "parts" / "a.png").exists()
    assert bench.main(["report", str(tmp_path / "parts" / "a.json"), str(tmp_path / "parts" / "b.json"),
                       "--out", str(tmp_path), "--name", "all"]) == 0
    rows = json.loads((tmp_path / "all.json").read_text())["rows"]
    assert [r["prompt_len"] for r in rows] == [8, 16]
    assert (tmp_path / "all.png").stat().st_size > 0 and (tmp_path / "all.md").exists()


@pytest.mark.parametrize("content", [b'{"results": []}', b"\xff\xfe"])
def test_report_refuses_a_file_that_is_no_bench_output(tmp_path, capsys, content):
    (tmp_path / "other.json").write_bytes(content)
    assert cli_main(["bench", "report", str(tmp_path / "other.json"), "--out", str(tmp_path)]) == 2
    assert "other.json" in capsys.readouterr().err


def test_outputs_never_overwrite_a_users_files_and_a_rerun_leaves_no_stale_table(tiny_path, tmp_path, capsys):
    run = ["ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", "8", "--repeats", "1",
           "--warmup", "0", "--decode-tokens", "2", "--out", str(tmp_path), "--name", "t"]
    (tmp_path / "t.md").write_text("my notes")
    assert cli_main(["bench", *run]) == 2 and "not benchmark results" in capsys.readouterr().err
    assert (tmp_path / "t.md").read_text() == "my notes"
    (tmp_path / "t.md").unlink()
    assert bench.main(run) == 0 and (tmp_path / "t.md").exists()
    assert bench.main([*run, "--no-plot"]) == 0 and not (tmp_path / "t.md").exists()  # an earlier run's table
    (tmp_path / "notes.txt").write_text("x")
    for flags in (["--out", str(tmp_path / "notes.txt")], ["--out", str(tmp_path / "new.json")],
                  ["--out", str(tmp_path), "--name", "../t"]):
        assert cli_main(["bench", "report", str(tmp_path / "t.json"), *flags]) == 2
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"meta": [], "rows": [{"model": "m"}]}))
    assert cli_main(["bench", "report", str(broken), "--out", str(tmp_path / "r")]) == 2
    assert "is not a `kvpred bench ttft` JSON" in capsys.readouterr().err


def test_cli_rejects_prompts_over_the_context(tiny_path, tmp_path, capsys):
    rc = cli_main(["bench", "ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", "500",
                   "--out", str(tmp_path)])
    assert rc == 2
    assert "do not fit" in capsys.readouterr().err


def test_cli_needs_two_decode_tokens_to_time_the_first_step_apart(tiny_path, tmp_path, capsys):
    rc = cli_main(["bench", "ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", "8",
                   "--decode-tokens", "1", "--out", str(tmp_path)])
    assert rc == 2
    assert "--decode-tokens must be at least 2" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--name", "a/b"], "is a file stem inside --out"),
                                            (["--warmup", "-1"], "--warmup at least 0"),
                                            (["--time-budget", "nan"], "--time-budget a positive number"),
                                            (["--max-batch-tokens", "0"], "--max-batch-tokens must be >= 1")])
def test_cli_refuses_settings_that_cannot_mean_anything(tiny_path, tmp_path, capsys, flags, message):
    assert cli_main(["bench", "ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", "8",
                     "--out", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_results_are_named_after_the_models_folder(tiny_path, tmp_path):
    assert bench.main(["ttft", "--model", f"{tiny_path}/", "--device", "cpu", "--prompt-lens", "8", "--repeats", "1",
                       "--warmup", "0", "--decode-tokens", "2", "--out", str(tmp_path), "--no-plot"]) == 0
    assert (tmp_path / f"ttft_cpu_{tiny_path.name}.json").is_file()


def test_each_shape_is_timed_once(tiny_path, tmp_path):
    assert bench.main(["ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", "8,8", "--batch", "1,1",
                       "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--out", str(tmp_path), "--name",
                       "u", "--no-plot"]) == 0
    assert len(json.loads((tmp_path / "u.json").read_text())["rows"]) == 1


def test_without_prompt_lens_the_default_lengths_that_fit_the_context_are_timed(tiny_path, tmp_path):
    """The tiny model's context is 512: of 128, 512, 2048 and 8192, only 128 leaves room for the decode tokens."""
    assert bench.main(["ttft", "--model", str(tiny_path), "--device", "cpu", "--repeats", "1", "--warmup", "0",
                       "--decode-tokens", "2", "--out", str(tmp_path), "--name", "d", "--no-plot"]) == 0
    data = json.loads((tmp_path / "d.json").read_text())
    assert [r["prompt_len"] for r in data["rows"]] == [128]
    assert "--prompt-lens 128 " in data["meta"][0]["command"]  # the command that reproduces it names them


def test_max_batch_tokens_skips_and_says_so(tiny_path, tmp_path):
    assert bench.main(["ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", "8,32",
                       "--batch", "1,4", "--max-batch-tokens", "64", "--repeats", "1", "--warmup", "0",
                       "--decode-tokens", "2", "--out", str(tmp_path), "--name", "s", "--no-plot"]) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert sorted((r["batch"], r["prompt_len"]) for r in data["rows"]) == [(1, 8), (1, 32), (4, 8)]
    assert data["notes"] == ["skipped batch 4, prompt 32: batch x length 128 > --max-batch-tokens 64"]


def test_a_run_that_measures_nothing_keeps_earlier_results_and_an_out_file_is_refused_first(tiny_path, tmp_path,
                                                                                           capsys):
    argv = ["bench", "ttft", "--model", str(tiny_path), "--device", "cpu", "--prompt-lens", "8", "--repeats", "1",
            "--warmup", "0", "--decode-tokens", "2", "--name", "k", "--no-plot"]
    assert cli_main(argv + ["--out", str(tmp_path)]) == 0
    earlier = (tmp_path / "k.json").read_text()
    assert cli_main(argv + ["--out", str(tmp_path), "--max-batch-tokens", "1"]) == 2
    assert "no shape was measured" in capsys.readouterr().err and (tmp_path / "k.json").read_text() == earlier
    (tmp_path / "afile").write_text("mine")
    assert cli_main(argv + ["--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err


# ---------------------------------------------------------------- FLOP accounting
def test_param_rule_on_smollm2_shape():
    # 49152*576 embedding + 30 layers * (2*576*576 + 2*576*192 + 3*576*1536) = 28,311,552 + 30 * 3,538,944
    base = shape_config("smollm2-135m")
    assert param_count(base) == 134_479_872
    aux = shape_config("smollm2-135m")
    aux.num_hidden_layers = 8  # KVP-LP 0.25 keeps layers 0, 4, ..., 28
    assert param_count(aux) == 56_623_104
    assert flop_ratio_params(base, aux) == pytest.approx(2.375, abs=1e-4)


def test_flop_counts_by_hand():
    cfg = tiny_config("llama", layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2)
    cfg.vocab_size, cfg.intermediate_size = 10, 8
    aux = tiny_config("llama", layers=1, hidden=4, heads=2, kv_heads=1, head_dim=2)
    aux.vocab_size, aux.intermediate_size = 10, 8
    # per layer: q 4*4=16, k+v 2*4*2=16, o 4*4=16, mlp 3*4*8=96 -> 144; plus one 10x4 embedding
    assert Dims.of(cfg).linear_params(1) == 144
    assert param_count(cfg) == 40 + 2 * 144 and param_count(aux) == 40 + 144
    assert flop_ratio_params(cfg, aux) == pytest.approx(328 / 184)
    # exact, 4 tokens: 2*4*2*144 = 2304 linear + 4*2 layers*2 heads*2 dim*(1+2+3+4) = 320 attention + 2*4*10 head
    assert exact_flops(cfg, 4) == 2304 + 320 + 80
    # predicted, 4 tokens: aux on 3 tokens, its only layer up to q/k/v (transformers projects q first): 2*3*32 = 192,
    # no attention run; predictor 2*3 tokens*2 base layers*2 in*(2+2) out = 96; base step 2*2*144 = 576 +
    # 4*2*2*2*(3+1) = 128 + 80
    pconf = PredictorConfig(layer_map=[0, 0], in_features=2, key_features=2, value_features=2)
    assert predicted_flops(cfg, aux, pconf, 4) == 192 + 96 + 576 + 128 + 80
    assert flop_ratio_full(cfg, aux, pconf, 4) == pytest.approx(2704 / 1072)
    # hidden-state input: the aux runs its whole layer (2*3*144 = 864) and attention (4*1*2*2*(1+2+3) = 96) for the
    # final normed state; the predictor reads 4 wide inputs: 2*3*2*4*(2+2) = 192
    hidden = PredictorConfig(layer_map=[0, 1], in_features=4, key_features=2, value_features=2, source="hidden")
    assert predicted_flops(cfg, aux, hidden, 4) == 864 + 96 + 192 + 576 + 128 + 80
    # factorised at rank 1: each of the 2 taps projected to 1 (2*3*2*4*1 = 48), then 2*3*2*1*(2+2) = 48 up
    factorised = PredictorConfig(layer_map=[0, 1], in_features=4, key_features=2, value_features=2,
                                 source="hidden", rank=1)
    assert predicted_flops(cfg, aux, factorised, 4) == 864 + 96 + 48 + 48 + 576 + 128 + 80
    # an exact tail of 2: aux and predictor on 2 tokens (128 + 64), the base on 2 tokens over 2 predicted ones:
    # 2*2*2*144 = 1152 linear + 4*2*2*2*(2*2 + 1+2) = 224 attention + 80 head; a tail of the whole prompt is exact
    assert predicted_flops(cfg, aux, pconf, 4, tail=2) == 128 + 64 + 1152 + 224 + 80
    assert predicted_flops(cfg, aux, pconf, 4, tail=4) == exact_flops(cfg, 4)


# phi3: fused projections; nemotron, arcee: ungated MLPs
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe",
                                  "hunyuan_v1_moe", "phi3", "nemotron", "arcee"])
def test_param_rule_counts_the_linear_weights_a_token_runs_through(arch):
    """With experts, only the 2 of 4 each token is routed to count (and the router, and the shared experts or MLP);
    GLM-4.5's first layer is dense."""
    model = random_causal_lm(tiny_config(arch), torch.float32, "meta")
    linear = sum(p.numel() * (0.5 if ".experts." in name else 1)
                 for name, p in model.model.layers.named_parameters() if "norm" not in name)
    assert param_count(model.config) == model.config.vocab_size * model.config.hidden_size + linear


# ---------------------------------------------------------------- random-weight shapes
PUBLIC_PARAMS = {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
                 "llama-3.1-8b": 8_030_261_248, "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304,
                 "smollm3-3b": 3_075_098_624, "qwen1.5-moe-a2.7b": 14_315_784_192, "qwen3-30b-a3b": 30_532_122_624,
                 "qwen3-0.6b": 596_049_920, "gemma-3-1b": 999_885_952, "phi-4": 14_659_507_200,
                 "phi-3-mini": 3_821_079_552}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_have_the_public_parameter_counts(name):
    model = random_causal_lm(shape_config(name), torch.bfloat16, "meta")  # meta: shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) == PUBLIC_PARAMS[name]


def test_random_kvp_models_share_a_base():
    lp = random_kvp_model("qwen2.5-1.5b", aux_keep=0.25, device="meta")
    c = random_kvp_model("qwen2.5-1.5b", aux_shape="qwen2.5-0.5b", device="meta", base=lp.base)
    assert c.base is lp.base and lp.aux.config.num_hidden_layers == 7
    assert (c.predictor.config.in_features, c.predictor.config.key_features) == (128, 256)
    assert bench.variant_name(lp) == "KVP-LP 0.25 (7/28 layers)" and bench.variant_name(c) == "KVP-C qwen2.5-0.5b"
    hidden = random_kvp_model("qwen2.5-1.5b", aux_keep=0.25, source="hidden", device="meta", base=lp.base)
    assert hidden.predictor.config.in_features == 1536 and max(hidden.predictor.config.layer_map) == 7
    assert bench.variant_name(hidden, 0.25) == "KVP-LP 0.25 (7/28 layers), hidden-state input"
    factorised = random_kvp_model("qwen2.5-1.5b", aux_keep=0.25, source="hidden", rank=64, device="meta",
                                  base=lp.base)
    assert factorised.predictor.down.shape == (len(factorised.predictor.config.taps), 64, 1536)
    assert bench.variant_name(factorised, 0.25).endswith("hidden-state input, rank-64 predictor")
    with pytest.raises(KVPredError, match="hidden-state input"):
        random_kvp_model("qwen2.5-1.5b", aux_keep=0.25, rank=64, device="meta", base=lp.base)
    with pytest.raises(KVPredError, match="shared tokenizer"):
        random_kvp_model("qwen2.5-1.5b", aux_shape="llama-3.2-1b", device="meta")
    with pytest.raises(KVPredError, match="unknown model shape"):
        shape_config("gpt-5")


# ---------------------------------------------------------------- the fast path matches the plain path
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_prefill_and_decode_match_the_plain_path(arch, tmp_path):
    model = KVPredictionModel.from_pretrained(str(save_tiny_model(tmp_path / arch, arch=arch)), keep_ratio=0.5)
    ids = torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(1))
    for mode in ("exact", "aux", "predicted"):
        plain, _ = model.prefill(ids, mode=mode)
        cache = model.new_cache(2, 40, mode)
        fast = model.prefill_into(cache, ids, mode=mode)
        assert torch.allclose(fast, plain, atol=1e-4), mode
        assert torch.equal(fast[:, -1].argmax(-1), plain[:, -1].argmax(-1))
        assert cache.get_seq_length() == 30
    # greedy decoding on the preallocated cache = transformers' generate on a DynamicCache
    for mode in ("exact", "predicted"):
        expected = model.generate(ids, mode=mode, max_new_tokens=6)[:, 30:]
        cache = model.new_cache(2, 40)
        if mode == "exact":
            first = model.prefill_into(cache, ids, mode="exact")[:, -1].argmax(-1)
            step = EagerStep(model, cache)
            step.start(first[:, None], torch.full((2, 1), 30), 30)
            tokens = [first] + [step() for _ in range(5)]
        else:
            model.predict_into(cache, ids)
            step = EagerStep(model, cache)
            step.start(ids[:, -1:], torch.full((2, 1), 29), 29)
            tokens = [step() for _ in range(6)]
        ended = ((expected == 2).cumsum(1) - (expected == 2).long()) > 0  # generate pads a row after its EOS (2)
        assert torch.equal(torch.stack(tokens, 1).masked_fill(ended, 0), expected), mode


@pytest.mark.parametrize("arch", ARCHS)
def test_static_step_matches_the_dynamic_step(arch, tmp_path):
    """The fixed-shape step a CUDA graph captures (whole buffer, mask, GQA-packed SDPA) = the plain step."""
    model = KVPredictionModel.from_pretrained(str(save_tiny_model(tmp_path / arch, arch=arch)), keep_ratio=0.5)
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(2, 32)
    model.predict_into(cache, ids)
    plain = model.base(input_ids=ids[:, -1:], use_cache=True, logits_to_keep=1, **cache_kwargs(model.base, cache))
    attention = model.base.config._attn_implementation
    model.predict_into(cache, ids)
    slot, mask = torch.tensor([19]), torch.zeros(2, 1, 1, 32, dtype=torch.bool)
    mask[..., :20] = True
    with model.static_step(cache, slot):
        static = model.base(input_ids=ids[:, -1:], position_ids=torch.full((2, 1), 19), attention_mask=mask,
                            use_cache=True, logits_to_keep=1, **cache_kwargs(model.base, cache))
    assert torch.allclose(static.logits, plain.logits, atol=1e-4)
    assert model.base.config._attn_implementation == attention and cache.step_slot is None  # restored


def test_identity_equivalence_holds_on_the_fast_path(tmp_path):
    """aux == base with an identity predictor: predicted prefill_into gives exact's logits."""
    model = KVPredictionModel.from_pretrained(str(save_tiny_model(tmp_path / "m", arch="qwen3")), keep_ratio=1.0)
    ids = torch.randint(3, 259, (1, 25), generator=torch.Generator().manual_seed(3))
    exact = model.prefill_into(model.new_cache(1, 25), ids, mode="exact")
    predicted = model.prefill_into(model.new_cache(1, 25), ids, mode="predicted")
    assert torch.allclose(predicted, exact, atol=1e-4)


@pytest.mark.parametrize("source", ["kv", "hidden"])
def test_cpu_chunks_write_the_same_cache_as_one_pass(source, tmp_path, monkeypatch):
    """On the CPU the predictor and the write run over chunks of tokens: the cache is what one pass writes, on a
    left-padded batch too."""
    model = KVPredictionModel.from_pretrained(str(save_tiny_model(tmp_path / "m", arch="qwen3")), keep_ratio=0.5,
                                              source=source)
    ids = torch.randint(3, 259, (2, 15), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    whole, chunked = model.new_cache(2, 16), model.new_cache(2, 16)
    model.predict_into(whole, ids, mask)
    monkeypatch.setattr(model_module, "CPU_PREDICT_ROWS", 6)  # 3 tokens a chunk at batch 2: 5 chunks
    marks = []
    model.predict_into(chunked, ids, mask, mark=marks.append)
    assert marks.count("predictor") == 5
    assert torch.allclose(chunked.key_arena, whole.key_arena, atol=1e-6)
    assert torch.allclose(chunked.value_arena, whole.value_arena, atol=1e-6)
    plain = torch.cat([layer.keys for layer in model.predicted_cache(ids, mask).layers])
    assert torch.allclose(plain, torch.cat([layer.keys for layer in chunked.layers]), atol=1e-6)


@pytest.mark.parametrize("source", ["kv", "hidden"])
def test_compiled_predictor_writes_the_same_cache(source, tmp_path):
    """compile_predictor changes how the predicted K/V get into the cache, not what gets there (traced by dynamo
    here; the inductor code it generates on a GPU is timed by `kvpred bench ttft --compile auto`)."""
    model = KVPredictionModel.from_pretrained(str(save_tiny_model(tmp_path / "m", arch="qwen3")), keep_ratio=0.5,
                                              source=source)
    ids = torch.randint(3, 259, (2, 15), generator=torch.Generator().manual_seed(5))
    eager, compiled = model.new_cache(2, 16), model.new_cache(2, 16)
    model.predict_into(eager, ids)
    model.compile_predictor(backend="aot_eager")
    for length in (15, 11):  # a second length reuses the dynamic-shape graph
        model.predict_into(compiled, ids[:, :length])
        if length == 15:
            assert torch.allclose(compiled.key_arena, eager.key_arena, atol=1e-5)
            assert torch.allclose(compiled.value_arena, eager.value_arena, atol=1e-5)
    assert compiled.get_seq_length() == 10


def test_hidden_source_reads_the_same_taps_as_training(tmp_path):
    """The "hidden" input: per-layer normed inputs plus the final normed state, which a pruned aux's last skipped
    base layers read; predicted prefill works on both paths."""
    model = KVPredictionModel.from_pretrained(str(save_tiny_model(tmp_path / "m")), keep_ratio=0.5, source="hidden")
    assert max(model.config.predictor.layer_map) == model.aux.config.num_hidden_layers  # the final-norm tap
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(4))
    plain, _ = model.prefill(ids, mode="predicted")
    fast = model.prefill_into(model.new_cache(1, 12), ids, mode="predicted")
    assert torch.allclose(fast, plain, atol=1e-4)


def test_aux_pass_stops_after_the_last_keys_and_values(tmp_path):
    model = KVPredictionModel.from_pretrained(str(save_tiny_model(tmp_path / "m")), keep_ratio=0.5)
    mlp_calls = []
    hook = model.aux.model.layers[-1].mlp.register_forward_hook(lambda *a: mlp_calls.append(1))
    ids = torch.randint(3, 259, (1, 12))
    key_in, value_in = model.aux_inputs(ids, None, None)
    hook.remove()
    assert mlp_calls == [] and key_in.shape[0] == value_in.shape[0] == 2
    full = model.aux.model(input_ids=ids, output_hidden_states=True).hidden_states[-2]  # input of the last layer
    last = model.aux.model.layers[-1]
    assert torch.allclose(key_in[-1], last.self_attn.k_proj(last.input_layernorm(full)), atol=1e-5)


def test_buffer_cache_refuses_to_overflow(tmp_path):
    model = KVPredictionModel.from_pretrained(str(save_tiny_model(tmp_path / "m")), keep_ratio=0.5)
    with pytest.raises(KVPredError, match="does not fit"):
        model.prefill_into(model.new_cache(1, 8), torch.randint(3, 259, (1, 10)), mode="exact")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_step_matches_the_eager_step(tmp_path):
    model = KVPredictionModel.from_pretrained(str(save_tiny_model(tmp_path / "m")), keep_ratio=0.5,
                                              device="cuda")
    ids = torch.randint(3, 259, (2, 20), device="cuda")
    cache = model.new_cache(2, 28)
    graph = bench.GraphStep(model, cache)
    model.predict_into(cache, ids)
    eager = EagerStep(model, cache)
    eager.start(ids[:, -1:], torch.full((2, 1), 19, device="cuda"), 19)
    expected = [eager() for _ in range(5)]
    model.predict_into(cache, ids)
    graph.start(ids[:, -1:], torch.full((2, 1), 19, device="cuda"), 19)
    got = [graph().clone() for _ in range(5)]
    assert torch.equal(torch.stack(got), torch.stack(expected))


def test_efficiency_targets_say_when_no_prompt_was_long_enough_to_judge_them():
    row = {"prompt_len": 128, "eff_params": 2.0, "eff_full": 0.5, "predictor_write_pct": 2.0,
           "predictor_flops_pct": 1.5, "decode_pred_vs_exact": 1.0, "first_step_exact_ms": 3.0,
           "first_step_pred_ms": 4.5}
    lines = bench.targets([row])
    assert all("not measured (no prompt that long)" in line for line in lines[:2])
    assert "1/1 rows" in bench.targets([{**row, "prompt_len": 2048}])[0]
    assert "FLOPs, its floor at equal efficiency, is 1.5%" in lines[2]
    assert "the first step takes 1.5 ms more" in lines[3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_bench_with_prefill_graphs_replays_every_modes_prompt_pass(tiny_path, tmp_path):
    rc = cli_main(["bench", "ttft", "--model", str(tiny_path), "--device", "cuda", "--prompt-lens", "24,130,400",
                   "--batch", "3", "--repeats", "2", "--warmup", "0", "--decode-tokens", "3", "--no-plot",
                   "--pipeline", "auto", "--prefill-graphs", "auto", "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    with (tmp_path / "t.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt_len"] for r in rows] == ["24", "130", "400"]
    for row, columns in zip(rows, (128, 256)):
        assert f"replayed as CUDA graphs over {columns} columns" in row["step"]
    assert "prompt passes eager (more than 1024 tokens a pass)" in rows[2]["step"]  # 3 rows x 512 columns
    assert all(float(row[k]) > 0 for row in rows for k in ("exact_ms", "aux_ms", "pred_ms"))
