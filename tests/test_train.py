"""Specification of distillation training (issue: training)."""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch

from kvpred import lora
from kvpred.cli import main as cli_main
from kvpred.data import build_shards, read_meta
from kvpred.model import KVPredictionModel, cache_kwargs
from kvpred.models import KVPredError
from kvpred.testing import byte_tokenizer, save_tiny_model
from kvpred.train import (STATE_NAME, Distillation, PredictedKV, TrainConfig, Trainer, add_arguments,
                          lr_lambda, with_copied_spans)
from conftest import ARCHS

# tiny models on a few busy cores: intra-op threads only spin (the time-limit test took minutes with 2 threads)
pytestmark = pytest.mark.usefixtures("one_thread")


def config(tiny_llama, shards, tmp_path, **overrides) -> TrainConfig:
    base = dict(model=tiny_llama, data=shards, out=str(tmp_path / "run"), keep_ratio=0.5, steps=4, seq_len=32,
                batch_size=4, warmup=2, log_every=1, save_every=2, eval_every=100, eval_windows=4, bf16=False)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("arch, split, prefix, exact_self", [
    ("llama", None, 0, False), ("llama", 9, 0, False), ("llama", 9, 4, False),
    *[(arch, None, 0, True) for arch in ARCHS]])
def test_training_forward_with_aux_equal_to_base_is_the_base(tiny_models, arch, split, prefix, exact_self):
    """METHOD 1.8: with A = B and identity P the training-path loss is the base's own loss and the KV loss is 0."""
    model = KVPredictionModel.from_pretrained(tiny_models[arch], keep_ratio=1.0)
    ids = torch.randint(3, 259, (2, min(24, (model.base_window or 25) - 1)))  # shorter than a sliding window
    losses = Distillation(model, TrainConfig(z_loss=0.0, exact_self=exact_self)).forward(ids, split, prefix)
    logits = model.base(input_ids=ids).logits[:, :-1]
    base_ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(losses["base_ce"], base_ce, atol=1e-5, rtol=1e-5)
    assert losses["kv_l1"].item() < 1e-5


# smollm3: layer 3's keys are cached without RoPE (NoPE); olmo2: its k-norm spans all heads; gemma3_text: RoPE tables
# per layer kind, a k-norm scaling by 1 + its weight; glm: RoPE on half of each head, adjacent dimensions paired
@pytest.mark.parametrize("arch", ["llama", "smollm3", "olmo2", "gemma3_text", "glm"])
def test_the_kv_loss_compares_keys_before_rope_and_values_as_cached(tiny_models, arch):
    """METHOD 1.7: the targets are the base's keys before RoPE; the mean |error| per layer, summed over kinds."""
    from transformers import DynamicCache

    from kvpred.rope import rope_tables, unrotate

    model = KVPredictionModel.from_pretrained(tiny_models[arch], keep_ratio=0.5)
    n = min(24, (model.base_window or 25) - 1)  # training windows are shorter than a sliding window
    ids = torch.randint(3, 259, (2, n), generator=torch.Generator().manual_seed(0))
    training = Distillation(model, TrainConfig(kv_reduction="mean"))
    _, keys, values = training.predicted_kv(ids)
    cache = DynamicCache(config=model.base.config)
    model.base(input_ids=ids, use_cache=True, **cache_kwargs(model.base, cache))
    true_k = torch.stack([layer.keys for layer in cache.layers])
    true_v = torch.stack([layer.values for layer in cache.layers])
    cos, sin = rope_tables(model.base, torch.arange(n).expand(2, n), torch.float32)
    if cos.dim() == 3:  # one table for every layer; else one per layer (Gemma 3's kinds)
        cos, sin = cos.expand(len(keys), *cos.shape), sin.expand(len(keys), *sin.shape)
    nope = {i for i, rope in enumerate(getattr(model.base.config, "no_rope_layers", None) or []) if not rope}
    def free(k, c, s):  # before RoPE
        return unrotate(k, c, s, model.base_adjacent)
    key_error = torch.stack([(k - t if i in nope else free(k, c, s) - free(t, c, s)).abs().mean()
                             for i, (k, t, c, s) in enumerate(zip(keys, true_k, cos, sin))])
    want = key_error.mean() + (values - true_v).abs().mean((1, 2, 3, 4)).mean()
    rotated = (keys - true_k).abs().mean((1, 2, 3, 4)).mean() + (values - true_v).abs().mean((1, 2, 3, 4)).mean()
    got = training.forward(ids)["kv_l1"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the test can tell the two apart: an L1 barely changes under rotation, so the margin is a few tolerances
    assert abs(got - rotated) > 3 * (1e-5 + 1e-5 * abs(want))


def test_an_exact_prefix_is_the_base_itself_and_only_the_span_after_it_is_predicted(tiny_llama):
    """The multi-turn training regime: positions before `prefix` see only the base's own keys/values, so their
    logits are the exact base's; the predicted span [prefix, split) changes what comes after it."""
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)  # untrained: predictions differ
    ids = torch.randint(3, 259, (2, 24))
    keys, values = torch.randn(2, 4, 2, 2, 24, 16).unbind(0)  # [L, B, H, T, D]: anything but the base's own
    run = lambda split, prefix: model.base(input_ids=ids, use_cache=True,  # noqa: E731
                                           **cache_kwargs(model.base, PredictedKV(keys, values, split, prefix))).logits
    exact = model.base(input_ids=ids).logits
    with_prefix, without = run(16, 6), run(16, 0)
    torch.testing.assert_close(with_prefix[:, :6], exact[:, :6])
    assert not torch.allclose(with_prefix[:, 6:], exact[:, 6:]) and not torch.allclose(without[:, :6], exact[:, :6])


