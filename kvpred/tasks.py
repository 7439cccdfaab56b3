"""Evaluation tasks for `kvpred eval`: data loading, batched scoring and generation in every mode, and metrics.

A task kind turns its data into *items*, each item into one or more *units* (a continuation to score, a prompt to
generate from, a window to compare caches on), runs units batched in one mode, and turns unit results into
per-item metric values. Unit results are plain JSON so that `evaluate.py` can cache them and resume.

Modes: "exact" (base alone), "aux" (auxiliary alone), "predicted" (KV prediction) and "truncate" (the base on only
the last 1/r of the prompt tokens, r = the TTFT FLOPs reduction of the model: an equal-cost baseline).
"""
from __future__ import annotations

import math
import os
import random
import re
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import find_files
from .generation import chat_prompts, cut_at_stop
from .model import position_ids_from_mask
from .models import KVPredError, files_digest, read_jsonl, read_text
from .rope import rope_runs, unrotate_layers

MODES = ("exact", "aux", "predicted", "truncate")
DATA_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")  # what a task path may hold
Unit = tuple[str, dict]  # (key within the task, payload)


# ------------------------------------------------------------------ options and task specs
@dataclass
class EvalOptions:
    """Settings shared by all tasks; CLI flags map one to one onto these fields."""
    batch_size: int = 8
    ratio: float = 1.0  # truncate mode keeps the last ceil(N / ratio) prompt tokens
    exact_tail: int = 1  # predicted mode: prompt tokens the base runs itself (the paper's 1)
    seed: int = 0
    fewshot: int | None = None  # None: each task's default (triviaqa 1, others 0)
    heldout_context: int = 256  # heldout: tokens of context (predicted in predicted mode) ...
    heldout_continuation: int = 64  # ... and of the continuation whose NLL is measured
    kv_length: int = 256  # kv: window length; the first kv_length-1 positions are compared
    agreement_prompt: int = 128  # agreement: prompt tokens
    agreement_tokens: int = 32  # agreement: greedy tokens compared with the exact base
    qa_max_new_tokens: int = 32
    retrieval_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    retrieval_items: int = 100  # items when no --limit is given, spread over the lengths
    humaneval_samples: int = 1  # 1: greedy pass@1; n > 1: sampling, pass@k for k <= n
    humaneval_temperature: float = 0.8
    humaneval_top_p: float = 0.95
    humaneval_max_new_tokens: int = 512
    humaneval_timeout: float = 10.0
    humaneval_workers: int = 4

    def __post_init__(self) -> None:
        counts = ("batch_size", "exact_tail", "heldout_context", "heldout_continuation", "agreement_prompt",
                  "agreement_tokens", "qa_max_new_tokens", "retrieval_items", "humaneval_samples",
                  "humaneval_max_new_tokens", "humaneval_workers")
        bad = [f"--{name.replace('_', '-')} {getattr(self, name)}" for name in counts if getattr(self, name) < 1]
        bad += [f"--kv-length {self.kv_length}"] * (self.kv_length < 2)
        bad += [f"--fewshot {self.fewshot}"] * (self.fewshot is not None and self.fewshot < 0)
        bad += [f"--humaneval-timeout {self.humaneval_timeout}"] * (not self.humaneval_timeout > 0)
        bad += [f"--retrieval-lengths {self.retrieval_lengths}"] * (not self.retrieval_lengths
                                                                    or min(self.retrieval_lengths) < 1)
        if bad:
            raise KVPredError(f"out of range: {', '.join(bad)} (counts and lengths must be at least 1, "
                              f"--kv-length at least 2, --fewshot at least 0, the timeout above 0)")
        if self.humaneval_samples > 1:
            from .decoding import check_decoding
            check_decoding(1, True, self.humaneval_temperature, self.humaneval_top_p, 0)



@dataclass
class TaskSpec:
    name: str  # label in the report (and cache key)
    kind: str  # key of KINDS
    path: str  # data file or glob


BUILTIN_TASKS = {
    "kv": ("kv", "wikitext2-test.txt"),
    "heldout": ("heldout", "wikitext2-test.txt"),
    "agreement": ("agreement", "wikitext2-test.txt"),
    "lambada": ("lm", "lambada_openai.jsonl"),
    "arc_easy": ("mc", "arc_easy.jsonl"),
    "piqa": ("mc", "piqa.jsonl"),
    "triviaqa": ("qa", "triviaqa_sm_sub.jsonl"),
    "humaneval": ("humaneval", "HumanEval.jsonl.gz"),
    "retrieval": ("retrieval", "wikitext2-test.txt"),
    "chat": ("chat", None),  # no chats in the shared data: chat=PATH
}


