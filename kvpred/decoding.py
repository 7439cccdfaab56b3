"""The base's one-token step on a preallocated BufferCache (eager, or captured once as a CUDA graph) and the
generation loop built on it.

On a GPU a small model's single-token forward is all launch overhead: transformers' eager step takes 11-18 ms at
batch 1 on an H100 for SmolLM2 or Llama-3.2-1B, the captured graph about 1-2 ms. `KVPredictionModel.generate` on CUDA
therefore runs predicted mode's first token and every decode step through `GraphStep`s kept per batch size and
cache capacity (`StepPool`), instead of transformers' generate.
"""
from __future__ import annotations

import functools
import math
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .deferred import deferred_values
from .models import KVPredError
from .rope import rope_runs


class EagerStep:
    """The base's one-token step on a BufferCache, run eagerly: write one column, attend to the filled ones."""

    def __init__(self, model, cache):
        from .model import cache_kwargs

        self.base, self.cache_kw = model.base, cache_kwargs(model.base, cache)
        self.cache = cache
        self.mask: torch.Tensor | None = None

    def start(self, ids: torch.Tensor, positions: torch.Tensor, slot: int, visible: torch.Tensor | None = None) -> None:
        """Next step feeds `ids` [B, 1] at `positions` [B, 1] into cache column `slot` (= the cache's length);
        `visible` [B, slot] bool marks the columns each row attends to (None: all of them)."""
        if self.cache.get_seq_length() != slot:
            raise RuntimeError(f"eager step at column {slot}, but the cache holds {self.cache.get_seq_length()}")
        self.ids, self.positions = ids, positions
        self.mask = None if visible is None else torch.cat([visible.bool(), visible.new_ones(len(ids), 1).bool()], 1)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        """Run one step; returns the greedy next token [B] and feeds it to the following step."""
        self.logits = self.base(input_ids=self.ids, position_ids=self.positions, attention_mask=self.mask,
                                use_cache=True, logits_to_keep=1, **self.cache_kw).logits  # [B, 1, V]
        token = self.logits[:, -1].argmax(-1)
        self.ids, self.positions = token[:, None], self.positions + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(token), 1)], 1)
        return token

    def feed(self, token: torch.Tensor) -> None:
        """Make the next step read `token` [B] instead of the greedy one."""
        self.ids = token[:, None]

    def admit(self, rows: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
              start: int) -> None:
        """Make `rows` [b] new sequences: next step feeds them `ids` [b] at `positions` [b]; they see the
        columns from `start` to the current one as `visible` [b, slot - start] says, and the current one."""
        self.ids, self.positions = self.ids.clone(), self.positions.clone()
        self.ids[rows, 0], self.positions[rows, 0] = ids, positions
        self.mask[rows] = False
        self.mask[rows, start:-1] = visible
        self.mask[rows, -1] = True