@pytest.mark.parametrize("split", [None, 9])
def test_with_exact_self_every_position_sees_what_inference_gives_the_last_prompt_token(tiny_llama, split):
    """exact_self: position t's logits in the training forward are predicted mode's for the prompt ids[:t+1]: the
    auxiliary + predictor cover the first t tokens (up to the split) and the base's own keys/values the rest."""
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)  # untrained: predictions differ
    ids = torch.randint(3, 259, (2, 16))
    training = Distillation(model, TrainConfig(exact_self=True))
    _, keys, values = training.predicted_kv(ids)
    logits = training.base_logits(ids, keys, values, split)
    for t in (1, 5, 9, 12, 15):
        tail = 1 if split is None or t < split else t - split + 1
        expected, _ = model.prefill(ids[:, :t + 1], mode="predicted", exact_tail=tail)
        torch.testing.assert_close(logits[:, t], expected[:, -1], atol=1e-4, rtol=1e-4)
    paper = Distillation(model, TrainConfig()).base_logits(ids, keys, values, split)  # its own diagonal predicted
    assert not torch.allclose(paper[:, 5], logits[:, 5], atol=1e-3)


def test_exact_prefix_windows_train_and_need_the_suffix_split(tiny_llama, shards, tmp_path, capsys):
    Trainer(config(tiny_llama, shards, tmp_path, steps=2, suffix_split=True, exact_prefix=1.0)).train()
    argv = ["train", "--model", tiny_llama, "--data", shards, "--out", str(tmp_path / "x"), "--exact-prefix", "0.5"]
    assert cli_main(argv) == 2
    assert "needs --suffix-split" in capsys.readouterr().err


def test_copied_spans_end_a_share_of_the_windows_with_a_span_of_their_first_half():
    random.seed(0)
    ids = torch.arange(40 * 64).view(40, 64)  # every token distinct: a copy is recognisable
    got = with_copied_spans(ids, 0.5)
    changed = [row for row in range(40) if not torch.equal(got[row], ids[row])]
    assert 8 <= len(changed) <= 32
    for row in changed:
        tail = got[row][got[row] != ids[row]]  # the copy, 16 tokens (a quarter of the window, the longest allowed)
        assert len(tail) == 16 and torch.equal(got[row, -16:], tail)
        start = int(tail[0] - ids[row, 0])
        assert start + 16 <= 32 and torch.equal(tail, ids[row, start:start + 16])
    assert torch.equal(with_copied_spans(ids, 0.0), ids)


