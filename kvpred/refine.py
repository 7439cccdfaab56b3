"""Beyond the paper (issue 7): progressive cache refinement, adaptive fallback and multi-turn cache reuse.

* `generate_refined`: the first token comes from predicted mode (same TTFT, same pooled cache and CUDA-graph step as
  `generate`); then, one chunk per decode step, the base recomputes the cache's columns exactly, in place, over the
  exact ones before them. Once it has caught up, later tokens are the exact base's continuation of what was
  generated so far.
* `confidence` / `choose_policy`: a cheap per-request signal picks "eager", "lazy" or "off" refinement;
  `tradeoff_curve` turns per-request measurements into the fraction-refined vs agreement-with-exact curve.
* `ChatSession`: earlier turns keep their (refined, exact) cache; only a new turn's tokens are predicted.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from .decoding import (Pooled, Trace, base_tail, capacity_bucket, capture_for_next, check_decoding, decode,
                       decoding_entry, eos_token_ids, first_logits, pad_id, tail_on_steps, with_stop_strings)
from .generation import ConversationTokenizer, check_text
from .model import (BufferCache, KVPredictionModel, cache_kwargs, capture, check_checkpoint_out, check_exact_tail,
                    position_ids_from_mask, write_report)
from .models import KVPredError
from .rope import rope_types, tables_follow_forward_length

POLICIES = ("eager", "lazy", "off")
REFINE_CHOICES = POLICIES + ("auto",)
LAZY_DIVISOR = 4  # "lazy" refines chunk_size // 4 tokens per step: a quarter of the slowdown, a later switch
SIGNALS = ("entropy", "tail_nll", "kv_error")


# -------------------------------------------------------------------- adaptive fallback
@dataclass
class Thresholds:
    """Per-request policy from one confidence signal (see `confidence`); larger signal = less trustworthy.

    The defaults are placeholders: `kvpred calibrate` (`calibrate`) measures them per model and saves them in its
    config, where `for_model` finds them.
    """
    signal: str = "entropy"  # a key of confidence()'s dict: "entropy" (any W), "tail_nll" / "kv_error" (W >= 2)
    off_below: float = 1.0  # every row's signal below this: trust the predicted cache ("off")
    eager_above: float = 3.0  # any row's signal above this: refine at once ("eager"); otherwise "lazy"

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise KVPredError(f"unknown confidence signal {self.signal!r}; choose one of {', '.join(SIGNALS)}")
        if self.off_below > self.eager_above:
            raise KVPredError(f"thresholds need off_below <= eager_above, got {self.off_below} > {self.eager_above}")

    @classmethod
    def for_model(cls, model: KVPredictionModel) -> "Thresholds":
        """The model's calibrated thresholds (saved in its config by `kvpred calibrate`), else the defaults."""
        saved = model.config.refine_thresholds
        return cls(**saved) if saved else cls()


def choose_policy(signal: dict, thresholds: Thresholds | None = None) -> str:
    """"eager" | "lazy" | "off" for a request (or a whole batch: the cache swap is batch-wide, so the least
    trustworthy row decides). `signal` maps names to a float or a per-row tensor, as `confidence` returns."""
    thresholds = thresholds or Thresholds()
    if thresholds.signal not in signal:
        raise KVPredError(f"signal {thresholds.signal!r} is not available here (have {sorted(signal)}); "
                          "tail_nll and kv_error need exact_tail >= 2")
    values = torch.as_tensor(signal[thresholds.signal], dtype=torch.float32).flatten()
    if bool((values > thresholds.eager_above).any()):
        return "eager"
    if bool((values < thresholds.off_below).all()):
        return "off"
    return "lazy"


@torch.no_grad()
def confidence(model: KVPredictionModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               exact_tail: int = 1) -> dict[str, torch.Tensor]:
    """Per-row signals [B] (float32, CPU) of how far predicted mode may stray from the exact base; all are
    by-products of the predicted prefill, so they cost next to nothing on top of the first token:

    * "entropy": entropy (nats) of the base's first-token distribution over the predicted cache. Any W.
    * "tail_nll" (W >= 2): mean NLL of the known tail tokens 2..W under the base's predicted-mode logits.
    * "kv_error" (W >= 2): relative L2 error, averaged over keys and values, between the predictor's K/V for the
      W tail tokens (the auxiliary runs over them too: W more aux tokens) and the K/V the base computes for them
      (k_proj/v_proj outputs, the predictor's own space). The base's tail K/V of layers > 0 see the predicted
      prefix, so this is a proxy: it measures how well the predictor tracks the base on this very input.
    """
    input_ids, attention_mask = model.check_inputs(input_ids, attention_mask, "predicted", 0, exact_tail)
    _, signal = _prefill(model, input_ids, attention_mask, exact_tail, Pooled(model.new_cache(*input_ids.shape)),
                         with_signal=True)
    return signal


def tradeoff_curve(signal: Sequence[float], agree_off: Sequence[float], agree_refined: Sequence[float],
                   thresholds: Sequence[float]) -> list[dict]:
    """For each threshold t, refine the requests whose signal exceeds t: the fraction refined and the mean
    agreement with the exact base (each request scores its refined or unrefined agreement). Pure arithmetic
    on per-request measurements, so one pair of runs gives the whole curve."""
    s, off, ref = (torch.as_tensor(x, dtype=torch.float64) for x in (signal, agree_off, agree_refined))
    if not s.shape == off.shape == ref.shape or s.dim() != 1:
        raise KVPredError(f"need three equally long 1-D sequences, got {tuple(s.shape)}, {tuple(off.shape)}, "
                          f"{tuple(ref.shape)}")
    rows = []
    for t in thresholds:
        refined = s > t
        rows.append({"threshold": float(t), "fraction_refined": refined.double().mean().item(),
                     "agreement": torch.where(refined, ref, off).mean().item()})
    return rows


