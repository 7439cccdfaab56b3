"""OpenAI-compatible HTTP server (`kvpred serve`) that reports the time to first token of each KV mode.

Endpoints: /v1/completions and /v1/chat/completions (streamed as server-sent events on request), /v1/models,
/health, /metrics (Prometheus text), and vLLM's /tokenize, /detokenize and /tokenizer_info, so that
lm-evaluation-harness can tokenize with the server's own tokenizer (tokenizer_backend=remote) and needs no download.
Extra request fields: `kv_mode` (exact | aux | predicted) and `exact_tail` (int >= 1; chat requests that name none
get at least the model's chat tail, see KVPredictionModel.chat_tail). Responses carry `kv_mode` and `ttft_s`; a
stream carries `ttft_s` in the first chunk of each choice.

Progressive refinement and multi-turn reuse (kvpred.refine; predicted mode only)
* `refine` (off | eager | lazy | auto; default: the server's --refine) and `refine_chunk` (int >= 2; default
  --refine-chunk): the first token comes from the predicted cache as usual, then each decode step lets the base
  compute the exact cache a chunk at a time and decoding switches to it once it has caught up (generate_refined).
  "auto" picks eager, lazy or off per request from the first token's confidence. Responses carry `refine`, the
  policy used (for auto the one chosen); a stream carries it in the last chunk of each choice. Refined decoding
  runs on the same pooled cache and CUDA-graph steps as plain generation, with the same stop handling and
  logprobs. Asking for refine on exact or aux mode is a 400; the server's --refine applies only where refinement
  can run and is reported as "off" elsewhere.
* `session` (string id, /v1/chat/completions only): the server keeps a kvpred.refine.ChatSession per id (an LRU
  of --max-sessions). When a request's messages, all but the last (a user message), start with the session's
  stored conversation (its earlier messages and the replies the server gave), the cached columns that agree with
  the new prompt's tokens are reused and only the rest is predicted; otherwise the session starts over. Responses
  carry `session` and `reused_tokens` (prompt tokens taken from the stored cache), in a stream's last chunk.
  With --auto-sessions, a chat request that names none but could (predicted mode, a user message last) runs as a
  turn of an automatic session, with a server-made id ("auto-..."): the one whose stored conversation its earlier
  messages extend most, else a new one. Sessions a client named are never continued this way, and a conversation
  is continued once: it then holds the new turn, so another request with the same history starts its own.

How requests run
* One worker thread owns the model; HTTP handlers only tokenize, validate and wait. Prompts wait in a bounded
  queue (a full queue answers 429). The worker takes the oldest prompt together with queued prompts of the same
  settings (mode, exact_tail, sampling, refine policy and chunk) and decodes them as one left-padded batch; each
  row stops on its own (EOS, a stop string, max_tokens, or its client going away). Refinement swaps the cache of a
  whole batch at once, so "auto" prompts share a batch only with prompts of their own request (one decision per
  request), and session turns run alone.
* Continuous batching (exact and predicted mode, unrefined: decoding.RollingBatch):
  prompts queued while such a batch decodes join it at a step boundary, in a free row (the batch has --max-batch
  rows from the start), as long as the cache has columns left. Their first token then waits for one prefill and
  one step rather than for the whole batch. On a CPU, where every row costs in every step, a lone prompt with
  nothing queued behind it runs on its own. Other batches run to their end before the next starts.
* TTFT (`ttft_s` and the histogram kvpred_time_to_first_token_seconds) runs from a request's arrival to the moment
  its first new token exists on the worker: tokenization, queueing and prefill included, the network not.

Scoring prompts (echo=true with logprobs, what lm-evaluation-harness's local-completions sends for log-likelihood)
* exact: the base scores every prompt token. aux: the auxiliary does.
* predicted: the base computes the prompt's last W positions over a predicted cache of the tokens before them
  (model.prefill with exact_tail=W); those earlier tokens are scored by the auxiliary, the model that read them
  (the paper's KVPredictionLLM likewise returns auxiliary logits at predicted positions). W is the request's
  exact_tail, else half the prompt rounded up, so that the answer at the end of a log-likelihood prompt is scored
  by the base over a predicted context. The first prompt token has no logprob (null), as in OpenAI's API.
"""

import argparse
import asyncio
import copy
import errno
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

import torch
from transformers.generation import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .decoding import Pooled, RollingBatch, eos_id_list, model_lock, sample
from .generation import ConversationTokenizer, check_text, visible_text
from .models import KVPredError
from .refine import REFINE_CHOICES, ChatSession, generate_refined

KV_MODES = ("exact", "aux", "predicted")
SPARE_SESSION_CACHES = 2  # dropped sessions' caches kept for new sessions
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CONVERSATIONS_KEPT = 64  # recent chat conversations whose tokenization a request that extends one starts from
TTFT_BUCKETS = (.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1., 1.5, 2.5, 5., 10., 30.)
log = logging.getLogger("kvpred.serve")

LogprobEntry = tuple[str, float | None, dict[str, float] | None]  # token text, its logprob, top alternatives


@dataclass
class ServeConfig:
    model_name: str = "kvpred"  # the id /v1/models reports; "kvpred" is always accepted as well
    default_mode: str = "predicted"  # kv_mode of requests that name none
    exact_tail: int = 1  # prompt tokens the base computes itself when a generation request names none; chat
    # requests get at least the model's chat tail (KVPredictionModel.chat_tail)
    max_queue: int = 64  # prompts waiting for the worker beyond this are answered 429
    max_batch: int = 8  # queued prompts of equal settings decoded together
    poll_s: float = 0.1  # how often a waiting non-streaming request checks that its client is still connected
    refine: str = "off"  # refine policy of predicted-mode generations that name none
    refine_chunk: int = 256  # columns the base refines per decode step (eager; lazy a quarter) when none is named
    max_sessions: int = 16  # chat sessions whose cache is kept; the least recently used beyond this is dropped
    warm_up: tuple[int, ...] = ()  # cache capacities made ready before the server starts
    continuous_batching: bool = True  # queued exact/predicted prompts join the running batch (RollingBatch)
    auto_sessions: bool = False  # chat requests that name no session continue the stored automatic session whose
    # conversation their messages extend (else start one), so stateless clients reuse earlier turns' cache too


