"""Pipelined predicted mode: the base's first step runs one group of layers at a time, each group as soon as the
predicted keys and values it attends to are written, while the auxiliary goes on with its next layers.

At batch 1 the base's one-token step reads every weight once (memory-bound) and the auxiliary's prefill multiplies
whole prompts (compute-bound), so on a GPU the two can share the machine: on an H100 84-108% of a Llama-3.2-1B-shaped
step, and 41-46% of a Llama-3.1-8B-shaped one, ran beside the auxiliary's prefill
(benchmarks/results/h100/overlap_probe). Base layer l reads auxiliary tap `layer_map[l]`; when the map never goes
back to an earlier tap (every default map), the base's layers fall into consecutive groups, one per tap, in the order
the auxiliary produces the taps. Each tap, once out, is predicted and written for its group on the main stream, and
the group's part of the step is replayed as its own CUDA graph on a second stream after that write. Only the group
that reads the last tap waits for the whole auxiliary.

The same holds for an exact tail of W tokens (a chat template's reply opening, say): each group's part then runs
the base's layers over those W tokens. In unpadded and left-padded batches; off the GPU the same code runs one group
after the other, which is how the tests check it against the plain path.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import Cache

from .decoding import ColumnInputs, _capture
from .attention import soft_cap
from .model import BufferCache, KVPredictionModel, cache_kwargs, hidden_output, hidden_tap, position_ids_from_mask
from .models import hook_kv_projections
from .rope import layer_position_embeddings, rope_runs


def layer_groups(layer_map: list[int]) -> list[tuple[int, range]] | None:
    """(tap, the base layers that read it) in tap order; None when a later base layer reads an earlier tap."""
    if any(b < a for a, b in zip(layer_map, layer_map[1:])):
        return None
    groups: list[tuple[int, range]] = []
    for layer, tap in enumerate(layer_map):
        if groups and groups[-1][0] == tap:
            groups[-1] = (tap, range(groups[-1][1].start, layer + 1))
        else:
            groups.append((tap, range(layer, layer + 1)))
    return groups


def input_embeddings(base: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the base's forward feeds its first layer: Granite scales the embeddings in its forward (Gemma's
    embedding module scales its own)."""
    return base.model.embed_tokens(ids) * getattr(base.config, "embedding_multiplier", 1.0)


