"""`kvpred bench ttft`: time to first token of exact, aux and predicted prefill side by side (METHOD 4).

Each (batch, prompt length) gets its own preallocated caches (BufferCache, written in place) and, on CUDA, the
base model's one-token step captured as a CUDA graph. Exact and predicted share that cache and that step, so
their decoding runs the very same code. Every repeat draws fresh random prompts (no prefix cache can help);
modes rotate order across repeats; medians and p10/p90 are reported after device synchronisation.

    kvpred bench ttft --model smollm2-135m --prompt-lens 128,512,1024,2048 --device cpu
    kvpred bench ttft --shape llama-3.2-3b --aux-keep 0.25 --aux-shape llama-3.2-1b --device cuda
    kvpred bench report part1.json part2.json --out benchmarks/results --name ttft_gpu
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from .decoding import EagerStep, GraphStep, make_step, synchronize
from .deferred import deferred_values
from .models import SHARED_MLP, UNGATED_MLPS, KVPredError, expert_count, expert_layers, out_folder

RANDOM_LABEL = "random-weight timing model"
DEFAULT_OUT = "benchmarks/results"
DEFAULT_PROMPT_LENS = (128, 512, 2048, 8192)
# Targets from the task (printed, never asserted)
TARGET_EFFICIENCY, TARGET_MIN_LEN, TARGET_PREDICTOR_SHARE, TARGET_DECODE_GAP = 0.9, 1024, 0.03, 0.02


# -------------------------------------------------------------------- FLOP accounting
@dataclass(frozen=True)
class Dims:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_params: tuple[int, ...]  # per layer, the MLP weights one token runs through (see `mlp_params`)
    qkv_bias: bool

    @classmethod
    def of(cls, config) -> "Dims":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        qkv_bias = (bool(getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", False))
                    or config.model_type == "qwen2")
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, mlp_params(config), qkv_bias)

    @property
    def kv_params(self) -> int:
        """k_proj + v_proj weights and biases of one layer."""
        return 2 * (self.hidden + self.qkv_bias) * self.kv_heads * self.head_dim

    @property
    def q_params(self) -> int:
        """q_proj weight and bias of one layer."""
        return (self.hidden + self.qkv_bias) * self.heads * self.head_dim

    def linear_params(self, layers: int | None = None) -> int:
        """Linear weights (and q/k/v biases) one token runs through in the first `layers` decoder layers (all by
        default): q, k, v, o and the MLP; norms left out."""
        layers = self.layers if layers is None else layers
        o = self.heads * self.head_dim * self.hidden
        return layers * (self.q_params + self.kv_params + o) + sum(self.mlp_params[:layers])


def mlp_params(config) -> tuple[int, ...]:
    """Per layer, the MLP weights one token runs through: the SwiGLU MLP (or an ungated one: StarCoder2, Nemotron);
    in a mixture-of-experts layer the router and the experts each token is routed to (and the shared experts:
    Qwen2-MoE's with its gate, GLM-4.5's, Hunyuan's MLP), not the other experts, since FLOPs are what the count
    stands for."""
    h = config.hidden_size
    dense = (2 if config.model_type in UNGATED_MLPS else 3) * h * config.intermediate_size
    experts = expert_count(config)
    if not experts:
        return (dense,) * config.num_hidden_layers
    per_expert = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    gated_shared = getattr(config, "shared_expert_intermediate_size", None) or 0  # Qwen2-MoE's, behind a gate of h
    shared = gated_shared or (getattr(config, "n_shared_experts", None) or 0) * per_expert  # or GLM-4.5's
    shared = shared or (config.intermediate_size if config.model_type in SHARED_MLP else 0)
    moe = (h * experts + config.num_experts_per_tok * 3 * h * per_expert + 3 * h * shared
           + (h if gated_shared else 0))
    return tuple(moe if routed else dense for routed in expert_layers(config))


def param_count(config) -> int:
    """METHOD 4's count: one (tied) embedding vocab x hidden plus every layer's linear weights."""
    d = Dims.of(config)
    return d.vocab * d.hidden + d.linear_params()


def flop_ratio_params(base_config, aux_config) -> float:
    """The paper's TTFT FLOPs reduction P_base / P_aux (METHOD 4): ignores attention and the base's last token."""
    return param_count(base_config) / param_count(aux_config)


def attention_flops(d: Dims, layers: int, new: int, past: int = 0) -> float:
    """QK^T and AV over causal context: 4 * heads * head_dim multiply-adds per (query, key) pair and layer."""
    pairs = new * past + new * (new + 1) / 2
    return 4.0 * layers * d.heads * d.head_dim * pairs


def exact_flops(base_config, n: int) -> float:
    """Base prefill of n tokens, LM head on the last one only."""
    d = Dims.of(base_config)
    return 2.0 * n * d.linear_params() + attention_flops(d, d.layers, n) + 2.0 * d.hidden * d.vocab


def predicted_flops(base_config, aux_config, predictor_config, n: int, tail: int = 1,
                    defer_values: bool = False) -> float:
    """What predicted mode computes: the auxiliary on the first n - tail tokens (no LM head; with K/V input it stops
    at its last layer's K/V projections, with hidden-state input at the deepest layer the layer map reads), the
    predictor on them, and the base's pass over the last `tail` tokens (the paper's 1) over those predicted entries.
    With `defer_values` (kvpred.deferred) the value maps are left out, and the tail attends over their inputs (width
    w instead of head_dim) and applies each map once per query."""
    b, a = Dims.of(base_config), Dims.of(aux_config)
    tail = min(tail, n)  # a tail past the prompt's start leaves nothing to predict: the exact prefill
    t = n - tail
    macs, layers = aux_run(aux_config, predictor_config)
    aux = 2.0 * t * macs + attention_flops(a, layers, t)
    predictor = predictor_flops(predictor_config, t, defer_values)
    base = 2.0 * tail * b.linear_params() + attention_flops(b, b.layers, tail, t) + 2.0 * b.hidden * b.vocab
    if defer_values:
        w = predictor_config.rank or predictor_config.in_features
        base += 2.0 * tail * b.layers * b.heads * (t * (w - b.head_dim) + w * b.head_dim)
    return aux + predictor + base


def predictor_flops(predictor_config, tokens: int, defer_values: bool = False) -> float:
    """The predictor's matmul FLOPs over `tokens` tokens (keys only with `defer_values`)."""
    return 2.0 * tokens * predictor_config.multiply_adds_per_token(values=not defer_values)


def aux_run(aux_config, predictor_config) -> tuple[int, int]:
    """(matmul multiply-adds per token, layers whose attention runs) of the auxiliary in predicted mode: with K/V
    input the pass stops after the last layer's Q/K/V projections (transformers runs q_proj first); with
    hidden-state input tap j is layer j's normed input, so layers 0..j-1 run for the deepest tap."""
    a = Dims.of(aux_config)
    if predictor_config.source == "kv":
        return a.linear_params(a.layers - 1) + a.q_params + a.kv_params, a.layers - 1
    layers = min(max(predictor_config.layer_map), a.layers)
    return a.linear_params(layers), layers


def flop_ratio_full(base_config, aux_config, predictor_config, n: int, defer_values: bool = False) -> float:
    """exact / predicted FLOPs with attention's N^2 term, the predictor and the base step; no aux LM head."""
    return exact_flops(base_config, n) / predicted_flops(base_config, aux_config, predictor_config, n,
                                                         defer_values=defer_values)


# -------------------------------------------------------------------- timing tools
class Clock:
    """One run's wall time with phase marks: CUDA events on GPU (no extra syncs), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def start(self) -> None:
        synchronize(self.device)
        self.marks: list[tuple[str, object]] = []
        self.t0 = time.perf_counter()
        self.first = _event() if self.cuda else self.t0

    def mark(self, name: str) -> None:
        self.marks.append((name, _event() if self.cuda else time.perf_counter()))

    def stop(self) -> tuple[float, dict[str, float]]:
        """Call once the result is on the host. Returns (total, {phase: seconds}), a phase marked more than once
        summed; the last phase runs to here."""
        total = time.perf_counter() - self.t0
        phases, prev = {}, self.first
        for name, mark in self.marks:
            phases[name] = phases.get(name, 0.0) + (prev.elapsed_time(mark) / 1e3 if self.cuda else mark - prev)
            prev = mark
        if self.marks:  # the last phase absorbs the host transfer
            phases[self.marks[-1][0]] += total - sum(phases.values())
        return total, phases


def _event():
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class PeakMemory:
    """Peak memory of one run: CUDA max_memory_allocated, or on CPU the resident set's high-water mark (VmHWM,
    reset through /proc/self/clear_refs). Both count everything resident: both models and all buffers."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "process peak RSS since start (VmHWM could not be reset)"

    def read(self) -> float:
        """GiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
        return float("nan")


def _ms(seconds: list[float], q: float = 50) -> float:
    return 1e3 * percentile(seconds, q)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -------------------------------------------------------------------- the benchmark
@dataclass
class Variant:
    name: str  # e.g. "KVP-LP 0.25 (8/30 layers)"
    model: object  # KVPredictionModel; all variants share one base


@dataclass
class Settings:
    prompt_lens: list[int]
    batches: list[int]
    repeats: int = 5
    warmup: int = 1
    decode_tokens: int = 32
    cuda_graph: bool = True
    compile_predictor: bool = False
    defer_values: bool = True  # with the eager step only: a captured graph cannot branch on pending values
    pipeline: bool = False  # with the graph step: predicted mode's step runs tap by tap behind the auxiliary
    prefill_graphs: bool = False  # on a GPU, each mode's whole prompt pass replays a CUDA graph (kvpred.prefill_graphs)
    max_batch_tokens: int | None = None
    time_budget: float | None = None
    seed: int = 0


@dataclass
class Combo:
    """Everything one (batch, prompt length) needs, allocated once: caches, the step, fixed position tensors."""
    batch: int
    length: int
    base_cache: object
    aux_caches: dict[str, object]
    step: object
    step_note: str
    defer_values: bool
    last_pos: torch.Tensor  # [B, 1] position of the last prompt token
    next_pos: torch.Tensor  # [B, 1] position of the first generated token
    pipelines: dict[str, object] = field(default_factory=dict)  # per variant: kvpred.pipeline.PipelinedPrefill
    prefills: dict[str, object] = field(default_factory=dict)  # per sample key: kvpred.prefill_graphs.PrefillGraph
    samples: dict[str, list] = field(default_factory=dict)


def variant_name(model, keep: float | None = None) -> str:
    """Display name: "KVP-LP 0.25 (8/30 layers)" for a pruned auxiliary, "KVP-C name" for a separate one; a
    hidden-state predictor says so."""
    from .models import keep_layers_for_ratio

    spec = model.config.aux
    n_base, n_aux = model.base.config.num_hidden_layers, model.aux.config.num_hidden_layers
    rank = model.config.predictor.rank
    source = ", hidden-state input" if model.config.predictor.source == "hidden" else ""
    source += f", rank-{rank} predictor" if rank else ""
    dtype = model.predictor_compute_dtype
    source += f" in {str(dtype).removeprefix('torch.')}" if dtype not in (None, model.base.dtype) else ""
    dtype = model.aux_compute_dtype
    source += f", auxiliary in {str(dtype).removeprefix('torch.')}" if dtype not in (None, model.base.dtype) else ""
    if spec.kind != "pruned":
        return f"KVP-C {Path(spec.name_or_path or 'aux').name}{source}"
    if keep is None:  # the paper's ratios, where the retained layers follow their pattern
        keep = next((r for r in (0.25, 0.5, 0.75) if keep_layers_for_ratio(n_base, r) == spec.keep_layers), None)
    ratio = f"{keep:.2f} " if keep else ""
    return f"KVP-LP {ratio}({n_aux}/{n_base} layers){source}"


def prompts(vocab: int, batch: int, length: int, device: torch.device, *key) -> torch.Tensor:
    """Fresh random token ids [B, N], one stream per (seed, batch, length, repeat, mode): no two runs share a
    prefix, so no prefix cache could help."""
    gen = torch.Generator(device=device)
    gen.manual_seed(zlib.crc32(repr((batch, length, *key)).encode()))
    return torch.randint(0, vocab, (batch, length), generator=gen, device=device)


class TTFTBench:
    def __init__(self, variants: list[Variant], settings: Settings, log=print):
        self.variants, self.s, self.log = variants, settings, log
        self.base = variants[0].model.base
        self.device = variants[0].model.device
        self.vocab = self.base.config.vocab_size
        self.clock, self.memory = Clock(self.device), PeakMemory(self.device)

    # ---- one combo
    def setup(self, batch: int, length: int) -> Combo:
        from .model import BufferCache
        from .prefill_graphs import MOST_TOKENS, bucket, served

        first = self.variants[0].model
        wanted = self.s.prefill_graphs and self.device.type == "cuda"
        graphed = wanted and served(batch, length)
        columns = bucket(length) if graphed else length  # a prompt pass's graph writes its bucket's columns
        capacity = -(-(max(columns, length + self.s.decode_tokens)) // 64) * 64  # aligned mask rows for SDPA kernels
        base_cache = BufferCache(self.base.config, batch, capacity, dtype=self.base.dtype, device=self.device)
        aux_caches = {v.name: v.model.new_cache(batch, columns, "aux") for v in self.variants}
        step, note = make_step(first, base_cache, self.s.cuda_graph)
        pos = lambda p: torch.full((batch, 1), p, dtype=torch.long, device=self.device)  # noqa: E731
        defer = self.s.defer_values and isinstance(step, EagerStep)
        combo = Combo(batch, length, base_cache, aux_caches, step, note, defer, pos(length - 1), pos(length))
        if isinstance(step, GraphStep) and step.graph is not None:
            combo.step_note = self._check_graph(combo)
            if self.s.pipeline:
                from .pipeline import PipelinedPrefill

                combo.pipelines = {v.name: PipelinedPrefill(v.model, base_cache) for v in self.variants}
                combo.step_note += ", pipelined behind the auxiliary (kvpred.pipeline)"
        elif self.s.pipeline:
            combo.step_note += ", not pipelined (that needs the CUDA-graph step)"
        combo.step_note += ", values deferred" if defer else ""
        if graphed:
            combo.step_note += self._capture_prefills(combo, columns)
        elif wanted:
            combo.step_note += f", prompt passes eager (more than {MOST_TOKENS} tokens a pass)"
        return combo

    def _capture_prefills(self, c: Combo, columns: int) -> str:
        """Each mode's prompt pass as a CUDA graph over `columns` (predicted mode's pipelined); what it says."""
        from .prefill_graphs import PrefillGraph

        pool = torch.cuda.graph_pool_handle()  # the graphs replay one at a time: their buffers can overlap
        try:
            first = self.variants[0].model
            c.prefills["exact"] = PrefillGraph(first, c.base_cache, "exact", c.batch, columns, pool=pool)
            for v in self.variants:
                c.prefills[f"aux|{v.name}"] = PrefillGraph(v.model, c.aux_caches[v.name], "aux", c.batch, columns,
                                                           pool=pool)
                c.prefills[f"predicted|{v.name}"] = PrefillGraph(v.model, c.base_cache, "predicted", c.batch,
                                                                 columns, pool=pool)
        except Exception as err:  # noqa: BLE001 - the passes then run eagerly, and the table says why
            c.prefills.clear()
            return f", prompt passes eager (capture failed: {type(err).__name__}: {err})"[:200]
        return f", prompt passes replayed as CUDA graphs over {columns} columns (kvpred.prefill_graphs)"

    def _check_graph(self, c: Combo) -> str:
        """The captured step replayed against the same step run eagerly (same attention, same mask): a capture
        that went wrong shows here. (Against the plain eager step, bf16 random-weight logits differ by ~3% RMS
        from the two attention kernels' rounding alone, so that comparison cannot tell.)"""
        model, step = self.variants[0].model, c.step
        ids = prompts(self.vocab, c.batch, c.length, self.device, self.s.seed, "graph check")
        model.predict_into(c.base_cache, ids)
        step.start(ids[:, -1:], c.last_pos, c.length - 1)
        with torch.no_grad(), model.static_step(c.base_cache, step.slot):
            step._body()
            eager = step.captured[1].float()
        model.predict_into(c.base_cache, ids)
        step.start(ids[:, -1:], c.last_pos, c.length - 1)
        step()
        diff, scale = (eager - step.logits.float()).abs().max().item(), eager.abs().max().item()
        if not diff <= 0.01 * scale + 1e-4:  # also catches NaN
            c.step = EagerStep(model, c.base_cache)
            return f"eager (graph replay differs from its eager run: max|d| {diff:.3g}, max|logit| {scale:.3g})"
        return f"{c.step_note} (max|d logit| vs its eager run {diff:.2g})"

    @torch.no_grad()
    def ttft(self, c: Combo, mode: str, variant: Variant, ids: torch.Tensor) -> tuple[float, dict, torch.Tensor]:
        """One timed prompt: until the first token's id is on the host."""
        clock, model = self.clock, variant.model
        clock.start()
        graph = c.prefills.get("exact" if mode == "exact" else f"{mode}|{variant.name}")
        if graph is not None:  # predicted mode's pass is pipelined: its phases are not told apart either
            token = graph(ids)
            clock.mark("step" if mode == "predicted" else "prefill")
        elif mode == "predicted" and c.pipelines:  # no phases to tell apart: all of it counts as the step
            token = c.pipelines[variant.name](ids)
            clock.mark("step")
        elif mode == "predicted":
            model.predict_into(c.base_cache, ids, mark=clock.mark, defer_values=c.defer_values)
            c.step.start(ids[:, -1:], c.last_pos, c.length - 1)
            with deferred_values(model.base, c.base_cache.pending_values, finish=False):
                token = c.step()
            clock.mark("step")
        else:
            cache = c.base_cache if mode == "exact" else c.aux_caches[variant.name]
            logits = model.prefill_into(cache, ids, mode=mode)
            token = logits[:, -1].argmax(-1)
            clock.mark("prefill")
        token = token.cpu()
        total, phases = clock.stop()
        return total, phases, token

    @torch.no_grad()
    def decode(self, c: Combo, token: torch.Tensor) -> tuple[float, float]:
        """Greedy decode_tokens steps after a prefill whose first token is `token` [B]: (the first step's seconds,
        tokens/s of the others, all rows). Deferred values are written in the first step, so it is timed apart."""
        c.step.start(token.to(self.device)[:, None], c.next_pos, c.length)
        synchronize(self.device)
        start = time.perf_counter()
        with deferred_values(self.base, c.base_cache.pending_values):
            c.step()
            synchronize(self.device)
            first = time.perf_counter()
            for _ in range(self.s.decode_tokens - 1):
                c.step()
        synchronize(self.device)
        return first - start, c.batch * (self.s.decode_tokens - 1) / (time.perf_counter() - first)

    def modes(self) -> list[tuple[str, Variant]]:
        return [("exact", self.variants[0])] + [(m, v) for v in self.variants for m in ("aux", "predicted")]

    def run_combo(self, c: Combo) -> None:
        modes = self.modes()
        for w in range(self.s.warmup):
            for mode, v in modes:
                ids = prompts(self.vocab, c.batch, c.length, self.device, self.s.seed, "warmup", w, mode, v.name)
                _, _, token = self.ttft(c, mode, v, ids)
                if mode != "aux":
                    self.decode(c, token)
        for r in range(self.s.repeats):
            for mode, v in modes[r % len(modes):] + modes[:r % len(modes)]:
                key = "exact" if mode == "exact" else f"{mode}|{v.name}"
                ids = prompts(self.vocab, c.batch, c.length, self.device, self.s.seed, r, key)
                sample = c.samples.setdefault(key, {"ttft": [], "phases": [], "first_step": [], "decode": [],
                                                    "memory": None})
                if sample["memory"] is None:
                    self.memory.reset()
                total, phases, token = self.ttft(c, mode, v, ids)
                sample["ttft"].append(total)
                sample["phases"].append(phases)
                if mode != "aux":
                    first_s, tokens_s = self.decode(c, token)
                    sample["first_step"].append(first_s)
                    sample["decode"].append(tokens_s)
                if sample["memory"] is None:
                    sample["memory"] = self.memory.read()

    def rows(self, c: Combo, model_label: str, weights: str, dtype: str) -> list[dict]:
        out = []
        exact = c.samples["exact"]
        for v in self.variants:
            aux, pred = c.samples[f"aux|{v.name}"], c.samples[f"predicted|{v.name}"]
            phase = {name: _ms([p.get(name, math.nan) for p in pred["phases"]])
                     for name in ("aux", "predictor", "write", "step")}
            m = v.model
            ratio_p = flop_ratio_params(m.base.config, m.aux.config)
            ratio_f = flop_ratio_full(m.base.config, m.aux.config, m.predictor.config, c.length, c.defer_values)
            speedup = percentile(exact["ttft"], 50) / percentile(pred["ttft"], 50)
            pred_ms = _ms(pred["ttft"])
            dec_e, dec_p = percentile(exact["decode"], 50), percentile(pred["decode"], 50)
            out.append({
                "model": model_label, "weights": weights, "aux": v.name, "device": _device_name(self.device),
                "dtype": dtype, "batch": c.batch, "prompt_len": c.length, "repeats": self.s.repeats,
                "exact_ms": _ms(exact["ttft"]), "exact_p10_ms": _ms(exact["ttft"], 10),
                "exact_p90_ms": _ms(exact["ttft"], 90),
                "aux_ms": _ms(aux["ttft"]), "aux_p10_ms": _ms(aux["ttft"], 10), "aux_p90_ms": _ms(aux["ttft"], 90),
                "pred_ms": pred_ms, "pred_p10_ms": _ms(pred["ttft"], 10), "pred_p90_ms": _ms(pred["ttft"], 90),
                "pred_aux_ms": phase["aux"], "pred_predictor_ms": phase["predictor"],
                "pred_write_ms": phase["write"], "pred_step_ms": phase["step"],
                "predictor_write_pct": 100 * (phase["predictor"] + phase["write"]) / pred_ms,
                # the share predictor + write cannot go below unless its matmuls run faster than the rest's
                "predictor_flops_pct": 100 * predictor_flops(m.predictor.config, c.length - 1, c.defer_values)
                / predicted_flops(m.base.config, m.aux.config, m.predictor.config, c.length,
                                  defer_values=c.defer_values),
                "speedup": speedup, "flop_ratio_params": ratio_p, "flop_ratio_full": ratio_f,
                "eff_params": speedup / ratio_p, "eff_full": speedup / ratio_f,
                "decode_exact_tok_s": dec_e, "decode_pred_tok_s": dec_p, "decode_pred_vs_exact": dec_p / dec_e,
                "first_step_exact_ms": _ms(exact["first_step"]), "first_step_pred_ms": _ms(pred["first_step"]),
                "mem_exact_gib": exact["memory"], "mem_aux_gib": aux["memory"], "mem_pred_gib": pred["memory"],
                "step": c.step_note,
            })
        return out

    def combos(self) -> list[tuple[int, int]]:
        """Cheapest first, so a time budget cuts the most expensive ones."""
        pairs = {(b, n) for b in self.s.batches for n in self.s.prompt_lens}  # each shape once
        return sorted(pairs, key=lambda bn: (bn[0] * bn[1], bn[0]))

    def skipped(self, b: int, n: int) -> str | None:
        if self.s.max_batch_tokens and b * n > self.s.max_batch_tokens:
            return f"batch x length {b * n} > --max-batch-tokens {self.s.max_batch_tokens}"
        return None


def expected_seconds(bench: TTFTBench, last: list[dict], batch: int, length: int) -> float:
    """A combo's likely wall time from the last one's measurements: prefills scale with batch x exact FLOPs,
    decoding stays as it was."""
    base = bench.base.config
    r0 = last[0]
    scale = batch * exact_flops(base, length) / (r0["batch"] * exact_flops(base, r0["prompt_len"]))
    prefills = (r0["exact_ms"] + sum(r["aux_ms"] + r["pred_ms"] for r in last)) / 1e3 * scale
    decodes = (1 + len(last)) * bench.s.decode_tokens * r0["batch"] / r0["decode_exact_tok_s"]
    return (bench.s.warmup + bench.s.repeats) * (prefills + decodes)


def run(bench: TTFTBench, model_label: str, weights: str, dtype: str, on_rows) -> tuple[list[dict], list[str]]:
    rows, notes, last = [], [], None
    start = time.monotonic()
    for b, n in bench.combos():
        reason = bench.skipped(b, n)
        if reason is None and bench.s.time_budget is not None and last:
            elapsed, expected = time.monotonic() - start, expected_seconds(bench, last, b, n)
            if elapsed + expected > bench.s.time_budget:
                reason = (f"time budget: {elapsed:.0f} s spent, ~{expected:.0f} s more needed, "
                          f"budget {bench.s.time_budget:.0f} s")
        if reason:
            notes.append(f"skipped batch {b}, prompt {n}: {reason}")
            bench.log(notes[-1])
            continue
        combo = bench.setup(b, n)
        bench.run_combo(combo)
        last = bench.rows(combo, model_label, weights, dtype)
        rows.extend(last)
        for row in last:
            bench.log(summary_line(row))
        on_rows(rows, notes)
        del combo
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, notes


# -------------------------------------------------------------------- output
CSV_FIELDS = ["model", "weights", "aux", "device", "dtype", "batch", "prompt_len", "repeats",
              "exact_ms", "exact_p10_ms", "exact_p90_ms", "aux_ms", "aux_p10_ms", "aux_p90_ms",
              "pred_ms", "pred_p10_ms", "pred_p90_ms", "pred_aux_ms", "pred_predictor_ms", "pred_write_ms",
              "pred_step_ms", "predictor_write_pct", "predictor_flops_pct", "speedup", "flop_ratio_params",
              "flop_ratio_full", "eff_params", "eff_full", "decode_exact_tok_s", "decode_pred_tok_s",
              "decode_pred_vs_exact", "first_step_exact_ms", "first_step_pred_ms", "mem_exact_gib", "mem_aux_gib",
              "mem_pred_gib", "step"]


def summary_line(r: dict) -> str:
    return (f"{r['model']} | {r['aux']} | B={r['batch']} N={r['prompt_len']}: exact {r['exact_ms']:.1f} ms, "
            f"aux {r['aux_ms']:.1f} ms, predicted {r['pred_ms']:.1f} ms -> speedup {r['speedup']:.2f}x "
            f"(FLOP ratio {r['flop_ratio_params']:.2f} params / {r['flop_ratio_full']:.2f} full; efficiency "
            f"{r['eff_params']:.2f} / {r['eff_full']:.2f})")


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})