class APIError(Exception):
    """An error answered with OpenAI's JSON body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Event:
    """What the worker tells a waiting request about one of its prompts (choices)."""
    index: int  # choice index
    text: str = ""  # newly visible text
    first: bool = False  # the choice's first event
    ttft_s: float | None = None  # on the first event, once a token exists
    finish_reason: str | None = None  # stop | length | cancelled, on its last event
    error: APIError | None = None


@dataclass(eq=False)
class Job:
    """One prompt of one request. The handler fills the settings; the worker thread alone writes the progress."""
    index: int
    prompt_ids: list[int]
    mode: str
    exact_tail: int  # for generation
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    stops: tuple[str, ...]
    logprobs: int | None  # top alternatives per generated (and, when scoring, prompt) token; None: no logprobs
    score_tail: int | None  # not None: also score the prompt (echo + logprobs), the base computing this many tokens
    arrived: float  # time.perf_counter() when the request came in
    sink: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    refine: str = "off"  # eager | lazy | auto | off (always off outside predicted-mode generation)
    refine_chunk: int = 256
    request_id: str = ""  # auto prompts batch only with their own request's: one policy decision per request
    session: str | None = None  # a chat session id: reuse the cache of the conversation's earlier turns
    auto_session: bool = False  # session is a fresh id, which the worker replaces by the id of the automatic
    # session whose stored conversation the messages extend most, if one does (--auto-sessions)
    messages: list[dict] | None = None  # a session turn's chat messages, as the chat template gets them
    # progress
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[LogprobEntry] = field(default_factory=list)
    prompt_logprobs: list[LogprobEntry] = field(default_factory=list)
    text: str = ""
    sent_chars: int = 0
    announced: bool = False
    started: float | None = None  # time.perf_counter() when the worker took it up
    ttft_s: float | None = None
    finish_reason: str | None = None
    refine_used: str | None = None  # the policy that ran; None while "auto" has not reported its choice
    reused_tokens: int | None = None  # a session turn's prompt tokens taken from the stored cache
    held: Event | None = None  # the last event, held back until the policy is known

    def __post_init__(self) -> None:
        self.refine_used = None if self.refine == "auto" else self.refine

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys may share a batch. Scoring, seeded, empty and session jobs run alone: a seed must
        give the same text whatever else is queued."""
        if self.score_tail is not None or self.seed is not None or self.max_tokens == 0 or self.session is not None:
            return None
        sampling = (self.temperature, self.top_p) if self.temperature > 0 else ()
        refine = () if self.refine == "off" else (self.refine, self.refine_chunk)
        if self.refine == "auto":
            refine += (self.request_id,)
        return self.mode, self.exact_tail if self.mode == "predicted" else None, sampling, refine

    def advance(self, token: int, is_eos: bool, now: float, tokenizer, entry: LogprobEntry | None) -> None:
        """Take one new token: send the text it makes visible, or finish."""
        if self.ttft_s is None:
            self.ttft_s = now - self.arrived
        if self.cancelled.is_set():
            return self.finish("cancelled")
        self.tokens.append(token)
        if entry is not None:
            self.token_logprobs.append(entry)
        if is_eos:
            return self.finish("stop", decode_after(tokenizer, self.prompt_ids, self.tokens[:-1]))
        text = decode_after(tokenizer, self.prompt_ids, self.tokens)
        visible, stopped = visible_text(text, self.stops)
        if stopped:
            return self.finish("stop", visible)
        if len(self.tokens) >= self.max_tokens:
            return self.finish("length", text)
        self._send(visible)

    def finish(self, reason: str, text: str | None = None) -> None:
        self.finish_reason = reason
        self._send(self.text if text is None else text, reason)

    def fail(self, error: APIError) -> None:
        self.finish_reason = "error"
        self._emit(Event(self.index, error=error))

    def _send(self, text: str, finish_reason: str | None = None) -> None:
        delta, first = text[self.sent_chars:], not self.announced
        self.text, self.sent_chars = text, max(self.sent_chars, len(text))
        if delta or finish_reason or first:
            self._emit(Event(self.index, delta, first, self.ttft_s if first else None, finish_reason))
            self.announced = True

    def release(self) -> None:
        """Send the last event if it was held back (the worker calls this once the run is over)."""
        if self.held is not None:
            event, self.held = self.held, None
            self._deliver(event)

    def _emit(self, event: Event) -> None:
        if event.finish_reason is not None and self.refine_used is None:
            self.held = event  # "auto": the response reports the policy, which generate_refined returns at its end
            return
        self._deliver(event)

    def _deliver(self, event: Event) -> None:
        try:
            self.sink(event)
        except RuntimeError:  # the request's event loop has closed (server shutting down): nobody to tell
            pass


DECODE_CONTEXT = 4  # tokens before a piece that settle how it decodes (a word's leading space, say)


def decode_after(tokenizer, context: list[int], ids: list[int]) -> str:
    """The text `ids` add after the tokens `context`. Decoded alone, a SentencePiece tokenizer drops a word's leading
    space ("world" after "Hello"); special tokens add nothing, as in the text a response carries."""
    context = list(context[-DECODE_CONTEXT:])
    before = tokenizer.decode(context, skip_special_tokens=True)
    after = tokenizer.decode(context + list(ids), skip_special_tokens=True)
    return after[len(before):] if after.startswith(before) else tokenizer.decode(ids, skip_special_tokens=True)


def token_entry(tokenizer, logprobs: torch.Tensor, token: int, top: int | None,
                context: list[int]) -> LogprobEntry:
    """logprobs: [V] log-probabilities of one position after the tokens `context` -> (token text, its logprob, its
    `top` best alternatives); texts as each adds to the response's text (`decode_after`)."""
    alternatives: dict[str, float] = {}
    if top:
        values, ids = logprobs.topk(top)
        for value, alt in zip(values.tolist(), ids.tolist()):
            if math.isfinite(value):  # keep the best when two tokens decode to the same text
                alternatives.setdefault(decode_after(tokenizer, context, [alt]), value)
    return decode_after(tokenizer, context, [token]), logprobs[token].item(), alternatives


class _LastScores(LogitsProcessor):
    """Keeps a decoding step's scores before temperature and top-p (it runs first), for generated-token logprobs:
    the model's own log-probabilities, as OpenAI reports them."""

    scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.scores = scores  # [B, V]
        return scores


class _Tracker(StoppingCriteria):
    """Runs after each decoding step: hands every row's new token to its Job. A row is done once its job finished
    (EOS, stop string, max_tokens, cancelled); generate stops when all rows are."""

    def __init__(self, jobs: list[Job], tokenizer, eos_ids: set[int], tap: _LastScores | None):
        self.jobs, self.tokenizer, self.eos_ids, self.tap = jobs, tokenizer, eos_ids, tap

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        live = {row: job for row, job in enumerate(self.jobs) if job.finish_reason is None}
        hand_out(live, input_ids[:, -1].tolist(), None if self.tap is None else self.tap.scores, self.tokenizer,
                 self.eos_ids)
        return torch.tensor([job.finish_reason is not None for job in self.jobs], device=input_ids.device)