def test_copy_span_training_runs_and_a_share_outside_0_1_is_refused(tiny_llama, shards, tmp_path, capsys):
    Trainer(config(tiny_llama, shards, tmp_path, steps=2, copy_spans=0.5)).train()
    argv = ["train", "--model", tiny_llama, "--data", shards, "--out", str(tmp_path / "x"), "--copy-spans", "2"]
    assert cli_main(argv) == 2
    assert "--copy-spans is a share" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen3_moe", "olmo2"])  # olmo2: post-norm layers
def test_training_reduces_the_loss_and_writes_a_loadable_checkpoint(tiny_models, shards, tmp_path, arch):
    trainer = Trainer(config(tiny_models[arch], shards, tmp_path, steps=30, lr=3e-3, aux_lr=3e-3, eval_every=30))
    final = trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    assert {"tokens_per_s", "mfu", "lr", "grad_norm"} <= set(records[0])
    assert "heldout_nll_predicted" in records[-1] and 0 <= records[-1]["first_token_agreement"] <= 1
    loaded = KVPredictionModel.from_pretrained(str(final), device=trainer.device)
    ids = torch.randint(3, 259, (2, 20), device=trainer.device)
    torch.testing.assert_close(loaded.prefill(ids)[0], trainer.model.prefill(ids)[0], atol=1e-4, rtol=1e-4)


# qwen2_moe: adapters on attention and the shared expert; phi3: on fused q/k/v and gate/up projections
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe", "phi3"])
def test_adapters_keep_the_checkpoint_small_and_load_merged(tiny_models, shards, tmp_path, arch):
    trainer = Trainer(config(tiny_models[arch], shards, tmp_path, steps=6, aux_lora_rank=2, lr=3e-3, aux_lr=1e-2))
    final = trainer.train()
    saved = KVPredictionModel.from_pretrained(str(final), device=trainer.device)
    names = saved.config.aux.saved_params
    assert any(n.endswith(lora.SUFFIX_A) for n in names) and not any(n.endswith("proj.weight") for n in names)
    if arch == "phi3":
        assert {"qkv_proj", "gate_up_proj"} <= {n.split(".")[-3] for n in names}  # "...qkv_proj.weight.lora_A"
    ids = torch.randint(3, 259, (2, 20), device=trainer.device)
    torch.testing.assert_close(saved.prefill(ids)[0], trainer.model.prefill(ids)[0], atol=1e-4, rtol=1e-4)


def test_a_second_round_of_adapter_training_keeps_the_first(tiny_llama, shards, tmp_path):
    """Training again from a trained checkpoint appends the new adapter factors to the saved ones (ranks add up)."""
    first = Trainer(config(tiny_llama, shards, tmp_path, steps=4, aux_lora_rank=2, aux_lr=1e-2)).train()
    again = Trainer(config(str(first), shards, tmp_path, steps=4, aux_lora_rank=2, aux_lr=1e-2, keep_ratio=None,
                           out=str(tmp_path / "again")))
    saved = KVPredictionModel.from_pretrained(str(again.train()), device=again.device)
    factors = {n: t for n, t in saved.aux_tensors.items() if n.endswith(lora.SUFFIX_A)}
    assert factors and all(t.shape[0] == 4 for t in factors.values())
    ids = torch.randint(3, 259, (2, 20), device=again.device)
    torch.testing.assert_close(saved.prefill(ids)[0], again.model.prefill(ids)[0], atol=1e-4, rtol=1e-4)


def test_a_predictor_only_fine_tune_keeps_the_trained_auxiliary(tiny_llama, shards, tmp_path):
    first = Trainer(config(tiny_llama, shards, tmp_path, steps=4, aux_lora_rank=2, aux_lr=1e-2)).train()
    calibrated = json.loads((first / "kvpred_config.json").read_text())
    calibrated["refine_thresholds"] = {"signal": "entropy", "off_below": 1.0, "eager_above": 2.0}
    calibrated["chat_exact_tail"] = 1
    (first / "kvpred_config.json").write_text(json.dumps(calibrated))
    tuned = Trainer(config(str(first), shards, tmp_path, steps=2, train_aux=False, keep_ratio=None,
                           out=str(tmp_path / "tuned"))).train()
    before, after = (KVPredictionModel.from_pretrained(str(p)) for p in (first, tuned))
    assert after.config.refine_thresholds is None and after.config.chat_exact_tail is None  # measured for the old
    assert after.aux_tensors.keys() == before.aux_tensors.keys()
    for name, tensor in before.aux_tensors.items():
        torch.testing.assert_close(after.aux_tensors[name], tensor)