def default_data_dir() -> Path:
    """$KVPRED_DATA, else the shared/data folder beside (or inside) the project root, else ./shared/data."""
    if os.environ.get("KVPRED_DATA"):
        return Path(os.environ["KVPRED_DATA"])
    root = Path(__file__).resolve().parents[1]
    for candidate in (root.parent / "shared" / "data", root / "shared" / "data", Path.cwd() / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return root.parent / "shared" / "data"


def parse_tasks(text: str, data_dir: Path) -> list[TaskSpec]:
    """'lambada,arc_easy' (built-in), 'heldout=/data/*.txt' (built-in on other data), 'my.jsonl' or
    'name=my.jsonl' (format detected from the file)."""
    specs = []
    for entry in filter(None, (t.strip() for t in text.split(","))):
        name, _, path = entry.partition("=") if "=" in entry and not _expand(entry) else ("", "", entry)
        if not name and entry in BUILTIN_TASKS:
            name, path = entry, ""
        if name in BUILTIN_TASKS:
            kind, default = BUILTIN_TASKS[name]
            if not (path or default):
                raise KVPredError(f"task {name!r} needs a data file: {name}=PATH")
            specs.append(TaskSpec(name, kind, path or str(data_dir / default)))
            continue
        if not _expand(path):
            raise KVPredError(f"unknown task {entry!r}: not one of {', '.join(BUILTIN_TASKS)} and no file matches "
                              f"{path!r} (give a path to a .txt / .jsonl file, or NAME=PATH)")
        specs.append(TaskSpec(name or Path(path).name.split(".")[0], detect_kind(path), path))
    if not specs:
        raise KVPredError("no tasks given; e.g. --tasks lambada,arc_easy,heldout")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise KVPredError(f"task names must be unique, got {names}; name files with NAME=PATH")
    return specs


def detect_kind(path: str) -> str:
    """The task format of the data at `path`: the same for every one of its files, from each one's first row."""
    kinds = {f: _file_kind(f) for f in _expand(path)}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{Path(f).name}: {k}" for f, k in list(kinds.items())[:6])
        raise KVPredError(f"the files of {path} hold different task formats ({listed}); give each its own task")
    return next(iter(kinds.values()))


def _file_kind(file: str) -> str:
    if file.endswith(".txt"):
        return "heldout"
    first = next((row for _, row in read_jsonl(file)), None)
    if not isinstance(first, dict):
        raise KVPredError(f"{file} is neither a .txt file nor JSON lines with an object per line")
    keys = set(first)
    if "messages" in keys:
        return "chat"
    if {"query", "choices", "gold"} <= keys:
        return "mc"
    if {"task_id", "prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if {"context", "continuation"} <= keys:
        return "lm"
    if ("question" in keys or "context" in keys) and keys & {"answer", "answers", "aliases"}:
        return "qa"
    raise KVPredError(f"cannot tell the task format of {file} from its fields {sorted(keys)}: expected "
                      "multiple choice (query, choices, gold), QA (question, answer|answers), language modelling "
                      "(context, continuation), HumanEval (task_id, prompt, test, entry_point) or chats (messages; "
                      "rendered chat text as chat=PATH)")


def _expand(path: str) -> list[str]:
    """The data files of a file, a glob or a folder (its .txt, .jsonl and .jsonl.gz files, recursively)."""
    return [str(f) for f in find_files(path, DATA_SUFFIXES)]


def data_digest(path: str) -> str:
    """A digest of the names and contents of the data files `path` names ("" where it names none), so that a result
    cache never serves what was computed on data since edited, replaced or grown."""
    try:
        files = _expand(path)
    except KVPredError:
        return ""
    return files_digest((name, name) for name in files)


def load_rows(path: str, fields: tuple[str, ...] = (), one_of: tuple[str, ...] = ()) -> list[dict]:
    """The JSON objects of `path`'s files, each checked to hold every one of `fields` and one of `one_of`: a
    format is told from a file's first row, and a later row that does not fit is named, not a KeyError."""
    files = _expand(path)
    if not files:
        raise KVPredError(f"data file {path!r} does not exist")
    rows = []
    for file in files:
        for n, (_, row) in enumerate(read_jsonl(file), 1):
            if not isinstance(row, dict):
                raise KVPredError(f"{file}, row {n}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in fields if key not in row] + (
                [" or ".join(one_of)] if one_of and not set(one_of) & set(row) else [])
            if missing:
                raise KVPredError(f"{file}, row {n} lacks {', '.join(missing)} (it has {sorted(row)})")
            rows.append(row)
    return rows


def _text_tokens(tokenizer, path: str) -> tuple[int, ...]:
    files = _expand(path)
    if not files:
        raise KVPredError(f"text file(s) {path!r} not found")
    stamps = tuple((f, s.st_mtime_ns, s.st_size) for f in files for s in [os.stat(f)])  # an edited file: read again
    return _tokenized(tokenizer, stamps)


@lru_cache(maxsize=4)
def _tokenized(tokenizer, stamps: tuple) -> tuple[int, ...]:
    text = "\n".join(read_text(f) for f, _, _ in stamps)
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


def text_windows(tokenizer, path: str, length: int, limit: int | None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `length` tokens of the text file(s) at `path` (a trailing
    shorter window is dropped)."""
    tokens = _text_tokens(tokenizer, path)
    count = len(tokens) // length if limit is None else min(limit, len(tokens) // length)
    if count == 0:
        raise KVPredError(f"{path} holds {len(tokens)} tokens, fewer than one window of {length}")
    return [list(tokens[i * length:(i + 1) * length]) for i in range(count)]


# ------------------------------------------------------------------ batched model calls in every mode
def model_mode(mode: str) -> str:
    if mode not in MODES:
        raise KVPredError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return "exact" if mode == "truncate" else mode


def mode_prompt(ids: list[int], mode: str, ratio: float) -> list[int]:
    """Truncate mode keeps the last ceil(N / ratio) prompt tokens: the base then spends about the FLOPs the
    auxiliary spends on all N."""
    return ids[-max(1, math.ceil(len(ids) / ratio)):] if mode == "truncate" else ids


def _warn_cut(cut: int, total: int, room: int, what: str) -> None:
    """Items longer than the model's window lose their first tokens in every mode, before truncate mode keeps 1/r
    of what is left (so it still spends 1/r of the others' FLOPs): say how many."""
    if cut:
        warnings.warn(f"{cut} of {total} {what} do not fit the {room} tokens the model's context leaves them: every "
                      "mode sees their last tokens that fit (truncate mode 1/r of those)", stacklevel=3)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _chunks(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def score(model, requests: list[tuple[list[int], list[int]]], mode: str, *, ratio: float = 1.0, exact_tail: int = 1,
          batch_size: int = 8, progress: tqdm | None = None) -> Iterator[list[tuple[int, dict]]]:
    """Log-likelihood of each continuation after its context. Yields, per batch, [(request index,
    {"ll": sum log p, "greedy": every token argmax, "n": tokens})].

    The context goes through `mode` (predicted: auxiliary + predictor for all but its last `exact_tail` tokens);
    the base (the auxiliary in aux mode) runs the rest of the context and scores the continuation: prefill of
    context + continuation but its last token, with exact_tail = len(continuation) - 1 + exact_tail. Contexts too
    long for the window lose their first tokens, as in lm-eval's hf model. Requests are grouped by continuation
    length, since one batch has one exact_tail, and sorted by length to pad little.
    """
    limit, tail = model.context_length, exact_tail if model_mode(mode) == "predicted" else 1
    _warn_cut(sum(len(ctx) + len(cont) > limit + 1 for ctx, cont in requests), len(requests), limit, "contexts")
    order = sorted(range(len(requests)), key=lambda i: (len(requests[i][1]), len(requests[i][0])))
    groups: dict[int, list[int]] = {}
    for i in order:
        cont = requests[i][1]
        if not cont:
            raise KVPredError(f"request {i} has an empty continuation; nothing to score")
        if len(cont) > limit:
            raise KVPredError(f"continuation of {len(cont)} tokens does not fit the context of {limit}")
        groups.setdefault(len(cont), []).append(i)
    for width, members in groups.items():
        for chunk in _chunks(members, batch_size):
            rows, targets = [], []
            for i in chunk:
                ctx, cont = requests[i]
                ctx = mode_prompt(ctx[-(limit + 1 - width):], mode, ratio)  # fit the window from the left first
                if not ctx:
                    raise KVPredError(f"request {i} has an empty context; give at least one token")
                rows.append(ctx + cont[:-1])
                targets.append(cont)
            ids, mask = left_pad(rows, model.tokenizer.pad_token_id, model.device)
            logits, _ = model.prefill(ids, mask, mode=model_mode(mode), exact_tail=width - 1 + tail)
            logp = logits[:, -width:].float().log_softmax(-1)  # [B, width, V]: position t predicts t+1
            target = torch.tensor(targets, device=logp.device)  # [B, width]
            ll = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)
            greedy = (logp.argmax(-1) == target).all(-1)
            yield [(i, {"ll": float(ll[j]), "greedy": bool(greedy[j]), "n": width}) for j, i in enumerate(chunk)]
            if progress is not None:
                progress.update(len(chunk))


def generate(model, prompts: list[list[int]], mode: str, *, ratio: float = 1.0, exact_tail: int = 1,
             batch_size: int = 8,
             max_new_tokens: int = 32, stop: list[str] | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             progress: tqdm | None = None, **generate_kwargs) -> Iterator[list[tuple[int, list[int]]]]:
    """Batched left-padded generation in `mode` (predicted: the base runs the last `exact_tail` prompt tokens).
    Yields per batch [(prompt index, new tokens)], each cut after the first end-of-sequence token (padding after
    it dropped). `generate_kwargs` go to KVPredictionModel.generate."""
    eos = model.base.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos if eos is not None else model.tokenizer.eos_token_id])
    room = model.context_length - max_new_tokens
    if room < 1:
        raise KVPredError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of "
                          f"{model.context_length}")
    _warn_cut(sum(len(p) > room for p in prompts), len(prompts), room, "prompts")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for chunk in _chunks(order, batch_size):
        rows = [mode_prompt(prompts[i][-room:], mode, ratio) for i in chunk]
        ids, mask = left_pad(rows, model.tokenizer.pad_token_id, model.device)
        if seed is not None:
            torch.manual_seed(seed + chunk[0])
        out = model.generate(ids, mask, mode=model_mode(mode), max_new_tokens=max_new_tokens, do_sample=do_sample,
                             exact_tail=exact_tail,  # model.generate reads it in predicted mode only
                             temperature=temperature, top_p=top_p, stop_strings=stop, **generate_kwargs)
        new = out[:, ids.shape[1]:].tolist()
        results = []
        for i, tokens in zip(chunk, new):
            end = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
            results.append((i, tokens[:end]))
        yield results
        if progress is not None:
            progress.update(len(chunk))


# ------------------------------------------------------------------ task kinds
@dataclass
class RunContext:
    model: object
    options: EvalOptions
    task: TaskSpec
    exact: dict[str, dict] | None = None  # exact-mode unit results, for tasks that compare against them
    progress: tqdm | None = None


class Kind:
    """One task format. Subclasses define how items are built, split into units, run and scored."""
    metrics_higher_is_better: dict[str, bool] = {}
    binary_metrics: frozenset[str] = frozenset()  # metrics that are 0 or 1 per item (always, or where all are)
    primary: str = ""
    option_fields: tuple[str, ...] = ()  # EvalOptions fields that change this kind's unit results

    def modes(self, requested: list[str]) -> list[str]:
        return list(requested)

    def exact_tail(self, model, opts: EvalOptions) -> int:
        """Prompt tokens the base runs itself in predicted mode."""
        return opts.exact_tail

    def build(self, model, spec: TaskSpec, opts: EvalOptions, limit: int | None) -> list[dict]:
        raise NotImplementedError

    def units(self, items: list[dict]) -> list[Unit]:
        raise NotImplementedError

    def run(self, ctx: RunContext, mode: str, units: list[Unit]) -> Iterator[list[tuple[str, dict]]]:
        raise NotImplementedError

    def metrics(self, items: list[dict], results: dict[str, dict],
                exact: dict[str, dict] | None) -> dict[str, list[float]]:
        """Per-item values of each metric, in item order."""
        raise NotImplementedError

    def extra(self, items: list[dict], results: dict[str, dict], mode: str) -> dict:
        """Anything beyond per-item means worth reporting (per-layer errors, per-length accuracy)."""
        return {}


class ScoringKind(Kind):
    """Kinds whose units are (context, continuation) pairs scored by log-likelihood."""

    def run(self, ctx, mode, units):
        requests = [(p["ctx"], p["cont"]) for _, p in units]
        for batch in score(ctx.model, requests, mode, ratio=ctx.options.ratio, exact_tail=ctx.options.exact_tail,
                           batch_size=ctx.options.batch_size, progress=ctx.progress):
            yield [(units[i][0], result) for i, result in batch]


class GenerationKind(Kind):
    """Kinds whose units are prompts answered by greedy generation; a unit's result is the text, cut at `stop`."""
    stop: list[str] = []

    def new_tokens(self, opts: EvalOptions) -> int:
        raise NotImplementedError

    def units(self, items):
        return [(str(i), {"prompt": item["prompt"]}) for i, item in enumerate(items)]

    def run(self, ctx, mode, units):
        opts = ctx.options
        for batch in generate(ctx.model, [p["prompt"] for _, p in units], mode, ratio=opts.ratio,
                              exact_tail=opts.exact_tail, batch_size=opts.batch_size,
                              max_new_tokens=self.new_tokens(opts), stop=self.stop or None, progress=ctx.progress):
            texts = [ctx.model.tokenizer.decode(t, skip_special_tokens=True) for _, t in batch]
            yield [(units[i][0], {"text": cut_at_stop(text, self.stop).strip()}) for (i, _), text in
                   zip(batch, texts)]


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize context + continuation together and split, so the boundary tokenizes naturally (as lm-eval)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:  # keep word-boundary spaces with the continuation
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation).input_ids
    ctx = tokenizer(context).input_ids
    if whole[:len(ctx)] != ctx or len(whole) == len(ctx):
        return ctx, tokenizer(continuation, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


class LanguageModelling(ScoringKind):
    """LAMBADA-style: the continuation (last word) must come out greedily, every token argmax-correct."""
    metrics_higher_is_better = {"acc": True, "nll": False}
    binary_metrics = frozenset({"acc"})
    primary = "acc"

    def build(self, model, spec, opts, limit):
        rows = load_rows(spec.path, ("context", "continuation"))[:limit]
        items = []
        for n, row in enumerate(rows, 1):
            context, word = str(row["context"]), str(row["continuation"]).lstrip()
            if not word:
                raise KVPredError(f"{spec.path}, row {n}: the continuation is empty")
            # the word follows a space, or the context's own trailing whitespace (a newline, say)
            sep = "" if context[-1:].isspace() or not context else " "
            ctx, cont = _encode_pair(model.tokenizer, context, sep + word)
            items.append({"ctx": ctx, "cont": cont})
        return items

    def units(self, items):
        return [(str(i), item) for i, item in enumerate(items)]

    def metrics(self, items, results, exact):
        rs = [results[str(i)] for i in range(len(items))]
        return {"acc": [float(r["greedy"]) for r in rs], "nll": [-r["ll"] / r["n"] for r in rs]}


class MultipleChoice(ScoringKind):
    """ARC/PIQA-style: each choice scored after the context; acc by summed log-likelihood, acc_norm by
    log-likelihood per character of the choice's text (lm-eval's acc_norm: the space before it not counted)."""
    metrics_higher_is_better = {"acc": True, "acc_norm": True}
    binary_metrics = frozenset({"acc", "acc_norm"})
    primary = "acc"
    option_fields = ("fewshot", "seed")

    def build(self, model, spec, opts, limit):
        rows = load_rows(spec.path, ("query", "choices", "gold"))
        golds = [_mc_gold(row, f"{spec.path}, row {i + 1}") for i, row in enumerate(rows)]
        shots = 0 if opts.fewshot is None else opts.fewshot
        items = []
        for idx, row in enumerate(rows[:limit]):
            prefix = "".join(f"{_mc_context(rows[j])} {rows[j]['choices'][golds[j]]}\n\n"
                             for j in _shots(len(rows), idx, shots, opts.seed))
            context = prefix + _mc_context(row)
            pairs = [_encode_pair(model.tokenizer, context, " " + str(c)) for c in row["choices"]]
            items.append({"ctx": pairs[0][0], "conts": [p[1] for p in pairs], "gold": golds[idx],
                          "chars": [len(str(c)) or 1 for c in row["choices"]]})
        return items

    def units(self, items):
        return [(f"{i}.{c}", {"ctx": item["ctx"], "cont": cont})
                for i, item in enumerate(items) for c, cont in enumerate(item["conts"])]

    def metrics(self, items, results, exact):
        acc, acc_norm = [], []
        for i, item in enumerate(items):
            lls = [results[f"{i}.{c}"]["ll"] for c in range(len(item["conts"]))]
            acc.append(float(_argmax(lls) == item["gold"]))
            acc_norm.append(float(_argmax([ll / n for ll, n in zip(lls, item["chars"])]) == item["gold"]))
        return {"acc": acc, "acc_norm": acc_norm}


def _mc_gold(row: dict, where: str) -> int:
    """The row's right choice, as an index into its list of two or more choices, none of them empty (an empty one
    would be scored as a lone space, and one choice is always right)."""
    choices, gold = row.get("choices"), row.get("gold")
    if not isinstance(choices, list) or len(choices) < 2 or not all(str(c).strip() for c in choices):
        raise KVPredError(f"{where}: 'choices' must be a list of two or more non-empty choices, got {choices!r}")
    if isinstance(gold, bool) or not (isinstance(gold, int) or (isinstance(gold, str) and gold.isdigit())):
        raise KVPredError(f"{where}: 'gold' must be the index of the right choice, got {gold!r}")
    if not 0 <= int(gold) < len(choices):
        raise KVPredError(f"{where}: 'gold' {gold} is not an index into its {len(choices)} choices")
    return int(gold)


def _mc_context(row: dict) -> str:
    return str(row["query"]).rstrip() + "\nAnswer:"


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _shots(n_rows: int, idx: int, k: int, seed: int) -> list[int]:
    """k few-shot example rows for item idx: drawn from the other rows of the same file, seeded per item."""
    if k <= 0:
        return []
    rng = random.Random(seed * 1_000_003 + idx)
    others = [j for j in rng.sample(range(n_rows), min(n_rows, k + 1)) if j != idx]
    return others[:k]


class HeldOut(ScoringKind):
    """Next-token loss of a continuation after a (predicted) context: text windows of context + continuation."""
    metrics_higher_is_better = {"nll": False}
    primary = "nll"
    option_fields = ("heldout_context", "heldout_continuation")

    def build(self, model, spec, opts, limit):
        n = opts.heldout_context + opts.heldout_continuation
        return [{"ctx": w[:opts.heldout_context], "cont": w[opts.heldout_context:]}
                for w in text_windows(model.tokenizer, spec.path, n, limit)]

    def units(self, items):
        return [(str(i), item) for i, item in enumerate(items)]

    def metrics(self, items, results, exact):
        return {"nll": [-results[str(i)]["ll"] / results[str(i)]["n"] for i in range(len(items))]}


class QuestionAnswering(GenerationKind):
    """TriviaQA-style: k-shot greedy generation until "\\n", "." or ","; normalised exact match against any alias."""
    metrics_higher_is_better = {"em": True}
    binary_metrics = frozenset({"em"})
    primary = "em"
    option_fields = ("fewshot", "seed", "qa_max_new_tokens")
    stop = ["\n", ".", ","]

    def build(self, model, spec, opts, limit):
        rows = load_rows(spec.path, one_of=("question", "context"))
        shots = 1 if opts.fewshot is None else opts.fewshot
        items = []
        where = lambda j: f"{spec.path}, row {j + 1}"  # noqa: E731
        for idx, row in enumerate(rows[:limit]):
            prefix = "".join(f"{_qa_prompt(rows[j])} {_qa_targets(rows[j], where(j))[0]}\n"
                             for j in _shots(len(rows), idx, shots, opts.seed))
            items.append({"prompt": model.tokenizer(prefix + _qa_prompt(row)).input_ids,
                          "targets": _qa_targets(row, where(idx))})
        return items

    def new_tokens(self, opts):
        return opts.qa_max_new_tokens

    def metrics(self, items, results, exact):
        return {"em": [float(exact_match(results[str(i)]["text"], item["targets"])) for i, item in enumerate(items)]}


def _qa_prompt(row: dict) -> str:
    return row["context"] if "context" in row else f"Question: {row['question']}\nAnswer:"


def _qa_targets(row: dict, where: str) -> list[str]:
    """The row's accepted answers: `answer`, `answers` and `aliases`, each a string or a list of them (a SQuAD-style
    {"text": [...]} too); numbers as text. Answers that normalise to nothing ("the", ".") would match an empty
    generation, so they are left out."""
    targets = []
    for key in ("answer", "answers", "aliases"):
        value = row.get(key)
        value = value.get("text") if isinstance(value, dict) else value
        for answer in value if isinstance(value, list) else [] if value is None else [value]:
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
                raise KVPredError(f"{where}: {key!r} must hold strings, got {answer!r}")
            targets.append(str(answer))
    targets = [t for t in targets if normalize_answer(t)]
    if not targets:
        raise KVPredError(f"{where} has no answer (answer, answers or aliases that are not empty or only "
                          f"articles and punctuation): {str(row)[:200]}")
    return targets


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower-case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, targets: list[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(t) for t in targets)


class Agreement(Kind):
    """How closely a mode reproduces the exact base's greedy output on held-out text prompts.

    * first_token: the first generated token equals the exact base's (top-1 agreement of the prefill).
    * prefix: length of the common prefix of the two `agreement_tokens`-token greedy outputs, as a fraction of
      `agreement_tokens` (positions matching until the first divergence).
    * per_position: fraction of the `agreement_tokens` positions holding the same token (after a divergence
      the two continue from different prefixes, so this counts chance re-alignments too).
    An output that ends early (end of sequence) counts as no token at the missing positions: two outputs that
    end at the same place match there.
    """
    metrics_higher_is_better = {"first_token": True, "prefix": True, "per_position": True}
    binary_metrics = frozenset({"first_token"})
    primary = "first_token"
    option_fields = ("agreement_prompt", "agreement_tokens")

    def modes(self, requested):
        return ["exact"] + [m for m in requested if m != "exact"]

    def build(self, model, spec, opts, limit):
        return [{"prompt": w, "compare": opts.agreement_tokens}
                for w in text_windows(model.tokenizer, spec.path, opts.agreement_prompt, limit)]

    def units(self, items):
        return [(str(i), item) for i, item in enumerate(items)]

    def run(self, ctx, mode, units):
        opts = ctx.options
        for batch in generate(ctx.model, [p["prompt"] for _, p in units], mode, ratio=opts.ratio,
                              exact_tail=self.exact_tail(ctx.model, opts), batch_size=opts.batch_size,
                              max_new_tokens=opts.agreement_tokens, progress=ctx.progress):
            yield [(units[i][0], {"tokens": tokens}) for i, tokens in batch]

    def metrics(self, items, results, exact):
        first, prefix, per_position = [], [], []
        for i, item in enumerate(items):
            mine, ref, n = results[str(i)]["tokens"], exact[str(i)]["tokens"], item["compare"]
            a, b = mine + [-1] * (n - len(mine)), ref + [-1] * (n - len(ref))  # -1: no token (ended)
            same = [x == y for x, y in zip(a, b)]
            common = next((k for k, s in enumerate(same) if not s), n)
            first.append(float(same[0]))
            prefix.append(common / n)
            per_position.append(sum(same) / n)
        return {"first_token": first, "prefix": prefix, "per_position": per_position}


class ChatAgreement(Agreement):
    """Agreement (first token, prefix, per position) on chat prompts: .jsonl lines of "messages" (OpenAI-style; the
    turns up to the last user message) or of "text" rendered in the model's chat template, each prompt ending with
    the template's reply opening. Predicted mode's exact tail is at least the model's chat tail, as for chat requests
    (`KVPredictionModel.chat_tail`)."""
    option_fields = ("agreement_tokens",)

    def build(self, model, spec, opts, limit):
        files = [Path(f) for f in _expand(spec.path)]
        if not files:
            raise KVPredError(f"data file {spec.path!r} does not exist")
        return [{"prompt": model.tokenizer(p, add_special_tokens=False).input_ids, "compare": opts.agreement_tokens}
                for p in chat_prompts(files, model.tokenizer, limit)]

    def exact_tail(self, model, opts):
        return max(opts.exact_tail, model.chat_tail)


class Retrieval(GenerationKind):
    """Long-range recall: a 5-digit pass key stated early (5-20% into wikitext filler, and before the last ceil(N/r)
    tokens of the N-token prompt, which truncation keeps, so truncation does not see it; a warning where N is too
    short for that), asked for at the end; correct when the first number generated is the key."""
    metrics_higher_is_better = {"acc": True}
    binary_metrics = frozenset({"acc"})
    primary = "acc"
    option_fields = ("retrieval_lengths", "retrieval_items", "seed")
    header = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
    question = "\n\nWhat is the pass key? The pass key is"
    max_new_tokens = 10

    def build(self, model, spec, opts, limit):
        tok = model.tokenizer
        lengths = [n for n in opts.retrieval_lengths if n + self.max_new_tokens <= model.context_length]
        if not lengths:
            raise KVPredError(f"retrieval lengths {opts.retrieval_lengths} all exceed the model's context of "
                              f"{model.context_length} tokens; pass --retrieval-lengths")
        filler = _text_tokens(tok, spec.path)
        head, question = tok(self.header).input_ids, tok(self.question, add_special_tokens=False).input_ids
        count = opts.retrieval_items if limit is None else limit
        items, short = [], set()
        for i in range(count):
            rng = random.Random(opts.seed * 7919 + i)
            length, key = lengths[i % len(lengths)], str(rng.randint(10000, 99999))
            needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                         add_special_tokens=False).input_ids
            n_fill = length - len(head) - len(needle) - len(question)
            if n_fill < 10:
                raise KVPredError(f"retrieval length {length} is too short for the pass-key prompt")
            if len(filler) < n_fill:
                raise KVPredError(f"retrieval filler {spec.path} holds {len(filler)} tokens, fewer than the {n_fill} "
                                  f"a {length}-token prompt needs")
            start = rng.randrange(0, len(filler) - n_fill + 1)
            fill = list(filler[start:start + n_fill])
            latest = length - math.ceil(length / opts.ratio) - len(head) - len(needle)  # ends before truncate's part
            if latest < 0 and length not in short:
                short.add(length)
                warnings.warn(f"a {length}-token pass-key prompt cannot state the key before its last 1/"
                              f"{opts.ratio:.2f}, so truncate mode sees it: give longer --retrieval-lengths to "
                              "compare with truncation", stacklevel=2)
            at = max(0, min(int(n_fill * rng.uniform(0.05, 0.2)), latest))
            items.append({"prompt": head + fill[:at] + needle + fill[at:] + question, "key": key, "length": length,
                          "depth": (len(head) + at) / length})
        return items

    def new_tokens(self, opts):
        return self.max_new_tokens

    def metrics(self, items, results, exact):
        acc = []
        for i, item in enumerate(items):
            found = re.search(r"\d+", results[str(i)]["text"])
            acc.append(float(found is not None and found.group() == item["key"]))
        return {"acc": acc}

    def extra(self, items, results, mode):
        by_length: dict[int, list[float]] = {}
        for item, value in zip(items, self.metrics(items, results, None)["acc"]):
            by_length.setdefault(item["length"], []).append(value)
        return {"acc_by_length": {str(k): sum(v) / len(v) for k, v in sorted(by_length.items())}}