def hand_out(jobs: dict[int, Job], tokens: list[int], scores: torch.Tensor | None, tokenizer,
             eos_ids: set[int]) -> None:
    """Give each row's new token (`tokens`, one per batch row) to the row's job in `jobs`, with its logprob entry
    where the job asked for one (`scores` [B, V]: what the token was sampled from)."""
    now = time.perf_counter()
    logprobs = None if scores is None else torch.log_softmax(scores.float(), dim=-1)  # [B, V]
    for row, job in jobs.items():
        token = tokens[row]
        entry = None
        if logprobs is not None and job.logprobs is not None:  # in the context of the tokens before it, no more
            context = (job.prompt_ids[-DECODE_CONTEXT:] + job.tokens[-DECODE_CONTEXT:])[-DECODE_CONTEXT:]
            entry = token_entry(tokenizer, logprobs[row], token, job.logprobs, context)
        job.advance(token, token in eos_ids, now, tokenizer, entry)


class _ServedSession(ChatSession):
    """A ChatSession that tokenizes with the worker's own tokenizer (the handlers use the model's) and tells the
    turn's Job how many prompt tokens came from the stored cache, before its first token."""

    def __init__(self, model, tokenizer, spare: Pooled | None = None):
        super().__init__(model, spare=spare, tokenizer=tokenizer)
        self.turn: Job | None = None
        self.automatic = False  # its last turn named no session: stateless clients' requests may continue it

    def _reusable(self, ids: torch.Tensor) -> int:
        reused = super()._reusable(ids)
        if self.turn is not None:
            self.turn.reused_tokens = reused
        return reused