class GraphStep:
    """The same step with fixed shapes (KVPredictionModel.static_step: the whole buffer under a mask), captured once
    as a CUDA graph on a GPU. It reads token ids and positions [B, 1], the cache column `slot` it writes, and `mask`
    [B, 1, 1, capacity] of the columns each row sees; replays write the token's K/V at `slot`, then advance ids,
    positions and slot. Capturing runs the step at the cache's last column, seeing only column 0, so a cache in use
    keeps its entries (`start` comes before that last column is reached). On a CPU nothing is captured:
    each call runs the compiled forward (`KVPredictionModel.compile_step`, which fixed shapes keep from recompiling)."""

    @torch.no_grad()
    def __init__(self, model, cache):
        from .model import cache_kwargs

        self.forward = model.compiled_step or model.base
        self.static_step = lambda: model.static_step(cache, self.slot)
        self.cache_kw, self.cache = cache_kwargs(model.base, cache), cache
        batch, capacity, device = cache.key_arena.shape[1], cache.capacity, model.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, 1, 1, capacity, dtype=torch.bool, device=device)  # [B, 1, q=1, capacity]

        def warm_up() -> None:
            self.slot.fill_(capacity - 1)  # each run writes there (and advances the slot)
            self.mask[..., 0] = True  # no row sees nothing (NaN)

        self.graph = None
        if device.type == "cuda":
            with self.static_step():
                self.graph = _capture(self._body, device, warm_up)
            self.token, self.logits = self.captured

    def start(self, ids: torch.Tensor, positions: torch.Tensor, slot: int, visible: torch.Tensor | None = None) -> None:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.slot.fill_(slot)
        self.mask.zero_()
        if visible is None:
            self.mask[..., :slot] = True
        else:
            self.mask[:, 0, 0, :slot] = visible.bool()

    def _body(self) -> None:
        self.mask.index_fill_(3, self.slot, True)
        logits = self.forward(input_ids=self.ids, position_ids=self.positions, attention_mask=self.mask,
                           use_cache=True, logits_to_keep=1, **self.cache_kw).logits  # [B, 1, V]
        token = logits[:, -1].argmax(-1)
        self.ids.copy_(token[:, None])
        self.positions.add_(1)
        self.slot.add_(1)
        self.captured = token, logits  # inside the capture: the graph's output tensors

    def __call__(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.token
        with torch.no_grad(), self.static_step():
            self._body()
        self.token, self.logits = self.captured
        return self.token

    def feed(self, token: torch.Tensor) -> None:
        self.ids.copy_(token[:, None])

    def admit(self, rows: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
              start: int) -> None:
        """As EagerStep.admit; the step itself shows each row its current column."""
        slot = start + visible.shape[1]
        self.ids[rows, 0], self.positions[rows, 0] = ids, positions
        self.mask[rows] = False
        self.mask[rows, 0, 0, start:slot] = visible


def make_step(model, cache, want_graph: bool):
    """A CUDA-graph step where possible; on a CPU the compiled static step after `compile_step`; the eager step
    otherwise, with the reason."""
    if model.device.type != "cuda":
        if want_graph and model.compiled_step is not None:
            return GraphStep(model, cache), "compiled (cpu)"
        return EagerStep(model, cache), "eager (cpu)"
    if not want_graph:
        return EagerStep(model, cache), "eager"
    try:
        return GraphStep(model, cache), "cuda-graph, compiled" if model.compiled_step else "cuda-graph"
    except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager step, and says so
        reason = f"{type(err).__name__}: {err}".replace("|", "/").replace("\n", " ")[:160]
        return EagerStep(model, cache), f"eager (graph capture failed: {reason})"


class ColumnInputs:
    """What a captured forward over `width` consecutive cache columns per row reads: token ids and positions
    [B, width], the columns `slots` [width] it writes and `mask` [B, 1, width, capacity] of the columns each of its
    queries sees. GraphChunk and kvpred.pipeline.GroupedStep hold them."""

    def __init__(self, batch: int, width: int, capacity: int, device: torch.device):
        self.width = width
        self.ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.positions = torch.zeros_like(self.ids)
        self.offsets = torch.arange(width, device=device)
        self.slots = self.offsets.clone()
        self.mask = torch.zeros(batch, 1, width, capacity, dtype=torch.bool, device=device)

    def load(self, ids: torch.Tensor, positions: torch.Tensor, start: int, visible: torch.Tensor) -> None:
        """Columns [start, start + width) hold `ids` at `positions`; `visible` [B, <= capacity] marks the columns
        each row may attend to (its padding excluded). Each query sees those up to its own column, and its own
        column always, so a padding query never attends to nothing."""
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.slots.copy_(self.offsets + start)
        columns = torch.arange(self.mask.shape[-1], device=ids.device)
        own = self.slots[:, None]  # [width, 1]
        seen = torch.zeros(self.mask.shape[0], self.mask.shape[-1], dtype=torch.bool, device=ids.device)
        seen[:, :visible.shape[1]] = visible.bool()
        self.mask.copy_((seen[:, None, None, :] & (columns <= own)) | (columns == own))


class GraphChunk(ColumnInputs):
    """The base backbone over `width` consecutive columns per row of a BufferCache, captured as a CUDA graph: it
    writes their K/V and attends over the whole buffer under a mask (KVPredictionModel.static_step). This is
    refinement's chunk: on a GPU an eager forward of a small base is launch-bound, 40-100 ms at batch 64 for
    SmolLM2-135M on an H100 (benchmarks/results/h100/refine_steps).

    Made by its first chunk: the warm-up runs and the capture compute that chunk's own columns, so no other
    column of a cache in use is touched."""

    @torch.no_grad()
    def __init__(self, model, cache, ids: torch.Tensor, positions: torch.Tensor, start: int, visible: torch.Tensor):
        from .model import cache_kwargs

        self.backbone, self.cache = model.base.model, cache
        self.cache_kw = cache_kwargs(self.backbone, cache)
        super().__init__(ids.shape[0], ids.shape[1], cache.capacity, ids.device)
        self.load(ids, positions, start, visible)
        with model.static_step(cache, self.slots):
            self.graph = _capture(self._body, ids.device)  # its replay computes this first chunk

    def _body(self) -> None:
        self.backbone(input_ids=self.ids, position_ids=self.positions, attention_mask=self.mask, use_cache=True,
                      **self.cache_kw)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, start: int, visible: torch.Tensor) -> None:
        self.load(ids, positions, start, visible)
        self.graph.replay()


