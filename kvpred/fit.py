"""Training-free predictor: closed-form ridge regression from auxiliary to base keys and values.

For every base layer i with aux tap j = layer_map[i], with X = [aux input | 1] and Y the base's keys (before k-norm and
RoPE) or values, W = (X^T X + lam*D)^-1 (X^T Y + lam*D*W0), where D is X^T X's mean diagonal (no penalty on the bias)
and W0 the prior (identity for a pruned auxiliary reading keys/values, zero otherwise). Only the running sums X^T X,
X^T Y and sum(Y^2) are kept, never the activations, so calibration size is bounded by time, not memory.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from .model import KVPredictionModel, capture, position_ids_from_mask


@dataclass
class FitConfig:
    tokens: int = 65_536  # calibration tokens
    seq_len: int = 512
    batch_size: int = 8
    ridge: float = 1e-3  # lam, relative to the mean diagonal of X^T X


@dataclass
class Statistics:
    xtx: torch.Tensor  # [taps, in+1, in+1] float64
    xty_k: torch.Tensor  # [L_base, in+1, key] float64
    xty_v: torch.Tensor  # [L_base, in+1, value]
    yy_k: torch.Tensor  # [L_base] sum of squared targets
    yy_v: torch.Tensor
    tokens: int = 0


@torch.no_grad()
def collect(model: KVPredictionModel, batches: Iterable[torch.Tensor], tokens: int) -> Statistics:
    """Accumulate regression statistics over packed token batches [B, T] until `tokens` tokens are seen."""
    pc = model.predictor.config
    layer_map = model.predictor.layer_map
    stats = None
    bar = tqdm(total=tokens, desc="fit: collecting", unit="tok")
    for ids in batches:
        ids = ids.to(model.device)
        mask = torch.ones_like(ids)
        pos = position_ids_from_mask(mask)
        key_in, value_in = model.aux_inputs(ids, mask, pos)  # [taps, B, T, in]
        with capture(model.base, "kv") as target:
            model.base.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        yk, yv = (torch.stack(t).flatten(1, 2).double() for t in (target.k, target.v))  # [L, N, out]
        xs = [torch.cat([x.flatten(1, 2).double(), x.new_ones(x.shape[0], ids.numel(), 1, dtype=torch.float64)],
                        -1) for x in (key_in, value_in)]  # [taps, N, in+1]
        if stats is None:
            n_taps, d = xs[0].shape[0], xs[0].shape[-1]
            z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=model.device)  # noqa: E731
            stats = Statistics(z(2, n_taps, d, d), z(len(layer_map), d, pc.key_features),
                               z(len(layer_map), d, pc.value_features), z(len(layer_map)), z(len(layer_map)))
        for s, x in enumerate(xs):
            stats.xtx[s] += x.transpose(1, 2) @ x
        for j in layer_map.unique():  # every base layer that reads tap j, in one product
            layers = (layer_map == j).nonzero().flatten()
            stats.xty_k[layers] += xs[0][j].T @ yk[layers]
            stats.xty_v[layers] += xs[1][j].T @ yv[layers]
        stats.yy_k += yk.pow(2).sum((1, 2))
        stats.yy_v += yv.pow(2).sum((1, 2))
        stats.tokens += ids.numel()
        bar.update(ids.numel())
        if stats.tokens >= tokens:
            break
    bar.close()
    if stats is None:
        raise ValueError("no calibration data: the batch iterator was empty")
    return stats


def _prior(model: KVPredictionModel, d_in: int, d_out: int) -> torch.Tensor:
    """[in+1, out] prior: identity when the aux reads the base's own key/value space (pruned copy), else zero."""
    prior = torch.zeros(d_in + 1, d_out, dtype=torch.float64, device=model.device)
    if model.config.aux.kind == "pruned" and model.predictor.config.source == "kv" and d_in == d_out:
        prior[:d_in] = torch.eye(d_in, dtype=torch.float64, device=model.device)
    return prior