class Metrics:
    """Prometheus metrics in a registry of their own, so that each app (and each test) counts for itself."""

    def __init__(self, queue_depth: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("kvpred_time_to_first_token_seconds", "Request arrival to its first new token",
                              ["mode"], buckets=TTFT_BUCKETS, registry=r)
        self.wait = Histogram("kvpred_queue_wait_seconds", "Request arrival to the worker taking it up", ["mode"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter("kvpred_generated_tokens", "New tokens generated", ["mode"], registry=r)
        self.requests = Counter("kvpred_requests", "Requests accepted", ["endpoint", "mode"], registry=r)
        self.finished = Counter("kvpred_prompts_finished", "Prompts finished, by finish reason (stop, length, "
                                "cancelled, error)", ["mode", "reason"], registry=r)
        self.errors = Counter("kvpred_errors", "Error responses", ["status"], registry=r)
        self.batch_size = Histogram("kvpred_batch_size", "Prompts decoded together", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=r)
        self.reused = Counter("kvpred_session_reused_tokens", "Prompt tokens of session turns taken from the "
                              "stored cache", registry=r)
        Gauge("kvpred_queue_depth", "Prompts waiting for the worker", registry=r).set_function(queue_depth)
        self.sessions = Gauge("kvpred_sessions", "Chat sessions holding a cache", registry=r)

    def record(self, job: Job) -> None:
        if job.started is not None:
            self.wait.labels(job.mode).observe(job.started - job.arrived)
        if job.ttft_s is not None:
            self.ttft.labels(job.mode).observe(job.ttft_s)
        self.tokens.labels(job.mode).inc(len(job.tokens))
        self.finished.labels(job.mode, job.finish_reason or "error").inc()
        self.reused.inc(job.reused_tokens or 0)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Scheduler:
    """The one thread that uses the model, fed by a bounded queue of Jobs."""

    def __init__(self, model, config: ServeConfig, metrics: Metrics):
        self.model, self.config, self.metrics = model, config, metrics
        self.tokenizer = copy.deepcopy(model.tokenizer)  # a fast tokenizer must not be shared between threads
        self.eos_ids = set(eos_id_list(model))  # the ids that end a row in generate, too
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._running: list[Job] = []
        self._thread: threading.Thread | None = None
        self.sessions: OrderedDict[str, _ServedSession] = OrderedDict()  # the worker's alone; least recent first
        self.spares: list[Pooled] = []  # caches of dropped sessions (or made by the warm-up) for new sessions

    @property
    def depth(self) -> int:
        with self._cond:
            self._drop_cancelled()
            return len(self._pending)

    def _drop_cancelled(self) -> None:
        """Tell the clients that left while their jobs waited, and free their places in the queue at once (not when
        the worker reaches them, after the generation under way): under the lock."""
        for job in [job for job in self._pending if job.cancelled.is_set()]:
            self._pending.remove(job)
            job.finish("cancelled")
            job.release()
            self.metrics.record(job)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kvpred-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            for job in [*self._pending, *self._running]:
                job.cancelled.set()
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's prompts, or none of them."""
        if len(jobs) > self.config.max_queue:
            raise APIError(400, f"a request may hold at most {self.config.max_queue} prompts (the server's "
                                f"--max-queue), got {len(jobs)}", param="prompt")
        with self._cond:
            self._drop_cancelled()
            if len(self._pending) + len(jobs) > self.config.max_queue:
                raise APIError(429, f"the server is busy: {len(self._pending)} prompts are waiting and the queue "
                                    f"holds {self.config.max_queue}; retry later", code="queue_full",
                               kind="server_overloaded")
            self._pending.extend(jobs)
            self._cond.notify()

    def next_batch(self) -> list[Job] | None:
        """The oldest live job and the queued jobs that may share its batch; None once closing."""
        with self._cond:
            while True:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return None
                self._drop_cancelled()
                if not self._pending:
                    continue
                first = self._pending.popleft()
                batch, longest, most = [first], len(first.prompt_ids), first.max_tokens
                # a batch decoded padded (not rolling, where each row has columns of its own) gives its longest
                # prompt the most new tokens: that must fit the context
                padded = not self._may_roll(first)
                for job in list(self._pending) if first.batch_key is not None else []:
                    if len(batch) == self.config.max_batch:
                        break
                    fits = not padded or (max(longest, len(job.prompt_ids)) + max(most, job.max_tokens)
                                          <= self.model.context_length)
                    if job.batch_key == first.batch_key and fits and not job.cancelled.is_set():
                        self._pending.remove(job)
                        batch.append(job)
                        longest, most = max(longest, len(job.prompt_ids)), max(most, job.max_tokens)
                self.metrics.batch_size.observe(len(batch))
                return batch

    def _loop(self) -> None:
        while (batch := self.next_batch()) is not None:
            self._running, started = batch, time.perf_counter()  # prompts joining a rolling batch are added
            for job in batch:
                job.started = started
            try:
                with model_lock(self.model):
                    self._run(batch)
            except KVPredError as err:
                self._fail(self._running, APIError(400, str(err)))
            except Exception as err:  # a bug or a device error: answer 500 and keep serving
                log.exception("generation failed")
                self._fail(self._running, APIError(500, f"{type(err).__name__}: {err}", kind="server_error"))
            for job in self._running:
                job.release()
                self.metrics.record(job)

    @staticmethod
    def _fail(batch: list[Job], error: APIError) -> None:
        for job in batch:
            if job.finish_reason is None:
                job.fail(error)

    def _run(self, batch: list[Job]) -> None:
        if batch[0].score_tail is not None:  # scoring jobs always run alone
            batch[0].prompt_logprobs = self._score(batch[0])
        live = [job for job in batch if job.max_tokens > 0]
        for job in batch:
            if job.max_tokens == 0:
                job.refine_used = job.refine_used or "off"  # no token: nothing to refine, no auto decision
                job.finish("length")
        if not live:
            return
        if live[0].seed is not None:  # seeded jobs run alone
            torch.manual_seed(live[0].seed)
        if live[0].session is not None:
            self._chat_turn(live[0])
        elif live[0].refine != "off":
            self._generate_refined(live)
        elif self._rolls(live):
            self._roll(live)
        else:
            self._generate(live)
        for job in live:
            if job.finish_reason is None:  # decoding ran to max_new_tokens
                job.finish("length")

    def _padded(self, jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        """The jobs' prompts as one left-padded batch: input_ids and attention_mask [B, T]."""
        pad, width = self.tokenizer.pad_token_id, max(len(job.prompt_ids) for job in jobs)
        input_ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])  # [B, T]
        attention_mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
        return input_ids, attention_mask

    @staticmethod
    def _sampling(job: Job) -> dict:
        sample = job.temperature > 0
        return {"do_sample": sample, "temperature": job.temperature if sample else 1.0, "top_p": job.top_p}

    def _chooser(self, job: Job) -> Callable[[torch.Tensor], torch.Tensor]:
        """The next tokens [rows] from logits [rows, V], drawn with `job`'s settings (those of its batch)."""
        sampling = self._sampling(job)
        return lambda logits: sample(logits.float(), top_k=0, **sampling)

    def _hooks(self, jobs: list[Job]) -> dict:
        """A batch's decoding hooks: the tracker that hands each row's token to its job and ends rows whose job
        finished, and, where logprobs were asked for, the tap on the scores each token was sampled from."""
        tap = _LastScores() if any(job.logprobs is not None for job in jobs) else None
        hooks = {"stopping_criteria": StoppingCriteriaList([_Tracker(jobs, self.tokenizer, self.eos_ids, tap)])}
        if tap is not None:
            hooks["logits_processor"] = LogitsProcessorList([tap])
        return hooks

    def _generate(self, jobs: list[Job]) -> None:
        first = jobs[0]
        input_ids, attention_mask = self._padded(jobs)
        self.model.generate(input_ids, attention_mask, mode=first.mode, exact_tail=first.exact_tail,
                            max_new_tokens=max(job.max_tokens for job in jobs), **self._sampling(first),
                            **self._hooks(jobs))

    def _may_roll(self, job: Job) -> bool:
        """Whether jobs like `job` can decode as a RollingBatch (else as one padded batch)."""
        return self.config.continuous_batching and job.refine == "off" and job.mode in ("exact", "predicted")

    def _rolls(self, jobs: list[Job]) -> bool:
        """Whether `jobs` run as a RollingBatch. On a CPU each of its max_batch rows costs in every step, so a lone
        prompt with nothing queued behind it runs on its own instead (one row, to its end)."""
        first = jobs[0]
        return (self._may_roll(first) and first.batch_key is not None
                and (self.model.device.type == "cuda" or len(jobs) > 1 or self.depth > 0))

    def _roll(self, jobs: list[Job]) -> None:
        """Decode `jobs` as a RollingBatch of max_batch rows that queued prompts of the same settings join at step
        boundaries."""
        model, first, rows = self.model, jobs[0], self.config.max_batch
        longest, most = max(len(job.prompt_ids) for job in jobs), max(job.max_tokens for job in jobs)
        need = max(len(job.prompt_ids) + job.max_tokens for job in jobs)
        # twice the room, for prompts to join; cache columns are not positions, so they may outgrow the context
        pooled = model._steps.get(model, rows, max(min(model.context_length, 2 * need), longest + most))
        capacity, slot = pooled.cache.capacity, longest - 1
        if model.device.type == "cuda":  # the graph step attends over the whole buffer anyway: start half-way
            slot = max(slot, min(capacity // 2, capacity - most))  # in, so that longer prompts can join too
        batch = RollingBatch(model, pooled, slot)
        running = self._join(batch, jobs)  # row -> job
        choose = self._chooser(first)
        while running:
            scores = batch().float()  # [rows, V]
            tokens = choose(scores)
            logprobs_wanted = any(job.logprobs is not None for job in running.values())
            hand_out(running, tokens.tolist(), scores if logprobs_wanted else None, self.tokenizer, self.eos_ids)
            for row, job in list(running.items()):
                if job.finish_reason is not None:
                    del running[row]
                    batch.release(row)
            batch.feed(tokens)
            if joining := self._joinable(first.batch_key, batch):
                running.update(self._join(batch, joining))
        batch.capture_missed()

    def _joinable(self, key: tuple, batch: RollingBatch) -> list[Job]:
        """The queue's oldest prompts, while they have the running batch's settings and fit into its free rows
        now. The first that does not stops the joining, so that nothing overtakes it: the batch then ends, and
        the next one starts with it."""
        found = []
        with self._cond:
            for job in self._pending:
                if job.cancelled.is_set():
                    continue  # _drop_cancelled tells its client
                if len(found) == len(batch.free) or job.batch_key != key or not batch.fits(len(job.prompt_ids),
                                                                                          job.max_tokens):
                    break
                found.append(job)
            for job in found:
                self._pending.remove(job)
        self._running.extend(found)
        return found

    def _join(self, batch: RollingBatch, jobs: list[Job]) -> dict[int, Job]:
        """`jobs` join `batch`; returns their rows that still decode. A prompt that joins alone does so through a
        captured prompt pass where one serves (`RollingBatch.admit_prefilled`): its first token is handed out at
        once."""
        started = time.perf_counter()
        for job in jobs:
            job.started = started
        first, device = jobs[0], self.model.device
        input_ids, attention_mask = self._padded(jobs)
        if len(jobs) == 1:
            if joined := batch.admit_prefilled(input_ids.to(device), first.mode, first.exact_tail,
                                               self._chooser(first)):
                (row,), logits, tokens = joined
                hand_out({0: first}, tokens.tolist(), None if first.logprobs is None else logits, self.tokenizer,
                         self.eos_ids)
                if first.finish_reason is None:
                    return {row: first}
                batch.release(row)
                return {}
        rows = batch.admit(input_ids.to(device), attention_mask.to(device), first.mode, first.exact_tail)
        return dict(zip(rows, jobs))

    def _generate_refined(self, jobs: list[Job]) -> None:
        first = jobs[0]
        input_ids, attention_mask = self._padded(jobs)
        _, info = generate_refined(self.model, input_ids, attention_mask, exact_tail=first.exact_tail,
                                   max_new_tokens=max(job.max_tokens for job in jobs), **self._sampling(first),
                                   refine=first.refine, chunk_size=first.refine_chunk, **self._hooks(jobs))
        for job in jobs:
            job.refine_used = job.refine_used or info["policy"]  # auto: the policy it chose

    def _chat_turn(self, job: Job) -> None:
        """One turn of a chat session: reuse the stored cache where the new prompt's tokens agree with it."""
        session = self._session(job)
        session.exact_tail, session.refine, session.chunk_size = job.exact_tail, job.refine, job.refine_chunk
        session.turn = job
        try:
            session.send(job.messages[-1]["content"], max_new_tokens=job.max_tokens, **self._sampling(job),
                         **self._hooks([job]))
        finally:
            session.turn = None
        session.messages[-1]["content"] = job.text  # the reply as the client got it (a stop string cuts it)
        job.refine_used = job.refine_used or session.last_info["policy"]

    def _session(self, job: Job) -> _ServedSession:
        """The job's session, most recently used now; a new one when its messages do not extend the stored
        conversation. An automatic job's session is the automatic one its messages extend most, if any. Beyond
        max_sessions, the least recently used session (and its cache) is dropped."""
        history = job.messages[:-1]
        if job.auto_session:
            job.session = self._automatic_match(history) or job.session
        session = self.sessions.pop(job.session, None)
        if session is None or not extends(history, session.messages):
            self._keep_spare(session)
            while len(self.sessions) >= self.config.max_sessions:  # drop first, so the new one can take its cache
                self._keep_spare(self.sessions.popitem(last=False)[1])
            session = _ServedSession(self.model, self.tokenizer, self.spares.pop() if self.spares else None)
        # messages the server did not generate may join the history: the cache is reused by token prefix anyway
        session.messages = list(history)
        session.automatic = job.auto_session  # a session a client names is never continued for another client
        self.sessions[job.session] = session
        self.metrics.sessions.set(len(self.sessions))
        return session

    def _automatic_match(self, history: list[dict]) -> str | None:
        """The id of the automatic session whose stored conversation is the longest that `history` extends. Once
        continued, a conversation grows by the new turn, so a second request with the same history starts its own."""
        found = {key: len(session.messages) for key, session in self.sessions.items()
                 if session.automatic and extends(history, session.messages)}
        return max(found, key=found.__getitem__, default=None)

    def _keep_spare(self, dropped: _ServedSession | None) -> None:
        """Keep a dropped session's cache for the next new session: on a GPU its step is captured already, which
        a new cache's first turn would otherwise wait for."""
        if dropped is not None and dropped.pooled is not None:
            self.spares = (self.spares + [dropped.pooled])[-SPARE_SESSION_CACHES:]

    def make_spare(self, capacity: int) -> None:
        """A session cache of `capacity` columns for the first new session, made by a session turn of its own: that
        captures its step (on a GPU) and runs the lazy first-time work of a session turn, which still cost the
        first session 94 ms on an H100 when the warm-up had only captured the step
        (benchmarks/results/h100/sessions)."""
        session = _ServedSession(self.model, self.tokenizer, Pooled(self.model.new_cache(1, capacity)))
        session.refine = "off"
        session.send("Hello", max_new_tokens=2)
        self.spares.append(session.pooled)

    @torch.no_grad()
    def _score(self, job: Job) -> list[LogprobEntry]:
        """Logprob of every prompt token given the tokens before it (see the module docstring for the modes)."""
        input_ids = torch.tensor([job.prompt_ids], device=self.model.device)  # [1, N]
        n = input_ids.shape[1]
        tail = n if job.mode != "predicted" else min(job.score_tail, n)
        logits, _ = self.model.prefill(input_ids, mode=job.mode, exact_tail=tail)  # [1, tail, V]
        if tail < n:
            head = self.model.aux(input_ids=input_ids[:, :n - tail]).logits  # [1, N - tail, V]
            logits = torch.cat([head, logits], dim=1)  # [1, N, V]
        logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # [N-1, V]: row i predicts token i+1
        first = (decode_after(self.tokenizer, [], job.prompt_ids[:1]), None, None)
        return [first] + [token_entry(self.tokenizer, logprobs[i], token, job.logprobs,
                                      job.prompt_ids[max(0, i + 1 - DECODE_CONTEXT):i + 1])
                          for i, token in enumerate(job.prompt_ids[1:])]


# -------------------------------------------------------------------- OpenAI response bodies (pure)
def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(jobs: list[Job]) -> dict:
    prompt, completion = sum(len(j.prompt_ids) for j in jobs), sum(len(j.tokens) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_block(entries: list[LogprobEntry]) -> dict:
    """OpenAI's legacy completions logprobs: parallel lists, text_offset counted in characters of `text`."""
    offsets = [0]
    for text, _, _ in entries[:-1]:
        offsets.append(offsets[-1] + len(text))
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries], "text_offset": offsets[:len(entries)]}


def first_ttft(jobs: list[Job]) -> float | None:
    return min((j.ttft_s for j in jobs if j.ttft_s is not None), default=None)


def completion_body(head: dict, jobs: list[Job], echoes: list[str] | None) -> dict:
    choices = []
    for job in jobs:
        entries = job.prompt_logprobs + job.token_logprobs
        choices.append({"index": job.index, "text": (echoes[job.index] if echoes else "") + job.text,
                        "logprobs": logprobs_block(entries) if job.logprobs is not None else None,
                        "finish_reason": job.finish_reason})
    return {**head, "object": "text_completion", "choices": choices, "usage": usage(jobs),
            "kv_mode": jobs[0].mode, "ttft_s": first_ttft(jobs), **run_report(jobs)}


def chat_body(head: dict, job: Job) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": job.text}, "logprobs": None,
              "finish_reason": job.finish_reason}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage([job]),
            "kv_mode": job.mode, "ttft_s": job.ttft_s, **run_report([job])}


def run_report(jobs: list[Job]) -> dict:
    """`refine`, plus `session` and `reused_tokens` for a session turn. A request whose prompts ran in several
    batches (more than max_batch prompts) reports the most eager policy among them, as a batch's choice does."""
    used = {job.refine_used for job in jobs} - {None}
    report = {"refine": next((p for p in ("eager", "lazy", "off") if p in used), None)}
    if jobs[0].session is not None:
        report.update(session=jobs[0].session, reused_tokens=jobs[0].reused_tokens)
    return report


def completion_chunk(head: dict, event: Event, job: Job) -> dict:
    choice = {"index": event.index, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
    return _with_extras({**head, "object": "text_completion", "choices": [choice], "kv_mode": job.mode}, event, job)


def chat_chunk(head: dict, event: Event, job: Job) -> dict:
    if event.first:
        delta = {"role": "assistant", "content": event.text}
    else:
        delta = {"content": event.text} if event.text else {}
    choice = {"index": event.index, "delta": delta, "logprobs": None, "finish_reason": event.finish_reason}
    chunk = {**head, "object": "chat.completion.chunk", "choices": [choice], "kv_mode": job.mode}
    return _with_extras(chunk, event, job)


def _with_extras(chunk: dict, event: Event, job: Job) -> dict:
    """ttft_s on a choice's first chunk; what the run reports (refine, session) on its last, once it is known."""
    if event.first:
        chunk["ttft_s"] = event.ttft_s
    if event.finish_reason is not None:
        chunk.update(run_report([job]))
    return chunk


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI/pydantic validation errors -> one 400 naming the first offending field."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                        code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(loc)
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {where!r}; besides OpenAI's fields kvpred takes kv_mode, exact_tail, "
                             "refine, refine_chunk and session", param=loc[0] if loc else None, code="unknown_field")
    return APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=loc[0] if loc else None,
                    code="invalid_value")