def _capture(body: Callable[[], None], device: torch.device,
             before_warm_up: Callable[[], None] = lambda: None, pool=None) -> torch.cuda.CUDAGraph:
    """`body` captured as a CUDA graph, after two warm-up runs on a side stream (cuBLAS handles, lazy inits), and
    replayed once (after `before_warm_up` again): a fresh graph's first replay costs about twice the CPU time of
    later ones (benchmarks/results/h100/session_pipeline), and here no request waits for it. `pool`: a memory pool
    shared with other graphs that never replay at once (torch.cuda.graph_pool_handle).

    The second warm-up may not wait on the host (RuntimeError): a body that does cannot be captured (transformers
    5.17 picks longrope's tables with a Python `if` on a tensor), and a capture that failed half-way left later
    graphs computing wrong results on an H200 (benchmarks/results/h200/longrope). A capture that fails anyway raises
    with the device's random numbers usable, so the caller's fallback can still sample."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        before_warm_up()
        body()  # lazy inits (cuBLAS handles, tables made on first use) may wait on the host once
        before_warm_up()
        with _host_waits_raise():
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    state = generator.clone_state()
    try:
        with torch.cuda.graph(graph, pool=pool):
            body()
    except Exception:
        # A capture that fails half-way leaves the generator capturing: every later draw on the device, sampling
        # included, raises "Offset increment outside graph capture" (benchmarks/results/h200/capture_rng)
        generator.graphsafe_set_state(state)
        raise
    before_warm_up()
    graph.replay()
    return graph


@contextmanager
def _host_waits_raise() -> Iterator[None]:
    """CUDA operations that wait on the host raise a RuntimeError inside."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # "a prototype feature": it is used for what it does detect
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@dataclass
class Pooled:
    """A preallocated BufferCache, its step and its refinement chunks, made on first use (CUDA graphs where they
    can be captured)."""
    cache: object
    step: "GraphStep | EagerStep | None" = None
    # the most recently used MAX_CAPTURED of each (widths and tails come from requests: unbounded, they would pile up
    # graphs, each with its own memory pool)
    chunks: OrderedDict = field(default_factory=OrderedDict)  # width -> GraphChunk, or None where not capturable
    pipelines: OrderedDict = field(default_factory=OrderedDict)  # exact tail -> PipelinedPrefill, False where none
    # (mode, exact tail, columns) -> kvpred.prefill_graphs.PrefillGraph, False where none; in one memory pool
    prefills: OrderedDict = field(default_factory=OrderedDict)
    graph_pool: object = None
    # the auxiliary's cache in every predicted-mode prompt pass above (they replay one at a time), as long as the
    # longest pass: one per graph would take 2.2 GB (computed) for the buckets of a Llama-3.1-8B-shaped KVP-LP 8/32
    # at batch 1
    aux_cache: object = None

    def made_step(self, model) -> "GraphStep | EagerStep":
        if self.step is None:
            self.step = make_step(model, self.cache, want_graph=True)[0]
        return self.step

    def made_pipeline(self, model, tail: int = 1):
        """The pipelined first step for an exact tail of `tail` tokens on this cache (kvpred.pipeline), made on first
        use; None where the layer map has no tap-by-tap order or the capture fails (the plain path serves then)."""
        if tail not in self.pipelines:
            from .pipeline import PipelinedPrefill

            try:
                _keep(self.pipelines, tail, PipelinedPrefill(model, self.cache, tail))
            except Exception:  # noqa: BLE001 - as for the step: what cannot be captured runs the plain way
                _keep(self.pipelines, tail, False)
        self.pipelines.move_to_end(tail)
        return self.pipelines[tail] or None

    def prefill_graph(self, model, mode: str, input_ids: torch.Tensor, exact_tail: int = 1, make: bool = False):
        """The captured prompt pass of `mode` for unpadded prompts shaped like `input_ids` on this cache
        (kvpred.prefill_graphs; `exact_tail` counts in predicted mode only); with `make`, captured now where there
        is none yet (the capture overwrites the cache's first columns: between requests only). None where none
        serves: a pass larger than MOST_TOKENS, a cache too small for its bucket, a pass not captured (yet), or one
        that cannot be (the plain path serves)."""
        from .prefill_graphs import BUCKET, KEPT, MOST_TOKENS, PrefillGraph, bucket, served

        columns, tail = bucket(input_ids.shape[1]), exact_tail if mode == "predicted" else 1
        if not served(*input_ids.shape) or columns > self.cache.capacity:
            return None
        key = (mode, tail, columns)
        if key not in self.prefills and make:
            try:
                batch = input_ids.shape[0]
                if model.device.type == "cuda" and self.graph_pool is None:
                    self.graph_pool = torch.cuda.graph_pool_handle()
                if mode == "predicted" and self.aux_cache is None:
                    longest = min(MOST_TOKENS // batch // BUCKET * BUCKET, self.cache.capacity)
                    self.aux_cache = model.new_cache(batch, longest, "aux")
                graph = PrefillGraph(model, self.cache, mode, batch, columns, tail, self.graph_pool,
                                     self.aux_cache if mode == "predicted" else None)
                _keep(self.prefills, key, graph, KEPT)
            except Exception:  # noqa: BLE001 - as for the step: what cannot be captured runs the plain way
                _keep(self.prefills, key, False, KEPT)
        if key not in self.prefills:
            return None
        self.prefills.move_to_end(key)
        return self.prefills[key] or None

    def run_chunk(self, model, ids: torch.Tensor, positions: torch.Tensor, start: int, visible: torch.Tensor) -> bool:
        """Run the base backbone over columns [start, start + width) as a captured chunk; False (and nothing run)
        where there is no GPU or the chunk cannot be captured, so the caller runs it eagerly."""
        width = ids.shape[1]
        if model.device.type != "cuda":
            return False
        if width in self.chunks:
            self.chunks.move_to_end(width)
            chunk = self.chunks[width]
            if chunk is not None:
                chunk(ids, positions, start, visible)
            return chunk is not None
        try:
            _keep(self.chunks, width, GraphChunk(model, self.cache, ids, positions, start, visible))
        except Exception:  # noqa: BLE001 - an uncapturable chunk runs eagerly instead, as the step does
            _keep(self.chunks, width, None)
            return False
        return True


MAX_CAPTURED = 8  # refinement chunk widths and pipelined exact tails kept per pooled cache


def _keep(table: OrderedDict, key, value, most: int = MAX_CAPTURED) -> None:
    """table[key] = value, dropping the least recently used entries beyond `most`."""
    table[key] = value
    while len(table) > most:
        table.popitem(last=False)


def without_cudnn_attention():
    """A context in which SDPA does not use its cuDNN backend. On an H100 (torch 2.11) cuDNN attention builds a plan
    for each new sequence length: the first call at each prompt length took 49-741 ms longer than the next
    (benchmarks/results/h100/shape_cost), and a server meets a new length with nearly every request. Flash and
    memory-efficient attention pay nothing per length. `generate`, `generate_refined` and `ChatSession.send` run
    inside it (`decoding_entry`)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its decoding lock
_LOCKS_GUARD = threading.Lock()
_CUDA_LOCK = threading.RLock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The lock that decoding on `model` runs under: one per model on a CPU, since its pool and the auxiliary's
    capture hooks are shared (calls from several threads gave wrong tokens). On a GPU one for every model of the
    process: while one thread captures a CUDA graph, another's host waits fail ("called a synchronizing CUDA
    operation", two servers in one process: benchmarks/results/h200/graph_joins)."""
    if next(model.parameters()).device.type == "cuda":
        return _CUDA_LOCK
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.RLock())


