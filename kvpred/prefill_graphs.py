"""Whole prompt passes captured as CUDA graphs, one per mode, batch size and bucket of 128 prompt lengths.

A short prefill on a GPU waits on the host: for the Gemma 3 1B shape over 1024 tokens on an H200 its kernels took
10 ms and launching them 52 ms (Llama-3.2-1B: 5.9 and 16.5 ms;
benchmarks/results/h200/aligned_attention/short_prefill_profile.txt). Both modes pay that, so predicted mode's
speedup there falls far below its FLOP ratio. A replayed graph launches everything at once: the exact base's
forward, the auxiliary's alone, or predicted mode's whole pass (the auxiliary, the predictor, the writes and the
base's pipelined first step, kvpred.pipeline).

A prompt is right-padded to its bucket's length: causal attention keeps the padding out of every real token's
outputs, and what the padding writes into the cache lies past the prompt's columns, where no later step looks and
decoding overwrites it. So a graph serves unpadded batches (a left-padded batch's positions and mask differ within a
bucket) written from the cache's first column, of up to MOST_TOKENS tokens (batch x bucket). Inside a capture
transformers 5.17 builds the causal mask instead of letting SDPA apply it, so a captured pass attends under a mask
(not flash attention): in `generate` on an H200, Llama-3.2-1B's exact TTFT at batch 1 fell from 16.4 to 9.1 ms over
1024 tokens but rose from 14.4 to 17.8 over 2048 (benchmarks/results/h200/prefill_graphs). From 5.18 SDPA applies it
in a capture too (these passes have no padding mask), and every graphed pass of up to 4096 tokens gained on the
Llama-3.2-1B and Gemma 3 1B shapes: at batch 1 and 2048 tokens Llama's exact TTFT fell from 18.5 to 12.8 ms and
predicted from 9.2 to 5.9 (benchmarks/results/h200/capture_flash).
"""
from __future__ import annotations

import torch
import transformers
from packaging.version import Version

from .decoding import _capture
from .model import BufferCache, KVPredictionModel
from .pipeline import PipelinedPrefill
from .rope import rope_runs, tables_follow_forward_length

BUCKET = 128  # prompt lengths that share a graph: a graph's pass runs up to 127 padding tokens
# batch x bucket: the largest pass a graph serves. Not more than 4096 with flash attention: above it Llama-3.2-1B
# gained 2-4% and Gemma 3 1B lost
MOST_TOKENS = 4096 if Version(transformers.__version__) >= Version("5.18") else 1024
# graphs kept per pooled cache: every bucket of both `generate` modes at batch 1 (they share one memory pool, so
# each adds only its static inputs: a request that evicted one would pay a capture again after it)
KEPT = 2 * MOST_TOKENS // BUCKET