def refine_policy(body, mode: str, default: str) -> str:
    """The request's refine policy: its own, else the server's `default` where refinement can run (predicted-mode
    generation), else "off". Asking for refinement where it cannot run is a 400."""
    if body.refine_chunk is not None and body.refine_chunk < 2:
        raise APIError(400, f"refine_chunk must be >= 2: the sequence grows by one token per decode step, so "
                            f"refining fewer columns per step never catches up; got {body.refine_chunk}",
                       param="refine_chunk", code="invalid_value")
    asked = body.refine not in (None, "off")
    if mode != "predicted":
        if asked:
            raise APIError(400, f"refine={body.refine!r} applies only to kv_mode 'predicted' (it replaces a predicted "
                                f"cache by the exact one), but this request runs kv_mode {mode!r}; send "
                                f"kv_mode='predicted' or refine='off'", param="refine", code="invalid_value")
        return "off"
    return body.refine or default


def session_refusal(messages: list[dict], mode: str) -> APIError | None:
    """Why these messages cannot be a session turn, or None if they can. A session turn predicts only the new turn
    on top of the stored cache: predicted mode, a user message last."""
    if mode != "predicted":
        return APIError(400, f"session applies only to kv_mode 'predicted' (it reuses a cache and predicts the new "
                             f"turn), but this request runs kv_mode {mode!r}; send kv_mode='predicted' or no session",
                        param="session", code="invalid_value")
    last = messages[-1]
    if set(last) != {"role", "content"} or last["role"] != "user" or not isinstance(last["content"], str):
        return APIError(400, "with session, the last message must be a user message of role and text content only "
                             "(the new turn)", param="messages", code="invalid_value")
    return None