def decoding_entry(fn: Callable) -> Callable:
    """The decorator of the entry points that decode on a model's pooled caches and steps (`generate`,
    `generate_refined`, `ChatSession.send`; the first argument is the model, or holds it as `.model`). Inside:
    no gradients; SDPA without cuDNN (`without_cudnn_attention`); one call at a time (`model_lock`); and not in
    torch.inference_mode, whose tensors, pooled by one call made in it, a later call outside it could not write."""
    @functools.wraps(fn)
    def entry(first, *args, **kwargs):
        model = first if isinstance(first, torch.nn.Module) else first.model
        with model_lock(model), torch.inference_mode(False), torch.no_grad(), without_cudnn_attention():
            return fn(first, *args, **kwargs)
    return entry


def capacity_bucket(tokens: int, context: int) -> int:
    """The cache capacity kept for `tokens` tokens: the next power of two, at least 256, so that few shapes (and
    graph captures) serve every length; but no more than the model's `context`, which no sequence outgrows."""
    return min(max(256, 1 << (tokens - 1).bit_length()), max(tokens, context))


class StepPool:
    """Caches and their captured steps, kept per (batch, capacity bucket) so that one capture (50-190 ms on an
    H100) serves every later request of that shape. Capacities round up to powers of two (at least 256); the `size`
    most recently used are kept, since each holds a whole KV cache."""

    def __init__(self, size: int = 4):
        self.size, self.entries = size, OrderedDict()
        self.side: Pooled | None = None  # `side_cache`
        self.made = 0  # caches made so far: requests that found no cache (and step) of their shape
        self.made_for: tuple | None = None  # the base's (device, dtype) the entries were made for

    def clear(self) -> None:
        self.entries.clear()
        self.side = None

    def get(self, model, batch: int, tokens: int) -> Pooled:
        """The pooled cache (and step) for `batch` rows of up to `tokens` tokens."""
        self._made_for(model)
        key = (batch, capacity_bucket(tokens, model.context_length))
        if key not in self.entries:
            while len(self.entries) >= self.size:
                self.entries.popitem(last=False)
            try:
                cache = model.new_cache(*key)
            except torch.cuda.OutOfMemoryError:  # the pooled caches of other shapes may be what fills the device
                self.entries.clear()
                torch.cuda.empty_cache()
                cache = model.new_cache(*key)
            self.entries[key] = Pooled(cache)
            self.made += 1
        self.entries.move_to_end(key)
        return self.entries[key]

    def side_cache(self, model) -> Pooled:
        """A pooled cache of one row and MOST_TOKENS columns, whose captured prompt passes lone joins replay
        (`RollingBatch.admit_prefilled`). It is kept apart from the `size` most recent caches: a server's warm-up
        fills those with its rolling batches' caches, and a join must not evict one."""
        from .prefill_graphs import MOST_TOKENS

        self._made_for(model)
        if self.side is None:
            self.side = Pooled(model.new_cache(1, capacity_bucket(MOST_TOKENS, model.context_length)))
            self.made += 1
        return self.side

    def _made_for(self, model) -> None:
        if self.made_for != (model.base.device, model.base.dtype):  # moved or cast since (e.g. model.base.to alone)
            self.clear()
            self.made_for = (model.base.device, model.base.dtype)


JOIN_COPY_BYTES = 256 << 20  # RollingBatch.admit's stacked copies: the most extra memory one may take