def _solve(xtx: torch.Tensor, xty: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    d = xtx.shape[-1] - 1
    penalty = torch.zeros_like(xtx[0])
    penalty.diagonal()[:d] = ridge * xtx[:, range(d), range(d)].mean()
    return torch.linalg.solve(xtx + penalty, xty + penalty @ prior)  # [L, in+1, out]


def _relative_error(xtx, xty, yy, w) -> torch.Tensor:
    """Per layer sqrt(||XW - Y||^2 / ||Y||^2), from the sufficient statistics alone."""
    sse = yy - 2 * (w * xty).sum((1, 2)) + torch.einsum("lio,lij,ljo->l", w, xtx, w)
    return (sse.clamp(min=0) / yy).sqrt()


@torch.no_grad()
def solve(model: KVPredictionModel, stats: Statistics, ridge: float) -> dict:
    """Write the ridge solution into model.predictor; return per-layer relative L2 errors before and after."""
    p, lm = model.predictor, model.predictor.layer_map
    report = {"tokens": stats.tokens, "ridge": ridge}
    for name, s, xty, yy, weight, bias in (("key", 0, stats.xty_k, stats.yy_k, p.key_weight, p.key_bias),
                                           ("value", 1, stats.xty_v, stats.yy_v, p.value_weight, p.value_bias)):
        xtx = stats.xtx[s][lm]
        current = torch.cat([weight.transpose(1, 2), bias.unsqueeze(1)], 1).double()  # [L, in+1, out]
        w = _solve(xtx, xty, _prior(model, weight.shape[2], weight.shape[1]), ridge)
        report[f"{name}_rel_error_before"] = _relative_error(xtx, xty, yy, current).tolist()
        report[f"{name}_rel_error_after"] = _relative_error(xtx, xty, yy, w).tolist()
        weight.copy_(w[:, :-1].transpose(1, 2))
        bias.copy_(w[:, -1])
    return report


def fit_predictor(model: KVPredictionModel, batches: Iterable[torch.Tensor], config: FitConfig) -> dict:
    start = time.perf_counter()
    report = solve(model, collect(model, batches, config.tokens), config.ridge)
    report["seconds"] = time.perf_counter() - start
    return report


# ---------------------------------------------------------------- CLI
def register(subparsers) -> None:
    from .cli import add_model_arguments

    p = subparsers.add_parser(
        "fit", help="training-free predictor: ridge regression on a calibration corpus",
        description="Fit every predictor map in closed form (ridge) from auxiliary->base key/value pairs collected "
                    "on token shards (see `kvpred data build`), and save a kvpred checkpoint.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="token shard folder made by `kvpred data build`")
    p.add_argument("--out", required=True, help="folder for the fitted checkpoint")
    p.add_argument("--source", choices=("kv", "hidden"), default=None,
                   help="predictor input: aux keys/values (paper) or the aux hidden state (default: the model's)")
    p.add_argument("--keep-ratio", type=float, default=None, help="build a new pruned aux keeping this share of layers")
    p.add_argument("--keep-layers", default=None, help="build a new pruned aux keeping these layers, e.g. 0,4,8")
    for f, default in asdict(FitConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    p.set_defaults(func=_fit_command)


def _fit_command(args: argparse.Namespace) -> int:
    from .data import PackedTokens, check_tokenizer

    keep = [int(x) for x in args.keep_layers.split(",")] if args.keep_layers else None
    # statistics in float32 whatever the serving dtype: X^T X of bf16 activations loses the small directions
    model = KVPredictionModel.from_pretrained(args.model, keep_ratio=args.keep_ratio, keep_layers=keep,
                                              source=args.source, dtype=torch.float32, device=args.device)
    check_tokenizer(args.data, model.tokenizer)
    config = FitConfig(**{f: getattr(args, f) for f in asdict(FitConfig())})
    batches = PackedTokens(args.data, "train", seq_len=config.seq_len, batch_size=config.batch_size)
    report = fit_predictor(model, batches, config)
    model.save_pretrained(args.out)
    Path(args.out, "fit_report.json").write_text(json.dumps(report, indent=2))
    k0, k1 = report["key_rel_error_before"], report["key_rel_error_after"]
    v0, v1 = report["value_rel_error_before"], report["value_rel_error_after"]
    print(f"fitted on {report['tokens']} tokens in {report['seconds']:.0f} s; mean relative error "
          f"keys {sum(k0) / len(k0):.3f} -> {sum(k1) / len(k1):.3f}, values {sum(v0) / len(v0):.3f} -> "
          f"{sum(v1) / len(v1):.3f}; saved {args.out}")
    return 0