class KVError(Kind):
    """Per-layer error of the predicted base cache against the true one on held-out text windows.

    Keys are compared un-rotated (before RoPE, the space the predictor works in and the paper's L1 loss
    uses); relative L2 is the same rotated or not. Per layer: relative L1 = sum|pred - true| / sum|true|,
    relative L2 = ||pred - true|| / ||true||, cosine error = 1 - mean over (head, position) of the cosine
    similarity of the head_dim vectors. Only predicted mode exists for this task.
    """
    metrics_higher_is_better = {"key_rel_l1": False, "value_rel_l1": False, "key_cos_err": False,
                                "value_cos_err": False, "key_rel_l2": False, "value_rel_l2": False}
    primary = "value_rel_l1"
    option_fields = ("kv_length",)

    def modes(self, requested):
        return ["predicted"]

    def build(self, model, spec, opts, limit):
        if opts.kv_length < 2:
            raise KVPredError("--kv-length must be at least 2 (one predicted position + the last token)")
        # a sliding-window base's cache keeps window - 1 columns, and kv_errors compares them all
        length = min(opts.kv_length, model.context_length, (model.base_window or opts.kv_length + 1) - 1)
        if length < opts.kv_length:
            warnings.warn(f"kv windows of {opts.kv_length} tokens do not fit the model's context or sliding "
                          f"attention window: {length} tokens each instead (--kv-length)", stacklevel=2)
        return [{"ids": w} for w in text_windows(model.tokenizer, spec.path, length, limit)]

    def units(self, items):
        return [(str(i), item) for i, item in enumerate(items)]

    def run(self, ctx, mode, units):
        for chunk in _chunks(list(range(len(units))), ctx.options.batch_size):
            errors = kv_errors(ctx.model, [units[i][1]["ids"] for i in chunk])
            yield [(units[i][0], err) for i, err in zip(chunk, errors)]
            if ctx.progress is not None:
                ctx.progress.update(len(chunk))

    def metrics(self, items, results, exact):
        rs = [results[str(i)] for i in range(len(items))]
        return {name: [sum(r[name]) / len(r[name]) for r in rs] for name in self.metrics_higher_is_better}

    def extra(self, items, results, mode):
        rs = [results[str(i)] for i in range(len(items))]
        layers = len(rs[0]["key_rel_l1"])
        return {"per_layer": {name: [sum(r[name][layer] for r in rs) / len(rs) for layer in range(layers)]
                              for name in self.metrics_higher_is_better}}