class RollingBatch:
    """Continuous batching on one pooled cache. Its rows decode in lockstep: each step writes one cache column for
    every row. A prompt joins at a step boundary: its cache (predicted, or exact) is written into a free row so
    that it ends just before the current column, and the next step runs its last prompt token beside the running
    rows' newest tokens, giving its first token. A row's columns before its prompt stay masked. Once the columns
    run out, prompts stop joining and the batch drains.

    `pipelined` (by default: on a GPU, once the step is a captured graph, as `model.pipelined_first_step` says)
    joins predicted prompts of a one-token tail as `generate()` runs them (kvpred.pipeline): the step after the join
    runs one group of layers at a time, each as soon as the auxiliary's tap for it is predicted and written into the
    joining rows, beside the auxiliary's next layers. Without it a joining prompt is prefilled apart, copied into its
    row, and waits for the whole step after that: 3 ms more for a lone 512-token request on an H100
    (benchmarks/results/h100/serve).

    `graph_joins` (by default: on a GPU, once the step is a captured graph, as `model.prefill_graphs` says) lets a
    prompt that joins alone do so through its mode's prompt pass replayed as a CUDA graph (`admit_prefilled`), as
    `generate()` runs it: an eager pass of a short prompt waits on the host (kvpred.prefill_graphs)."""

    def __init__(self, model, pooled: Pooled, slot: int, pipelined: bool | None = None,
                 graph_joins: bool | None = None):
        self.model, self.pooled, self.cache, self.slot = model, pooled, pooled.cache, slot
        rows, device = self.cache.key_arena.shape[1], model.device
        self.free = list(range(rows))
        self.cache.reset()
        self.cache.set_length(slot)
        self.step = pooled.made_step(model)
        captured = getattr(self.step, "graph", None) is not None
        if pipelined is None:
            pipelined = model.pipelined_first_step and captured
        self.pipelined = pipelined and isinstance(self.step, GraphStep)
        self.graph_joins = model.prefill_graphs and captured if graph_joins is None else graph_joins
        self.missed: dict[tuple, torch.Tensor] = {}  # joins no captured pass served: (mode, tail, bucket) -> ids
        # a pipelined join, for the next step: (prefix ids, mask, the whole prompts' positions, rows)
        self.joining: tuple | None = None
        zeros = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.step.start(zeros, zeros, slot, torch.zeros(rows, slot, dtype=torch.bool, device=device))

    def fits(self, prompt_tokens: int, new_tokens: int) -> bool:
        """Whether a prompt of this length, then this many new tokens, can join now."""
        return bool(self.free) and prompt_tokens - 1 <= self.slot and self.slot + new_tokens <= self.cache.capacity

    @torch.no_grad()
    @without_cudnn_attention()  # prompts of new lengths join all the time (see without_cudnn_attention)
    def admit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str, exact_tail: int = 1
              ) -> list[int]:
        """Left-padded prompts [b, T] join (b <= free rows); returns their rows. Their cache of all but the last
        token comes from one batched prefill: in "predicted" mode the auxiliary and predictor's for all but the last
        `exact_tail` tokens, then the base's for the rest of the tail; the base's alone in "exact". Pipelined, the
        predicted prefill runs inside the next step."""
        from transformers import DynamicCache

        from .model import cache_kwargs, position_ids_from_mask

        b, t = input_ids.shape
        rows, self.free = self.free[:b], self.free[b:]
        index = torch.tensor(rows, device=self.model.device)
        start = self.slot - (t - 1)
        positions = position_ids_from_mask(attention_mask)
        predicted = max(t - exact_tail, 0) if mode == "predicted" else 0  # columns the predictor writes
        if (predicted and exact_tail == 1 and self.pipelined and self.joining is None
                and self.pooled.made_pipeline(self.model) is not None):
            prefix_mask = None if bool(attention_mask.all()) else attention_mask[:, :-1]
            self.joining = input_ids[:, :-1], prefix_mask, positions, index
        elif t > 1:
            prefix = (self.model.predicted_cache(input_ids, attention_mask, exact_tail) if predicted
                      else DynamicCache(config=self.model.base.config))
            # the base computes the columns after the prediction, eagerly: building the joining rows apart so that
            # this could be a captured chunk was no faster under load (benchmarks/results/h100/chat_tail)
            if predicted < t - 1:
                backbone = self.model.base.model
                backbone(input_ids=input_ids[:, predicted:-1], attention_mask=attention_mask[:, :-1],
                         position_ids=positions[:, predicted:-1], use_cache=True, **cache_kwargs(backbone, prefix))
            for arena, kind in ((self.cache.key_arena, "keys"), (self.cache.value_arena, "values")):
                # layers stacked, so that one copy writes many of them (fewer launches), in groups of at most
                # JOIN_COPY_BYTES so that a long prompt of a large model needs little extra memory for it
                layers = [getattr(lay, kind) for lay in prefix.layers]  # each [b, H, t - 1, D]
                group = max(1, JOIN_COPY_BYTES // (layers[0].numel() * layers[0].element_size()))
                for g in range(0, len(layers), group):
                    arena[g:g + group, :, :, start:self.slot].index_copy_(1, index, torch.stack(layers[g:g + group]))
        self.step.admit(index, input_ids[:, -1], positions[:, -1], attention_mask[:, :-1].bool(), start)
        return rows

    @torch.no_grad()
    def admit_prefilled(self, input_ids: torch.Tensor, mode: str, exact_tail: int,
                        choose: Callable[[torch.Tensor], torch.Tensor]
                        ) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        """A prompt [1, T] joins through its mode's captured prompt pass (kvpred.prefill_graphs) on the pool's side
        cache (`StepPool.side_cache`): the whole prompt's keys and values are copied into its row, ending just before
        the current column, and its first token, `choose`n from the pass's logits [1, V], comes out now; the next
        step reads it. Returns ([row], logits, first token), or None where no captured pass serves (the caller joins
        it with `admit`; `capture_missed` captures the shape later). One prompt at a time: joins of several vary in
        size, and a side cache per size would take memory for each."""
        from .prefill_graphs import bucket

        b, t = input_ids.shape
        mode_ok = mode == "exact" or (mode == "predicted" and self.model.pipelined_first_step and t > exact_tail)
        if not (self.graph_joins and mode_ok and b == 1 and self.free and t <= self.slot):
            return None
        side = self.model._steps.side_cache(self.model)
        graph = side.prefill_graph(self.model, mode, input_ids, exact_tail)
        if graph is None:
            self.missed[(mode, exact_tail, bucket(t))] = input_ids
            return None
        graph(input_ids)  # the side cache's first t columns: the prompt's keys and values, its last token's too
        logits = graph.logits[:, -1]
        tokens = choose(logits)
        rows, self.free = self.free[:b], self.free[b:]
        index, start = torch.tensor(rows, device=self.model.device), self.slot - t
        for arena, theirs in ((self.cache.key_arena, side.cache.key_arena),
                              (self.cache.value_arena, side.cache.value_arena)):
            arena[:, :, :, start:self.slot].index_copy_(1, index, theirs[:, :, :, :t])
        visible = torch.ones(b, t, dtype=torch.bool, device=self.model.device)
        self.step.admit(index, tokens, torch.full_like(tokens, t), visible, start)
        return rows, logits, tokens

    @staticmethod
    def capture_join_passes(model, longest: int, tails: Iterable[int] = (1,)) -> int:
        """Capture, ahead of any join, the prompt passes that lone joins of up to `longest` tokens replay
        (`admit_prefilled`): exact mode's and, where its first step is pipelined, predicted mode's with each exact
        tail of `tails`, for every length bucket. Returns how many serve. `kvpred serve --warm-up` runs it, so that
        no join of these shapes first runs eagerly and then makes the next batch wait for a capture."""
        from .prefill_graphs import BUCKET, MOST_TOKENS

        side = model._steps.side_cache(model)
        runs = [("exact", 1)] + [("predicted", tail) for tail in sorted(set(tails)) if model.pipelined_first_step]
        made = 0
        for n in range(BUCKET, min(longest, MOST_TOKENS, side.cache.capacity) + 1, BUCKET):
            ids = torch.arange(n, device=model.device).remainder(model.common_vocab)[None]
            made += sum(side.prefill_graph(model, mode, ids, tail, make=True) is not None for mode, tail in runs
                        if n > tail)
        return made

    def capture_missed(self) -> None:
        """Capture the prompt passes that joins missed (`admit_prefilled`), between batches: no running row waits."""
        for (mode, tail, _), ids in self.missed.items():
            self.model._steps.side_cache(self.model).prefill_graph(self.model, mode, ids, tail, make=True)
        self.missed.clear()

    def __call__(self) -> torch.Tensor:
        """One step for every row: the logits [rows, V] of each row's next token."""
        if self.joining is not None:
            logits = self._pipelined_step()
        else:
            self.step()
            logits = self.step.logits
        self.slot += 1
        return logits[:, -1]

    @torch.no_grad()
    @without_cudnn_attention()
    def _pipelined_step(self) -> torch.Tensor:
        """The step, with the joining prompts' predicted prefill behind it (kvpred.pipeline); the graph step's
        inputs then advance as its own replay would have advanced them. Returns the logits [rows, 1, V]."""
        (ids, mask, positions, index), self.joining = self.joining, None
        pipeline, step = self.pooled.made_pipeline(self.model), self.step
        grouped, (b, n), start = pipeline.step, ids.shape, self.slot - ids.shape[1]
        step.mask.index_fill_(3, step.slot, True)
        for mine, theirs in ((grouped.ids, step.ids), (grouped.positions, step.positions),
                             (grouped.slots, step.slot), (grouped.mask, step.mask)):
            mine.copy_(theirs)
        arenas = self.cache.key_arena, self.cache.value_arena

        def into(layers: slice) -> tuple[torch.Tensor, torch.Tensor]:  # the joining rows' keys and values, apart
            shape = (layers.stop - layers.start, b, arenas[0].shape[2], n, arenas[0].shape[4])
            return arenas[0].new_empty(shape), arenas[1].new_empty(shape)

        def then(layers: slice, keys: torch.Tensor, values: torch.Tensor) -> None:  # ... copied into their rows
            for arena, kv in zip(arenas, (keys, values)):
                arena[layers, :, :, start:self.slot].index_copy_(1, index, kv)

        rope = rope_runs(self.model.base, positions, arenas[0].dtype, n)  # the prompt's last position included
        pipeline.behind_aux(lambda: self.model.run_aux(ids, mask, None if mask is None else positions[:, :n]), rope,
                            into, then)
        step.ids.copy_(grouped.token[:, None])
        step.positions.add_(1)
        step.slot.add_(1)
        return grouped.logits

    def feed(self, token: torch.Tensor) -> None:
        """The tokens [rows] the next step reads (a free row's is ignored)."""
        self.step.feed(token)

    def release(self, row: int) -> None:
        self.free.append(row)


def check_decoding(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int) -> None:
    """Clear errors, before any work, for no tokens to generate and for sampling arguments no draw can use (greedy
    decoding ignores them). Every generation loop (generate, generate_refined, ChatSession.send) calls it."""
    if max_new_tokens < 1:
        raise KVPredError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not do_sample:
        return
    if not math.isfinite(temperature) or temperature <= 0:
        raise KVPredError(f"temperature must be a finite number > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise KVPredError(f"top_p must lie in (0, 1] when sampling, got {top_p}")
    if top_k < 0:
        raise KVPredError(f"top_k must be >= 0 (0: no top-k cut), got {top_k}")


MIN_TEMPERATURE = 1e-30  # a smaller one is 0 in float32 (0 / 0 = NaN), or overflows logits / temperature to inf


def sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Next token per row from logits [B, V] (float32): argmax, or a temperature / top-k / top-p draw (arguments as
    `check_decoding` lets through)."""
    if not do_sample:
        return logits.argmax(-1)
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
    # less the row's largest first: a tiny temperature then sends the other tokens to -inf, not to inf - inf = NaN
    probs = ((logits - logits.amax(-1, keepdim=True)) / max(temperature, MIN_TEMPERATURE)).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # and always the likeliest token, when top_p is below float32's smallest number
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


def with_stop_strings(criteria, stop_strings: list[str] | None, tokenizer):
    """transformers' stopping `criteria` (a list, or None) plus one that ends a row once its text, as `tokenizer`
    decodes it, holds any of `stop_strings` (empty ones never match, as in the server); None when there is nothing
    to check."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    out = StoppingCriteriaList(criteria or [])
    stop_strings = [s for s in stop_strings or [] if s]
    if stop_strings:
        out.append(StopStringCriteria(tokenizer, stop_strings))
    return out or None


def eos_id_list(model, eos_token_id=None) -> list[int]:
    """The ids that end a row: `eos_token_id` (int or list), else the base's generation config's, else the
    tokenizer's. KVPredictionModel.generate's every loop uses this default."""
    eos = eos_token_id
    if eos is None:  # `is None`, not falsiness: id 0 ends rows in some vocabularies
        eos = model.base.generation_config.eos_token_id
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def eos_token_ids(model, eos_token_id=None) -> torch.Tensor:
    """`eos_id_list` as a tensor on the model's device."""
    return torch.tensor(eos_id_list(model, eos_token_id), dtype=torch.long, device=model.device)


def pad_id(model) -> int:
    """The id that fills a row after it ended, as transformers' generate picks it: the base's generation config's
    pad, else the tokenizer's, else the first EOS id (else 0: with no EOS no row ends before the others)."""
    for pad in (model.base.generation_config.pad_token_id, model.tokenizer.pad_token_id):
        if pad is not None:
            return int(pad)
    eos = eos_id_list(model)
    return eos[0] if eos else 0


@dataclass
class Trace:
    """What a decode loop did, token by token, for refinement's reports. Tracing synchronises the device once per
    token, so plain `generate` runs without one."""
    start: float  # time.perf_counter() when the request began
    token_s: list[float] = field(default_factory=list)  # seconds from `start` to each new token
    refined: list[int] = field(default_factory=list)  # columns the refiner made exact before each decode step
    exact_from: int | None = None  # index of the first new token decoded from a wholly exact cache

    @classmethod
    def started(cls, device: torch.device) -> "Trace":
        """A trace whose clock starts now, once the device has finished earlier work."""
        synchronize(device)
        return cls(time.perf_counter())

    def tick(self, device: torch.device) -> None:
        synchronize(device)
        self.token_s.append(time.perf_counter() - self.start)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_with_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mode: str, exact_tail: int,
                        max_new_tokens: int, defer_values: bool = False, pool: StepPool, **decoding) -> torch.Tensor:
    """transformers' generate loop for modes "exact" and "predicted" on a pooled BufferCache and its step:
    `first_logits`, then `decode` (which takes the sampling and stopping arguments). Returns [B, N + new]. The
    pipelined first step and the prompt pass's graph that `first_logits` could use for this shape, where it finds none
    yet, are captured after the last token, for the next prompt of the shape: no request waits for a capture before
    its tokens (the step itself is captured after the first token)."""
    b, n = input_ids.shape
    pooled = pool.get(model, b, n + max_new_tokens)
    mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new_tokens)], 1)
    logits = first_logits(model, pooled, input_ids, mask, mode=mode, exact_tail=exact_tail,
                          defer_values=defer_values)
    out = decode(model, pooled, input_ids, mask, logits, max_new_tokens=max_new_tokens, **decoding)
    capture_for_next(model, pooled, mode, input_ids, bool(attention_mask.all()), exact_tail)
    return out


