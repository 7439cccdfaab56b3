"""Training-free predictor: closed-form ridge regression from auxiliary to base keys and values.

For every base layer i with aux tap j = layer_map[i], with X = [aux input | 1] and Y the base's keys (before k-norm and
RoPE) or values, W = (X^T X + lam*D)^-1 (X^T Y + lam*D*W0), where D is X^T X's mean diagonal (no penalty on the bias)
and W0 the prior (identity for a pruned auxiliary reading keys/values, zero otherwise). Only the running sums X^T X,
X^T Y and sum(Y^2) are kept, never the activations, so calibration size is bounded by time, not memory.

`factorise` turns full-rank maps into the cheaper factorised predictor (PredictorConfig.rank): per tap, the maps of all
base layers reading it are approximated by a truncated SVD after scaling by the square root of the input covariance,
the best rank-r approximation in output error over the calibration inputs (reduced-rank regression). `kvpred fit
--rank` applies it to the ridge solution, `kvpred compress` to a trained predictor.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Iterable

import torch
from tqdm import tqdm

from . import lora
from .model import (CONFIG_NAME, DEFAULTS_DIR, KVPredictionModel, capture, check_checkpoint_out,
                    position_ids_from_mask, write_report)
from .models import KVPredError
from .predictor import KVPredictor, PredictorConfig


@dataclass
class FitConfig:  # each field is a `kvpred fit` flag, with its help text
    tokens: int = field(default=65_536, metadata={
        "help": "calibration tokens (read in whole batches of --batch-size x --seq-len)"})
    seq_len: int = field(default=512, metadata={"help": "tokens per calibration window"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward"})
    ridge: float = field(default=1e-3, metadata={"help": "ridge strength, relative to the mean diagonal of X^T X"})
    rank: int = field(default=0, metadata={
        "help": "> 0: factorise the fitted maps to this rank per tap (hidden-state input only); 0: full rank"})

    def __post_init__(self) -> None:
        problems = [f"--{name.replace('_', '-')} must be at least 1, got {value}"
                    for name, value in (("tokens", self.tokens), ("seq_len", self.seq_len),
                                        ("batch_size", self.batch_size)) if value < 1]
        if not (math.isfinite(self.ridge) and self.ridge >= 0) or self.rank < 0:
            problems.append(f"--ridge must be a finite number >= 0 and --rank >= 0, got {self.ridge} and {self.rank}")
        if problems:
            raise KVPredError("; ".join(problems))


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
        xs = [_augmented(x) for x in (key_in, value_in)]  # [taps, N, in+1]
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


def _augmented(x: torch.Tensor) -> torch.Tensor:
    """[taps, B, T, in] -> [taps, B*T, in+1] float64 with a ones column (the bias's input)."""
    x = x.flatten(1, 2).double()
    return torch.cat([x, x.new_ones(*x.shape[:2], 1)], -1)


@torch.no_grad()
def input_moments(model: KVPredictionModel, batches: Iterable[torch.Tensor], tokens: int) -> torch.Tensor:
    """Running [X|1]^T [X|1] per auxiliary tap [taps, in+1, in+1] over `tokens` tokens: the auxiliary alone runs."""
    xtx, seen = None, 0
    bar = tqdm(total=tokens, desc="compress: input statistics", unit="tok")
    for ids in batches:
        x = _augmented(model.aux_inputs(ids.to(model.device), None, None)[0])
        xtx = x.transpose(1, 2) @ x if xtx is None else xtx + x.transpose(1, 2) @ x
        seen += ids.numel()
        bar.update(ids.numel())
        if seen >= tokens:
            break
    bar.close()
    if xtx is None:
        raise ValueError("no calibration data: the batch iterator was empty")
    return xtx


def mean_and_covariance(xtx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs' mean [in] and covariance [in, in] from their moments [in+1, in+1], augmented as in `_augmented`."""
    mean = xtx[:-1, -1] / xtx[-1, -1]
    return mean, xtx[:-1, :-1] / xtx[-1, -1] - torch.outer(mean, mean)


@torch.no_grad()
def factorise(predictor: KVPredictor, xtx: torch.Tensor, rank: int) -> tuple[KVPredictor, list[float]]:
    """The rank-`rank` factorised predictor closest to the full-rank `predictor` in output error on inputs with
    moments `xtx` [taps, in+1, in+1] (augmented as in `_augmented`), and per tap the relative output error it
    leaves, sqrt(sum of dropped squared singular values / total). The biases absorb the error at the mean input."""
    c = predictor.config
    if c.rank is not None:
        raise ValueError(f"the predictor is already factorised (rank {c.rank})")
    check_rank(c, rank)
    lowrank = KVPredictor(replace(c, rank=rank)).to(predictor.key_weight.device)
    errors = []
    for code, tap in enumerate(c.taps):
        layers = [i for i, j in enumerate(c.layer_map) if j == tap]
        w = torch.cat([torch.cat([predictor.key_weight[i], predictor.value_weight[i]]) for i in layers]).double()
        b = torch.cat([torch.cat([predictor.key_bias[i], predictor.value_bias[i]]) for i in layers]).double()
        mean, covariance = mean_and_covariance(xtx[tap])
        e, v = torch.linalg.eigh(covariance)
        if not e.max() > 0:
            raise KVPredError(f"the predictor's inputs at auxiliary tap {tap} do not vary over the calibration "
                              "tokens, so no factorisation can be fitted: give more --tokens")
        e = e.clamp(min=e.max() * 1e-12)
        u, sv, vh = torch.linalg.svd(w @ (v * e.sqrt()) @ v.T, full_matrices=False)
        root = sv[:rank].sqrt()  # split evenly between the two factors
        up, down = u[:, :rank] * root, (root[:, None] * vh[:rank]) @ (v * e.rsqrt()) @ v.T
        b = b + (w - up @ down) @ mean
        lowrank.down.data[code] = down
        width = c.key_features + c.value_features
        for i, rows, bias in zip(layers, up.split(width), b.split(width)):
            lowrank.key_weight.data[i], lowrank.value_weight.data[i] = rows.split([c.key_features, c.value_features])
            lowrank.key_bias.data[i], lowrank.value_bias.data[i] = bias.split([c.key_features, c.value_features])
        errors.append((sv[rank:].pow(2).sum() / sv.pow(2).sum()).sqrt().item())
    return lowrank.to(predictor.key_weight.dtype), errors


def check_rank(config: PredictorConfig, rank: int) -> None:
    if config.source != "hidden":  # the kv source's inputs are already narrow
        raise KVPredError(f"a factorised predictor needs hidden-state input, but this one reads {config.source!r}: "
                          "fit one with --source hidden first")
    widest = min(config.in_features, *(config.layer_map.count(j) * (config.key_features + config.value_features)
                                       for j in config.taps))
    if not 0 < rank <= widest:
        raise KVPredError(f"rank {rank} is not in [1, {widest}]: the maps of one tap have rank at most {widest}")


def _use_factorised(model: KVPredictionModel, xtx: torch.Tensor, rank: int) -> list[float]:
    """Replace model.predictor by its rank-`rank` factorisation; return the per-tap relative output errors."""
    model.predictor, errors = factorise(model.predictor, xtx, rank)
    model.config.predictor = model.predictor.config
    return errors


def _prior(model: KVPredictionModel, d_in: int, d_out: int) -> torch.Tensor:
    """[in+1, out] prior: identity when the aux reads the base's own key/value space (pruned copy), else zero."""
    prior = torch.zeros(d_in + 1, d_out, dtype=torch.float64, device=model.device)
    if model.config.aux.kind == "pruned" and model.predictor.config.source == "kv" and d_in == d_out:
        prior[:d_in] = torch.eye(d_in, dtype=torch.float64, device=model.device)
    return prior


def _solve(xtx: torch.Tensor, xty: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    d = xtx.shape[-1] - 1
    penalty = torch.zeros_like(xtx)  # per map: ridge x the mean diagonal of its own inputs' X^T X (bias unpenalised)
    penalty.diagonal(dim1=-2, dim2=-1)[:, :d] = ridge * xtx.diagonal(dim1=-2, dim2=-1)[:, :d].mean(-1, keepdim=True)
    singular = KVPredError("the calibration statistics are singular (too few or too repetitive tokens for the "
                           "predictor's inputs): use --ridge > 0 or more --tokens")
    if ridge == 0 and (torch.linalg.cond(xtx) > 1e12).any():  # LAPACK may still return a (useless) solution
        raise singular
    # Cholesky, not LU (torch.linalg.solve): the normal equations are symmetric positive definite, and torch 2.13's
    # CPU build fails batched LU solves of SmolLM2's 577 inputs once torch.set_num_threads(2) has been called
    factor, info = torch.linalg.cholesky_ex(xtx + penalty)  # info > 0: not positive definite, i.e. singular
    w = torch.cholesky_solve(xty + penalty @ prior, factor)  # [L, in+1, out]
    if info.any() or not torch.isfinite(w).all():  # some LAPACK builds return inf / NaN for a singular system
        raise singular
    return w


def _relative_error(xtx, xty, yy, w) -> torch.Tensor:
    """Per layer sqrt(||XW - Y||^2 / ||Y||^2), from the sufficient statistics alone."""
    sse = yy - 2 * (w * xty).sum((1, 2)) + torch.einsum("lio,lij,ljo->l", w, xtx, w)
    return (sse.clamp(min=0) / yy).sqrt()


@torch.no_grad()
def solve(model: KVPredictionModel, stats: Statistics, ridge: float) -> dict:
    """Write the ridge solution into model.predictor; return per-layer relative L2 errors before and after."""
    p, lm = model.predictor, model.predictor.layer_map
    if ridge == 0 and stats.tokens < stats.xtx.shape[-1]:  # X^T X of fewer rows than columns has no inverse
        raise KVPredError(f"--ridge 0 needs at least {stats.xtx.shape[-1]} calibration tokens for the predictor's "
                          f"{stats.xtx.shape[-1] - 1} inputs, got {stats.tokens}: use --ridge > 0 or more --tokens")
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
    if config.rank:  # before the collection, not after it
        check_rank(model.predictor.config, config.rank)
    stats = collect(model, batches, config.tokens)
    report = solve(model, stats, config.ridge)
    model.config.forget_measurements()
    if config.rank:
        report["rank"] = config.rank
        report["factorised_rel_error_per_tap"] = _use_factorised(model, stats.xtx[0], config.rank)
    report["seconds"] = time.perf_counter() - start
    return report


# ---------------------------------------------------------------- CLI
def register(subparsers) -> None:
    from .cli import (add_calibration_arguments, add_checkpoint_out_arguments, add_model_arguments, command_help,
                      layer_list, positive_int)

    p = subparsers.add_parser(
        "fit", help=command_help("fit"),
        description="Fit every predictor map in closed form (ridge) from auxiliary->base key/value pairs collected "
                    "on token shards (see `kvpred data build`), and save a kvpred checkpoint.")
    add_model_arguments(p, dtype=False)  # statistics in float32 whatever the serving dtype (see _fit_command)
    p.add_argument("--data", required=True, help="token shard folder made by `kvpred data build`")
    add_checkpoint_out_arguments(p, "folder for the fitted checkpoint")
    p.add_argument("--source", choices=("kv", "hidden"), default=None,
                   help="predictor input: aux keys/values (paper) or the aux hidden state (default: the model's)")
    p.add_argument("--keep-ratio", type=float, default=None, help="build a new pruned aux keeping this share of layers")
    p.add_argument("--keep-layers", type=layer_list, default=None,
                   help="build a new pruned aux keeping these layers, e.g. 0,4,8")
    p.add_argument("--aux", default=None, help="build with this separate auxiliary (KVP-C; e.g. from `kvpred narrow`)")
    for f in fields(FitConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f.metadata["help"])
    p.set_defaults(func=_fit_command)

    p = subparsers.add_parser(
        "compress", help=command_help("compress"),
        description="--rank: replace the predictor's full-rank maps by the factorised predictor of that rank (one "
                    "projection per auxiliary tap shared by every base layer reading it, then per-layer maps): the "
                    "best approximation in output error on calibration text (--data), found in closed form. "
                    "Hidden-state predictors only. Fine-tune the result with `kvpred train` to recover what it "
                    "loses. --aux-rank: refactor the auxiliary's saved adapters (whose rank grows with each round of "
                    "training) to at most that rank by truncated SVD; it reports the largest relative error.")
    add_model_arguments(p, dtype=False)  # loaded and measured in float32
    p.add_argument("--rank", type=positive_int, default=None, help="width of each tap's shared code")
    p.add_argument("--aux-rank", type=positive_int, default=None, help="largest rank of each auxiliary adapter")
    add_checkpoint_out_arguments(p, "folder for the compressed checkpoint")
    add_calibration_arguments(p, data_required=False)
    p.set_defaults(func=_compress_command)


def _compress_command(args: argparse.Namespace) -> int:
    if args.rank is None and args.aux_rank is None:
        raise KVPredError("nothing to compress: give --rank (the predictor) and/or --aux-rank (the adapters)")
    if args.rank is not None and args.data is None:
        raise KVPredError("--rank fits the factorised predictor on calibration text: give --data")
    check_checkpoint_out(args.out, args.overwrite)
    model = KVPredictionModel.from_pretrained(args.model, dtype=torch.float32, device=args.device)
    report = {"from": args.model}
    if args.aux_rank is not None:
        report.update(_compact_adapters(model, args.aux_rank))
    if args.rank is not None:
        report.update(_compress_predictor(model, args))
    model.config.forget_measurements()
    model.save_pretrained(args.out, dtype=getattr(torch, args.save_dtype))
    write_report(args.out, "compress_report.json", report)
    print(f"saved {args.out}")
    return 0


def _compact_adapters(model: KVPredictionModel, rank: int) -> dict:
    old = {n: t for n, t in model.aux_tensors.items() if n.endswith((lora.SUFFIX_A, lora.SUFFIX_B))}
    if not old:
        raise KVPredError("--aux-rank: this checkpoint's auxiliary has no adapters to compact")
    new, error = lora.compact_factors(old, rank)
    undo = {n: -t if n.endswith(lora.SUFFIX_B) else t for n, t in old.items()}
    lora.merge_factors(model.aux, undo)  # the loaded weights hold the old products: swap them for the new ones
    lora.merge_factors(model.aux, new)
    model.aux_tensors.update(new)
    ranks = sorted({t.shape[0] for n, t in old.items() if n.endswith(lora.SUFFIX_A)})
    print(f"adapters of rank {', '.join(map(str, ranks))} -> at most {rank}; largest relative error of a product "
          f"{error:.4f}")
    return {"aux_rank": rank, "aux_ranks_before": ranks, "aux_max_rel_error": error}


def _compress_predictor(model: KVPredictionModel, args: argparse.Namespace) -> dict:
    from .data import PackedTokens, check_tokenizer

    check_tokenizer(args.data, model.tokenizer)
    if model.predictor.config.rank is not None:  # both found before the calibration pass, not after it
        raise KVPredError(f"cannot compress {args.model}: its predictor is already factorised (rank "
                          f"{model.predictor.config.rank})")
    check_rank(model.predictor.config, args.rank)
    before = model.predictor.config.multiply_adds_per_token()
    xtx = input_moments(model, PackedTokens(args.data, "train", seq_len=args.seq_len, batch_size=args.batch_size),
                        args.tokens)
    try:
        errors = _use_factorised(model, xtx, args.rank)
    except ValueError as err:
        raise KVPredError(f"cannot compress {args.model}: {err}") from err
    after = model.predictor.config.multiply_adds_per_token()
    change = f"{before / after:.1f}x fewer" if after <= before else f"{after / before:.1f}x more: too high a rank"
    print(f"rank {args.rank}: predictor multiply-adds per token {before} -> {after} ({change}); "
          f"relative output error per tap {', '.join(f'{e:.3f}' for e in errors)}")
    return {"rank": args.rank, "tokens": args.tokens, "rel_error_per_tap": errors,
            "multiply_adds_per_token": [before, after]}


def _fit_command(args: argparse.Namespace) -> int:
    from .data import PackedTokens, check_tokenizer

    config = FitConfig(**{f: getattr(args, f) for f in asdict(FitConfig())})  # checked before the model loads
    check_checkpoint_out(args.out, args.overwrite)
    # statistics in float32 whatever the serving dtype: X^T X of bf16 activations loses the small directions
    model = KVPredictionModel.from_pretrained(args.model, aux=args.aux, keep_ratio=args.keep_ratio,
                                              keep_layers=args.keep_layers,
                                              source=args.source, dtype=torch.float32, device=args.device)
    check_tokenizer(args.data, model.tokenizer)
    if config.seq_len > model.context_length:  # statistics of positions the model never serves
        raise KVPredError(f"--seq-len {config.seq_len} exceeds the model's context limit of {model.context_length} "
                          f"tokens ({model.context_limit_reason})")
    if model.predictor.config.rank is not None:
        raise KVPredError(f"{args.model} is a checkpoint with a factorised predictor (rank "
                          f"{model.predictor.config.rank}), which fit cannot refit: it solves full-rank maps (and "
                          "then factorises them with --rank). Fit a full-rank checkpoint, or a new auxiliary around a "
                          "base: --model BASE with --keep-layers, --keep-ratio or --aux (`--model smollm2-135m "
                          "--keep-layers 0,10,20,29 --source hidden` builds one around the embedded default's base)")
    building = [f"--{name.replace('_', '-')}" for name in ("aux", "keep_ratio", "keep_layers", "source")
                if getattr(args, name) is not None]
    if building and (DEFAULTS_DIR / args.model / CONFIG_NAME).is_file():
        print(f"note: {args.model} names an embedded kvpred checkpoint and its base model; with {', '.join(building)} "
              "fit builds a new auxiliary and predictor around the base, not the checkpoint's trained ones",
              file=sys.stderr)
    if config.rank and model.predictor.config.source != "hidden":
        raise KVPredError("--rank needs a hidden-state predictor (--source hidden)")
    batches = PackedTokens(args.data, "train", seq_len=config.seq_len, batch_size=config.batch_size)
    if config.tokens > batches.stream.tokens:
        print(f"note: the train split holds {batches.stream.tokens} tokens, fewer than --tokens {config.tokens}: "
              "its windows are read more than once", file=sys.stderr)
    report = fit_predictor(model, batches, config)
    model.save_pretrained(args.out, dtype=getattr(torch, args.save_dtype))
    write_report(args.out, "fit_report.json", report)
    k0, k1 = report["key_rel_error_before"], report["key_rel_error_after"]
    v0, v1 = report["value_rel_error_before"], report["value_rel_error_after"]
    factorised = report.get("factorised_rel_error_per_tap")
    rank_note = (f" (full rank; factorised to rank {report['rank']}: relative output error per tap "
                 f"{', '.join(f'{e:.3f}' for e in factorised)})" if factorised else "")
    print(f"fitted on {report['tokens']} tokens in {report['seconds']:.0f} s; mean relative error "
          f"keys {sum(k0) / len(k0):.3f} -> {sum(k1) / len(k1):.3f}, values {sum(v0) / len(v0):.3f} -> "
          f"{sum(v1) / len(v1):.3f}{rank_note}; saved {args.out}")
    return 0
