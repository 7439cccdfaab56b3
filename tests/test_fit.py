"""Specification of the training-free predictor: ridge fit, factorised (low-rank) predictor, compression."""
import json

import pytest
import torch

from kvpred.cli import main
from kvpred.data import PackedTokens
from kvpred.fit import FitConfig, factorise, fit_predictor, input_moments
from kvpred.model import KVPredictionModel
from kvpred.models import KVPredError
from kvpred.predictor import PredictorConfig
from kvpred.train import Distillation, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
def batches(shards: str, batch_size: int = 4):
    return PackedTokens(shards, "train", seq_len=32, batch_size=batch_size)


def hidden_model(tiny_llama) -> KVPredictionModel:
    torch.manual_seed(0)
    return KVPredictionModel.from_pretrained(tiny_llama, keep_layers=[0, 2], source="hidden")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("arch, source", [("llama", "kv"), ("llama", "hidden"), ("olmo2", "hidden"),
                                          ("gemma3_text", "kv"), ("gemma3_text", "hidden"), ("phi3", "kv")])
def test_ridge_fit_predicts_base_keys_and_values_better_than_the_initial_predictor(tiny_models, shards, arch, source):
    model = KVPredictionModel.from_pretrained(tiny_models[arch], keep_layers=[0, 2], source=source)
    report = fit_predictor(model, batches(shards), FitConfig(tokens=512, seq_len=32, batch_size=4))
    for kind in ("key", "value"):
        assert mean(report[f"{kind}_rel_error_after"]) < 0.9 * mean(report[f"{kind}_rel_error_before"])


def test_factorised_predictor_at_full_rank_computes_the_same_maps(tiny_llama, shards):
    model = hidden_model(tiny_llama)
    xtx = input_moments(model, batches(shards), 256)
    full_rank, (code_width,) = model.predictor, {model.predictor.config.in_features}
    lowrank, errors = factorise(full_rank, xtx, code_width)
    taps = torch.randn(3, 2, 5, code_width)
    for got, want in zip(lowrank(taps, taps), full_rank(taps, taps)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert max(errors) < 1e-6


def test_factorisation_reports_its_output_error_and_beats_an_unweighted_svd(tiny_llama, shards):
    """At rank r the maps are truncated in the metric of the calibration inputs: the error reported per tap is the
    relative output error measured on those inputs, and plain SVD truncation of the weights does worse there."""
    model, rank = hidden_model(tiny_llama), 4
    ids = next(iter(batches(shards, batch_size=8)))
    taps = model.aux_inputs(ids, None, None)[0]
    xtx = input_moments(model, [ids], ids.numel())
    lowrank, errors = factorise(model.predictor, xtx, rank)
    want = torch.cat(model.predictor(taps, taps), -1)  # [L, B, T, key+value]
    got = torch.cat(lowrank(taps, taps), -1)
    for code, tap in enumerate(model.predictor.config.taps):
        layers = [i for i, j in enumerate(model.predictor.config.layer_map) if j == tap]
        y, y_low = want[layers].permute(1, 2, 0, 3).flatten(2), got[layers].permute(1, 2, 0, 3).flatten(2)
        measured = ((y - y_low).pow(2).sum() / (y - y.mean((0, 1))).pow(2).sum()).sqrt().item()
        assert measured == pytest.approx(errors[code], rel=1e-3)

    white = torch.eye(xtx.shape[-1], dtype=torch.float64).expand_as(xtx).clone()  # mean 0, covariance I
    plain = factorise(model.predictor, white, rank)[0]  # so: the weights' own truncated SVD
    assert (want - got).pow(2).sum() < (want - torch.cat(plain(taps, taps), -1)).pow(2).sum()


def test_factorised_predictor_is_cheaper_and_round_trips_through_a_checkpoint(tiny_llama, shards, tmp_path):
    model = hidden_model(tiny_llama)
    full = model.predictor.config.multiply_adds_per_token()
    model.predictor, _ = factorise(model.predictor, input_moments(model, batches(shards), 256), 4)
    model.config.predictor = model.predictor.config
    assert model.predictor.config.multiply_adds_per_token() < full / 3
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "kvpred_config.json").read_text())["predictor"]["rank"] == 4
    loaded = KVPredictionModel.from_pretrained(str(tmp_path / "ckpt"))
    ids = torch.randint(3, 259, (2, 12))
    torch.testing.assert_close(loaded.prefill(ids)[0], model.prefill(ids)[0])