@torch.no_grad()
def kv_errors(model, windows: list[list[int]]) -> list[dict[str, list[float]]]:
    """Per window, per base layer: relative L1 / L2 and cosine error of predicted vs exact keys and values."""
    ids = torch.tensor(windows, device=model.device)  # [B, N], equal lengths: no padding
    if model.base_window is not None and ids.shape[1] >= model.base_window:
        raise KVPredError(f"the kv task compares every cached column, and the base's sliding attention window of "
                          f"{model.base_window} tokens leaves its cache {model.base_window - 1}: use windows "
                          f"shorter than {model.base_window} tokens")
    mask = torch.ones_like(ids)
    n = ids.shape[1] - 1  # positions the predictor fills
    predicted = model.predicted_cache(ids, mask, exact_tail=1)
    _, exact = model.prefill(ids, mask, mode="exact")
    runs = rope_runs(model.base, position_ids_from_mask(mask), torch.float32, n)
    # position-free keys [L, B, H, n, D] (SmolLM3's NoPE layers as cached)
    cached = ([layer.keys for layer in predicted.layers], [layer.keys[:, :, :n] for layer in exact.layers])
    pred_keys, true_keys = (unrotate_layers(torch.stack(k).float(), runs, model.base_rotated, model.base_adjacent)
                            for k in cached)
    out: dict[str, list[list[float]]] = {k: [] for k in KVError.metrics_higher_is_better}
    for i, (pred_layer, true_layer) in enumerate(zip(predicted.layers, exact.layers)):
        pairs = {"key": (pred_keys[i], true_keys[i]),
                 "value": (pred_layer.values.float(), true_layer.values[:, :, :n].float())}
        for name, (pred, true) in pairs.items():
            diff = pred - true
            out[f"{name}_rel_l1"].append((diff.abs().sum((1, 2, 3)) / true.abs().sum((1, 2, 3))).tolist())
            out[f"{name}_rel_l2"].append((diff.flatten(1).norm(dim=1) / true.flatten(1).norm(dim=1)).tolist())
            cosine = F.cosine_similarity(pred, true, dim=-1, eps=1e-12).mean((1, 2))  # [B]
            out[f"{name}_cos_err"].append((1 - cosine).tolist())
    return [{k: [layer[b] for layer in v] for k, v in out.items()} for b in range(len(windows))]


