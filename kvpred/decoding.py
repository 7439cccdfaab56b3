"""The base's one-token step on a preallocated BufferCache (eager, or captured once as a CUDA graph) and the
generation loop built on it.

On a GPU a small model's single-token forward is all launch overhead: transformers' eager step takes 11-18 ms at
batch 1 on an H100 for SmolLM2 or Llama-3.2-1B, the captured graph about 1-2 ms. `KVPredictionModel.generate` on CUDA
therefore runs predicted mode's first token and every decode step through `GraphStep`s kept per batch size and
cache capacity (`StepPool`), instead of transformers' generate.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from .deferred import deferred_values
from .models import KVPredError


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


class GraphStep:
    """The same step captured once as a CUDA graph (KVPredictionModel.static_step: fixed shapes, the whole
    buffer under a mask). Replays write the token's K/V at `slot`, then advance ids, positions and slot.
    Capturing runs the step three times at the cache's last column, seeing only column 0, so a cache in use
    keeps its entries (`start` comes before that last column is reached)."""

    @torch.no_grad()
    def __init__(self, model, cache):
        from .model import cache_kwargs

        self.base, self.cache_kw, self.cache = model.base, cache_kwargs(model.base, cache), cache
        batch, capacity, device = cache.key_arena.shape[1], cache.capacity, model.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, 1, 1, capacity, dtype=torch.bool, device=device)  # [B, 1, q=1, capacity]
        with model.static_step(cache, self.slot):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up outside the graph: cuBLAS handles, lazy inits
                for _ in range(2):
                    self.slot.fill_(capacity - 1)  # each run writes there (and advances the slot)
                    self.mask[..., 0] = True  # no row sees nothing (NaN)
                    self._body()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.token, self.logits = self._body()

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.mask.index_fill_(3, self.slot, True)
        logits = self.base(input_ids=self.ids, position_ids=self.positions, attention_mask=self.mask,
                           use_cache=True, logits_to_keep=1, **self.cache_kw).logits  # [B, 1, V]
        token = logits[:, -1].argmax(-1)
        self.ids.copy_(token[:, None])
        self.positions.add_(1)
        self.slot.add_(1)
        return token, logits

    def start(self, ids: torch.Tensor, positions: torch.Tensor, slot: int, visible: torch.Tensor | None = None) -> None:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.slot.fill_(slot)
        self.mask.zero_()
        if visible is None:
            self.mask[..., :slot] = True
        else:
            self.mask[:, 0, 0, :slot] = visible.bool()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.token

    def feed(self, token: torch.Tensor) -> None:
        self.ids.copy_(token[:, None])


def make_step(model, cache, want_graph: bool):
    """A CUDA-graph step where possible; the eager step otherwise, with the reason."""
    if not want_graph or model.device.type != "cuda":
        return EagerStep(model, cache), "eager" if model.device.type == "cuda" else "eager (cpu)"
    try:
        return GraphStep(model, cache), "cuda-graph"
    except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager step, and says so
        reason = f"{type(err).__name__}: {err}".replace("|", "/").replace("\n", " ")[:160]
        return EagerStep(model, cache), f"eager (graph capture failed: {reason})"


@dataclass
class Pooled:
    """A preallocated BufferCache and its step, made on first use (a CUDA graph where one can be captured)."""
    cache: object
    step: "GraphStep | EagerStep | None" = None

    def made_step(self, model) -> "GraphStep | EagerStep":
        if self.step is None:
            self.step = make_step(model, self.cache, want_graph=True)[0]
        return self.step


class StepPool:
    """Caches and their captured steps, kept per (batch, capacity bucket) so that one capture (50-190 ms on an
    H100) serves every later request of that shape. Capacities round up to powers of two (at least 256); the `size`
    most recently used are kept, since each holds a whole KV cache."""

    def __init__(self, size: int = 4):
        self.size, self.entries = size, OrderedDict()

    def get(self, model, batch: int, tokens: int) -> Pooled:
        """The pooled cache (and step) for `batch` rows of up to `tokens` tokens."""
        key = (batch, max(256, 1 << (tokens - 1).bit_length()))
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
        self.entries.move_to_end(key)
        return self.entries[key]


def sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Next token per row from logits [B, V] (float32): argmax, or a temperature / top-k / top-p draw."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise KVPredError(f"temperature must be > 0 when sampling, got {temperature}")
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


def eos_token_ids(model, eos_token_id=None) -> torch.Tensor:
    """The ids that end a row: `eos_token_id` (int or list), else KVPredictionModel.generate's default."""
    eos = eos_token_id
    if eos is None:  # the same default as KVPredictionModel.generate
        eos = model.base.generation_config.eos_token_id or model.tokenizer.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(eos, dtype=torch.long, device=model.device)


def pad_id(model) -> int:
    """The id that fills a row after it ended: the tokenizer's pad, else the first EOS id."""
    pad = model.tokenizer.pad_token_id
    return pad if pad is not None else int(eos_token_ids(model, None)[0])


@torch.no_grad()
def generate_with_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mode: str, exact_tail: int,
                        max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int,
                        eos: torch.Tensor, pad_token_id: int, streamer=None, logits_processor=None,
                        stopping_criteria=None, defer_values: bool = False, pool: StepPool) -> torch.Tensor:
    """transformers' generate loop (greedy or sampling, eos, padding of finished rows, streamer, logits processors
    and stopping criteria called as it calls them) for modes "exact" and "predicted", on a pooled BufferCache and
    its step. Predicted mode's first token with a one-token tail is that step (eager until the shape's graph was
    captured, after a first token, so no request waits for a capture before its first token); otherwise the
    prompt's tail runs eagerly (`prefill_into`). `defer_values` (kvpred.deferred) applies where the first token's
    step is eager. Returns [B, N + new]."""
    from .model import position_ids_from_mask

    b, n = input_ids.shape
    pooled = pool.get(model, b, n + max_new_tokens)
    cache = pooled.cache
    mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new_tokens)], 1)
    positions = position_ids_from_mask(mask)
    padded = not bool(attention_mask.all())
    if mode == "predicted" and exact_tail == 1:
        first = pooled.step or EagerStep(model, cache)
        model.predict_into(cache, input_ids, attention_mask if padded else None,
                           defer_values=defer_values and isinstance(first, EagerStep))
        first.start(input_ids[:, -1:], positions[:, n - 1:n], n - 1, mask[:, :n - 1] if padded else None)
        with deferred_values(model.base, cache.pending_values, finish=False):  # the pooled cache is reset on reuse
            first()
        logits = first.logits[:, -1]
    else:
        logits = model.prefill_into(cache, input_ids, attention_mask if padded else None, mode=mode,
                                    exact_tail=exact_tail)[:, -1]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    seq, unfinished = input_ids, torch.ones(b, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        scores = logits.float()
        if logits_processor is not None:
            scores = logits_processor(seq, scores)
        token = sample(scores, do_sample, temperature, top_p, top_k)
        token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        seq = torch.cat([seq, token[:, None]], 1)
        if streamer is not None:
            streamer.put(token.cpu())
        unfinished &= ~torch.isin(token, eos)
        if stopping_criteria is not None:
            unfinished &= ~stopping_criteria(seq, scores)
        if i == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        if i == 0:
            if cache.pending_values is not None:  # the prompt's deferred values, before any step reads them
                cache.pending_values.materialize()
            step = pooled.made_step(model)
            step.start(token[:, None], positions[:, n:n + 1], n, mask[:, :n] if padded else None)
        else:
            step.feed(token)
        step()
        logits = step.logits[:, -1]
    if streamer is not None:
        streamer.end()
    return seq