def extends(history: list[dict], stored: list[dict]) -> bool:
    """Whether a request's earlier messages begin with a session's stored conversation."""
    return history[:len(stored)] == stored


def check_prompts(prompts: list[list[int]], max_tokens: int, context: int, vocab: int) -> None:
    if not prompts:
        raise APIError(400, "prompt is empty: give a string, a list of strings or token ids", param="prompt")
    for ids in prompts:
        if not ids:
            raise APIError(400, "a prompt encodes to no tokens: give at least one character or token id",
                           param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must lie in [0, {vocab}), got {bad[:5]}", param="prompt")
        if len(ids) + max_tokens > context:
            raise APIError(400, f"this model's context length is {context} tokens, but the prompt has {len(ids)} "
                                f"tokens and max_tokens is {max_tokens}; shorten the prompt or lower max_tokens",
                           param="prompt" if len(ids) >= context else "max_tokens", code="context_length_exceeded")


def port_number(text: str) -> int:
    """argparse type: a TCP port, checked before the model loads."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must lie in 0-65535, got {value}")
    return value


def valid_text(text: str, param: str) -> str:
    """`text` if a tokenizer can take it, else a 400 naming `param` (JSON may carry lone surrogates: "\\ud800")."""
    try:
        return check_text(text, param)
    except KVPredError as err:
        raise APIError(400, str(err), param=param) from None


def prompt_token_lists(prompt, tokenizer, max_chars: int) -> list[list[int]]:
    """OpenAI's prompt forms: str, list[str], list[int] (one tokenized prompt), list[list[int]]."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [tokenizer.encode(valid_text(check_chars(p, max_chars, "prompt"), "prompt")) if isinstance(p, str)
            else list(p) for p in prompt]


def text_chars_limit(tokenizer, context: int) -> int:
    """More characters than any text of `context` tokens can have: no token stands for more characters than its
    vocabulary entry has (twice that, for normalizers that drop some). Longer texts are refused untokenized: the
    event loop tokenizes, and a text of megabytes would stall every other request meanwhile."""
    return 2 * context * max(map(len, tokenizer.get_vocab()))


def check_chars(text: str, max_chars: int, param: str) -> str:
    if len(text) > max_chars:
        raise APIError(400, f"{param} has {len(text)} characters, more than this model's context can hold in "
                            "tokens; shorten it", param=param, code="context_length_exceeded")
    return text