def test_resume_after_a_kill_continues_exactly(tiny_llama, shards, tmp_path):
    straight = Trainer(config(tiny_llama, shards, tmp_path / "a", steps=4))
    straight.train()
    first = Trainer(config(tiny_llama, shards, tmp_path / "b", steps=2))
    first.train()  # stops at step 2 with a checkpoint, as a killed run would have
    resumed = Trainer(config(tiny_llama, shards, tmp_path / "b", steps=4))
    assert resumed.step == 2
    resumed.train()
    for a, b in zip(straight.model.predictor.parameters(), resumed.model.predictor.parameters()):
        torch.testing.assert_close(a, b)
    log = lambda d: [json.loads(l)["loss"] for l in open(tmp_path / d / "run" / "metrics.jsonl") if '"loss"' in l]
    assert log("a") == pytest.approx(log("b"), rel=1e-6)


def test_a_run_resumed_from_other_weights_than_it_started_from_is_refused(tiny_llama, shards, tmp_path):
    import shutil

    base = shutil.copytree(tiny_llama, tmp_path / "base")
    Trainer(config(str(base), shards, tmp_path, steps=2)).train()
    save_tiny_model(base, seed=1)  # same shapes, other weights, at the same path
    with pytest.raises(KVPredError, match="started from other weights than --model"):
        Trainer(config(str(base), shards, tmp_path, steps=4))


def test_a_corrupt_or_foreign_checkpoint_is_refused(tiny_llama, shards, tmp_path):
    Trainer(config(tiny_llama, shards, tmp_path, steps=2)).train()
    with pytest.raises(KVPredError, match="different configuration"):
        Trainer(config(tiny_llama, shards, tmp_path, steps=4, lr=0.5))
    with pytest.raises(KVPredError, match="at step 2, past --steps 1"):  # a shorter run cannot be what was meant
        Trainer(config(tiny_llama, shards, tmp_path, steps=1))
    (tmp_path / "run" / STATE_NAME).write_bytes(b"garbage")
    with pytest.raises(KVPredError, match="corrupt"):
        Trainer(config(tiny_llama, shards, tmp_path, steps=4))
    torch.save([1, 2], tmp_path / "run" / STATE_NAME)
    with pytest.raises(KVPredError, match="not a kvpred training checkpoint"):
        Trainer(config(tiny_llama, shards, tmp_path, steps=4))


def test_a_run_folder_is_held_by_one_run_at_a_time(tiny_llama, shards, tmp_path):
    running = Trainer(config(tiny_llama, shards, tmp_path, steps=2))
    with pytest.raises(KVPredError, match="in use by another kvpred train run"):
        Trainer(config(tiny_llama, shards, tmp_path, steps=2))
    running.train()  # ends, and lets the folder go
    assert Trainer(config(tiny_llama, shards, tmp_path, steps=2)).step == 2