def capture_for_next(model, pooled: Pooled, mode: str, input_ids: torch.Tensor, unpadded: bool,
                     exact_tail: int) -> None:
    """After a request: the pipelined first step and the prompt pass's graph that `first_logits` could have used for
    prompts of its shape, captured where there are none yet (the pass's capture overwrites the pooled cache)."""
    if pipelined(model, pooled, mode, input_ids, exact_tail):
        pooled.made_pipeline(model, exact_tail)
    if graphable(model, pooled, mode, input_ids, unpadded, exact_tail):
        pooled.prefill_graph(model, mode, input_ids, exact_tail, make=True)


def pipelined(model, pooled: Pooled, mode: str, input_ids: torch.Tensor, exact_tail: int) -> bool:
    """Whether predicted mode's first step may run pipelined behind the auxiliary (kvpred.pipeline;
    `model.pipelined_first_step`): once the shape's step is captured, for a prompt longer than its exact tail."""
    return (mode == "predicted" and input_ids.shape[1] > exact_tail and model.pipelined_first_step
            and getattr(pooled.step, "graph", None) is not None)


def graphable(model, pooled: Pooled, mode: str, input_ids: torch.Tensor, unpadded: bool, exact_tail: int) -> bool:
    """Whether the prompt pass may replay a captured graph (kvpred.prefill_graphs; `model.prefill_graphs`): on a GPU,
    once the shape's step is captured, for an unpadded batch longer than predicted mode's exact tail, whose first
    step is pipelined (`model.pipelined_first_step`) in predicted mode."""
    captured = getattr(pooled.step, "graph", None) is not None
    return (captured and model.prefill_graphs and unpadded and input_ids.shape[1] > exact_tail
            and (mode == "exact" or model.pipelined_first_step))