def _model_title(r: dict) -> str:
    return f"{r['model']} ({RANDOM_LABEL})" if r["weights"] == RANDOM_LABEL else r["model"]


def _span(r: dict, key: str) -> str:
    """The "median [p10-p90]" of one mode's TTFT in a row."""
    return f"{r[key + '_ms']:.1f} [{r[key + '_p10_ms']:.1f}-{r[key + '_p90_ms']:.1f}]"


def markdown(rows: list[dict], meta: list[dict], notes: list[str]) -> str:
    lines = ["# Time to first token: exact vs aux vs predicted", ""]
    if any(r["weights"] == RANDOM_LABEL for r in rows):
        lines += [f"Models marked *{RANDOM_LABEL}* are randomly initialised with the exact shapes of public "
                  "models: their timings are real, their outputs meaningless.", ""]
    for m in meta:
        lines += [f"* `{m['command']}`", f"  - {m['device']}, {m['dtype']}; torch {m['torch']}, transformers "
                  f"{m['transformers']}; {m['threads']} CPU threads; load average {m['loadavg']} at the start, "
                  f"{m.get('loadavg_end', '?')} at the end; {m['date']}"]
    lines += ["", "TTFT: from prompt ids on the device to the first token's id on the host (argmax done), median "
              "[p10-p90] in ms over fresh random prompts. Speedup = exact / predicted. FLOP ratio *params* = "
              "P_base / P_aux (METHOD 4, one embedding); *full* = exact FLOPs / predicted FLOPs counting attention's "
              "N^2 term, the predictor and the base's last-token step, without the aux LM head. Efficiency = "
              "speedup / FLOP ratio.", "",
              "| model | aux | B | N | exact ms | aux ms | predicted ms | speedup | FLOP ratio params / full "
              "| efficiency params / full |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {_model_title(r)} | {r['aux']} | {r['batch']} | {r['prompt_len']} | {_span(r, 'exact')} | "
                     f"{_span(r, 'aux')} | {_span(r, 'pred')} | {r['speedup']:.2f} | {r['flop_ratio_params']:.2f} / "
                     f"{r['flop_ratio_full']:.2f} | {r['eff_params']:.2f} / {r['eff_full']:.2f} |")
    lines += ["", "Predicted-mode breakdown (medians, ms), decoding after the prefill (greedy, same cache type and "
              "step for both modes: the first step in ms, as it writes deferred values, then tokens/s of the others "
              "summed over the batch) and peak memory with both models resident.", "",
              "| model | aux | B | N | aux prefill | predictor | cache write | base step | predictor+write % "
              "(its FLOP share) | first decode step ms exact / pred | decode exact tok/s | decode predicted tok/s "
              "| pred/exact | peak GiB exact / aux / pred | step |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        lines.append(f"| {_model_title(r)} | {r['aux']} | {r['batch']} | {r['prompt_len']} | {r['pred_aux_ms']:.1f} "
                     f"| {r['pred_predictor_ms']:.2f} | {r['pred_write_ms']:.2f} | {r['pred_step_ms']:.2f} | "
                     f"{r['predictor_write_pct']:.1f} ({r['predictor_flops_pct']:.1f}) | "
                     f"{r['first_step_exact_ms']:.2f} / {r['first_step_pred_ms']:.2f} | "
                     f"{r['decode_exact_tok_s']:.1f} | {r['decode_pred_tok_s']:.1f} "
                     f"| {r['decode_pred_vs_exact']:.3f} | {r['mem_exact_gib']:.2f} / {r['mem_aux_gib']:.2f} / "
                     f"{r['mem_pred_gib']:.2f} | {r['step']} |")
    lines += ["", "## Targets (printed, not asserted)", ""] + [f"* {t}" for t in targets(rows)]
    if notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    long = [r for r in rows if r["prompt_len"] >= TARGET_MIN_LEN]
    out = []
    for key, label in (("eff_params", "params"), ("eff_full", "full")):
        met = [r for r in long if r[key] >= TARGET_EFFICIENCY]
        found = (f"{len(met)}/{len(long)} rows (lowest efficiency {min(r[key] for r in long):.2f})" if long
                 else "not measured (no prompt that long)")
        out.append(f"speedup >= {TARGET_EFFICIENCY} x FLOP ratio ({label}) for prompts >= {TARGET_MIN_LEN}: {found}")
    timed = [r for r in rows if not math.isnan(r["predictor_write_pct"])]  # pipelined runs have no breakdown
    share = [r for r in timed if r["predictor_write_pct"] <= 100 * TARGET_PREDICTOR_SHARE]
    out.append(f"predictor + cache write <= {100 * TARGET_PREDICTOR_SHARE:.0f}% of predicted TTFT: {len(share)}/"
               f"{len(timed)} rows (highest {max((r['predictor_write_pct'] for r in timed), default=0):.1f}%; the "
               f"predictor's share of predicted-mode FLOPs, its floor at equal efficiency, is "
               f"{_range(r['predictor_flops_pct'] for r in timed)}%)")
    close = [r for r in rows if abs(r["decode_pred_vs_exact"] - 1) <= TARGET_DECODE_GAP]
    out.append(f"decode after predicted within {100 * TARGET_DECODE_GAP:.0f}% of exact per token, after the first "
               f"step: {len(close)}/{len(rows)} rows (largest gap "
               f"{max((abs(r['decode_pred_vs_exact'] - 1) for r in rows), default=0):.1%}); the first step takes "
               f"{_range(r['first_step_pred_ms'] - r['first_step_exact_ms'] for r in rows)} ms more after a predicted "
               "prefill (deferred values are written in it)")
    return out