def test_fsdp_in_a_single_process_says_it_trains_the_model_whole(tiny_llama, shards, tmp_path, capsys):
    Trainer(config(tiny_llama, shards, tmp_path, steps=1, fsdp=True)).train()
    assert "start it with torchrun" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(KVPredError, match="is a file"):
        TrainConfig(out=str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "mine"


def train_cli(tiny_llama, shards, out, *, steps: int, nproc: int = 1, fsdp: bool = False, warmup: int = 1,
              extra: tuple[str, ...] = ()) -> None:
    """`kvpred train` on the CPU (GPUs hidden, so also on a GPU machine): one process (this one, which has paid
    for its imports already), or `nproc` gloo processes under torchrun at the same global batch of 4."""
    args = ["--model", tiny_llama, "--data", shards, "--keep-ratio", "0.5", "--steps", str(steps), "--seq-len", "32",
            "--warmup", str(warmup), "--log-every", "1", "--eval-every", "100", "--save-every", "2", "--no-bf16",
            "--batch-size", str(4 // nproc), "--out", str(out), *(["--fsdp"] if fsdp else []), *extra]
    if nproc == 1:
        with mock.patch("torch.cuda.is_available", return_value=False):
            assert cli_main(["train", *args]) == 0
        return
    args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", "29533", "-m",
            "kvpred.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, *args], check=True, env=env, capture_output=True)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"loss"' in line]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tiny_llama, shards, tmp_path, sharding):
    train_cli(tiny_llama, shards, tmp_path / "one", steps=3)
    train_cli(tiny_llama, shards, tmp_path / "two", steps=3, nproc=2, fsdp=sharding == "fsdp")
    assert len(losses(tmp_path / "two")) == 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    # the checkpoints hold whole tensors (FSDP2 shards are gathered) and load like the one-process model
    one, two = (KVPredictionModel.from_pretrained(str(tmp_path / d / "final")) for d in ("one", "two"))
    ids = torch.randint(3, 259, (2, 20))
    torch.testing.assert_close(two.prefill(ids)[0], one.prefill(ids)[0], atol=1e-4, rtol=1e-4)
    state = torch.load(tmp_path / "two" / STATE_NAME, weights_only=False)
    assert state["step"] == 3 and state["predictor"]["key_weight"].shape == one.predictor.key_weight.shape


@pytest.mark.parametrize("extra", [("--copy-spans", "0.5"), ("--base-loss", "0", "--kv-loss", "0")])
def test_copied_spans_and_the_auxiliary_alone_train_under_ddp_as_in_one_process(tiny_llama, shards, tmp_path, extra):
    # copies are drawn for the global batch (each rank's were its neighbour's); OE-LP leaves the predictor out
    train_cli(tiny_llama, shards, tmp_path / "one", steps=2, extra=extra)
    train_cli(tiny_llama, shards, tmp_path / "two", steps=2, nproc=2, extra=extra)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_a_run_resumes_on_another_number_of_processes_at_the_same_global_batch(tiny_llama, shards, tmp_path):
    train_cli(tiny_llama, shards, tmp_path / "straight", steps=4, warmup=2)
    train_cli(tiny_llama, shards, tmp_path / "moved", steps=2, nproc=2, warmup=2)  # then on one GPU instead of two
    train_cli(tiny_llama, shards, tmp_path / "moved", steps=4, warmup=2)
    assert losses(tmp_path / "moved") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)


def test_a_time_limit_under_torchrun_is_not_fitted_to_a_late_ranks_start(tiny_llama, shards, tmp_path):
    """Rank 1 enters the training loop 2 s after rank 0: rank 0's first step must not count that wait, or the
    schedule is fitted to a handful of steps (the rate is the slowest rank's) and the run ends early."""
    late = tmp_path / "late.py"
    late.write_text("import sys, time\nfrom kvpred import train\nrun = train.Trainer._train\n"
                    "train.Trainer._train = lambda self: (self.rank == 1 and time.sleep(2), run(self))[1]\n"
                    "sys.exit(train.main())\n")
    args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29534", str(late), "--model",
            tiny_llama, "--data", shards, "--keep-ratio", "0.5", "--steps", "100000", "--seq-len", "32", "--warmup",
            "1000", "--eval-every", "0", "--save-every", "0", "--no-bf16", "--batch-size", "2", "--max-minutes",
            "0.1", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, *args], check=True, env=env, capture_output=True)
    state = torch.load(tmp_path / "run" / STATE_NAME, weights_only=False)
    assert state["fitted_steps"] > 20  # about 40 steps/s here; with the wait counted, 2-3 in all