def test_training_a_factorised_predictor_reaches_its_shared_projection(tiny_llama, shards):
    model = hidden_model(tiny_llama)
    model.predictor, _ = factorise(model.predictor, input_moments(model, batches(shards), 256), 4)
    model.config.predictor = model.predictor.config
    losses = Distillation(model, TrainConfig(z_loss=0.0)).forward(torch.randint(3, 259, (2, 16)), None)
    losses["kv_l1"].backward()
    assert model.predictor.down.grad is not None and model.predictor.down.grad.abs().sum() > 0


def test_cli_fit_with_rank_and_compress_write_factorised_checkpoints(tiny_llama, shards, tmp_path, capsys):
    common = ["--data", shards, "--device", "cpu", "--seq-len", "32", "--batch-size", "4"]
    assert main(["fit", "--model", tiny_llama, "--keep-layers", "0,2", "--source", "hidden", "--out",
                 str(tmp_path / "fit"), "--tokens", "256", "--rank", "8", *common]) == 0
    report = json.loads((tmp_path / "fit" / "fit_report.json").read_text())
    fitted = KVPredictionModel.from_pretrained(str(tmp_path / "fit"))
    assert report["rank"] == fitted.predictor.config.rank == 8
    assert len(report["factorised_rel_error_per_tap"]) == len(fitted.predictor.config.taps)
    capsys.readouterr()
    assert main(["fit", "--model", str(tmp_path / "fit"), "--out", str(tmp_path / "refit"), "--tokens", "256",
                 "--rank", "4", *common]) == 2  # no refit of a factorised predictor, whatever --rank says
    assert "is a checkpoint with a factorised predictor (rank 8), which fit cannot refit" in capsys.readouterr().err
    assert main(["fit", "--model", tiny_llama, "--keep-layers", "0,2", "--source", "hidden", "--out",
                 str(tmp_path / "full"), "--tokens", "256", *common]) == 0
    calibrated = json.loads((tmp_path / "full" / "kvpred_config.json").read_text())
    calibrated["refine_thresholds"] = {"signal": "entropy", "off_below": 1.0, "eager_above": 2.0}
    calibrated["chat_exact_tail"] = 1
    (tmp_path / "full" / "kvpred_config.json").write_text(json.dumps(calibrated))
    assert main(["compress", "--model", str(tmp_path / "full"), "--rank", "4", "--out", str(tmp_path / "small"),
                 "--tokens", "256", *common]) == 0
    assert "fewer" in capsys.readouterr().out
    small = KVPredictionModel.from_pretrained(str(tmp_path / "small"))
    assert small.predictor.config.rank == 4  # what was measured for the old maps is dropped:
    assert small.config.refine_thresholds is None and small.config.chat_exact_tail is None
    out = small.generate(torch.randint(3, 259, (1, 10)), max_new_tokens=3)
    assert out.shape == (1, 13)