def _range(values: Iterable[float]) -> str:
    """"lo to hi" of `values` to one decimal, or the one value they all round to."""
    shown = sorted({f"{v:.1f}" for v in values}, key=float)
    return "-" if not shown else shown[0] if len(shown) == 1 else f"{shown[0]} to {shown[-1]}"


def summary_table(rows: list[dict]) -> str:
    """The short table printed last."""
    head = (f"{'model':<34} {'aux':<34} {'B':>2} {'N':>6} {'exact':>9} {'aux':>8} {'pred':>8} {'spd':>5} "
            f"{'ratio p/f':>10} {'eff p/f':>10} {'pw%':>5} {'dec p/e':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        model = r["model"] + (" (random-w.)" if r["weights"] == RANDOM_LABEL else "")
        aux = r["aux"].replace(", hidden-state input", ", hidden")
        lines.append(f"{model[:34]:<34} {aux[:34]:<34} {r['batch']:>2} {r['prompt_len']:>6} "
                     f"{r['exact_ms']:>9.1f} {r['aux_ms']:>8.1f} {r['pred_ms']:>8.1f} {r['speedup']:>5.2f} "
                     f"{r['flop_ratio_params']:>4.2f}/{r['flop_ratio_full']:<5.2f} "
                     f"{r['eff_params']:>4.2f}/{r['eff_full']:<5.2f} {r['predictor_write_pct']:>5.1f} "
                     f"{r['decode_pred_vs_exact']:>7.3f}")
    lines.append("times: median TTFT ms; spd = exact/pred; ratio/eff: FLOP ratio and efficiency, params rule / full "
                 "count; pw% = predictor+write share of predicted TTFT; dec p/e = decode tok/s predicted/exact")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """TTFT vs prompt length, one panel per (model, auxiliary), exact/aux/predicted; batches as line styles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((_model_title(r), r["aux"], r["device"], r["dtype"]), []).append(r)
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    colours = {"exact": "black", "aux": "tab:gray", "pred": "tab:blue"}
    labels = {"exact": "exact (base)", "aux": "aux alone", "pred": "predicted (KVP)"}
    for ax, ((model, aux, device, dtype), rs) in zip(axes.flat, groups.items(), strict=False):
        for i, b in enumerate(sorted({r["batch"] for r in rs})):
            pts = sorted((r for r in rs if r["batch"] == b), key=lambda r: r["prompt_len"])
            x = [r["prompt_len"] for r in pts]
            for key in ("exact", "aux", "pred"):
                y = [r[f"{key}_ms"] for r in pts]
                ax.plot(x, y, styles[i % len(styles)], color=colours[key], marker="o", ms=3,
                        label=f"{labels[key]}, B={b}")
                ax.fill_between(x, [r[f"{key}_p10_ms"] for r in pts], [r[f"{key}_p90_ms"] for r in pts],
                                color=colours[key], alpha=0.15, lw=0)
            for r in pts:  # speedup over exact, next to each predicted point
                ax.annotate(f"{r['speedup']:.1f}x", (r["prompt_len"], r["pred_ms"]), textcoords="offset points",
                            xytext=(4, -9), fontsize=6, color=colours["pred"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(f"{model}\n{aux}; {device}, {dtype}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OUTPUT_SUFFIXES = (".json", ".csv", ".md", ".png")
ROW_FIELDS = frozenset({"model", "weights", "aux", "device", "dtype", "batch", "prompt_len", "exact_ms", "aux_ms",
                        "pred_ms", "speedup", "flop_ratio_params", "flop_ratio_full", "predictor_write_pct",
                        "decode_pred_vs_exact"})  # what the reports read of every row


def check_outputs(out: str, name: str | None) -> None:
    """Before any work: `out` is a folder (or will be) and `name` a file stem in it, whose files, where they exist
    already, are an earlier run's results (a `{name}.json` of rows and meta beside them), not a user's own files."""
    if name is not None and (not name or Path(name).name != name):
        raise KVPredError(f"--name {name!r} is a file stem inside --out, not a path")
    folder = out_folder(out, "the results", make=False)
    if not folder.exists() and folder.suffix in OUTPUT_SUFFIXES:
        raise KVPredError(f"--out {out} is the folder the results go into; {folder.name} looks like a file name")
    if name is None or not any((folder / f"{name}{suffix}").exists() for suffix in OUTPUT_SUFFIXES):
        return
    try:
        data = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        ours = isinstance(data, dict) and {"rows", "meta"} <= set(data)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise KVPredError(f"{folder} holds {name}.* files that are not benchmark results: writing them would overwrite "
                          "them; choose another --out or --name")


def write_outputs(rows: list[dict], meta: list[dict], notes: list[str], out: Path, name: str,
                  with_plot: bool = True) -> list[Path]:
    """json + csv always; with_plot adds the markdown table and the png (without, an earlier run's are removed,
    which would no longer match)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if not with_plot:
        for stale in (out / f"{name}.md", out / f"{name}.png"):
            stale.unlink(missing_ok=True)
    if with_plot and rows:
        try:
            plot(rows, out / f"{name}.png")
            paths.append(out / f"{name}.png")
        except ImportError:
            notes.append("matplotlib is not installed here: no plot (run `kvpred bench report` on the json elsewhere)")
        paths.append(out / f"{name}.md")
        paths[-1].write_text(markdown(rows, meta, notes))
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "notes": notes, "rows": rows}, indent=1))
    write_csv(rows, out / f"{name}.csv")
    return [out / f"{name}.json", out / f"{name}.csv"] + paths