def test_a_signal_to_torchrun_saves_every_rank_at_one_step_and_the_same_command_resumes(tiny_llama, shards, tmp_path):
    """torchrun passes its signal on to the workers, a moment apart; the ranks agree on one step, save there
    together and stop, and the run resumed from that checkpoint ends where an uninterrupted one does. SIGINT (Ctrl+C)
    here; the workers handle SIGTERM (what schedulers send) the same way, as the one-process test checks for both."""
    slow = tmp_path / "slow.py"  # steps of 0.3 s, so the signal lands mid-run
    slow.write_text("import sys, time\nfrom kvpred import train\nstep = train.Trainer._step\n"
                    "train.Trainer._step = lambda self: (time.sleep(0.3), step(self))[1]\n"
                    "sys.exit(train.main())\n")
    train_cli(tiny_llama, shards, tmp_path / "straight", steps=8, warmup=2)
    flags = ["--model", tiny_llama, "--data", shards, "--keep-ratio", "0.5", "--steps", "8", "--seq-len", "32",
             "--warmup", "2", "--log-every", "1", "--eval-every", "100", "--save-every", "100", "--no-bf16",
             "--batch-size", "2", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                              "29535", str(slow), *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    # counted as text: the last line may be half-written while it is read
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2) and agent.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    agent.send_signal(signal.SIGINT)
    printed = agent.communicate(timeout=120)[0].decode()
    assert agent.returncode != 0
    stopped = len(losses(tmp_path / "run"))
    assert 2 <= stopped < 8, printed
    assert f"interrupted at step {stopped}; checkpoint saved" in printed  # rank 0 says so, the others keep quiet
    assert printed.count("interrupted at step") == printed.count("stopping after this step") == 1
    assert torch.load(tmp_path / "run" / STATE_NAME, weights_only=False)["step"] == stopped
    assert not (tmp_path / "run" / "final").exists()
    train_cli(tiny_llama, shards, tmp_path / "run", steps=8, nproc=2, warmup=2)
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)


def test_copies_drawn_for_the_global_batch_give_each_rank_its_own_rows():
    ids = torch.arange(4 * 64).view(4, 64)
    random.seed(1)
    whole = with_copied_spans(ids, 0.5)
    parts = []
    for rank in (0, 1):
        random.seed(1)
        parts.append(with_copied_spans(ids[2 * rank:2 * rank + 2], 0.5, rank=rank, world=2))
    assert torch.equal(torch.cat(parts), whole)


def test_an_fsdp2_run_resumed_after_a_kill_continues_like_an_uninterrupted_one(tiny_llama, shards, tmp_path):
    """The gathered checkpoint (whole parameters and optimizer state, by name) is loaded back into the shards, also
    after a stretch in one process (which trains the model whole)."""
    # a warm-up of 3 steps: runs stopped by --steps 2 and 3 (as kills would) follow the schedule of --steps 4. The
    # uninterrupted run is one process: two give the same losses (test_two_gloo_processes_match_one_process...)
    train_cli(tiny_llama, shards, tmp_path / "straight", steps=4, warmup=3)
    train_cli(tiny_llama, shards, tmp_path / "killed", steps=2, nproc=2, fsdp=True, warmup=3)
    train_cli(tiny_llama, shards, tmp_path / "killed", steps=3, fsdp=True, warmup=3)  # then one process, to step 3
    train_cli(tiny_llama, shards, tmp_path / "killed", steps=4, nproc=2, fsdp=True, warmup=3)
    assert len(losses(tmp_path / "killed")) == 4
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)


@pytest.mark.parametrize("warmup", [3, 0, 1000])  # 1000: more steps than the time allows
def test_a_time_limit_shortens_the_schedule_so_it_still_ends_annealed(tiny_llama, shards, tmp_path, monkeypatch,
                                                                       warmup):
    """With max_minutes too short for `steps`, the cosine is fitted to the time after warm-up (or after a few steps
    without one), not cut off; its last step runs at the minimum rate, and the log says what each step used."""
    clock = [0.0]  # a steady 20 steps/s, whatever this machine's speed and load
    monkeypatch.setattr("kvpred.train.time.perf_counter", lambda: clock[0])
    step = Trainer._step
    monkeypatch.setattr(Trainer, "_step", lambda self: (clock.__setitem__(0, clock[0] + 0.05), step(self))[1])
    c = config(tiny_llama, shards, tmp_path, steps=10**6, warmup=warmup, max_minutes=0.05, save_every=10**6)
    trainer = Trainer(c)
    used = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    trainer.train()
    assert 10 < trainer.step == trainer.total_steps < 60  # 3 s at 20 steps/s, less the margin for evals
    assert used[-1] == pytest.approx(c.lr * c.min_lr_ratio) and max(used) == pytest.approx(c.lr)
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"lr"' in line]
    assert [r["lr"] for r in logged] == pytest.approx(used)
    assert [r["aux_lr"] / r["lr"] for r in logged] == pytest.approx([c.aux_lr / c.lr] * len(logged))
    again = dict(steps=10**6, warmup=warmup, save_every=10**6)
    resumed = Trainer(config(tiny_llama, shards, tmp_path, max_minutes=0.05, **again))
    assert resumed.total_steps == trainer.total_steps  # the same command again finds the run done
    assert resumed.train() and resumed.step == trainer.step
    # the limit is the run's over all its processes: raised to 6 s, the run gets the 3 s the first one left
    more = Trainer(config(tiny_llama, shards, tmp_path, max_minutes=0.1, **again))
    more.train()
    assert trainer.step + 40 < more.step < 120
    longer = Trainer(config(tiny_llama, shards, tmp_path, steps=1000, warmup=warmup, max_minutes=0,
                            save_every=10**6))
    assert longer.total_steps == 1000  # ... and without a limit, it goes on to --steps