def echo_texts(prompt, prompts: list[list[int]], tokenizer) -> list[str]:
    """The prompt text that echo=true puts before each completion: as sent, or decoded from token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [tokenizer.decode(ids) for ids in prompts]


async def _events(jobs: list[Job], queue: asyncio.Queue, request=None, poll_s: float = 0.1) -> AsyncIterator[Event]:
    """The jobs' events until each has finished. With `request`, poll its connection and stop when the client left
    (a stream needs no polling: Starlette cancels it when its client disconnects)."""
    open_jobs, getter, checked = len(jobs), None, time.monotonic()
    try:
        while open_jobs:
            getter = getter or asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=poll_s if request is not None else None)
            if request is not None and time.monotonic() - checked >= poll_s:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            if not done:
                continue
            event, getter = getter.result(), None
            open_jobs -= event.finish_reason is not None or event.error is not None
            yield event
    finally:
        if getter is not None:
            getter.cancel()


# -------------------------------------------------------------------- the app
def create_app(model, config: ServeConfig | None = None):
    """A FastAPI app serving `model` (a KVPredictionModel); its worker thread runs while the app is up."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from .serve_schema import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

    config = config or ServeConfig()
    if config.default_mode not in KV_MODES:
        raise KVPredError(f"unknown default mode {config.default_mode!r}; choose one of {', '.join(KV_MODES)}")
    if config.refine not in REFINE_CHOICES:
        raise KVPredError(f"unknown refine policy {config.refine!r}; choose one of {', '.join(REFINE_CHOICES)}")
    if config.refine_chunk < 2 or config.max_sessions < 1:
        raise KVPredError(f"--refine-chunk must be >= 2 (so refinement catches up with decoding) and --max-sessions "
                          f">= 1, got {config.refine_chunk} and {config.max_sessions}")
    if any(tokens < 4 for tokens in config.warm_up):
        raise KVPredError(f"--warm-up token counts must be >= 4, got {', '.join(map(str, config.warm_up))}")
    tokenizer, context = model.tokenizer, model.context_length
    vocab = model.common_vocab  # ids every mode can read
    chat_tail = model.chat_tail  # chat requests that name no exact_tail get at least this one
    # stateless clients send the whole conversation every turn: tokenize only what is new to it
    conversations = ConversationTokenizer(tokenizer, keep=CONVERSATIONS_KEPT)
    max_chars = text_chars_limit(tokenizer, context)
    metrics = Metrics(lambda: scheduler.depth)
    scheduler = Scheduler(model, config, metrics)

    @asynccontextmanager
    async def lifespan(app):
        if config.warm_up:  # before uvicorn accepts connections, so no request waits for it
            started = time.perf_counter()
            # a GPU's rolling batches have max_batch rows; on a CPU that many would take 30 s for little gain
            rolling = config.continuous_batching and model.device.type == "cuda"
            rows = config.max_batch if rolling else 1
            made = model.warm_up(config.warm_up, batch_size=rows)
            if model.device.type == "cuda" and model.tokenizer.chat_template is not None:
                scheduler.make_spare(made[-1])  # the first chat session's first token takes no graph capture
            passes = 0
            if rolling and model.prefill_graphs:  # lone prompts join a rolling batch through captured passes
                passes = RollingBatch.capture_join_passes(model, made[-1], (1, chat_tail))
            logging.getLogger("uvicorn.error").info(
                "warmed up for batches of %d rows and up to %s tokens, with %d prompt passes for joins, in %.1f s",
                rows, ", ".join(map(str, made)), passes, time.perf_counter() - started)
        if model.compiled_step is not None:
            # A shape the warm-up did not compile runs the uncompiled graph step, rather than stalling its request
            # (and every request queued behind it) for a 20-45 s compile.
            torch.compiler.set_stance("eager_on_recompile")
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="kvpred", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def error_response(err: APIError) -> JSONResponse:
        metrics.errors.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def on_api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, err: RequestValidationError):
        return error_response(validation_error(list(err.errors())))

    @app.exception_handler(HTTPException)
    async def on_http_error(request, err: HTTPException):
        return error_response(APIError(err.status_code, str(err.detail)))

    def check_model(name: str) -> None:
        if name not in (config.model_name, "kvpred"):
            raise APIError(404, f"model {name!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    def make_jobs(prompts: list[list[int]], body, max_tokens: int, arrived: float, logprobs: int | None = None,
                  score: bool = False, messages: list[dict] | None = None,
                  auto_session: bool = False) -> tuple[list[Job], asyncio.Queue]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        sink = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)  # noqa: E731 (worker -> loop)
        mode, request_id = body.kv_mode or config.default_mode, uuid.uuid4().hex
        refine = refine_policy(body, mode, config.refine)
        default_tail = config.exact_tail if messages is None else max(config.exact_tail, chat_tail)
        jobs = [Job(index=i, prompt_ids=ids, mode=mode,
                    exact_tail=body.exact_tail or default_tail, max_tokens=max_tokens,
                    temperature=body.temperature, top_p=body.top_p, seed=body.seed, stops=body.stops,
                    logprobs=logprobs, score_tail=(body.exact_tail or math.ceil(len(ids) / 2)) if score else None,
                    arrived=arrived, sink=sink, refine=refine, refine_chunk=body.refine_chunk or config.refine_chunk,
                    request_id=request_id, session=f"auto-{request_id[:12]}" if auto_session else body.session,
                    auto_session=auto_session, messages=messages)
                for i, ids in enumerate(prompts)]
        scheduler.submit(jobs)
        return jobs, queue

    async def respond(request, body, jobs: list[Job], queue: asyncio.Queue, chat: bool, make_body):
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(jobs, queue, head, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async for event in _events(jobs, queue, request, config.poll_s):
                if event.error is not None:
                    raise event.error
        finally:
            for job in jobs:  # no-op for finished jobs; stops the rest when the client left or one failed
                job.cancelled.set()
        return make_body(head, jobs)

    async def stream(jobs, queue, head: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        make_chunk = chat_chunk if chat else completion_chunk
        try:
            async for event in _events(jobs, queue):
                if event.error is not None:  # the status line is gone already: report in the stream, as OpenAI does
                    metrics.errors.labels(str(event.error.status)).inc()
                    yield sse(event.error.body())
                    return
                yield sse(make_chunk(head, event, jobs[event.index]))
            if include_usage:
                kind = "chat.completion.chunk" if chat else "text_completion"
                yield sse({**head, "object": kind, "choices": [], "usage": usage(jobs)})
            yield sse("[DONE]")
        finally:
            for job in jobs:
                job.cancelled.set()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrived = time.perf_counter()
        check_model(body.model)
        if body.stream and (body.echo or body.logprobs is not None):
            raise APIError(400, "echo and logprobs are not supported with stream=true; send them without streaming",
                           param="stream")
        if body.session is not None:
            raise APIError(400, "session is only supported on /v1/chat/completions, whose messages tell which part "
                                "of the prompt is a new turn", param="session")
        prompts = prompt_token_lists(body.prompt, tokenizer, max_chars)
        max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        check_prompts(prompts, max_tokens, context, vocab)
        echoes = echo_texts(body.prompt, prompts, tokenizer) if body.echo else None
        jobs, queue = make_jobs(prompts, body, max_tokens, arrived, body.logprobs,
                                score=body.echo and body.logprobs is not None)
        metrics.requests.labels("completions", jobs[0].mode).inc()
        return await respond(request, body, jobs, queue, False, lambda head, jobs: completion_body(head, jobs, echoes))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrived = time.perf_counter()
        check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported on /v1/chat/completions; use /v1/completions",
                           param="logprobs")
        if tokenizer.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        messages = [m.for_template() for m in body.messages]
        check_chars("".join(m.get("content", "") for m in messages), max_chars, "messages")  # before the template runs
        refusal = session_refusal(messages, body.kv_mode or config.default_mode)
        if body.session is not None and refusal is not None:
            raise refusal
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja errors: the template rejects these messages
            raise APIError(400, f"the chat template rejects these messages: {err}", param="messages") from err
        ids = conversations(valid_text(text, "messages"))  # the template holds the special tokens
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is None and len(ids) >= context:
            raise APIError(400, f"this model's context length is {context} tokens, and the messages take "
                                f"{len(ids)} of them: no room is left for a reply; shorten the conversation",
                           param="messages", code="context_length_exceeded")
        max_tokens = limit if limit is not None else context - len(ids)
        check_prompts([ids], max_tokens, context, vocab)
        # --auto-sessions: a request that could name a session runs as one (a request for no tokens has no turn)
        auto = config.auto_sessions and body.session is None and refusal is None and max_tokens > 0
        jobs, queue = make_jobs([ids], body, max_tokens, arrived, messages=messages, auto_session=auto)
        metrics.requests.labels("chat", jobs[0].mode).inc()
        return await respond(request, body, jobs, queue, True, lambda head, jobs: chat_body(head, jobs[0]))

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "kvpred", "max_model_len": context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(i) for i in dict.fromkeys([config.model_name, "kvpred"])]}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str):
        check_model(name)
        return model_card(name)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": scheduler.depth}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        text = valid_text(check_chars(body.prompt, max_chars, "prompt"), "prompt")
        ids = tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "chat_template": tokenizer.chat_template, "model_max_length": context}

    return app


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn on a background thread (for tests and benchmarks); yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# -------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    from .cli import add_model_arguments, command_help

    p = subparsers.add_parser("serve", help=command_help("serve"),
                              description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                                          "/v1/models, /health, /metrics). Requests may set kv_mode, exact_tail, "
                                          "refine (off|eager|lazy|auto: replace the predicted cache by the exact "
                                          "one while decoding), refine_chunk, and on chat a session id (reuse the "
                                          "cache of the conversation's earlier turns); responses report kv_mode, "
                                          "ttft_s, refine, and for sessions session and reused_tokens.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    p.add_argument("--default-mode", choices=KV_MODES, default="predicted",
                   help="kv_mode of requests that name none (default: predicted)")
    p.add_argument("--exact-tail", type=int, default=1,
                   help="prompt tokens the base computes itself when a request names none (paper: 1); chat "
                        "requests get at least the model's chat tail (the checkpoint's own, else the template's "
                        "tokens that open the reply)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting prompts beyond this are answered 429")
    p.add_argument("--max-batch", type=int, default=8, help="queued prompts of equal settings decoded together")
    p.add_argument("--refine", choices=REFINE_CHOICES, default="off",
                   help="refine policy of predicted-mode generations that name none (default: off): eager refines "
                        "--refine-chunk tokens per decode step, lazy a quarter, auto decides per request from the "
                        "first token's confidence")
    p.add_argument("--refine-chunk", type=int, default=256,
                   help="tokens the base refines per decode step when a request names no refine_chunk (>= 2)")
    p.add_argument("--max-sessions", type=int, default=16,
                   help="chat sessions (request field session) whose cache is kept; the least recently used "
                        "beyond this is dropped")
    p.add_argument("--auto-sessions", action="store_true",
                   help="run a predicted-mode chat request that names no session as a session turn: it continues "
                        "the automatic session whose stored conversation its earlier messages extend most, else "
                        "starts one (within --max-sessions). Stateless clients, which resend the whole conversation, "
                        "then reuse the cache of earlier turns, exact where refinement ran (pair with --refine lazy). "
                        "Cost: session turns run alone, so concurrent chat requests no longer share batches; for "
                        "interactive, low-concurrency serving")
    p.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="let queued exact and predicted prompts join the running batch at a step boundary, instead "
                        "of waiting for it to end (default: on)")
    p.add_argument("--warm-up", type=parse_capacities, default="256,512,1024,2048", metavar="TOKENS",
                   help="before serving, make the caches (and on a GPU the CUDA graphs) for batches of up to these "
                        "many prompt + new tokens (on a GPU of --max-batch rows, as continuous batching runs them; "
                        "else of one), so the first requests do not wait for them; 'none' to start at once "
                        "(default: 256,512,1024,2048)")
    p.add_argument("--compile-step", action="store_true",
                   help="run the one-token decode step through a torch.compile'd base forward (the step 1.3-2.2x "
                        "faster on an H100 for 135M-8B shapes, captured as a CUDA graph; on a CPU without deferring "
                        "predicted values). The --warm-up compiles each of its shapes (20-45 s each on an H100, "
                        "about a minute on 2 CPU cores); a shape it did not make runs the uncompiled step")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    p.set_defaults(func=_serve)