# -------------------------------------------------------------------- command line
def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_variants(args) -> tuple[list[Variant], str, str]:
    """(variants sharing one base, model label, weights label)."""
    from .cli import DTYPES, load_model

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if str(args.device).startswith("cuda")
                                                   else torch.float32)
    if args.shape:
        from .shapes import random_kvp_model

        keeps = args.aux_keep or ([] if args.aux_shape else [0.25])
        variants, base = [], None
        for spec in [{"aux_keep": k} for k in keeps] + [{"aux_shape": s} for s in args.aux_shape or []]:
            for source in args.source or ["kv"]:
                model = random_kvp_model(args.shape, source=source, rank=args.predictor_rank, dtype=dtype,
                                         device=args.device, seed=args.seed, base=base, **spec)
                base = model.base
                variants.append(Variant(variant_name(model, spec.get("aux_keep")), model))
        return variants, args.shape, RANDOM_LABEL
    if args.aux_shape or args.predictor_rank:
        raise KVPredError("--aux-shape and --predictor-rank build random-weight models and need --shape (for a "
                          "checkpoint, `kvpred compress` makes a factorised predictor)")
    if (args.aux_keep and len(args.aux_keep) > 1) or (args.source and len(args.source) > 1):
        raise KVPredError("with --model, give at most one --aux-keep and one --source")
    if args.source and not args.aux_keep:
        raise KVPredError("--source builds a new predictor: give --aux-keep too (a checkpoint has its own)")
    if args.aux_keep:
        from .model import KVPredictionModel

        model = KVPredictionModel.from_pretrained(args.model, keep_ratio=args.aux_keep[0], dtype=dtype,
                                                  device=args.device, source=(args.source or ["kv"])[0])
    else:
        model = load_model(args)
    return [Variant(variant_name(model, args.aux_keep[0] if args.aux_keep else None), model)], args.model, \
        "real weights"