def test_the_schedule_reaches_its_peak_once_and_its_minimum_at_the_last_step():
    factor = lr_lambda(TrainConfig(model="m", data="d", out="o", steps=10, warmup=3, min_lr_ratio=0.1), lambda: 10)
    factors = [factor(s) for s in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and factors[3] < 1.0
    assert factors[-1] == pytest.approx(0.1) and factors == sorted(factors[:3]) + sorted(factors[3:], reverse=True)


@pytest.mark.parametrize("flags, named", [
    (["--steps", "0"], "--steps"), (["--seq-len", "1"], "--seq-len"), (["--seq-len", "3"], "--seq-len"),
    (["--batch-size", "0"], "--batch-size"), (["--grad-accum", "0"], "--grad-accum"), (["--lr=-1e-3"], "--lr"),
    (["--aux-lr", "nan"], "--aux-lr"), (["--warmup", "-1"], "--warmup"), (["--clip", "0"], "--clip"),
    (["--log-every", "-1"], "--log-every"), (["--eval-windows", "0"], "--eval-windows"),
    (["--kv-loss", "-1"], "loss weights"), (["--kv-reduction", "max"], "--kv-reduction"),
    (["--base-loss", "0", "--kv-loss", "0", "--no-train-aux"], "--no-train-aux"),
    (["--aux-lora-rank", "4", "--no-train-aux"], "--aux-lora-rank"), (["--lr", "0", "--aux-lr", "0"], "--lr is 0")])
def test_settings_that_cannot_train_are_one_line_errors_naming_the_flag(tiny_llama, shards, tmp_path, capsys, flags,
                                                                         named):
    argv = ["train", "--model", tiny_llama, "--data", shards, "--out", str(tmp_path / "run"), *flags]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpred: error: ") and named in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_windows_longer_than_the_models_context_are_refused(tiny_llama, shards, tmp_path, capsys):
    argv = ["train", "--model", tiny_llama, "--data", shards, "--out", str(tmp_path / "run"), "--seq-len", "600"]
    assert cli_main(argv) == 2
    assert "kvpred: error: --seq-len 600 exceeds the model's context limit of 512 tokens" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_windows_longer_than_a_sliding_attention_window_are_refused(shards, tmp_path, capsys):
    # the training forwards attend under masks of their own, which know no sliding window
    base = save_tiny_model(tmp_path / "mistral", arch="mistral", sliding_window=24)
    argv = ["train", "--model", str(base), "--data", shards, "--out", str(tmp_path / "run"), "--seq-len", "32"]
    assert cli_main(argv) == 2
    assert "--seq-len 32 reaches the sliding attention window of 24 tokens" in capsys.readouterr().err


def test_every_0_means_never_and_no_heldout_split_is_needed_without_evaluation(tiny_llama, tmp_path, capsys):
    """--eval-every 0 never evaluates, so shards without a held-out split train; --log-every 0 writes no metrics;
    --save-every 0 writes the training state only at the end of the run."""
    (tmp_path / "doc.txt").write_text("one document, so no held-out split " * 40)
    build_shards([str(tmp_path / "doc.txt")], byte_tokenizer(), tmp_path / "tokens", progress=False)
    assert read_meta(tmp_path / "tokens")["splits"]["heldout"]["tokens"] == 0
    with pytest.raises(KVPredError, match="--eval-every 0"):
        Trainer(config(tiny_llama, str(tmp_path / "tokens"), tmp_path, eval_every=10))
    saves = []
    c = config(tiny_llama, str(tmp_path / "tokens"), tmp_path, steps=3, eval_every=0, log_every=0, save_every=0)
    trainer = Trainer(c)
    trainer.save = lambda: saves.append(trainer.step)
    trainer.train()
    assert saves == [3] and (tmp_path / "run" / "final").is_dir()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert all("0: never" in a.help for a in parser._actions if a.dest in ("eval_every", "log_every"))


def test_a_resumed_run_drops_the_metrics_logged_after_its_checkpoint(tiny_llama, shards, tmp_path, monkeypatch):
    """A run killed after logging step 3 resumes from its step-2 checkpoint: metrics.jsonl then reads as one run."""
    save = Trainer.save

    def killed_while_saving_3(self):
        if self.step == 3:
            raise RuntimeError("killed")
        save(self)

    monkeypatch.setattr(Trainer, "save", killed_while_saving_3)
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(config(tiny_llama, shards, tmp_path, steps=4, eval_every=1, save_every=1)).train()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line torn by the kill
    monkeypatch.undo()
    resumed = Trainer(config(tiny_llama, shards, tmp_path, steps=4, eval_every=1, save_every=1))
    assert resumed.step == 2
    resumed.train()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 1, 2, 2, 3, 3, 4, 4]  # a loss record and an evaluation per step
    assert sum("loss" in r for r in records) == 4


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl+C; what `timeout` and schedulers send
def test_a_signal_saves_a_checkpoint_at_the_step_boundary_and_the_same_command_resumes(tiny_llama, shards, tmp_path,
                                                                                       monkeypatch, capsys, sig):
    """The first Ctrl+C or SIGTERM lets the current step finish, saves the training state there and exits with
    status 128 + the signal (130, 143); the same command then resumes and ends where an uninterrupted run does."""
    argv = lambda out: ["train", "--model", tiny_llama, "--data", shards, "--out", str(tmp_path / out),  # noqa: E731
                        "--keep-ratio", "0.5", "--steps", "4", "--seq-len", "32", "--batch-size", "4", "--warmup",
                        "2", "--log-every", "1", "--save-every", "100", "--eval-every", "100", "--no-bf16"]
    assert cli_main(argv("straight")) == 0
    step = Trainer._step
    # Python's own handlers, as `kvpred train` has them from a shell. A suite started as a background job of a
    # non-interactive shell inherits SIGINT ignored, and the trainer then (rightly) leaves Ctrl+C alone
    usual = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}[sig]
    signal.signal(sig, usual)

    def signal_during_step_2(self):
        if self.step == 1 and not (tmp_path / "sent").exists():
            (tmp_path / "sent").touch()
            signal.raise_signal(sig)
        return step(self)

    monkeypatch.setattr(Trainer, "_step", signal_during_step_2)
    capsys.readouterr()
    try:
        assert cli_main(argv("run")) == 128 + sig
    except KeyboardInterrupt:  # would end the whole pytest session
        pytest.fail("Ctrl+C escaped `kvpred train` as a KeyboardInterrupt")
    err = capsys.readouterr().err
    assert "interrupted at step 2" in err and "run the same command to resume" in err and "Traceback" not in err
    assert torch.load(tmp_path / "run" / STATE_NAME, weights_only=False)["step"] == 2
    assert not (tmp_path / "run" / "final").exists()
    assert signal.getsignal(sig) is usual
    assert cli_main(argv("run")) == 0
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    straight, resumed = (KVPredictionModel.from_pretrained(str(tmp_path / d / "final")) for d in ("straight", "run"))
    for a, b in zip(straight.predictor.parameters(), resumed.predictor.parameters()):
        torch.testing.assert_close(a, b)


def test_options_that_build_a_new_auxiliary_are_refused_for_a_kvpred_checkpoint(tiny_llama, shards, tmp_path,
                                                                                 capsys):
    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(tmp_path / "fitted")
    for flags in (["--keep-ratio", "0.5"], ["--source", "hidden"]):
        argv = ["train", "--model", str(tmp_path / "fitted"), "--data", shards, "--out", str(tmp_path / "run"), *flags]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "already a kvpred checkpoint" in err and f"the {flags[0][2:].replace('-', ' ')} given" in err
        assert tiny_llama in err  # its base, to start over from