def first_logits(model, pooled: Pooled, input_ids: torch.Tensor, mask: torch.Tensor, *, mode: str, exact_tail: int,
                 defer_values: bool = False) -> torch.Tensor:
    """The prompt pass into the pooled cache; returns the last position's logits [B, V]. `mask` [B, N + new] covers
    the prompt and the tokens to come. Predicted mode's last prompt token is the pooled step (eager until the
    shape's graph was captured, after a first token, so no request waits for a capture before its first token),
    after the rest of a longer tail (`base_tail`, where `tail_on_steps`; else one eager forward, `prefill_into`).
    `defer_values` (kvpred.deferred) applies to a one-token tail's eager step. Where `pipelined`, a pipelined first
    step made before (`generate_with_steps` makes them) runs it (kvpred.pipeline); where `graphable`, a prompt pass
    captured before replays as a graph (kvpred.prefill_graphs), in exact mode too."""
    prompt_mask = mask[:, :input_ids.shape[1]]
    padded = not bool(prompt_mask.all())
    cache = pooled.cache
    if (graphable(model, pooled, mode, input_ids, not padded, exact_tail)
            and (graph := pooled.prefill_graph(model, mode, input_ids, exact_tail))):
        graph(input_ids)
        return graph.logits[:, -1]
    if pipelined(model, pooled, mode, input_ids, exact_tail) and (pipeline := pooled.pipelines.get(exact_tail)):
        pipeline(input_ids, prompt_mask if padded else None)
        return pipeline.step.logits[:, -1]
    if mode == "predicted" and tail_on_steps(model, exact_tail):
        model.predict_into(cache, input_ids, prompt_mask if padded else None, exact_tail,
                           defer_values=defer_values and exact_tail == 1 and not isinstance(pooled.step, GraphStep))
        return base_tail(model, pooled, input_ids, prompt_mask, padded, cache.get_seq_length())
    return model.prefill_into(cache, input_ids, prompt_mask if padded else None, mode=mode,
                              exact_tail=exact_tail)[:, -1]