def entropy_thresholds(entropy: Sequence[float], agree: Sequence[bool], trust: float, distrust: float
                       ) -> Thresholds:
    """Entropy thresholds from per-prompt measurements: off_below is the largest cut under which the prompts' mean
    first-token agreement is still >= `trust`, eager_above the smallest cut above which it is <= `distrust`
    (cuts halfway between neighbouring values). Where no group qualifies, the policy it would select never fires."""
    e, a = (torch.as_tensor(x, dtype=torch.float64) for x in (entropy, agree))
    if e.dim() != 1 or e.shape != a.shape or len(e) < 2:
        raise KVPredError(f"need two equally long 1-D sequences of at least 2 values, got {tuple(e.shape)}, "
                          f"{tuple(a.shape)}")
    e, order = e.sort()
    a = a[order]
    counts = torch.arange(1, len(e) + 1, dtype=torch.float64)
    low = (a.cumsum(0) / counts >= trust).nonzero().flatten()  # the k lowest agree >= trust (k = index + 1)
    high = (a.flip(0).cumsum(0) / counts <= distrust).nonzero().flatten()  # the k highest agree <= distrust
    gap = e[1:] > e[:-1]  # only a cut between unequal values puts exactly those k on its side
    low = low[torch.cat([gap, gap.new_ones(1)])[low]]
    high = high[torch.cat([gap.flip(0), gap.new_ones(1)])[high]]

    def cut(i: int) -> float:  # between the i-th and the next value; past either end, beyond it
        return float(e[0]) - 1.0 if i < 0 else float(e[-1]) + 1.0 if i + 1 >= len(e) else float(e[i] + e[i + 1]) / 2

    off_below = cut(int(low.max()) if len(low) else -1)  # no group trusted: below every value
    eager_above = cut(len(e) - 2 - int(high.max()) if len(high) else len(e) - 1)  # none distrusted: above all
    return Thresholds("entropy", off_below, max(off_below, eager_above))


@torch.no_grad()
def calibrate(model: KVPredictionModel, windows: torch.Tensor, *, trust: float = 0.9, distrust: float = 0.5,
              batch_size: int = 16, progress: bool = True) -> tuple[Thresholds, dict]:
    """`entropy_thresholds` measured on prompts `windows` [N, T] (held-out text, not evaluation data): per prompt,
    predicted mode's first-token entropy and whether its first token equals the exact base's. Returns the
    thresholds and a report: agreement overall and within the groups each policy would get."""
    from tqdm.auto import tqdm

    entropy, agree = [], []
    for ids in tqdm(windows.split(batch_size), desc="calibrate: prompts", unit="batch", disable=not progress):
        ids = ids.to(model.device)
        mask = torch.ones_like(ids)
        logits, signal = _prefill(model, ids, mask, 1, Pooled(model.new_cache(*ids.shape)), with_signal=True)
        exact, _ = model.prefill(ids, mask, mode="exact")
        entropy += signal["entropy"].tolist()
        agree += (logits[:, -1].argmax(-1) == exact[:, -1].argmax(-1)).tolist()
    found = entropy_thresholds(entropy, agree, trust, distrust)
    e, a = torch.tensor(entropy), torch.tensor(agree, dtype=torch.float64)
    groups = {"off": e < found.off_below, "eager": e > found.eager_above}
    groups["lazy"] = ~(groups["off"] | groups["eager"])
    report = {"prompts": len(entropy), "trust": trust, "distrust": distrust, "agreement": a.mean().item(),
              **{f"{name}_fraction": g.double().mean().item() for name, g in groups.items()},
              **{f"{name}_agreement": a[g].mean().item() if g.any() else None for name, g in groups.items()}}
    return found, report


@torch.no_grad()
def measure_chat_tail(model: KVPredictionModel, prompts: list[str], *, tolerance: float = 0.02,
                      batch_size: int = 16, progress: bool = True) -> tuple[int, dict]:
    """The chat tail these weights need (`KVPredictionModel.chat_tail`), measured on chat prompts (`prompts`, each
    rendered up to its reply's opening; held-out chats, not evaluation data): per exact tail W from 1 to the
    template's reply opening, how often predicted mode's first token equals the exact base's. The chosen tail is the
    shortest within `tolerance` of the opening's agreement, the safe default it replaces. Returns it and a report."""
    from tqdm.auto import tqdm

    from .evaluate import confidence_interval
    from .generation import chat_exact_tail

    opening = chat_exact_tail(model.tokenizer)
    agree: dict[int, list[bool]] = {w: [] for w in range(1, opening + 1)}
    for start in tqdm(range(0, len(prompts), batch_size), desc="calibrate: chats", unit="batch", disable=not progress):
        enc = model.tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              padding_side="left", add_special_tokens=False).to(model.device)
        exact = model.prefill(enc.input_ids, enc.attention_mask, mode="exact")[0][:, -1].argmax(-1)
        for w, hits in agree.items():
            logits, _ = model.prefill(enc.input_ids, enc.attention_mask, mode="predicted", exact_tail=w)
            hits += (logits[:, -1].argmax(-1) == exact).tolist()
    rates = {w: confidence_interval(hits, binary=True) for w, hits in agree.items()}
    chosen = shortest_tail_within({w: rate for w, (rate, _, _) in rates.items()}, tolerance)
    report = {"chat_prompts": len(prompts), "reply_opening_tokens": opening, "chat_tolerance": tolerance,
              "chat_exact_tail": chosen,
              "chat_first_token_agreement": {str(w): {"mean": m, "ci95": [lo, hi]} for w, (m, lo, hi) in rates.items()}}
    return chosen, report