def test_a_checkpoint_in_out_is_replaced_only_with_overwrite(tiny_llama, shards, tmp_path, capsys):
    """fit, compress and calibrate share the rule: a kvpred checkpoint already in --out is refused before any work;
    --overwrite replaces it, and the reports of the checkpoint it replaced go with it."""
    out = tmp_path / "out"
    fit = ["fit", "--model", tiny_llama, "--keep-layers", "0,2", "--source", "hidden", "--out", str(out), "--data",
           shards, "--device", "cpu", "--tokens", "64", "--seq-len", "32", "--batch-size", "2"]
    assert main(fit + ["--save-dtype", "bfloat16"]) == 0
    assert KVPredictionModel.from_pretrained(str(out)).predictor.key_weight.dtype == torch.float32  # loaded as asked
    from safetensors import safe_open
    with safe_open(str(out / "predictor.safetensors"), "pt") as f:
        assert f.get_tensor("key_weight").dtype == torch.bfloat16
    (out / "calibration.json").write_text("{}")  # as a calibrate into this folder would have left
    before = (out / "predictor.safetensors").read_bytes()
    capsys.readouterr()
    for argv in (fit, ["compress", "--model", str(out), "--aux-rank", "1", "--out", str(out)],
                 ["calibrate", "--model", str(out), "--data", shards, "--out", str(out), "--device", "cpu"]):
        assert main(argv) == 2
        assert f"{out} already holds a kvpred checkpoint: choose another folder, or pass --overwrite" in \
            capsys.readouterr().err
    assert (out / "predictor.safetensors").read_bytes() == before
    assert main(fit + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["fit_report.json", "kvpred_config.json"]
    assert (out / "predictor.safetensors").read_bytes() != before  # float32 now


def test_fit_and_compress_have_no_dtype_flag_they_would_ignore(tiny_llama, tmp_path, capsys):
    for command in ("fit", "compress"):
        with pytest.raises(SystemExit):
            main([command, "--model", tiny_llama, "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                  "--dtype", "bfloat16"])
        assert "unrecognized arguments: --dtype bfloat16" in capsys.readouterr().err


def test_compress_refuses_a_kv_input_predictor_before_its_calibration_pass(tiny_llama, shards, tmp_path, capsys,
                                                                           monkeypatch):
    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(tmp_path / "kv")
    import kvpred.fit

    monkeypatch.setattr(kvpred.fit, "input_moments", lambda *a, **k: pytest.fail("the pass ran"))
    assert main(["compress", "--model", str(tmp_path / "kv"), "--rank", "4", "--out", str(tmp_path / "small"),
                 "--data", shards, "--device", "cpu", "--tokens", "64", "--seq-len", "32"]) == 2
    assert "needs hidden-state input, but this one reads 'kv'" in capsys.readouterr().err


def test_the_ridge_penalty_is_relative_to_each_maps_own_inputs():
    from kvpred.fit import _solve

    torch.manual_seed(0)
    x, y = torch.randn(200, 5, dtype=torch.float64), torch.randn(200, 3, dtype=torch.float64)
    stats = [(torch.cat([x * s, torch.ones(200, 1, dtype=torch.float64)], 1), y) for s in (1.0, 10.0)]
    xtx = torch.stack([a.T @ a for a, _ in stats])
    xty = torch.stack([a.T @ b for a, b in stats])
    w = _solve(xtx, xty, torch.zeros(6, 3, dtype=torch.float64), ridge=0.1)
    # inputs 10x as large: the same fit, weights a tenth (a penalty shared by all maps would shrink them less)
    torch.testing.assert_close(w[1, :5], w[0, :5] / 10)
    torch.testing.assert_close(w[1, 5], w[0, 5])


def test_many_maps_of_hundreds_of_inputs_solve_together_with_two_threads():
    # SmolLM2's hidden-state maps: 30 systems of 577 unknowns. torch 2.13's batched LU solve fails on them on the CPU
    # after torch.set_num_threads(2) (which the test session has called), so the fit must not depend on it.
    from kvpred.fit import _solve

    torch.manual_seed(0)
    torch.set_num_threads(2)
    x = torch.randn(3, 1200, 577, dtype=torch.float64)
    xtx, xty = x.transpose(1, 2) @ x, x.transpose(1, 2) @ torch.randn(3, 1200, 4, dtype=torch.float64)
    w = _solve(xtx, xty, torch.zeros(577, 4, dtype=torch.float64), ridge=1e-3)
    for i in range(3):  # each map as if solved alone
        torch.testing.assert_close(w[i:i + 1], _solve(xtx[i:i + 1], xty[i:i + 1], torch.zeros(577, 4,
                                                                                           dtype=torch.float64), 1e-3))


def test_singular_statistics_without_a_ridge_are_refused():
    from kvpred.fit import _solve

    x = torch.randn(100, 2, dtype=torch.float64)
    a = torch.cat([x, x[:, :1], torch.ones(100, 1, dtype=torch.float64)], 1)  # a repeated input column
    with pytest.raises(KVPredError, match="singular"):
        _solve((a.T @ a)[None], (a.T @ torch.randn(100, 2, dtype=torch.float64))[None],
               torch.zeros(4, 2, dtype=torch.float64), ridge=0.0)


@pytest.mark.parametrize("argv, message", [
    (["fit", "--keep-layers", "0,2", "--source", "kv", "--rank", "4"], "hidden-state predictor"),
    (["compress", "--rank", "4"], "hidden-state input"),
    (["fit", "--keep-layers", "0,2", "--seq-len", "1024"], "--seq-len 1024 exceeds the model's context limit of 512"),
    (["fit", "--keep-layers", "0,2", "--ridge", "nan"], "--ridge must be a finite number >= 0"),
    (["fit", "--keep-layers", "0,2", "--ridge", "inf"], "--ridge must be a finite number >= 0"),
    (["fit", "--keep-layers", "0,2", "--ridge", "0", "--tokens", "1", "--seq-len", "1", "--batch-size", "1"],
     "--ridge 0 needs at least"),
    (["fit", "--keep-layers", "0,2", "--source", "hidden", "--rank", "65"], "rank 65 is not in [1, 64]"),
    (["fit", "--keep-layers", "0,2", "--source", "hidden", "--rank", "4", "--tokens", "1", "--seq-len", "1",
      "--batch-size", "1"], "do not vary over the calibration tokens"),
    (["fit", "--keep-layers", "0,2", "--keep-ratio", "0.5"], "keep_ratio or its keep_layers, not both"),
    (["fit", "--keep-layers", "0,2", "--out", "BASE"], "holds a Hugging Face model"),
    (["compress", "--aux-rank", "4", "--out", "BASE"], "holds a Hugging Face model"),
])
def test_fits_that_cannot_work_are_clear_errors(tiny_llama, shards, tmp_path, capsys, argv, message):
    argv = [tiny_llama if arg == "BASE" else arg for arg in argv]
    argv = argv[:1] + ["--model", tiny_llama, "--data", shards, "--out", str(tmp_path / "x"), "--device", "cpu",
                       "--tokens", "64", "--seq-len", "32", "--batch-size", "2"] + argv[1:]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fit", "narrow"])
def test_a_malformed_layer_list_is_refused_by_argparse(tiny_llama, tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--model", tiny_llama, "--keep-layers", "0,,2", "--data", str(tmp_path), "--out",
              str(tmp_path / "o"), "--heads", "2", "--kv-heads", "2", "--intermediate", "8"])
    assert exit_.value.code == 2
    assert "argument --keep-layers: expected comma-separated layer numbers" in capsys.readouterr().err


def test_singular_statistics_are_a_clear_error_whatever_lapack_does():
    from kvpred.fit import _solve
    xtx = torch.zeros(1, 3, 3, dtype=torch.float64)  # inputs that never vary
    with pytest.raises(KVPredError, match="statistics are singular"):
        _solve(xtx, torch.ones(1, 3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64), 0.0)


def test_options_that_build_a_new_model_are_refused_for_a_checkpoint(tiny_llama, tmp_path):
    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(tmp_path / "fitted")
    with pytest.raises(KVPredError, match=f"already a kvpred checkpoint.*the source given.*its base \\({tiny_llama}"):
        KVPredictionModel.from_pretrained(str(tmp_path / "fitted"), source="hidden")


def test_a_rank_without_hidden_input_is_refused_by_the_config():
    with pytest.raises(ValueError, match="hidden-state input"):
        PredictorConfig(layer_map=[0], in_features=4, key_features=4, value_features=4, source="kv", rank=2)


@pytest.mark.parametrize("flag", ["--tokens", "--seq-len", "--batch-size"])
def test_calibration_sizes_must_be_positive(tiny_llama, tmp_path, flag, capsys):
    assert main(["fit", "--model", tiny_llama, "--data", str(tmp_path), "--out", str(tmp_path / "o"), flag, "0"]) == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # compress and narrow share these flags
        main(["compress", "--model", tiny_llama, "--rank", "2", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
              flag, "0"])
    assert exit_.value.code == 2 and f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err


def test_compacting_adapters_keeps_their_products_up_to_the_rank_asked_for():
    """Stacked rounds of rank-3 adapters (rank 6) whose sum needs rank 3: compacting to 3 is exact, to 2 the best
    rank-2 approximation."""
    from kvpred.lora import SUFFIX_A, SUFFIX_B, compact_factors

    torch.manual_seed(0)
    b1, a1 = torch.randn(10, 3), torch.randn(3, 7)
    old = {"w" + SUFFIX_A: torch.cat([a1, 2 * a1]), "w" + SUFFIX_B: torch.cat([b1, -b1 / 4], dim=1)}
    product = old["w" + SUFFIX_B] @ old["w" + SUFFIX_A]
    three, error = compact_factors(old, 3)
    assert three["w" + SUFFIX_A].shape == (3, 7) and error < 1e-6
    torch.testing.assert_close(three["w" + SUFFIX_B] @ three["w" + SUFFIX_A], product, atol=1e-5, rtol=1e-5)
    two, error = compact_factors(old, 2)
    u, s, vh = torch.linalg.svd(product)
    torch.testing.assert_close(two["w" + SUFFIX_B] @ two["w" + SUFFIX_A], u[:, :2] * s[:2] @ vh[:2], atol=1e-5,
                               rtol=1e-5)
    assert error == pytest.approx((s[2:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-4)


def test_cli_compress_aux_rank_refactors_the_saved_adapters_without_calibration_data(tiny_llama, tmp_path, capsys):
    from kvpred.lora import SUFFIX_A, SUFFIX_B

    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    torch.manual_seed(0)
    weight = "model.layers.0.mlp.up_proj.weight"
    out_f, in_f = model.aux.get_parameter(weight).shape
    b, a = torch.randn(out_f, 2) * 0.1, torch.randn(2, in_f)
    model.aux_tensors = {weight + SUFFIX_A: torch.cat([a, a]), weight + SUFFIX_B: torch.cat([b, b], dim=1)}  # rank 4
    model.config.chat_exact_tail = 1
    model.save_pretrained(tmp_path / "stacked")
    assert main(["compress", "--model", str(tmp_path / "stacked"), "--aux-rank", "2", "--out",
                 str(tmp_path / "compact"), "--device", "cpu"]) == 0
    assert "rank 4 -> at most 2" in capsys.readouterr().out
    stacked, compact = (KVPredictionModel.from_pretrained(str(tmp_path / p)) for p in ("stacked", "compact"))
    assert compact.aux_tensors[weight + SUFFIX_A].shape[0] == 2 and compact.config.chat_exact_tail is None
    torch.testing.assert_close(compact.aux.get_parameter(weight), stacked.aux.get_parameter(weight))
    assert main(["compress", "--model", str(tmp_path / "stacked"), "--rank", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--rank fits the factorised predictor on calibration text: give --data" in capsys.readouterr().err
    assert main(["compress", "--model", str(tmp_path / "stacked"), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to compress" in capsys.readouterr().err
    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(tmp_path / "untrained")
    assert main(["compress", "--model", str(tmp_path / "untrained"), "--aux-rank", "2", "--out",
                 str(tmp_path / "x")]) == 2
    assert "has no adapters to compact" in capsys.readouterr().err