def tail_on_steps(model, tail: int) -> bool:
    """Whether a predicted prompt's last `tail` tokens go through `base_tail` (the pooled step, after a captured
    chunk on a GPU) rather than one eager forward: a single token always; a longer tail on a GPU only, since on a
    CPU one forward reads the weights once."""
    return tail == 1 or model.device.type == "cuda"


def base_tail(model, pooled: Pooled, input_ids: torch.Tensor, prompt_mask: torch.Tensor, padded: bool,
              start: int) -> torch.Tensor:
    """The base over prompt columns [start, N) of a cache filled before `start`; returns the last one's logits
    [B, V]. The last token goes through the pooled step. The others run eagerly until that step exists (no request
    waits for a capture, as for the step) and as a captured chunk on a GPU after that (`Pooled.run_chunk`): an eager
    forward of a small base is launch-bound, and a chat template's reply opening as tail took 35.8-38.1 ms that way
    for SmolLM2 on an H100, against 12.8-15.1 ms (benchmarks/results/h100/chat_tail)."""
    from .model import cache_kwargs, position_ids_from_mask

    n, cache = input_ids.shape[1], pooled.cache
    if start < n - 1:
        pos = position_ids_from_mask(prompt_mask)[:, start:n - 1]
        ids, visible = input_ids[:, start:n - 1], prompt_mask[:, :n - 1]
        if pooled.step is None or not pooled.run_chunk(model, ids, pos, start, visible):
            cache.set_length(start)
            model.base.model(input_ids=ids, attention_mask=visible if padded else None, position_ids=pos,
                             **cache_kwargs(model.base.model, cache), use_cache=True)
        cache.set_length(n - 1)
    return last_token(model, pooled.step or EagerStep(model, cache), input_ids, prompt_mask, padded)


def last_token(model, first: "GraphStep | EagerStep", input_ids: torch.Tensor, prompt_mask: torch.Tensor,
               padded: bool) -> torch.Tensor:
    """The last prompt token through `first` (the pooled step, or an eager one) over the N - 1 columns already in
    its cache; returns its logits [B, V]."""
    from .model import position_ids_from_mask

    n = input_ids.shape[1]
    positions = position_ids_from_mask(prompt_mask)
    first.start(input_ids[:, -1:], positions[:, -1:], n - 1, prompt_mask[:, :-1] if padded else None)
    with deferred_values(model.base, first.cache.pending_values, finish=False):  # a pooled cache resets on reuse
        first()
    return first.logits[:, -1]


@torch.no_grad()
def decode(model, pooled: Pooled, input_ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor, *,
           max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int, eos: torch.Tensor,
           pad_token_id: int, streamer=None, logits_processor=None, stopping_criteria=None, refiner=None,
           trace: Trace | None = None) -> torch.Tensor:
    """transformers' generate loop (greedy or sampling, eos, padding of finished rows, streamer, logits processors
    and stopping criteria called as it calls them) from the pooled cache of the N prompt columns and the last
    prompt position's `logits` [B, V], on the pooled step. `mask` [B, N + new] covers prompt and new tokens.

    With a `refiner` (kvpred.refine.Refiner: `done`, `advance(seq, mask, positions, upto)`), each decode step first
    lets it make more of the cache exact in place; `trace` records timings, refinement and the token from which the
    cache was wholly exact. Returns [B, N + new]."""
    from transformers import LogitsProcessorList

    from .model import position_ids_from_mask

    b, n = input_ids.shape
    positions = position_ids_from_mask(mask)
    visible = None if bool(mask[:, :n].all()) else mask
    if refiner is not None and refiner.done >= n:  # the prompt's cache is exact already
        refiner = None
        if trace is not None:
            trace.exact_from = 0
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if logits_processor is not None:  # a plain list, as transformers' generate takes it, applies each in turn
        logits_processor = LogitsProcessorList(logits_processor)
    seq, unfinished = input_ids, torch.ones(b, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        scores = logits.float()
        if logits_processor is not None:
            scores = logits_processor(seq, scores)
        token = sample(scores, do_sample, temperature, top_p, top_k)
        token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        seq = torch.cat([seq, token[:, None]], 1)
        if trace is not None:
            trace.tick(model.device)
        if streamer is not None:
            streamer.put(token.cpu())
        unfinished &= ~torch.isin(token, eos)
        if stopping_criteria is not None:
            unfinished &= ~stopping_criteria(seq, scores)
        if i == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        cols = n + i  # the cache holds seq[:, :cols]; this step writes column `cols` for the newest token
        if i == 0:
            if pooled.cache.pending_values is not None:  # the prompt's deferred values, before any step reads them
                pooled.cache.pending_values.materialize()
            step = pooled.made_step(model)
            step.start(token[:, None], positions[:, n:n + 1], n, None if visible is None else visible[:, :n])
        else:
            step.feed(token)
        if refiner is not None:
            done = refiner.advance(seq, mask, positions, cols)
            if trace is not None:
                trace.refined.append(done)
            if refiner.done == cols:  # every column before this step is exact: so is everything from here on
                refiner = None
                if trace is not None:
                    trace.exact_from = i + 1
        elif trace is not None:
            trace.refined.append(0)
        step()
        logits = step.logits[:, -1]
    if streamer is not None:
        streamer.end()
    return seq