def _command(args, weights: str) -> str:
    """The command that reproduces this run, every setting spelled out."""
    parts = ["kvpred", "bench", "ttft"]
    if weights == RANDOM_LABEL:
        parts += ["--shape", args.shape] + [x for k in args.aux_keep or [] for x in ("--aux-keep", str(k))]
        parts += [x for a in args.aux_shape or [] for x in ("--aux-shape", a)]
    else:
        parts += ["--model", args.model] + [x for k in args.aux_keep or [] for x in ("--aux-keep", str(k))]
    parts += [x for src in args.source or [] for x in ("--source", src)]
    parts += ["--predictor-rank", str(args.predictor_rank)] if args.predictor_rank else []
    parts += ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    parts += ["--prompt-lens", ",".join(map(str, args.prompt_lens)), "--batch", ",".join(map(str, args.batch)),
              "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--decode-tokens", str(args.decode_tokens)]
    for flag, value in (("--max-batch-tokens", args.max_batch_tokens), ("--time-budget", args.time_budget)):
        parts += [flag, str(value)] if value is not None else []
    parts += ["--cuda-graph", args.cuda_graph, "--compile", args.compile, "--compile-step", args.compile_step,
              "--defer-values", args.defer_values, "--pipeline", args.pipeline, "--prefill-graphs", args.prefill_graphs]
    parts += ["--predictor-dtype", args.predictor_dtype, "--aux-dtype", args.aux_dtype, "--seed", str(args.seed)]
    parts += ["--label", args.label] if args.label else []
    parts += ["--threads", str(args.threads)] if args.threads else []
    return shlex.join(parts)