def shortest_tail_within(agreement: dict[int, float], tolerance: float) -> int:
    """The shortest exact tail whose first-token agreement is within `tolerance` of the longest tail's."""
    reference = agreement[max(agreement)]
    return min(w for w, rate in agreement.items() if rate >= reference - tolerance)


def token_agreement(new_tokens: torch.Tensor, reference: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Per row [B]: the fraction of positions where two [B, n] continuations hold the same token (both padded
    to the longer with `pad_token_id`, as generate pads rows that stopped)."""
    n = max(new_tokens.shape[1], reference.shape[1])
    a = torch.nn.functional.pad(new_tokens, (0, n - new_tokens.shape[1]), value=pad_token_id)
    b = torch.nn.functional.pad(reference, (0, n - reference.shape[1]), value=pad_token_id)
    return (a == b).double().mean(-1)


def prefix_agreement(new_tokens: torch.Tensor, reference: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Per row [B]: the length of the common prefix of two continuations over their (padded) length."""
    n = max(new_tokens.shape[1], reference.shape[1])
    a = torch.nn.functional.pad(new_tokens, (0, n - new_tokens.shape[1]), value=pad_token_id)
    b = torch.nn.functional.pad(reference, (0, n - reference.shape[1]), value=pad_token_id)
    return (a == b).long().cumprod(-1).sum(-1).double() / n


# -------------------------------------------------------------------- prefill with a kept prefix and signals
def _prefill(model: KVPredictionModel, ids: torch.Tensor, mask: torch.Tensor, exact_tail: int, pooled: Pooled,
             kept: int = 0, with_signal: bool = False,
             aux_past: DynamicCache | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Predicted prefill into the pooled cache on top of its first `kept` columns (already computed, and kept):
    predicted K/V for columns [kept, N - W), then the base over the rest, a last single token through the pooled
    step (a CUDA graph once captured). The auxiliary reads the columns before them for context: from `aux_past`, its
    own cache of at most `kept` columns, which it extends, or else again. Returns the logits of the columns the base
    ran [B, T, V] (only the last one without signals) and the signals (empty unless `with_signal`). Without
    signals, where the pooled cache has a pipelined first step for this tail (made beforehand: capturing it here
    would delay the first token), the base's forward over the tail runs pipelined behind the auxiliary
    (kvpred.pipeline), as in `generate`."""
    cache = pooled.cache
    n_total = ids.shape[1]
    n = max(n_total - exact_tail, kept)  # columns [kept, n) are predicted; [n, N) run through the base
    pos = position_ids_from_mask(mask)
    padded = not bool(mask.all())  # unpadded batches pass no mask: SDPA's causal fast path, as generate takes
    pipeline = pooled.pipelines.get(n_total - n) if model.pipelined_first_step and not with_signal else None
    if pipeline and n > kept:
        pipeline(ids, mask if padded else None, kept, aux_past)
        return pipeline.step.logits, {}
    aux_end = n_total if with_signal and exact_tail >= 2 else n
    tail_keys = tail_values = None
    cache.reset()  # drops a previous request's pending values too
    cache.set_length(kept)
    if n > kept:
        start = 0 if aux_past is None else aux_past.get_seq_length()  # columns the auxiliary has in its cache
        key_in, value_in = model.aux_inputs(ids[:, start:aux_end], mask[:, :aux_end] if padded else None,
                                            pos[:, start:aux_end] if padded or start else None, aux_past)
        # only the new columns go through the predictor
        key_out, value_out = cache.slices(n)
        model.predict_kv_into(key_in[:, :, kept - start:n - start], value_in[:, :, kept - start:n - start],
                              pos[:, kept:], key_out[..., kept:, :], value_out[..., kept:, :])
        cache.set_length(n)
        if aux_end > n:  # the tail's own predicted K/V, which kv_error compares with the base's [L, B, N-n, kv]
            tail_keys, tail_values = model.predictor(key_in[:, :, n - start:], value_in[:, :, n - start:])
    if not with_signal and tail_on_steps(model, n_total - n):
        return base_tail(model, pooled, ids, mask, padded, n)[:, None], {}
    with capture(model.base, "kv") if with_signal else nullcontext() as taps:
        out = model.base(input_ids=ids[:, n:], attention_mask=mask if padded else None, position_ids=pos[:, n:],
                         **cache_kwargs(model.base, cache), use_cache=True,
                         logits_to_keep=0 if with_signal else 1)  # 0: all (tail_nll reads them)
    logits = out.logits.float()  # [B, N-n or 1, V]
    signal = _signals(logits, ids[:, n:], mask[:, n:], tail_keys, tail_values, taps) if with_signal else {}
    if "kv_error" in signal:  # a row with nothing predicted (all of it in the tail, beside a longer one) has an exact
        signal["kv_error"] *= mask[:, kept:n].any(-1).cpu()  # cache: no error, as when it runs alone
    return logits, signal


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per row [B]: the entropy (nats) of the distribution of logits [B, V]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _signals(logits: torch.Tensor, tail_ids: torch.Tensor, tail_mask: torch.Tensor, tail_keys, tail_values,
             taps) -> dict[str, torch.Tensor]:
    """See `confidence`. logits [B, T, V] over the T tail tokens; tail_keys/values [L, B, T, kv] or None."""
    logp = logits.log_softmax(-1)
    signal = {"entropy": _entropy(logits[:, -1])}
    if logits.shape[1] >= 2:
        # NLL of real next tokens after real ones: a row's first token, after padding, is never scored unpadded
        real = (tail_mask[:, 1:] * tail_mask[:, :-1]).float()
        nll = -logp[:, :-1].gather(-1, tail_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
        signal["tail_nll"] = (nll * real).sum(-1) / real.sum(-1).clamp(min=1)
    if tail_keys is not None and tail_keys.shape[2] >= 2:
        real = tail_mask[None, :, :, None].to(tail_keys.dtype)  # [1, B, T, 1]
        errors = []
        for predicted, true in ((tail_keys, torch.stack(taps.k)), (tail_values, torch.stack(taps.v))):
            diff = ((predicted - true).float() * real).pow(2).sum((0, 2, 3))
            errors.append((diff / (true.float() * real).pow(2).sum((0, 2, 3)).clamp(min=1e-12)).sqrt())
        signal["kv_error"] = (errors[0] + errors[1]) / 2
    return {name: value.detach().float().cpu() for name, value in signal.items()}


# -------------------------------------------------------------------- progressive refinement
class Refiner:
    """Makes a BufferCache exact in place, `budget` columns per decode step: the base backbone (no LM head, whose
    [chunk, vocab] logits nobody reads) recomputes columns [done, done + budget) over the exact columns before them,
    overwriting what was predicted there. Decoding in between attends to exact columns up to `done` and to
    predicted ones after; no second cache is held."""

    def __init__(self, model: KVPredictionModel, pooled: Pooled, budget: int, done: int = 0):
        self.model, self.pooled, self.cache, self.budget, self.done = model, pooled, pooled.cache, budget, done

    @torch.no_grad()
    def advance(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, upto: int) -> int:
        """Make columns [done, min(done + budget, upto)) exact; ids, mask, pos cover at least `upto` columns.
        Returns how many columns it made exact. On a GPU a chunk of `budget` columns is a captured graph
        (Pooled.run_chunk); a last, shorter chunk runs as the `budget` columns ending at `end`, recomputing exact
        columns rather than capturing another width."""
        end = min(self.done + self.budget, upto)
        if end <= self.done:
            return 0
        start = end - self.budget
        if start >= 0 and self.pooled.run_chunk(self.model, ids[:, start:end], pos[:, start:end], start,
                                                 mask[:, :end]):
            processed, self.done = end - self.done, end
            return processed
        filled = self.cache.get_seq_length()  # a CUDA-graph step writes past it without moving it: keep it as is
        self.cache.set_length(self.done)
        backbone = self.model.base.model
        try:
            backbone(input_ids=ids[:, self.done:end], attention_mask=mask[:, :end],
                     position_ids=pos[:, self.done:end], **cache_kwargs(backbone, self.cache), use_cache=True)
        finally:
            self.cache.set_length(filled)
        processed, self.done = end - self.done, end
        return processed


def _report(trace: Trace, new_tokens: int) -> dict:
    """generate_refined's timing and refinement info from a decode loop's trace."""
    step_s = [b - a for a, b in zip(trace.token_s, trace.token_s[1:])]
    switch = len(step_s) if trace.exact_from is None else trace.exact_from  # steps 1..switch ran while refining
    before, after = step_s[:switch], step_s[switch:]
    return {"ttft_s": trace.token_s[0], "exact_from": trace.exact_from, "new_tokens": new_tokens,
            "refined_per_step": trace.refined, "step_s": step_s,
            "decode_s_before_exact": sum(before) / len(before) if before else None,
            "decode_s_after_exact": sum(after) / len(after) if after else None}


def _check_refine(model: KVPredictionModel, refine: str, chunk_size: int) -> None:
    if refine not in REFINE_CHOICES:
        raise KVPredError(f"unknown refine policy {refine!r}; choose one of {', '.join(REFINE_CHOICES)}")
    if chunk_size < 2:
        # the sequence grows by one column per step, so a refiner of one column per step never catches up
        raise KVPredError(f"chunk_size must be >= 2 so refinement can catch up with decoding, got {chunk_size}")
    if refine != "off" and tables_follow_forward_length(model.base.config):
        # a chunk [a, b) of the prompt gets the tables of a forward ending at b, not those of the whole prompt
        raise KVPredError(f"refinement recomputes the prompt's cache in chunks, and this base's RoPE "
                          f"({', '.join(sorted(rope_types(model.base.config)))}) picks its tables by each forward's "
                          f"last position, so the chunks would not give the exact prefill's cache; use refine='off'")


def _budget(policy: str, chunk_size: int) -> int:
    return chunk_size if policy == "eager" else max(2, chunk_size // LAZY_DIVISOR)


@decoding_entry
def generate_refined(model: KVPredictionModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     *, exact_tail: int = 1, max_new_tokens: int = 32, do_sample: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, refine: str = "eager",
                     chunk_size: int = 256, eos_token_id=None, streamer=None, logits_processor=None,
                     stopping_criteria=None, stop_strings: list[str] | None = None,
                     thresholds: Thresholds | None = None) -> tuple[torch.Tensor, dict]:
    """Predicted-mode generation whose cache is progressively replaced by the exact one.

    The first token is predicted mode's (predicted cache for prompt[:-W], the base over the last W tokens), from the
    same pooled cache and step as `generate`, so TTFT is unchanged. Then each decode step first lets the base
    recompute the next `chunk_size` columns ("eager"; chunk_size // 4 for "lazy") of prompt + generated tokens in
    place (`Refiner`); once it covers the sequence, decoding is the exact base's continuation of the tokens so far.
    "off" never refines (= predicted mode); "auto" picks a policy per batch with `confidence` signals and
    `thresholds`. `logits_processor` and `stopping_criteria` are called as transformers' generate calls them;
    `stop_strings` end a row as in `KVPredictionModel.generate`.

    Returns ids [B, N + new] and info: policy, signal (auto only), ttft_s, exact_from (index of the first new
    token decoded from an exact cache; None if refinement never caught up), refined_per_step (columns refined
    in each decode step), step_s, decode_s_before_exact (mean over steps up to and including the switch) and
    decode_s_after_exact, new_tokens.
    """
    _check_refine(model, refine, chunk_size)
    ids, mask = model.check_inputs(input_ids, attention_mask, "predicted", max_new_tokens, exact_tail)
    check_decoding(max_new_tokens, do_sample, temperature, top_p, top_k)
    trace = Trace.started(model.device)
    (b, n), signal = ids.shape, None
    pooled = model._steps.get(model, b, n + max_new_tokens)
    full_mask = torch.cat([mask, mask.new_ones(b, max_new_tokens)], 1)
    thresholds = thresholds or Thresholds.for_model(model)
    if refine == "auto" and thresholds.signal != "entropy":  # the tail's signals need its logits and K/V
        logits, signal = _prefill(model, ids, mask, exact_tail, pooled, with_signal=True)
        logits = logits[:, -1]
    else:  # generate's own first token (a CUDA-graph step on a GPU); the entropy needs nothing more
        logits = first_logits(model, pooled, ids, full_mask, mode="predicted", exact_tail=exact_tail,
                              defer_values=model.device.type == "cpu")
        if refine == "auto":
            signal = {"entropy": _entropy(logits).cpu()}
    if refine != "auto":
        policy = refine
    elif n <= exact_tail:  # nothing was predicted: nothing to decide, nor the tail's signals to decide by
        policy = "off"
    else:
        policy = choose_policy(signal, thresholds)
    budget = _budget(policy, chunk_size)
    if n <= exact_tail:  # the base ran the whole prompt: the cache is exact already
        refiner = Refiner(model, pooled, budget, done=n)
    else:
        refiner = None if policy == "off" else Refiner(model, pooled, budget)
    seq = decode(model, pooled, ids, full_mask, logits, max_new_tokens=max_new_tokens, do_sample=do_sample,
                 temperature=temperature, top_p=top_p, top_k=top_k, eos=eos_token_ids(model, eos_token_id),
                 pad_token_id=pad_id(model), streamer=streamer, logits_processor=logits_processor,
                 stopping_criteria=with_stop_strings(stopping_criteria, stop_strings, model.tokenizer), refiner=refiner,
                 trace=trace)
    capture_for_next(model, pooled, "predicted", ids, bool(mask.all()), exact_tail)
    info = {"policy": policy, "signal": None if signal is None else {k: v.tolist() for k, v in signal.items()},
            **_report(trace, seq.shape[1] - n)}
    return seq, info


# -------------------------------------------------------------------- multi-turn reuse
class ChatSession:
    """A conversation whose earlier turns keep their base cache, made exact by refinement.

    Each `send` renders the whole conversation with the tokenizer's chat template and tokenizes it (the same ids
    exact mode would see), keeps the cached columns that agree with those ids, predicts K/V only for the new
    columns (the auxiliary keeps its own cache too, so it reads only the tokens it has not seen: the new turn and
    the previous reply), lets the base run the last `exact_tail` tokens (by default the model's chat tail,
    `KVPredictionModel.chat_tail`), and decodes with refinement. After an exact history, a new turn short enough
    that the base costs fewer FLOPs on it than the auxiliary on what it has not read runs exactly instead.
    Refinement that has not caught up by the end of a reply is finished right after it, so the next turn starts
    from an exact cache (with refine="off" the kept cache stays approximate). The session holds its own
    preallocated cache (and, on a GPU, its own CUDA-graph step), grown when a turn outgrows it. Batch size 1.
    """

    def __init__(self, model: KVPredictionModel, *, system: str | None = None, exact_tail: int | None = None,
                 refine: str = "eager", chunk_size: int = 256, thresholds: Thresholds | None = None,
                 spare: Pooled | None = None, tokenizer=None):
        """`exact_tail` None: the model's chat tail (`KVPredictionModel.chat_tail`). `spare`: a cache of batch 1
        to start from (an ended session's, with its CUDA graphs already captured); what it holds is ignored.
        `tokenizer`: the one to render and tokenize with, the model's by default (a server's worker keeps its own,
        as a fast tokenizer must not be used from two threads at once)."""
        _check_refine(model, refine, chunk_size)
        if model.tokenizer.chat_template is None:
            raise KVPredError("this model's tokenizer has no chat template; ChatSession needs one")
        self.model, self.refine = model, refine
        self.tokenize = ConversationTokenizer(tokenizer or model.tokenizer)
        self.exact_tail = model.chat_tail if exact_tail is None else exact_tail
        check_exact_tail(self.exact_tail)
        self.chunk_size, self.thresholds = chunk_size, thresholds
        self.messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        self.tokens = torch.empty(1, 0, dtype=torch.long, device=model.device)  # conversation so far
        self.pooled: Pooled | None = spare  # the cache, covering tokens[:, :cached]
        self.aux_cache = DynamicCache(config=model.aux.config)  # the auxiliary's, covering a prefix of tokens
        self.exact_cols = 0  # leading cached columns that are exact
        self.last_info: dict = {}

    @property
    def cached(self) -> int:
        """Columns the cache holds: the conversation so far but its last token, which was never fed."""
        return max(self.tokens.shape[1] - 1, 0)

    @property
    def cache(self) -> BufferCache | None:
        """The base cache of the conversation so far (tokens[:, :-1]); before the first turn None, or the spare."""
        return None if self.pooled is None else self.pooled.cache

    def conversation_ids(self, messages: list[dict]) -> torch.Tensor:
        """[1, T] ids of `messages` rendered for the assistant's next reply, as exact mode would tokenize them
        (tokenizing only what follows the conversation before: `ConversationTokenizer`)."""
        text = self.tokenize.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return torch.tensor([self.tokenize(text)], device=self.model.device)

    @decoding_entry
    def send(self, user_text: str, *, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, streamer=None, logits_processor=None,
             stopping_criteria=None) -> str:
        """Append a user turn, generate the reply, remember both; returns the reply text. `streamer` (a
        transformers BaseStreamer) gets the conversation's ids, then each new token; `logits_processor` and
        `stopping_criteria` are called as transformers' generate calls them."""
        model = self.model
        check_decoding(max_new_tokens, do_sample, temperature, top_p, top_k)
        self._follow_model()
        messages = self.messages + [{"role": "user", "content": check_text(user_text, "message")}]
        ids, mask = model.check_inputs(self.conversation_ids(messages), None, "predicted", max_new_tokens,
                                       self.exact_tail)
        trace = Trace.started(model.device)
        n = ids.shape[1]
        reuse = self._reusable(ids)
        exact_cols = min(self.exact_cols, reuse)  # the kept columns that are exact
        if self.aux_cache.get_seq_length() > reuse:  # an edited history: the auxiliary reads it all again (rare;
            self.aux_cache = DynamicCache(config=model.aux.config)  # cropping fails on its never-run layers)
        pooled = self._room(reuse, n + max_new_tokens)
        tail = self.exact_tail
        if 0 < reuse == exact_cols and self._exact_turn_is_cheaper(n, reuse):
            tail = n - reuse  # the base runs the new turn itself: cheaper than the aux, and exact
        predicted = max(n - tail - reuse, 0)
        # auto with nothing approximate (no predicted tokens on top of an exact prefix): nothing to decide
        policy = "off" if self.refine == "auto" and predicted == 0 and exact_cols == reuse else self.refine
        thresholds = self.thresholds or Thresholds.for_model(model)
        tail_signals = policy == "auto" and thresholds.signal != "entropy"  # these need the tail's logits and K/V
        logits, signal = _prefill(model, ids, mask, tail, pooled, reuse, with_signal=tail_signals,
                                  aux_past=self.aux_cache)
        if policy == "auto":
            policy = choose_policy(signal if tail_signals else {"entropy": _entropy(logits[:, -1]).cpu()}, thresholds)
        budget = _budget(policy, self.chunk_size)
        if predicted == 0 and exact_cols == reuse:  # nothing predicted on top of an exact prefix: all exact
            refiner = Refiner(model, pooled, budget, done=n)
        else:
            refiner = None if policy == "off" else Refiner(model, pooled, budget, done=exact_cols)
        full_mask = torch.cat([mask, mask.new_ones(1, max_new_tokens)], 1)
        seq = decode(model, pooled, ids, full_mask, logits[:, -1], max_new_tokens=max_new_tokens,
                     do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                     eos=eos_token_ids(model), pad_token_id=pad_id(model), streamer=streamer,
                     logits_processor=logits_processor, stopping_criteria=stopping_criteria, refiner=refiner,
                     trace=trace)
        self._remember(seq, n, messages, refiner, trace, exact_cols)
        self.last_info.update(policy=policy, reused_tokens=reuse, predicted_tokens=predicted, prompt_tokens=n)
        return self.messages[-1]["content"]

    def _follow_model(self) -> None:
        """After `model.to(...)` the caches of earlier turns are in the old dtype or on the old device: drop them
        (the conversation is kept), so that the next turn computes them again."""
        arena = None if self.pooled is None else self.pooled.cache.key_arena
        if arena is not None and (arena.device, arena.dtype) != (self.model.base.device, self.model.base.dtype):
            self.pooled, self.exact_cols = None, 0
            self.aux_cache = DynamicCache(config=self.model.aux.config)
            self.tokens = self.tokens[:, :0].to(self.model.device)  # nothing cached

    def _room(self, reuse: int, tokens: int) -> Pooled:
        """The session's cache, able to hold `tokens` columns: a larger one (keeping the first `reuse` columns)
        when the current one is too small."""
        old = self.pooled
        if old is None or old.cache.capacity < tokens:
            self.pooled = Pooled(self.model.new_cache(1, capacity_bucket(tokens, self.model.context_length)))
            for new, kept in zip(self.pooled.cache.slices(reuse), old.cache.slices(reuse) if reuse else ()):
                new.copy_(kept)
        return self.pooled

    def _exact_turn_is_cheaper(self, total: int, reused: int) -> bool:
        """After an exact history, the base on the new tokens alone costs (total - reused) * P_base; predicting
        them costs the auxiliary over the tokens its cache lacks, (total - aux_cached) * P_aux, which include the
        previous reply (the base decoded it). So a short question after a long reply is cheaper exact."""
        def layer_params(lm) -> int:
            return sum(p.numel() for p in lm.model.layers.parameters())
        unread = total - self.aux_cache.get_seq_length()
        return (total - reused) * layer_params(self.model.base) <= unread * layer_params(self.model.aux)

    def _reusable(self, ids: torch.Tensor) -> int:
        """How many leading cached columns hold exactly these ids (at most N - 1: the base must run one token)."""
        cached = self.tokens[0, :self.cached]
        limit = min(len(cached), ids.shape[1] - 1)
        same = (cached[:limit] == ids[0, :limit]).long().cumprod(0)
        return int(same.sum())

    def _remember(self, seq: torch.Tensor, n: int, messages: list[dict], refiner: Refiner | None, trace: Trace,
                  kept_exact: int) -> None:
        """Keep the conversation's ids and cache; finish a refinement still under way so the cache is exact."""
        cols, finished = seq.shape[1] - 1, 0  # the last token was never fed: the cache holds seq[:, :-1]
        if trace.exact_from is not None:  # decoding caught up: every column is exact
            exact_cols = cols
        elif refiner is not None:  # the user reads the reply now: finish refining in that time
            refiner.budget = self.chunk_size
            mask = torch.ones_like(seq)
            pos = position_ids_from_mask(mask)
            while refiner.done < cols:
                finished += refiner.advance(seq, mask, pos, cols)
            exact_cols = cols
        else:  # unrefined: only the kept exact prefix stays exact
            exact_cols = kept_exact
        capacity = self.pooled.cache.capacity
        context = self.model.context_length
        if 2 * cols > capacity and capacity < context:  # the next turn would likely outgrow it: grow now, while the
            self._room(cols, min(2 * capacity, context))  # user reads, rather than before its first token
        self.pooled.cache.set_length(cols)
        # the next turn's first token takes the pooled step: capture it now if decoding did not (a new cache, or a
        # reply that ended at its first token); on a GPU its pipelined form too, where it fits after what is kept
        step = self.pooled.made_step(self.model)
        if (self.model.pipelined_first_step and getattr(step, "graph", None) is not None
                and cols + self.exact_tail < self.pooled.cache.capacity):  # its capture writes the last columns
            self.pooled.made_pipeline(self.model, self.exact_tail)
        new = seq[0, n:]
        eos = eos_token_ids(self.model, None)
        ends = torch.isin(new, eos).nonzero()
        reply = new if len(ends) == 0 else new[:int(ends[0])]
        self.messages = messages + [{"role": "assistant",
                                     "content": self.tokenize.tokenizer.decode(reply, skip_special_tokens=True)}]
        self.tokens, self.exact_cols = seq, exact_cols
        self.last_info = {**_report(trace, seq.shape[1] - n), "refined_after_reply": finished}


# -------------------------------------------------------------------- CLI: kvpred chat
def register(subparsers) -> None:
    from .cli import add_checkpoint_out_arguments, add_model_arguments, command_help, positive_int

    p = subparsers.add_parser("chat", help=command_help("chat"),
                              description="Chat with the base through KV prediction: each turn's new tokens are "
                                          "predicted on top of the exact cache of earlier turns, and decoding "
                                          "refines the cache to the exact one. One user turn per input line; "
                                          "a line /reset starts a new conversation.")
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--refine", choices=REFINE_CHOICES, default="eager",
                   help="eager: refine at once; lazy: a quarter chunk per step; off: trust the prediction; "
                        "auto: decide per turn from the first-token entropy")
    p.add_argument("--chunk-size", type=int, default=256,
                   help="columns refined per decode step (eager; lazy refines a quarter of it; default 256)")
    p.add_argument("--exact-tail", type=int, default=None,
                   help="prompt tokens the base runs itself (default: the checkpoint's chat tail, else the chat "
                        "template's tokens that open the reply; the shipped default, trained on chats, takes 1)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="most tokens per reply (default 256)")
    p.add_argument("--verbose", action="store_true", help="print per-turn reuse and timing to stderr")
    p.set_defaults(func=_chat)

    p = subparsers.add_parser(
        "calibrate", help=command_help("calibrate"),
        description="With --data (held-out windows of token shards, `kvpred data build`; not evaluation data): "
                    "measure per prompt predicted mode's first-token entropy and whether its first token equals the "
                    "exact base's, and set `--refine auto`'s thresholds: trust the prediction (no refinement) below "
                    "the largest entropy under which agreement is >= --trust, refine at once above the smallest "
                    "entropy above which it is <= --distrust, lazily between. With --chats (held-out chats, e.g. "
                    "from `kvpred data sample --chat` with a seed training did not use): measure first-token agreement "
                    "for each exact tail from 1 token to the chat template's reply opening, and set the model's chat "
                    "tail to the shortest within --chat-tolerance of the opening's. Writes the checkpoint to --out; "
                    "what is not measured is kept.")
    add_model_arguments(p)
    p.add_argument("--data", help="token shard folder; its held-out split calibrates the refinement thresholds")
    p.add_argument("--chats", help=".jsonl chats (file, folder or glob; lines of \"messages\" or rendered "
                                   "\"text\") that calibrate the chat tail")
    p.add_argument("--prompts", type=positive_int, default=256, help="prompts (windows, chats) measured")
    p.add_argument("--prompt-len", type=positive_int, default=256,
                   help="tokens per --data window (at least 2: one to predict, one the base runs)")
    p.add_argument("--trust", type=float, default=0.9, help="first-token agreement that needs no refinement")
    p.add_argument("--distrust", type=float, default=0.5, help="first-token agreement that refines at once")
    p.add_argument("--chat-tolerance", type=float, default=0.02,
                   help="first-token agreement a shorter chat tail may lose against the template's reply opening")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward")
    add_checkpoint_out_arguments(p, "folder for the calibrated checkpoint")
    p.set_defaults(func=_calibrate)


def _calibrate(args) -> int:
    import json

    from .cli import load_model
    from .data import check_tokenizer, heldout_windows
    from .generation import read_chat_prompts

    if args.data is None and args.chats is None:
        raise KVPredError("nothing to calibrate: give --data (refinement thresholds), --chats (chat tail) or both")
    if not 0 <= args.distrust <= args.trust <= 1:
        raise KVPredError(f"need 0 <= --distrust <= --trust <= 1, got {args.distrust} and {args.trust}")
    if not 0 <= args.chat_tolerance <= 1:
        raise KVPredError(f"--chat-tolerance must be within [0, 1], got {args.chat_tolerance}")
    if args.data is not None and (args.prompt_len < 2 or args.prompts < 2):  # else nothing predicted, or one point
        raise KVPredError(f"refinement thresholds need --prompts >= 2 windows of --prompt-len >= 2 tokens, got "
                          f"{args.prompts} of {args.prompt_len}")
    check_checkpoint_out(args.out, args.overwrite)
    model = load_model(args)
    report = {"model": args.model}
    # read before any measuring: a tokenizer without a chat template is refused at once
    chats = None if args.chats is None else read_chat_prompts(args.chats, model.tokenizer, args.prompts)
    if args.data is not None:
        check_tokenizer(args.data, model.tokenizer)
        thresholds, found = calibrate(model, heldout_windows(args.data, args.prompt_len, args.prompts),
                                      trust=args.trust, distrust=args.distrust, batch_size=args.batch_size)
        model.config.refine_thresholds = asdict(thresholds)
        report |= {"data": args.data, "prompt_len": args.prompt_len, **model.config.refine_thresholds, **found}
    if chats is not None:
        if len(chats) < args.prompts:
            print(f"kvpred: {args.chats} holds {len(chats)} conversations, fewer than --prompts {args.prompts}: "
                  "the chat tail is measured on those", file=sys.stderr)
        model.config.chat_exact_tail, found = measure_chat_tail(model, chats, tolerance=args.chat_tolerance,
                                                                batch_size=args.batch_size)
        report |= {"chats": args.chats, **found}
    if model.base.dtype != torch.float32:  # measured in the serving dtype (bf16 on a GPU): save the weights as loaded
        measured, model = model.config, KVPredictionModel.from_pretrained(args.model, dtype=torch.float32,
                                                                          device="cpu")
        model.config.refine_thresholds, model.config.chat_exact_tail = (measured.refine_thresholds,
                                                                        measured.chat_exact_tail)
    model.save_pretrained(args.out, dtype=getattr(torch, args.save_dtype))
    write_report(args.out, "calibration.json", report)
    print(json.dumps(report, indent=2))
    return 0


def _typed_lines(stdin) -> Iterator[str]:
    """The user's messages, one per line: piped lines as they come; at a terminal, each asked for with a prompt."""
    if not stdin.isatty():
        yield from stdin
        return
    print("Type a message and press Enter; Ctrl+D ends the chat.", file=sys.stderr)
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return


def _chat(args) -> int:
    from .cli import load_model

    model = load_model(args)
    if not 1 <= args.max_new_tokens < model.context_length:
        raise KVPredError(f"--max-new-tokens must be in [1, {model.context_length}) (the context limit), got "
                          f"{args.max_new_tokens}")
    def new_session() -> ChatSession:
        return ChatSession(model, system=args.system, exact_tail=args.exact_tail, refine=args.refine,
                           chunk_size=args.chunk_size)

    session, failed = new_session(), 0
    for line in _typed_lines(sys.stdin):
        if not line.strip():
            continue
        if line.strip() == "/reset":
            session = new_session()
            print("[new conversation]", file=sys.stderr, flush=True)
            continue
        try:
            print(session.send(line.rstrip("\n"), max_new_tokens=args.max_new_tokens), flush=True)
        except KVPredError as err:  # this turn cannot run (too long for the context, say): the chat goes on
            hint = ("; the whole conversation counts: type /reset to begin a new one"
                    if "context limit" in str(err) else "")
            print(f"kvpred: error: {err}{hint}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if args.verbose:
            i = session.last_info
            print(f"[reused {i['reused_tokens']} of {i['prompt_tokens']} tokens, predicted {i['predicted_tokens']}, "
                  f"policy {i['policy']}, ttft {i['ttft_s'] * 1e3:.1f} ms, exact from token {i['exact_from']}]",
                  file=sys.stderr, flush=True)
    return 1 if failed else 0  # a script piping turns in learns that some got no reply