def output_logits(base: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The base's logits from its last layer's hidden states, as its forward makes them (Granite divides them,
    Cohere multiplies them, Gemma 2 soft-caps them)."""
    logits = base.lm_head(base.model.norm(hidden)) / getattr(base.config, "logits_scaling", 1.0)
    logits = logits * getattr(base.config, "logit_scale", 1.0)
    if cap := getattr(base.config, "final_logit_softcapping", None):
        logits = soft_cap(logits, cap)
    return logits


class GroupedStep(ColumnInputs):
    """The base's forward over a prompt's last `width` tokens (its exact tail; one token: the first step) as the
    static step runs it (the whole buffer under a mask, inside `static_step`), cut into parts that each run a range
    of layers; the hidden states pass between parts in a static buffer. On CUDA each part is captured as its own
    graph (unless `capture` is False: a graph of the whole prompt pass then holds them, kvpred.prefill_graphs), at
    the cache's last columns (seeing only themselves), so a cache in use keeps its entries."""

    @torch.no_grad()
    def __init__(self, model: KVPredictionModel, cache: BufferCache, parts: list[range], width: int = 1,
                 capture: bool = True):
        base, device, batch = model.base, model.device, cache.key_arena.shape[1]
        super().__init__(batch, width, cache.capacity, device)
        self.model, self.cache, self.parts = model, cache, parts
        self.layer_kw = cache_kwargs(base.model.layers[0], cache)
        self.hidden = torch.zeros(batch, width, base.config.hidden_size, dtype=base.dtype, device=device)
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.token = self.logits = None  # the last part's outputs (a graph's own tensors on CUDA)
        # a part is the base's layers over a few tokens, as a decode step is: KVPredictionModel.compile_step's fusions
        # serve it too (one compile per part, as its layer range is a constant of the trace)
        self.part = self._part if model.compiled_step is None else torch.compile(self._part, dynamic=False)
        if device.type == "cuda" and capture:
            with model.static_step(cache, self.slots):
                self.graphs = [_capture(lambda i=i: self.part(i), device, self._at_last_columns)
                               for i in range(len(parts))]

    def _at_last_columns(self) -> None:
        self.load(self.ids, self.positions, self.cache.capacity - self.width, self.ids[:, :0])

    def _part(self, i: int) -> None:
        base = self.model.base
        hidden = input_embeddings(base, self.ids) if i == 0 else self.hidden
        rope = layer_position_embeddings(base, hidden, self.positions)
        for index in self.parts[i]:
            out = base.model.layers[index](hidden, attention_mask=self.mask, position_ids=self.positions,
                                           position_embeddings=rope[index], use_cache=True, **self.layer_kw)
            hidden = out[0] if isinstance(out, tuple) else out  # older transformers return a tuple
        if i < len(self.parts) - 1:
            self.hidden.copy_(hidden)
            return
        logits = output_logits(base, hidden[:, -1:])  # [B, 1, V]: the last prompt token's
        self.token, self.logits = logits[:, -1].argmax(-1), logits

    def run(self, i: int) -> None:
        if self.graphs is not None:
            self.graphs[i].replay()
            return
        with torch.no_grad(), self.model.static_step(self.cache, self.slots):
            self.part(i)


class PipelinedPrefill:
    """Predicted mode's first token with the base's forward over the exact tail (`tail` tokens, the paper's one by
    default) pipelined behind the auxiliary (see the module docstring). `__call__(input_ids, attention_mask)` fills
    `cache` as `predict_into` and the tail's forward do, and returns the first token's ids [B]."""

    def __init__(self, model: KVPredictionModel, cache: BufferCache, tail: int = 1, priority: int = 0,
                 capture: bool = True):
        """`priority`: the CUDA priority of the step's stream (lower runs first; the auxiliary's stream has 0). A
        higher one made no measurable difference on an H100 (benchmarks/results/h100/pipeline_priority).
        `capture`: whether the step's parts are captured as graphs of their own (see GroupedStep)."""
        groups = layer_groups(model.predictor.config.layer_map)
        if groups is None:
            raise ValueError("the layer map goes back to an earlier tap; the step cannot run tap by tap")
        self.model, self.cache, self.groups = model, cache, groups
        self.step = GroupedStep(model, cache, [layers for _, layers in groups], tail, capture)
        self.side = torch.cuda.Stream(model.device, priority=priority) if model.device.type == "cuda" else None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, kept: int = 0,
                 aux_past: Cache | None = None) -> torch.Tensor:
        """`attention_mask` [B, N] of a left-padded batch; None for an unpadded one (no host-device syncs). On top
        of the cache's first `kept` columns (computed before, and kept: a chat session's earlier turns), as
        kvpred.refine's prefill runs it: the auxiliary reads the tokens its own cache `aux_past` (at most `kept`
        long) lacks, and extends it; columns [kept, N - tail) are predicted."""
        cache, model = self.cache, self.model
        b, total = input_ids.shape
        n = total - self.step.width  # the end of the predicted columns
        if n <= kept:  # nothing to predict: no tap would start the step
            raise ValueError(f"a pipelined first step needs a prompt longer than its exact tail of {self.step.width}"
                             + (f" plus {kept} kept columns" if kept else ""))
        start = 0 if aux_past is None else aux_past.get_seq_length()  # what the auxiliary has read already
        if attention_mask is None:
            positions = torch.arange(total, device=input_ids.device).expand(b, total)
            visible = torch.ones(b, total, dtype=torch.bool, device=input_ids.device)
        else:
            positions, visible = position_ids_from_mask(attention_mask), attention_mask
        cache.reset()  # its first `kept` columns stay in the arena
        self.step.load(input_ids[:, n:], positions[:, n:], n, visible)
        keys_out, values_out = cache.slices(n)
        aux_mask = None if attention_mask is None else attention_mask[:, :n]
        aux_positions = positions[:, start:n] if attention_mask is not None or start else None
        rope = rope_runs(model.base, positions[:, kept:], cache.key_arena.dtype, n - kept)
        self.behind_aux(lambda: model.run_aux(input_ids[:, start:n], aux_mask, aux_positions, aux_past), rope,
                        lambda layers: (keys_out[layers, ..., kept:, :], values_out[layers, ..., kept:, :]),
                        skip=kept - start)
        cache.set_length(total - 1)  # as the plain path leaves it: the tail's last column is the step's to advance
        return self.step.token

    def behind_aux(self, run_aux: Callable[[], None], rope: list[tuple[slice, torch.Tensor, torch.Tensor]],
                   into: Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
                   then: Callable[[slice, torch.Tensor, torch.Tensor], None] = lambda layers, k, v: None,
                   skip: int = 0) -> None:
        """`run_aux()` (the auxiliary's pass, `KVPredictionModel.run_aux`) with, as each tap comes out, its group of
        base layers' keys and values predicted from the tap's outputs after the first `skip` tokens, rotated with
        `rope` (the base's tables at their n columns, `rope_runs`), written into `into(layers)` ([L, b, H, n, D]
        each) and handed to `then(layers, keys, values)` (for a copy elsewhere); then the group's part of the step
        runs. The step's inputs are loaded already; it may have more rows than the auxiliary
        (kvpred.decoding.RollingBatch)."""
        model = self.model
        main = torch.cuda.current_stream(model.device) if self.side is not None else None
        if self.side is not None:
            self.side.wait_stream(main)  # the step's inputs, written by the caller
        pending = iter(enumerate(self.groups))

        def tap_out(tap: int, key_x: torch.Tensor, value_x: torch.Tensor) -> None:
            i, (group_tap, layers) = next(pending)
            assert group_tap == tap, (group_tap, tap)
            dtype, picked = model.predictor_compute_dtype, slice(layers.start, layers.stop)
            key_x, value_x = key_x[:, skip:].to(model.aux.dtype), value_x[:, skip:].to(model.aux.dtype)
            # the hooks run inside the auxiliary's autocast, where it has one (bf16 on some CPUs): not for the base
            with torch.autocast(model.device.type, enabled=False):
                keys, values = model.predictor.group(key_x, value_x, layers, dtype)
                key_out, value_out = into(picked)
                model.base_kv_into(keys, values, rope, key_out, value_out, picked)
                then(picked, key_out, value_out)
                if self.side is not None:
                    self.side.wait_stream(main)
                with torch.cuda.stream(self.side) if self.side is not None else nullcontext():
                    self.step.run(i)

        with _tap_hooks(model, tap_out):
            run_aux()
        if self.side is not None:
            main.wait_stream(self.side)


@contextmanager
def _tap_hooks(model: KVPredictionModel, tap_out) -> Iterator[None]:
    """Forward hooks on the auxiliary that call `tap_out(tap, key_x, value_x)` as each tap the predictor reads comes
    out, in tap order. Entered before `run_aux` installs its own hooks, so these run first and the last tap is
    handed over before the auxiliary's pass is cut short."""
    layers, taps = model.aux.model.layers, sorted(set(model.predictor.config.layer_map))
    hooks = []
    if model.predictor.config.source == "hidden":
        for tap in taps:
            hooks.append(hidden_tap(model.aux, tap).register_forward_hook(
                lambda module, args, out, tap=tap: tap_out(tap, hidden_output(out), hidden_output(out))))
    else:
        for tap in taps:
            hooks += hook_kv_projections(layers[tap].self_attn, lambda k, v, tap=tap: tap_out(tap, k, v))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