def bucket(tokens: int) -> int:
    """The length of the graph that serves prompts of `tokens` tokens."""
    return -(-tokens // BUCKET) * BUCKET


def served(batch: int, tokens: int) -> bool:
    """Whether a graph serves `batch` prompts of `tokens` tokens (see MOST_TOKENS)."""
    return batch * bucket(tokens) <= MOST_TOKENS


class PrefillGraph:
    """`mode`'s prompt pass ("exact", "aux" or "predicted") over the first `length` columns of `cache` (its model's
    BufferCache: the base's, or the auxiliary's in aux mode) for `batch` rows, serving prompts of up to `length`
    tokens whose last `tail` are the exact tail (predicted mode; the other modes return that many logits). Captured
    as a CUDA graph on a GPU (which overwrites those columns); elsewhere each call runs the same pass eagerly.
    Predicted mode's auxiliary writes its keys and values into `aux_cache` (at least `length` columns; by default
    one of its own): graphs that never replay at once can share one."""

    @torch.no_grad()
    def __init__(self, model: KVPredictionModel, cache: BufferCache, mode: str, batch: int, length: int,
                 tail: int = 1, pool=None, aux_cache: BufferCache | None = None):
        if length > cache.capacity:
            raise ValueError(f"a prompt pass over {length} columns does not fit a cache of {cache.capacity}")
        if any(tables_follow_forward_length(m.config) for m in (model.base, model.aux)):
            # longrope, dynamic NTK: a forward over the whole bucket could take other tables than the prompt's own
            raise ValueError("the model picks its rotary tables by each forward's length, which padding would change")
        device = model.device
        self.model, self.cache, self.mode, self.tail, self.length = model, cache, mode, tail, length
        self.ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.offsets = torch.arange(-tail, 0, device=device)
        self.picked = self.offsets + length  # the positions whose logits are returned (the last `tail` prompt ones)
        self.token = self.logits = None  # [B] and [B, W, V]: the graph's own tensors on a GPU
        if mode == "predicted":
            self.pipeline = PipelinedPrefill(model, cache, tail, capture=False)  # its step's parts run in this graph
            self.positions = torch.arange(length, device=device).expand(batch, length)
            self.visible = torch.ones(batch, length, dtype=torch.bool, device=device)
            self.rope = rope_runs(model.base, self.positions, cache.key_arena.dtype, length)
            self.keys, self.values = cache.slices(length)
            # the auxiliary writes its own keys and values too: without a cache, transformers looks for packed
            # sequences in the positions, which waits on the host
            self.aux_cache = aux_cache if aux_cache is not None else model.new_cache(batch, length, "aux")
            if self.aux_cache.capacity < length or self.aux_cache.key_arena.shape[1] != batch:
                raise ValueError(f"an auxiliary cache of {self.aux_cache.key_arena.shape[1]} rows and "
                                 f"{self.aux_cache.capacity} columns cannot hold a pass of {batch} x {length}")
        self.graph = None
        if device.type == "cuda":
            self._load(self.ids)
            self.graph = _capture(self._body, device, pool=pool)

    def _load(self, input_ids: torch.Tensor) -> None:
        n = input_ids.shape[1]
        self.cache.reset()
        self.ids[:, :n].copy_(input_ids)  # the columns after: an earlier prompt's, behind the causal mask
        self.picked.copy_(self.offsets + n)
        if self.mode == "predicted":
            start = n - self.tail
            self.pipeline.step.load(input_ids[:, start:], self.positions[:, start:n], start, self.visible[:, :n])

    def _body(self) -> None:
        self.cache.reset()  # for the capture's and warm-ups' host-side state: replays write from column 0
        if self.mode == "predicted":
            # every column predicted, the step's own and the padding's too: the step then writes its columns
            self.aux_cache.reset()
            self.pipeline.behind_aux(lambda: self.model.run_aux(self.ids, None, None, self.aux_cache), self.rope,
                                     lambda layers: (self.keys[layers], self.values[layers]))
            self.token, self.logits = self.pipeline.step.token, self.pipeline.step.logits
            return
        self.logits = self.model._prompt_logits(self.mode, self.ids, None, None, self.cache, self.picked)
        self.token = self.logits[:, -1].argmax(-1)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The pass over unpadded prompts `input_ids` [B, N] (N <= length); returns the first token's ids [B] and
        leaves the cache as `prefill_into` (N columns) or the pipelined first step (N - 1) does; `logits` [B, W, V]
        hold the last W prompt positions' (predicted mode: the last one's)."""
        n, shortest = input_ids.shape[1], self.tail + (self.mode == "predicted")
        if not shortest <= n <= self.length or input_ids.shape[0] != self.ids.shape[0]:
            raise ValueError(f"a prompt pass for {self.ids.shape[0]} rows of {shortest} to {self.length} tokens "
                             f"cannot take prompts of shape {tuple(input_ids.shape)}")
        self._load(input_ids)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()
        self.cache.set_length(n - 1 if self.mode == "predicted" else n)
        return self.token