def _ttft_command(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise KVPredError("--device cuda, but torch sees no CUDA device")
    settings = Settings(prompt_lens=args.prompt_lens, batches=args.batch, repeats=args.repeats, warmup=args.warmup,
                        decode_tokens=args.decode_tokens, cuda_graph=args.cuda_graph == "auto",
                        compile_predictor=args.compile == "auto" and args.device.startswith("cuda"),
                        defer_values=args.defer_values == "auto", pipeline=args.pipeline == "auto",
                        prefill_graphs=args.prefill_graphs == "auto",
                        max_batch_tokens=args.max_batch_tokens,
                        time_budget=args.time_budget, seed=args.seed)
    if args.repeats < 1 or args.warmup < 0:
        raise KVPredError(f"--repeats must be at least 1 and --warmup at least 0, got {args.repeats} and "
                          f"{args.warmup}")
    check_outputs(args.out, args.name)
    if args.decode_tokens < 2:
        raise KVPredError("--decode-tokens must be at least 2: the first step is timed apart from the others")
    if not (args.max_batch_tokens is None or args.max_batch_tokens >= 1) or not (
            args.time_budget is None or 0 < args.time_budget < math.inf):
        raise KVPredError(f"--max-batch-tokens must be >= 1 and --time-budget a positive number of seconds, got "
                          f"{args.max_batch_tokens} and {args.time_budget}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .model import KVPredictionModel

    for name in ("predictor_dtype", "aux_dtype"):  # on the class: every variant, named by what it runs
        value = getattr(args, name)
        if value != "auto":
            setattr(KVPredictionModel, name, None if value == "model" else torch.bfloat16)
    variants, label, weights = load_variants(args)
    label = args.label or label
    for variant in variants:
        if settings.compile_predictor:
            variant.model.compile_predictor()
        if args.compile_step == "auto" and settings.cuda_graph:
            variant.model.compile_step()
    model = variants[0].model
    limit = model.context_length - args.decode_tokens
    if limit < 2:
        raise KVPredError(f"{label}'s context of {model.context_length} tokens ({model.context_limit_reason}) leaves "
                          f"no room for a prompt besides {args.decode_tokens} decode tokens: lower --decode-tokens")
    if args.prompt_lens is None:  # the default lengths that fit this model's context
        args.prompt_lens = settings.prompt_lens = [n for n in DEFAULT_PROMPT_LENS if n <= limit] or [limit]
    too_long = [n for n in args.prompt_lens if n > limit or n < 2]
    if too_long:
        raise KVPredError(f"prompt lengths {too_long} do not fit: each needs 2..{limit} tokens ({label}'s context "
                          f"of {model.context_length} minus {args.decode_tokens} decode tokens)")
    dtype = str(model.base.dtype).removeprefix("torch.")
    device = model.device
    name = args.name or f"ttft_{device.type}_{re.sub(r'[^A-Za-z0-9._+-]+', '_', Path(label).name) or 'model'}"
    if args.name is None:
        check_outputs(args.out, name)
    meta = [{"command": _command(args, weights),
             "device": _device_name(device), "dtype": dtype, "torch": torch.__version__,
             "transformers": __import__("transformers").__version__, "threads": torch.get_num_threads(),
             "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M"),
             "weights": weights, "memory": PeakMemory(device).kind,
             "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__}}]
    print(f"kvpred bench ttft: {label} ({weights}) on {meta[0]['device']}, {dtype}; variants: "
          f"{', '.join(v.name for v in variants)}", flush=True)
    bench = TTFTBench(variants, settings, log=lambda text: print(text, flush=True))
    out = Path(args.out)
    rows, notes = run(bench, label, weights, dtype,
                      on_rows=lambda rows, notes: write_outputs(rows, meta, notes, out, name, with_plot=False))
    if not rows:  # the results of an earlier run under this name stay as they are
        raise KVPredError("no shape was measured (" + "; ".join(notes or ["every one was skipped"]) + "); nothing "
                          "written")
    meta[0]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    paths = write_outputs(rows, meta, notes, out, name, with_plot=not args.no_plot)
    print("\n" + "\n".join(targets(rows)))
    print("\n" + summary_table(rows))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _report_command(args) -> int:
    check_outputs(args.out, args.name)
    rows, meta, notes = [], [], []
    for path in args.inputs:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise KVPredError(f"cannot read benchmark results {path}: {err}") from err
        if not (isinstance(data, dict) and isinstance(data.get("rows"), list) and isinstance(data.get("meta"), list)
                and all(isinstance(row, dict) and ROW_FIELDS <= set(row) for row in data["rows"])):
            raise KVPredError(f"{path} is not a `kvpred bench ttft` JSON (rows of {', '.join(sorted(ROW_FIELDS))}, "
                              "and meta)")
        rows += data["rows"]
        meta += data["meta"]
        notes += data.get("notes", [])
    notes += args.note or []
    if not rows:
        raise KVPredError("no benchmark rows in " + ", ".join(args.inputs))
    paths = write_outputs(rows, meta, notes, Path(args.out), args.name)
    print("\n".join(targets(rows)))
    print("wrote " + ", ".join(str(p) for p in paths))
    print("\n" + summary_table(rows))
    return 0


def register(subparsers) -> None:
    from .cli import add_model_arguments, command_help, positive_int

    bench = subparsers.add_parser("bench", help=command_help("bench"),
                                  description="Benchmarks of KV prediction.")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = sub.add_parser("ttft", help="time to first token: exact vs aux vs predicted",
                       description="Time to first token of exact, aux-alone and predicted prefill side by side, with "
                                   "the predicted breakdown, decode speed, peak memory and FLOP ratios.")
    add_model_arguments(p)
    p.add_argument("--shape", default=None,
                   help="time a random-weight model with this public shape instead of --model (see kvpred.shapes)")
    p.add_argument("--aux-keep", type=float, action="append", default=None,
                   help="KVP-LP auxiliary keeping this fraction of the base's layers (repeatable with --shape)")
    p.add_argument("--aux-shape", action="append", default=None,
                   help="KVP-C auxiliary: a random-weight model of this public shape (needs --shape; repeatable)")
    p.add_argument("--source", choices=("kv", "hidden"), action="append", default=None,
                   help="predictor input of the auxiliaries built here: kv (the paper's, default) or hidden "
                        "(repeatable with --shape: one variant per source)")
    p.add_argument("--predictor-rank", type=int, default=None,
                   help="with --shape and --source hidden: time a factorised predictor of this rank")
    p.add_argument("--prompt-lens", type=_ints, default=None,
                   help=f"comma-separated lengths (default: those of {','.join(map(str, DEFAULT_PROMPT_LENS))} that "
                        "fit the model's context with the decode tokens)")
    p.add_argument("--batch", type=_ints, default=[1], help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per mode and shape (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per shape")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="greedy tokens timed after each prefill (at least 2: the first step is reported apart)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="skip shapes with batch x length above this")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: skip the remaining (costlier) shapes once the next would overrun this")
    p.add_argument("--cuda-graph", choices=("auto", "off"), default="auto",
                   help="capture the base's one-token step as a CUDA graph (auto: on CUDA)")
    p.add_argument("--compile", choices=("off", "auto"), default="off",
                   help="auto: on CUDA, run the predictor and the cache write as one torch.compile'd function (the "
                        "breakdown then reports the two under predictor). Off by default: on an H100 it moves TTFT "
                        "at 8k-32k tokens by -1%% to +4%%")
    p.add_argument("--compile-step", choices=("off", "auto"), default="off",
                   help="auto: run the base's one-token step through a torch.compile'd forward, captured as a CUDA "
                        "graph on a GPU (KVPredictionModel.compile_step; on a CPU predicted mode's values are then "
                        "not deferred); each batch and capacity compiles once, before it is timed")
    p.add_argument("--defer-values", choices=("auto", "off"), default="auto",
                   help="auto: with the eager step, predicted mode writes only the keys before its first token and "
                        "the values in the first decode step (kvpred.deferred; the decode speed pays for them)")
    p.add_argument("--pipeline", choices=("off", "auto"), default="off",
                   help="auto: with the CUDA-graph step, predicted mode runs the base's step one group of layers at "
                        "a time, each as soon as its auxiliary tap is predicted, on a second stream beside the "
                        "auxiliary (kvpred.pipeline), as generate() does on a GPU; the breakdown then has no phases")
    p.add_argument("--prefill-graphs", choices=("off", "auto"), default="off",
                   help="auto: on CUDA, each mode's whole prompt pass (predicted mode's pipelined) replays a CUDA "
                        "graph, the prompt right-padded to a multiple of 128 tokens, up to 4096 tokens a pass "
                        "(batch x length; 1024 before transformers 5.18; kvpred.prefill_graphs)")
    p.add_argument("--predictor-dtype", choices=("auto", "model", "bfloat16"), default="auto",
                   help="what the predictor's matmuls run in (auto: bf16 for an fp32 model on a CPU with bf16 dot "
                        "products, else the model's dtype; see KVPredictionModel.predictor_dtype)")
    p.add_argument("--aux-dtype", choices=("auto", "model", "bfloat16"), default="auto",
                   help="what the auxiliary's prefill runs in, by autocast (auto: as --predictor-dtype; see "
                        "KVPredictionModel.aux_dtype)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (and timing models)")
    p.add_argument("--label", default=None, help="model name in the tables (default: --shape or --model)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--name", default=None, help="file stem (default ttft_<device>_<model>)")
    p.add_argument("--no-plot", action="store_true", help="write json/csv only")
    p.set_defaults(func=_ttft_command)
    r = sub.add_parser("report", help="merge bench ttft results (json) into one csv/md/png",
                       description="Merge the json files of several `bench ttft` runs into one table and plot.")
    r.add_argument("inputs", nargs="+", help="json files written by bench ttft")
    r.add_argument("--out", default=DEFAULT_OUT, help="output folder for the redrawn report")
    r.add_argument("--name", default="ttft", help="file stem of the .md, .csv and .png")
    r.add_argument("--note", action="append", default=None, help="a line for the notes section (repeatable)")
    r.set_defaults(func=_report_command)


def main(argv: list[str] | None = None) -> int:
    """`python -m kvpred.bench ttft ...`: the same as `kvpred bench ttft ...`."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