# ------------------------------------------------------------------ HumanEval
class HumanEval(Kind):
    """Code completion: each problem's prompt completed (greedy for n = 1, else n samples), cut at the usual
    stop sequences, then run against the problem's tests in a sandboxed subprocess. pass@k with the unbiased
    estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    stop = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
    primary = "pass@1"
    option_fields = ("humaneval_samples", "humaneval_temperature", "humaneval_top_p", "humaneval_max_new_tokens",
                     "humaneval_timeout", "seed")

    binary_metrics = frozenset({"pass@1", "pass@10", "pass@100"})  # 0 or 1 per problem for greedy pass@1, pass@n

    @property
    def metrics_higher_is_better(self):  # type: ignore[override]
        return {f"pass@{k}": True for k in (1, 10, 100)}

    def build(self, model, spec, opts, limit):
        rows = load_rows(spec.path, ("task_id", "prompt", "test", "entry_point"))[:limit]
        return [{"prompt": model.tokenizer(row["prompt"]).input_ids, "problem": row} for row in rows]

    def units(self, items):
        return [(str(i), item) for i, item in enumerate(items)]

    def run(self, ctx, mode, units):
        opts = ctx.options
        n = opts.humaneval_samples
        prompts = [p["prompt"] for _, p in units for _ in range(n)]  # n copies of each prompt, adjacent
        # whole problems per batch, so results complete per batch; sampled, one problem per batch, seeded by its own
        # index, so that its samples depend neither on --batch-size nor on which problems a resumed run has left
        per_batch = n if n > 1 else opts.batch_size
        for start in range(0, len(prompts), per_batch):
            texts = [""] * (min(per_batch, len(prompts) - start))
            for batch in generate(ctx.model, prompts[start:start + per_batch], mode, ratio=opts.ratio,
                                  exact_tail=opts.exact_tail, batch_size=per_batch,
                                  max_new_tokens=opts.humaneval_max_new_tokens, stop=self.stop, do_sample=n > 1,
                                  temperature=opts.humaneval_temperature, top_p=opts.humaneval_top_p,
                                  seed=opts.seed + int(units[start // n][0]) if n > 1 else None):
                for i, tokens in batch:
                    texts[i] = cut_at_stop(ctx.model.tokenizer.decode(tokens, skip_special_tokens=True), self.stop)
            problems = [units[(start + j) // n][1]["problem"] for j in range(len(texts))]
            programs = [humaneval_program(p, t) for p, t in zip(problems, texts)]
            with ThreadPoolExecutor(max_workers=opts.humaneval_workers) as pool:
                outcomes = list(pool.map(lambda prog: execute_program(prog, opts.humaneval_timeout), programs))
            results = []
            for u in range(start // n, start // n + len(texts) // n):
                rows = range(u * n - start, (u + 1) * n - start)
                results.append((units[u][0], {"completions": [texts[j] for j in rows],
                                              "outcomes": [outcomes[j] for j in rows]}))
            yield results
            if ctx.progress is not None:
                ctx.progress.update(len(results))

    def metrics(self, items, results, exact):
        rs = [results[str(i)] for i in range(len(items))]
        n = len(rs[0]["outcomes"]) if rs else 1
        return {f"pass@{k}": [pass_at_k(len(r["outcomes"]), r["outcomes"].count("passed"), k) for r in rs]
                for k in (1, 10, 100) if k <= n}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def humaneval_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


# Runs first inside the child, before any model-written code: resource limits, no sockets and, as in OpenAI's
# human-eval harness, no functions that kill, fork, run commands or delete files, in os and in posix beneath it (a
# guard against careless code, not a security boundary: `_isolation` is that, where available). The program keeps
# the evaluator's user: another may not read the Python installation (under /root with pyenv, say).
_SANDBOX_PRELUDE = '''\
import builtins as _b, os as _o, posix as _p, resource as _r, shutil as _sh, socket as _s, _socket as _ss
import subprocess as _sp
for _lim, _val in ((_r.RLIMIT_AS, 4 << 30), (_r.RLIMIT_FSIZE, 16 << 20), (_r.RLIMIT_CORE, 0)):
    try:
        _r.setrlimit(_lim, (_val, _val))
    except (ValueError, OSError):
        pass
def _disabled(*args, **kwargs):
    raise OSError("disabled in the kvpred evaluation sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _ss.socket = _disabled
for _name in ("kill", "killpg", "system", "fork", "forkpty", "setsid", "remove", "unlink", "rmdir", "removedirs",
              "rename", "renames", "replace", "truncate", "putenv", "chmod", "chown", "setuid", "execv", "execve",
              "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "pidfd_open", "register_at_fork"):
    for _m in (_o, _p):
        if hasattr(_m, _name):
            setattr(_m, _name, _disabled)
_sh.rmtree = _sh.move = _sh.chown = _sp.Popen = _b.exit = _b.quit = _disabled
del _b, _o, _p, _r, _sh, _s, _ss, _sp, _lim, _val, _name, _m
'''
_WORK = "{work}"  # in an `_isolation` command: the program's own folder, the one place it may write


@lru_cache(maxsize=1)
def _isolation() -> tuple[str, ...]:
    """The strongest isolation this machine allows, as a command prefix (`_WORK` stands for the program's folder):
    * bubblewrap (`bwrap`, Debian's bubblewrap): the file system read-only but for that folder, fresh namespaces
      (PID, network, IPC, ...), killed with the evaluator;
    * else `unshare` into fresh PID, mount and network namespaces (as root, or in a user namespace): the program
      cannot see or signal the evaluator, reach a network or leave a process behind; it can still write where the
      evaluator's user may;
    * else a network namespace, else nothing but the prelude (with a warning).
    Each runs under `setpriv --pdeathsig KILL`, so a killed evaluator takes its programs along."""
    bwrap, unshare, setpriv = (shutil.which(name) for name in ("bwrap", "unshare", "setpriv"))
    candidates = []
    if bwrap:
        candidates.append((bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", _WORK, _WORK,
                           "--unshare-all", "--die-with-parent", "--new-session"))
    if unshare:
        isolated = ("--pid", "--kill-child", "--mount-proc", "--net")  # --kill-child: the namespace dies with it
        candidates += [(unshare, *isolated), (unshare, "--user", "--map-root-user", *isolated), (unshare, "--net"),
                       (unshare, "--user", "--map-root-user", "--net")]
    death = (setpriv, "--pdeathsig", "KILL") if setpriv else ()
    with tempfile.TemporaryDirectory(prefix="kvpred-probe-") as work:
        for prefix in candidates:
            try:
                probe = [*death, *(work if part == _WORK else part for part in prefix), sys.executable, "-I", "-S",
                         "-c", f"open({work!r} + '/w', 'w')"]  # runs Python and may write its folder
                if subprocess.run(probe, capture_output=True, timeout=10).returncode == 0:
                    return (*death, *prefix)
            except (OSError, subprocess.SubprocessError):
                pass
    warnings.warn("HumanEval programs run without isolation on this machine (no working bwrap or unshare): only "
                  "Python-level guards stand between generated code and your files; install bubblewrap",
                  stacklevel=2)
    return death


def execute_program(program: str, timeout: float = 10.0) -> str:
    """Run untrusted `program` in a separate isolated Python (-I -S: no environment, no site-packages) in an
    empty temporary folder, isolated as far as the machine allows (`_isolation`), with memory and file-size limits,
    no network, no destructive os functions and a wall-clock limit. Returns "passed" (it ran to its end: a line
    appended to it writes a random token, so exiting early, even with status 0, fails; code written to forge that
    token could, as code written to fake its tests could), "failed" or "timeout". Never executes anything in this
    process."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="kvpred-exec-") as tmp:
        script, done = Path(tmp) / "program.py", Path(tmp) / "done"
        script.write_text(f"{_SANDBOX_PRELUDE}{program}\nopen({str(done)!r}, 'w').write({token!r})\n",
                          encoding="utf-8")
        cmd = [*(tmp if part == _WORK else part for part in _isolation()), sys.executable, "-I", "-S", "-B",
               str(script)]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return "timeout"
        _kill_group(proc)  # reap anything the program left running in its session
        finished = done.is_file() and done.read_text() == token
        return "passed" if code == 0 and finished else "failed"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


KINDS: dict[str, Kind] = {
    "kv": KVError(), "heldout": HeldOut(), "agreement": Agreement(), "lm": LanguageModelling(),
    "mc": MultipleChoice(), "qa": QuestionAnswering(), "humaneval": HumanEval(), "retrieval": Retrieval(),
    "chat": ChatAgreement(),
}