def parse_capacities(text: str) -> tuple[int, ...]:
    """--warm-up's value: comma-separated token counts, or 'none'."""
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts or 'none', got {text!r}") from None
    return values


def check_address_free(host: str, port: int) -> None:
    """Refuse an address another process listens on (uvicorn would find out only after the model has loaded)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise KVPredError(f"--host {host!r} cannot be resolved: {err.strerror}") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no obstacle
        try:
            probe.bind(address)
        except OSError as err:
            hint = " (another server there? choose --port)" if err.errno == errno.EADDRINUSE else ""
            raise KVPredError(f"cannot listen on {host}:{port}: {err.strerror}{hint}") from err


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .cli import load_model

    if args.exact_tail < 1 or args.max_batch < 1 or args.max_queue < 1:
        raise KVPredError("--exact-tail, --max-batch and --max-queue must be >= 1 (a queue of 0 would refuse every "
                          "request)")
    if args.compile_step and not args.warm_up:
        raise KVPredError("--compile-step compiles each shape's step during the warm-up; give --warm-up capacities")
    check_address_free(args.host, args.port)  # before the model loads, which may take minutes
    model = load_model(args)
    if args.compile_step:
        model.compile_step()
    app = create_app(model, ServeConfig(model_name=args.model, default_mode=args.default_mode,
                                        exact_tail=args.exact_tail, max_queue=args.max_queue,
                                        max_batch=args.max_batch, refine=args.refine,
                                        refine_chunk=args.refine_chunk, max_sessions=args.max_sessions,
                                        warm_up=args.warm_up, continuous_batching=args.continuous_batching,
                                        auto_sessions=args.auto_sessions))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
