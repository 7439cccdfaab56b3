"""Distillation training of auxiliary + predictor with the base frozen (METHOD 1.3-1.4), as one recipe.

Training forward: the auxiliary runs the whole window; the predictor maps its taps to base keys/values; the base runs
the window attending causally to the *predicted* keys/values (its own are discarded), or, with `suffix_split`, to
predicted keys/values before a random split point and its own after it (the inference regime: predicted prompt,
true tail); with `exact_prefix` > 0 that share of windows also uses its own keys/values before a random earlier point
(the multi-turn regime: exact history, predicted new turn, true tail). With `exact_self`, every position also
attends to its own key/value as the base computes it in this pass (METHOD 1.3's train/inference mismatch: the paper's
diagonal is predicted, while at inference the last prompt token uses its own), so each position trains as the last
token of its prefix. With `copy_spans`, that share of windows ends by repeating an earlier span. Loss = base CE +
aux CE (both + z-loss) + L1 on keys (before RoPE, METHOD 1.7) and values (sum or mean over layers) + optional KL to
the exact base's next-token distribution. Runs before 2026-11-28 compared keys after RoPE (the cached ones).

    kvpred train --model smollm2-135m --data .carry/tokens --out runs/kvp --steps 2000
    torchrun --nproc-per-node 2 -m kvpred.train --model ... (same flags): DDP, or --fsdp for FSDP2

Rerunning the same command resumes from the run's last checkpoint (train_state.pt). Ctrl+C or SIGTERM (under torchrun
too, which passes it on to every rank) lets the step under way finish, saves a checkpoint there and exits with status
130 or 143; a second one stops at once.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from . import lora
from .model import KVPredictionModel, cache_kwargs, capture
from .models import KVPredError, fingerprint, sliding_window
from .rope import rope_runs, unrotate_layers

STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.jsonl"
LOGGED_LR = {"predictor": "lr", "aux": "aux_lr"}  # optimizer group -> its learning rate's name in the metrics log
FIT_AFTER = 10  # --max-minutes: steps timed before the schedule is fitted, where the warm-up is shorter
FIT_SHARE = 0.25  # --max-minutes: the schedule is fitted by this share of the time at the latest, warm-up or not


def opt(default, help: str):
    """A TrainConfig field and its `kvpred train` flag's help text, in one place."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = opt("smollm2-135m", "initial model: a kvpred checkpoint (e.g. from `kvpred fit`), the embedded "
                                       "default, or a base to wrap with a new pruned auxiliary")
    data: str = opt("", "token shard folder (`kvpred data build`), or several joined by commas")
    out: str = opt("runs/kvp", "run folder: train_state.pt, metrics.jsonl, final/; an existing run there resumes")
    keep_ratio: float | None = opt(None, "build a new pruned auxiliary keeping this share of the base's layers "
                                         "instead of using the model's")
    source: str | None = opt(None, "predictor input of a newly built model: kv (the paper's) or hidden")
    steps: int = opt(1000, "optimiser steps; the cosine schedule spans them (or what --max-minutes allows)")
    seq_len: int = opt(512, "tokens per training window")
    batch_size: int = opt(16, "windows per process and micro-step")
    grad_accum: int = opt(1, "micro-steps per optimiser step")
    lr: float = opt(1e-3, "peak learning rate of the predictor")
    aux_lr: float = opt(3e-4, "peak learning rate of the auxiliary (its adapters or full weights)")
    warmup: int = opt(50, "linear warm-up steps")
    min_lr_ratio: float = opt(0.1, "the cosine ends at this share of the peak learning rate")
    weight_decay: float = opt(0.1, "AdamW weight decay of the auxiliary's matrices (not its norms and biases, nor the "
                                   "predictor, whose fitted or identity start decay would pull toward zero)")
    clip: float = opt(1.0, "gradient norm limit")
    base_loss: float = opt(1.0, "weight of the base's next-token loss through the predicted keys/values")
    aux_loss: float = opt(1.0, "weight of the auxiliary's own next-token loss")
    kv_loss: float = opt(1.0, "weight of the L1 loss between predicted and true base keys/values")
    kv_reduction: str = opt("mean", "over layers: mean (the paper's text, 1/layers) or sum (the paper's code)")
    z_loss: float = opt(1e-4, "weight of the z-loss on both models' logits")
    kl_loss: float = opt(0.0, "weight of KL(exact base || base through predicted keys/values)")
    suffix_split: bool = opt(False, "true keys/values after a random split point, as at inference")
    exact_prefix: float = opt(0.0, "with --suffix-split: share of windows with true keys/values before a random "
                                   "earlier point too (a new chat turn after an exact history)")
    exact_self: bool = opt(False, "each position sees its own true key/value, as the last prompt token does at "
                                  "inference")
    copy_spans: float = opt(0.0, "share of windows that end by repeating an earlier span")
    train_aux: bool = opt(True, "train the auxiliary's layers; its embeddings and final norm stay the base's, so a "
                                "checkpoint holds no copy of them (--no-train-aux: the predictor only)")
    aux_lora_rank: int = opt(0, "> 0: train low-rank adapters of this rank on the auxiliary (small checkpoints); "
                                "0: its full weights")
    activation_checkpointing: bool = opt(False, "recompute the auxiliary's layers in the backward pass")
    bf16: bool = opt(True, "bf16 autocast on CUDA")
    fsdp: bool = opt(False, "FSDP2 (fully_shard) instead of DDP under torchrun")
    max_minutes: float = opt(0.0, "stop with a checkpoint and a final model after this wall time (the run's, over "
                                  "the processes that resume it), the cosine fitted to it; 0: no limit")
    log_every: int = opt(10, "steps between loss records in metrics.jsonl (0: never)")
    save_every: int = opt(200, "steps between checkpoints (train_state.pt) (0: only at the end, at the time limit "
                               "and on Ctrl+C or SIGTERM, also under torchrun)")
    eval_every: int = opt(200, "steps between held-out evaluations (0: never, and then the data needs no held-out "
                               "split)")
    eval_windows: int = opt(64, "held-out windows per evaluation")
    seed: int = opt(0, "seed of every random choice: data order, split points, initialisation")

    # fields that may change between a run and its resumption; batch_size too, where the global batch stays the same
    # (batch_size x processes: PackedTokens' resumption checks it), so a run may resume on another number of GPUs
    RESUMABLE_CHANGES = ("steps", "max_minutes", "log_every", "save_every", "eval_every", "eval_windows", "out",
                         "batch_size")

    @property
    def uses_base(self) -> bool:
        """Whether a loss needs the base and the predictor; else only the auxiliary trains (the paper's OE-LP)."""
        return bool(self.base_loss or self.kv_loss or self.kl_loss)

    def __post_init__(self) -> None:
        """Refuse, naming the flags, settings that would crash mid-run or silently train nothing (the CLI prints
        a KVPredError as one line)."""
        problems = [message for wrong, message in self._checks() if wrong]
        if problems:
            raise KVPredError("; ".join(problems))

    def _checks(self) -> list[tuple[bool, str]]:
        """(wrong, message) pairs; written `not x >= 0` where a NaN must count as wrong."""
        shortest = 4 if self.eval_every else 2  # a next-token target; evaluation scores a quarter after a prefix
        weights = {"--base-loss": self.base_loss, "--aux-loss": self.aux_loss, "--kv-loss": self.kv_loss,
                   "--z-loss": self.z_loss, "--kl-loss": self.kl_loss}
        every = {"--log-every": self.log_every, "--save-every": self.save_every, "--eval-every": self.eval_every}
        return [
            (self.steps < 1, f"--steps must be at least 1, got {self.steps}"),
            (self.seq_len < shortest, f"--seq-len must be at least {shortest}"
             + (" with evaluation (--eval-every > 0)" if self.eval_every else "") + f", got {self.seq_len}"),
            (self.batch_size < 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum < 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (not self.lr >= 0, f"--lr must be >= 0, got {self.lr}"),
            (not self.aux_lr >= 0, f"--aux-lr must be >= 0, got {self.aux_lr}"),
            (self.warmup < 0, f"--warmup must be >= 0, got {self.warmup}"),
            (not 0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (not self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (not self.clip > 0, f"--clip (the gradient norm limit) must be positive, got {self.clip}"),
            (not all(w >= 0 for w in weights.values()), f"loss weights must be >= 0, got {weights}"),
            (not (self.base_loss or self.aux_loss or self.kv_loss or self.kl_loss),
             "all loss weights are 0: set one of --base-loss, --aux-loss, --kv-loss, --kl-loss"),
            (not self.train_aux and not self.uses_base,
             "with the auxiliary frozen (--no-train-aux) only --base-loss, --kv-loss and --kl-loss train the "
             "predictor, and all three are 0"),
            (not self.train_aux and self.aux_lora_rank > 0,
             "--aux-lora-rank trains adapters on the auxiliary, which --no-train-aux freezes"),
            (self.lr == 0 and not (self.train_aux and self.aux_lr > 0),
             "nothing would train: --lr is 0 and the auxiliary is frozen or has --aux-lr 0"),
            (self.kv_reduction not in ("mean", "sum"),
             f"--kv-reduction must be mean or sum, got {self.kv_reduction!r}"),
            (not 0 <= self.copy_spans <= 1, f"--copy-spans is a share in [0, 1], got {self.copy_spans}"),
            (self.exact_prefix != 0 and not (0 < self.exact_prefix <= 1 and self.suffix_split),
             f"--exact-prefix is a share in (0, 1] and needs --suffix-split, got {self.exact_prefix}"),
            (self.aux_lora_rank < 0, f"--aux-lora-rank must be >= 0 (0: full weights), got {self.aux_lora_rank}"),
            (not self.max_minutes >= 0, f"--max-minutes must be >= 0 (0: no limit), got {self.max_minutes}"),
            (min(every.values()) < 0, f"{', '.join(every)} must be >= 0 (0: never), got {every}"),
            (self.eval_every > 0 and self.eval_windows < 1,
             f"--eval-windows must be at least 1 with evaluation (--eval-every > 0), got {self.eval_windows}"),
            (Path(self.out).exists() and not Path(self.out).is_dir(),
             f"{self.out} is a file; give a folder for the run (its checkpoint, metrics and final/)"),
        ]


def hold_run_folder(out: Path):
    """An exclusive lock on the run folder `out` for as long as the returned file stays open (the process's life):
    two runs writing one folder would overwrite each other's checkpoints and interleave their metrics."""
    import fcntl

    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise KVPredError(f"{out} is in use by another kvpred train run; wait for it, or give another --out") from None
    return handle


class Interrupted(KeyboardInterrupt):
    """Ctrl+C or SIGTERM stopped training at a step boundary, after saving a checkpoint there; the message says
    where, `signal` which."""

    def __init__(self, message: str, signal: int = 2):
        super().__init__(message)
        self.signal = signal


class PredictedKV(DynamicCache):
    """A cache that hands every base attention layer the predicted keys/values instead of its own.

    Stays empty, so transformers builds the plain causal mask over the window. With `split`, positions >= split use
    the base's own keys/values (computed in this same pass), as at inference after the predicted prompt prefix; with
    `prefix`, so do positions < prefix, as after an exact conversation history. With `exact_self`, the layer gets
    [those | its own] (2T keys), to be read under `exact_self_mask`.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, split: int | None = None, prefix: int = 0,
                 exact_self: bool = False):
        super().__init__()
        self.pred_keys, self.pred_values, self.split, self.prefix = keys, values, split, prefix  # [L, B, H, T, D]
        self.exact_self = exact_self

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.pred_keys[layer_idx].to(key_states.dtype), self.pred_values[layer_idx].to(value_states.dtype)
        if self.split is not None or self.prefix:
            p, s = self.prefix, self.split if self.split is not None else k.shape[2]
            k = torch.cat([key_states[:, :, :p], k[:, :, p:s], key_states[:, :, s:]], 2)
            v = torch.cat([value_states[:, :, :p], v[:, :, p:s], value_states[:, :, s:]], 2)
        if self.exact_self:
            return torch.cat([k, key_states], 2), torch.cat([v, value_states], 2)
        return k, v


def with_copied_spans(ids: torch.Tensor, share: float, shortest: int = 16, longest: int = 64, rank: int = 0,
                      world: int = 1) -> torch.Tensor:
    """`ids` [B, T] with, in a `share` of the rows, the last s tokens (s in [shortest, longest]) replaced by a copy of
    s tokens from the window's first half. Next-token loss on the copy rewards a predicted cache the base can copy
    from, by induction over the predicted keys and values: what a pass key or LAMBADA's last word needs, and what
    natural text seldom asks for. Under torchrun the draws are made for the global batch and `rank` takes its rows,
    so the copies are those of one process with the whole batch."""
    ids = ids.clone()
    b, t = ids.shape
    for row in range(b * world):
        if random.random() < share:
            s = random.randint(min(shortest, t // 4), min(longest, t // 4))
            a = random.randint(0, t // 2 - s)
            if rank * b <= row < (rank + 1) * b:
                ids[row - rank * b, t - s:] = ids[row - rank * b, a:a + s]
    return ids


def exact_self_mask(length: int, device: torch.device, eager: bool) -> torch.Tensor:
    """The 4D mask [1, 1, T, 2T] over an exact-self PredictedKV's keys: query t sees the first half before t and the
    second half (its own) at t. Boolean for SDPA; additive for eager attention."""
    t = torch.arange(length, device=device)
    mask = torch.cat([t[None, :] < t[:, None], t[None, :] == t[:, None]], 1)[None, None]
    return torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min) if eager else mask


def window_positions(ids: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of packed training windows: every window starts at 0."""
    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)


def cross_entropy_with_z(logits: torch.Tensor, ids: torch.Tensor, z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token CE over a packed window and z-loss eps*mean(logsumexp^2)."""
    logits = logits[:, :-1].float()
    ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return ce, z * torch.logsumexp(logits, -1).pow(2).mean()


class Distillation(nn.Module):
    """The training forward as a module (so DDP/FSDP can wrap it): ids [B, T] -> dict of losses."""

    def __init__(self, model: KVPredictionModel, config: TrainConfig):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, ids: torch.Tensor, split: int | None = None, prefix: int = 0) -> dict[str, torch.Tensor]:
        m, c = self.model, self.config
        pos = window_positions(ids)
        if not c.uses_base:  # the aux alone (the paper's OE-LP baseline)
            ce, z = cross_entropy_with_z(m.aux(input_ids=ids, position_ids=pos, use_cache=False).logits, ids, c.z_loss)
            return {"aux_ce": ce, "loss": c.aux_loss * (ce + z)}
        with torch.no_grad():  # targets: the exact base's cache (and logits for KL)
            cache = DynamicCache(config=m.base.config)
            exact = m.base(input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(m.base, cache),
                           logits_to_keep=0 if c.kl_loss else 1)
            true_k = torch.stack([layer.keys for layer in cache.layers])  # [L, B, H, T, D]
            true_v = torch.stack([layer.values for layer in cache.layers])
        aux_logits, keys, values = self.predicted_kv(ids)
        pred = self.base_logits(ids, keys, values, split, prefix)
        losses = {}
        losses["base_ce"], base_z = cross_entropy_with_z(pred, ids, c.z_loss)
        losses["aux_ce"], aux_z = cross_entropy_with_z(aux_logits, ids, c.z_loss)
        # keys compared before RoPE, as METHOD 1.7 says: L1 is not rotation-invariant, and after RoPE it would weigh
        # fast-turning dimensions by position (the rotation is linear, so the difference is un-rotated once)
        runs = rope_runs(m.base, pos, torch.float32)
        per_layer_k = unrotate_layers(keys.float() - true_k.float(), runs, m.base_rotated, m.base_adjacent)
        per_layer_k = per_layer_k.abs().mean((1, 2, 3, 4))
        per_layer_v = (values.float() - true_v.float()).abs().mean((1, 2, 3, 4))
        reduce = torch.sum if c.kv_reduction == "sum" else torch.mean
        losses["kv_l1"] = reduce(per_layer_k) + reduce(per_layer_v)
        loss = c.base_loss * (losses["base_ce"] + base_z) + c.aux_loss * (losses["aux_ce"] + aux_z) \
            + c.kv_loss * losses["kv_l1"]
        if c.kl_loss:
            losses["kl"] = F.kl_div(F.log_softmax(pred.float(), -1).flatten(0, 1),
                                    F.log_softmax(exact.logits.float(), -1).flatten(0, 1),
                                    log_target=True, reduction="batchmean")
            loss = loss + c.kl_loss * losses["kl"]
        losses["loss"] = loss
        return losses

    def predicted_kv(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The auxiliary over the window and the predictor after it: aux logits [B, T, V] and the predicted base
        keys, values [L, B, H, T, D]."""
        m = self.model
        pos = window_positions(ids)
        with capture(m.aux, m.predictor.config.source) as taps:
            aux_logits = m.aux(input_ids=ids, position_ids=pos, use_cache=False).logits
        return aux_logits, *m.base_kv(*m.predictor(*taps.stacked()), pos)

    def base_logits(self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, split: int | None = None,
                    prefix: int = 0) -> torch.Tensor:
        """The base's logits over the window [B, T, V] when it attends to these keys/values [L, B, H, T, D]."""
        base, exact_self = self.model.base, self.config.exact_self
        pos = window_positions(ids)
        mask = exact_self_mask(ids.shape[1], ids.device, base.config._attn_implementation == "eager") \
            if exact_self else None
        return base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **cache_kwargs(base, PredictedKV(keys, values, split, prefix, exact_self))).logits


# ---------------------------------------------------------------- set-up
def trainable_parameters(model: KVPredictionModel, config: TrainConfig) -> list[dict]:
    """Optimizer groups: predictor; aux matrices (decayed) and aux norms/biases (not), per the paper's AdamW."""
    model.requires_grad_(False)
    groups = []
    if config.uses_base:  # else no loss reaches it, and DDP refuses parameters that get no gradient
        model.predictor.requires_grad_(True)
        groups.append({"params": list(model.predictor.parameters()), "lr": config.lr, "weight_decay": 0.0,
                       "name": "predictor"})
    if not config.train_aux:
        return groups
    if config.aux_lora_rank:
        lora.add_adapters(model.aux, config.aux_lora_rank)
        matrices = [p for n, p in model.aux.named_parameters() if n.endswith((".A", ".B"))]
    else:
        embeddings = {id(p) for p in model.aux.get_input_embeddings().parameters()}
        matrices = [p for n, p in model.aux.named_parameters()
                    if p.dim() > 1 and id(p) not in embeddings and ".layers." in f".{n}"]
    norms = [p for n, p in model.aux.named_parameters() if p.dim() == 1 and ".layers." in f".{n}"]
    for p in matrices + norms:
        p.requires_grad_(True)
    groups.append({"params": matrices, "lr": config.aux_lr, "weight_decay": config.weight_decay, "name": "aux"})
    groups.append({"params": norms, "lr": config.aux_lr, "weight_decay": 0.0, "name": "aux_norms"})
    return groups


def _load_whole(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a saved whole tensor into a parameter, or into this rank's shard of an FSDP2 (DTensor) parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        whole = distribute_tensor(whole.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(whole)


def lr_lambda(config: TrainConfig, total_steps: Callable[[], int]):
    """Linear warm-up, then cosine to min_lr_ratio at total_steps() (config.steps, or fewer to fit max_minutes).
    Fitted to max_minutes, the warm-up takes at most half the steps, so that even a run the time cuts short anneals."""
    def factor(step: int) -> float:
        total = total_steps()
        warmup = config.warmup if total >= config.steps else min(config.warmup, total // 2)
        if step < warmup:
            return (step + 1) / warmup
        # the peak once, at the warm-up's last step; the minimum at the last step
        progress = min(1.0, (step + 1 - warmup) / max(1, total - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def trained_aux_state(model: KVPredictionModel, config: TrainConfig) -> dict[str, torch.Tensor]:
    """What must be saved of the aux: what the checkpoint training started from saved (`model.aux_tensors`),
    updated by this run's changed matrices and layer norms, and its adapter factors appended to earlier ones (their
    ranks add up), so a second round of training keeps the first."""
    state = dict(model.aux_tensors)
    if not config.train_aux:
        return state
    plain = {n: p.detach() for n, p in model.aux.named_parameters()
             if p.requires_grad and not n.endswith((".A", ".B")) and "parametrizations" not in n}
    for name in plain:  # a whole trained matrix already holds the adapters merged into it at load
        state.pop(name + lora.SUFFIX_A, None), state.pop(name + lora.SUFFIX_B, None)
    state.update(plain)
    for name, factor in lora.adapter_factors(model.aux).items():
        earlier = state.get(name)
        state[name] = factor if earlier is None else torch.cat(
            [earlier.to(factor), factor], dim=0 if name.endswith(lora.SUFFIX_A) else 1)
    return state


def train_flops_per_token(model: KVPredictionModel, config: TrainConfig) -> float:
    """Matmul FLOPs per trained token: aux fwd+bwd (6P), base 2 forwards + input-gradient backward (~6P),
    predictor 6P; the aux alone when no loss needs the base (OE-LP). Parameters counted as matmul weights incl. the
    LM head; attention's T^2 term ignored."""
    def matmul_params(m) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed_tokens" not in n) + \
            (m.get_output_embeddings().weight.numel() if m.config.tie_word_embeddings else 0)
    if not config.uses_base:
        return 6.0 * matmul_params(model.aux)
    return 6.0 * (matmul_params(model.aux) + matmul_params(model.base)
                  + model.predictor.config.multiply_adds_per_token())


def trim_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` in a run's metrics log. A run resumed from its checkpoint at `step`
    logs the later steps again (the killed run had logged some of them), and the log should read as one run."""
    from .data import _write_atomic

    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) < len(lines):
        _write_atomic(path, "".join(f"{line}\n" for line in kept).encode())


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a last line torn by the kill
        return math.inf


@contextlib.contextmanager
def deferred_interrupt(enabled: bool = True) -> Iterator[Callable[[], int]]:
    """Yield a function that says which of Ctrl+C (SIGINT) and SIGTERM (what `timeout` and job schedulers send)
    arrived, 0 for neither. The first only sets that, so the loop can stop at a step boundary, where the state to
    save is consistent, and gives the signal back to its previous handler, so a second one stops at once. Inert
    unless enabled and in the main thread; each signal only where it has its usual effect (SIGINT raising
    KeyboardInterrupt, SIGTERM ending the process), not where it is ignored or handled otherwise."""
    usual = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {sig: signal.getsignal(sig) for sig in usual}
    caught = [sig for sig in usual if previous[sig] is usual[sig]]
    if not enabled or threading.current_thread() is not threading.main_thread():
        caught = []
    arrived = []

    def first(signum, frame) -> None:
        arrived.append(signum)
        signal.signal(signum, previous[signum])
        # os.write, not print: a handler that prints while the loop is printing may hit a reentrant-call error
        if first_rank():
            os.write(2, b"\nkvpred: stopping after this step to save a checkpoint (again: stop at once)\n")

    for sig in caught:
        signal.signal(sig, first)
    try:
        yield lambda: int(arrived[0]) if arrived else 0
    finally:
        for sig in caught:
            signal.signal(sig, previous[sig])


def first_rank() -> bool:
    """This process is torchrun's rank 0, or runs alone: the one that speaks for the run."""
    return os.environ.get("RANK", "0") == "0"


# ---------------------------------------------------------------- the recipe
class Trainer:
    def __init__(self, config: TrainConfig):
        from .data import PackedTokens, check_tokenizer

        self.config = c = config
        self.distributed = dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if c.fsdp and not self.distributed:
            print("kvpred: --fsdp shards the model over the processes torchrun starts; this run has one, so it "
                  "trains the model whole (start it with torchrun --nproc-per-node N to shard)", file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        seed_everything(c.seed)
        self.model = KVPredictionModel.from_pretrained(c.model, keep_ratio=c.keep_ratio, source=c.source,
                                                       dtype=torch.float32, device=self.device)
        check_tokenizer(c.data, self.model.tokenizer)
        # what --model loaded, before training changes it: a resumed run must start from the same models
        self.fingerprints = [self.model.config.base_fingerprint, fingerprint(self.model.aux)]
        if c.seq_len > self.model.context_length:
            raise KVPredError(f"--seq-len {c.seq_len} exceeds the model's context limit of "
                              f"{self.model.context_length} tokens ({self.model.context_limit_reason})")
        # the training forwards' own masks know no sliding window, and transformers' sliding caches keep window - 1
        windows = [w for w in (self.model.base_window, sliding_window(self.model.aux.config)) if w]
        if windows and c.seq_len >= min(windows):
            raise KVPredError(f"--seq-len {c.seq_len} reaches the sliding attention window of {min(windows)} tokens "
                              f"that the base or auxiliary has; training windows must be shorter")
        self.model.base.requires_grad_(False)
        groups = trainable_parameters(self.model, c)
        if c.activation_checkpointing:
            self.model.aux.gradient_checkpointing_enable()
            self.model.aux.train()
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.module = self._wrap(Distillation(self.model, c))
        current = dict(self.model.named_parameters())  # fully_shard swaps parameters for sharded ones
        for group in groups:
            group["params"] = [current[names[id(p)]] for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
        self.total_steps = c.steps  # shortened once, after warm-up, when max_minutes cannot fit c.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(c, lambda: self.total_steps))
        self.data = PackedTokens(c.data, "train", seq_len=c.seq_len, batch_size=c.batch_size, rank=self.rank,
                                 world_size=self.world, seed=c.seed)
        self.heldout = self._heldout() if self.evaluates else None
        if self.sharded and c.eval_every and self.rank == 0:
            print("kvpred: held-out evaluation does not run under FSDP2: --eval-every is ignored (evaluate final/ "
                  "with `kvpred eval`)", file=sys.stderr)
        self.step = 0
        self.spent_before, self.t_start = 0.0, None  # training seconds of earlier runs in this folder; this one's start
        self.out = Path(c.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = hold_run_folder(self.out) if self.rank == 0 else None
        try:
            self._resume_if_possible()
        except BaseException:
            self.release()
            raise
        if self.rank == 0:
            trim_metrics(self.out / METRICS_NAME, self.step)

    def _heldout(self) -> torch.Tensor:
        from .data import heldout_windows

        c = self.config
        try:
            return heldout_windows(c.data, c.seq_len, c.eval_windows)
        except KVPredError as err:  # only evaluation needs them
            raise KVPredError(f"{err}; or train without evaluation (--eval-every 0)") from err

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.distributed:
            return module
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in [*self.model.aux.model.layers, *self.model.base.model.layers]:
                fully_shard(layer)
            return fully_shard(module)
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---------------------------------------------------------- checkpoints
    @property
    def sharded(self) -> bool:
        return self.config.fsdp and self.distributed

    @property
    def evaluates(self) -> bool:
        """Whether the loop evaluates on held-out windows (and so needs them): not with --eval-every 0, nor under
        FSDP2, where it never has."""
        return self.config.eval_every > 0 and not self.sharded

    def _whole_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name under the model ("predictor.key_weight", "aux.model.layers.0...").
        FSDP2 keeps each rank's shard only: there every rank takes part in gathering them, rank 0 receives them."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            whole = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            whole = dict(self.model.named_parameters())
        return {n: t.detach() for n, t in whole.items() if n in trainable}

    def _optimizer_state(self) -> dict:
        """The optimizer's whole state keyed by parameter name, one format for one process, DDP and FSDP2, so that
        a run resumes under any of them (a state keyed by index does not load into a sharded optimizer)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=self.sharded))

    def _state(self, whole: dict[str, torch.Tensor], optimizer: dict) -> dict:
        part = lambda prefix: {n.removeprefix(prefix): t for n, t in whole.items() if n.startswith(prefix)}
        return {"config": asdict(self.config), "step": self.step,
                "predictor": part("predictor."), "aux": part("aux."),
                "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "data": self.data.state_dict(), "rng": rng_state(),
                "fitted_steps": self.total_steps if self.total_steps < self.config.steps else None,
                "spent_s": self.spent_before + (0.0 if self.t_start is None else time.perf_counter() - self.t_start),
                "fingerprints": self.fingerprints}

    def _load_optimizer_state(self, saved: dict, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if all(isinstance(key, str) for key in saved["state"]):  # by name: `_optimizer_state`
            set_optimizer_state_dict(self.module, self.optimizer, saved, options=StateDictOptions(full_state_dict=True))
        elif not self.sharded:  # by index, as runs in one process or DDP saved it before
            self.optimizer.load_state_dict(saved)
        else:
            raise KVPredError(f"{path} holds an optimizer state by parameter index (an older kvpred saved it so in "
                              "one process), which FSDP2 cannot load: resume in one process first; its next "
                              "checkpoint loads anywhere")

    def save(self) -> None:
        whole, optimizer = self._whole_state(), self._optimizer_state()
        if self.rank == 0:
            path = self.out / STATE_NAME
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(self._state(whole, optimizer), tmp)
            os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint intact

    def _resume_if_possible(self) -> None:
        path = self.out / STATE_NAME
        if not path.exists():
            return
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:  # torch raises many types for a truncated or foreign file
            raise KVPredError(f"training checkpoint {path} is corrupt ({type(err).__name__}: {err}); "
                              "move it away to start over") from err
        if not isinstance(state, dict) or not {"config", "step", "predictor", "aux", "optimizer"} <= set(state):
            raise KVPredError(f"{path} is not a kvpred training checkpoint; move it away to start over")
        saved = state.get("config", {})
        diff = {k: (saved.get(k), v) for k, v in asdict(self.config).items()
                if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != v}
        if diff:
            raise KVPredError(f"{path} was written by a run with a different configuration {diff} "
                              "(saved, now); use another --out or the same settings")
        if state.get("fingerprints", self.fingerprints) != self.fingerprints:
            raise KVPredError(f"{path} was written by a run that started from other weights than --model "
                              f"{self.config.model} holds now (base, auxiliary fingerprints {state['fingerprints']}, "
                              f"now {self.fingerprints}); use another --out or the model the run started from")
        predictor, aux = dict(self.model.predictor.named_parameters()), dict(self.model.aux.named_parameters())
        with torch.no_grad():
            for params, tensors in ((predictor, state["predictor"]), (aux, state["aux"])):
                for n, t in tensors.items():
                    _load_whole(params[n], t)
        self._load_optimizer_state(state["optimizer"], path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step, self.spent_before = state["step"], state.get("spent_s", 0.0)
        if self.step > self.config.steps:
            raise KVPredError(f"{path} is at step {self.step}, past --steps {self.config.steps}: give --steps >= "
                              f"{self.step} to go on, or another --out to start over")
        # a schedule fitted to --max-minutes holds only for the limits it was fitted to
        fitted = state.get("fitted_steps") if all(saved.get(k) == getattr(self.config, k)
                                                  for k in ("steps", "max_minutes")) else None
        self.total_steps = min(self.config.steps, fitted or self.config.steps)
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):  # this run's schedule (a new --steps) from here
            group["lr"] = base * factor(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    # ---------------------------------------------------------- loop
    def train(self) -> Path:
        """Train to total_steps and write final/. A first Ctrl+C or SIGTERM stops at the end of the step under way
        (under torchrun, which passes its own signal on to every worker, the ranks agree on that step): a checkpoint
        is saved there and Interrupted raised, and the same run resumes from it. The run folder is let go however
        it ends."""
        try:
            return self._train()
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the run folder (`hold_run_folder`), so that another run may use it."""
        if getattr(self, "lock", None) is not None:
            self.lock.close()
            self.lock = None

    def _train(self) -> Path:
        from tqdm import tqdm

        c = self.config
        # --max-minutes is the run's budget over all its processes: a resumed run gets what earlier ones left
        left = 60 * c.max_minutes - self.spent_before if c.max_minutes else math.inf
        if left <= 0 and self.step < self.total_steps:
            self.log(f"the {c.max_minutes} min of --max-minutes were spent by earlier runs in {self.out}: raise it "
                     "to train on")
            return self.finish()
        tokens_per_step = c.batch_size * c.seq_len * c.grad_accum * self.world
        flops = train_flops_per_token(self.model, c)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=self.rank != 0, dynamic_ncols=True)
        metrics = open(self.out / METRICS_NAME, "a") if self.rank == 0 else contextlib.nullcontext()
        if self.distributed:  # the ranks start their clocks together: waiting for a late one is no step time
            dist.barrier()
        t_last, step_last = time.perf_counter(), self.step
        t_start, step_start = time.perf_counter(), self.step
        self.t_start = t_start
        deadline, fit_by = t_start + left, t_start + FIT_SHARE * left
        with bar, metrics as metrics_file, deferred_interrupt() as interrupted:
            while self.step < self.total_steps:
                losses = self._step()
                self.step += 1
                bar.update(1)
                past, fit_due, stop = self._agree(deadline, fit_by, interrupted())
                # the rate from this process's own steps, after the warm-up (a resumed run too, if newly limited),
                # or earlier where the warm-up would take too much of the time
                if c.max_minutes and self.total_steps == c.steps and (
                        self.step == max(c.warmup, step_start + FIT_AFTER) or fit_due):
                    self._fit_schedule_to_time(t_start, step_start, deadline, bar)
                last = self.step == self.total_steps or past
                if past:  # the run is done: the same command again does not train on
                    self.total_steps = self.step
                if c.log_every and (self.step % c.log_every == 0 or last):
                    self._sync()
                    elapsed = time.perf_counter() - t_last
                    tok_s = tokens_per_step * (self.step - step_last) / elapsed
                    record = {"step": self.step, **{k: round(v, 5) for k, v in losses.items()},
                              **self.step_lr, "tokens_per_s": round(tok_s),
                              "mfu": round(flops * tok_s / peak_flops(self.device) / self.world, 4)}
                    bar.set_postfix(loss=f"{losses['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                    t_last, step_last = time.perf_counter(), self.step
                    self._write(metrics_file, record)
                if self.evaluates and (self.step % c.eval_every == 0 or last):
                    record = {"step": self.step, **self.evaluate()}
                    self.log(json.dumps(record))
                    self._write(metrics_file, record)
                stop = 0 if last else stop  # a signal after the agreement stops the run after the next step
                if (c.save_every and self.step % c.save_every == 0) or last or stop:
                    self.save()
                if stop:
                    raise Interrupted(f"interrupted at step {self.step}; checkpoint saved to "
                                      f"{self.out / STATE_NAME}; run the same command to resume", stop)
                if past:
                    self.log(f"time limit of {c.max_minutes} min reached at step {self.step}")
        return self.finish()

    def _agree(self, deadline: float, fit_by: float, signal_number: int) -> tuple[bool, bool, int]:
        """Whether the time limit, and the latest time to fit the schedule to it, have passed, and which signal
        (0: none) stops the run here, for every rank at once. Ranks that start apart, or that torchrun signals a
        moment apart, must not stop, save or fit apart: one would wait in a collective forever."""
        now = time.perf_counter()
        flags = [float(now > deadline), float(now > fit_by), float(signal_number)]
        if self.distributed:
            agreed = torch.tensor(flags, dtype=torch.float32, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()
        return bool(flags[0]), bool(flags[1]), int(flags[2])

    def _fit_schedule_to_time(self, t_start: float, step_start: int, deadline: float, bar) -> None:
        """Shorten the cosine so that it ends, annealed, inside max_minutes instead of being cut off mid-way.
        Decided once, from the warm-up's step rate, and saved, so a resumed run keeps the same schedule."""
        rate = (self.step - step_start) / (time.perf_counter() - t_start)
        fits = self.step + int(0.92 * rate * (deadline - time.perf_counter()))  # 8% for evaluations and saves
        if self.distributed:  # every rank must stop at the same step
            fits_t = torch.tensor([fits], device=self.device)
            dist.all_reduce(fits_t, op=dist.ReduceOp.MIN)
            fits = int(fits_t)
        if fits < self.total_steps:
            self.total_steps = max(self.step + 1, fits)
            bar.total = self.total_steps
            self.log(f"{self.config.max_minutes} min fit {self.total_steps} of {self.config.steps} steps "
                     f"at {rate:.2f} steps/s: the learning-rate schedule ends there")

    def _step(self) -> dict[str, float]:
        c = self.config
        self.module.train()
        self.model.base.eval()
        totals: dict[str, float] = {}
        for _ in range(c.grad_accum):
            ids = next(self.data).to(self.device)
            # copies and prefixes are drawn only when asked for, so runs without them keep their random stream
            ids = with_copied_spans(ids, c.copy_spans, rank=self.rank, world=self.world) if c.copy_spans else ids
            split = random.randint(1, c.seq_len - 1) if c.suffix_split else None
            prefix = random.randint(0, split - 1) if split and c.exact_prefix and random.random() < c.exact_prefix \
                else 0
            with torch.autocast(self.device.type, torch.bfloat16, enabled=c.bf16 and self.device.type == "cuda"):
                losses = self.module(ids, split, prefix)
            (losses["loss"] / c.grad_accum).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.item() / c.grad_accum
        if self.distributed:  # report the global-batch mean, as one process with the whole batch would
            reduced = torch.tensor(list(totals.values()), device=self.device)
            dist.all_reduce(reduced)
            totals = dict(zip(totals, (reduced / self.world).tolist()))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, c.clip))
        # what this step used, for the log: the predictor's rate as "lr", the auxiliary's as "aux_lr"
        self.step_lr = {LOGGED_LR[g["name"]]: g["lr"] for g in self.optimizer.param_groups if g["name"] in LOGGED_LR}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return totals

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out windows: NLL of the last quarter (at most 64 tokens) after a predicted (or exact) prefix, and
        agreement of the first of those tokens' argmax with the exact base's."""
        self.model.eval()
        ids = self.heldout.to(self.device)
        tail = min(64, ids.shape[1] // 4)
        out = {}
        first = {}
        autocast = self.config.bf16 and self.device.type == "cuda"
        for mode in ("exact", "predicted"):
            with torch.autocast(self.device.type, torch.bfloat16, enabled=autocast):
                logits, _ = self.model.prefill(ids, mode=mode, exact_tail=tail + 1)
            logits = logits[:, :-1].float()
            out[f"heldout_nll_{mode}"] = F.cross_entropy(logits.flatten(0, 1), ids[:, -tail:].flatten()).item()
            first[mode] = logits[:, 0].argmax(-1)
        out["first_token_agreement"] = (first["exact"] == first["predicted"]).float().mean().item()
        return out

    def finish(self) -> Path:
        """Write the trained model as a kvpred checkpoint (adapters stay as factors, merged on load)."""
        final = self.out / "final"
        whole = self._whole_state() if self.sharded else None
        if self.rank == 0:
            model = self._unsharded_copy(whole) if self.sharded else self.model
            aux_state = trained_aux_state(model, self.config)
            lora.merge_adapters(model.aux)
            model.aux_tensors = aux_state
            model.config.forget_measurements()
            model.save_pretrained(final)
            self.log(f"saved {final}")
        if self.distributed:
            dist.barrier()
        return final

    def _unsharded_copy(self, whole: dict[str, torch.Tensor]) -> KVPredictionModel:
        """A plain (unsharded) copy of the model on the CPU with the gathered trained tensors, for saving."""
        c = self.config
        model = KVPredictionModel.from_pretrained(c.model, keep_ratio=c.keep_ratio, source=c.source,
                                                  dtype=torch.float32, device="cpu")
        trainable_parameters(model, c)  # the same adapters and trainable set
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in whole.items():
                params[n].copy_(t)
        return model

    @staticmethod
    def _write(file, record: dict) -> None:
        if file:
            file.write(json.dumps(record) + "\n")
            file.flush()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)


def peak_flops(device: torch.device) -> float:
    """Dense bf16 peak used for MFU: H100 SXM 989 TFLOP/s; elsewhere a nominal figure (MFU then meaningless)."""
    if device.type == "cuda" and "H100" in torch.cuda.get_device_name(device):
        return 989e12
    if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return 989e12
    return 1e12


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        flag, default = f"--{f.name.replace('_', '-')}", f.default
        help = f.metadata["help"] + ("" if default in (None, "") else " (default: %(default)s)")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        elif f.name == "keep_ratio":
            p.add_argument(flag, type=float, default=None, help=help)
        elif f.name == "source":
            p.add_argument(flag, choices=("kv", "hidden"), default=None, help=help)
        else:
            p.add_argument(flag, type=type(default), default=default, required=f.name == "data", help=help)


def register(subparsers) -> None:
    from .cli import command_help

    p = subparsers.add_parser("train", help=command_help("train"),
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_train_command)


def _train_command(args: argparse.Namespace) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    status = 0
    try:
        Trainer(config).train()
    except Interrupted as stop:  # every rank stopped at the same step, so they leave together, as after the last
        if first_rank():
            print(f"kvpred: {stop}", file=sys.stderr)
        status = 128 + stop.signal  # what a shell reports for a command stopped by that signal (Ctrl+C: 130)
    except KeyboardInterrupt:  # a second Ctrl+C, or one before training began
        print(f"kvpred: interrupted without saving; the same command resumes from the last checkpoint in "
              f"{config.out}, if there is one", file=sys.stderr)
        return 130
    if dist.is_initialized():
        dist.destroy_process_group()
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point for torchrun: `torchrun --nproc-per-node N -m kvpred.train --data ... --out ...`."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
