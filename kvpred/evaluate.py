"""`kvpred eval`: quality of KV prediction against the exact base, the auxiliary alone and truncation.

Every task runs every requested mode on the same items and reports each metric with a 95% confidence
interval and the *gap recovered* (m - aux) / (exact - aux): 1 means as good as the exact base, 0 no better
than the auxiliary alone. The same formula serves loss-like metrics (lower is better), since numerator and
denominator change sign together. Unit results are cached in FILE.items.jsonl beside the output, so an
interrupted run resumes where it stopped.

    kvpred eval --model smollm2-135m --tasks lambada,arc_easy,heldout,agreement,kv --limit 50 --out r.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .models import KVPredError, fingerprint, temporary_name

RESULTS_VERSION = 1
DEFAULT_MODES = ("exact", "aux", "predicted", "truncate")
Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 2000


# ------------------------------------------------------------------ FLOPs accounting
def flop_ratio(model, prompt_tokens: int = 1024, tail: int = 1) -> dict:
    """TTFT FLOPs reduction of KV prediction over the exact base, by two rules.

    * param_ratio (the paper's rule, METHOD 4, as `kvpred bench` counts it): params(base) / params(aux), each one
      vocab x hidden embedding (an untied LM head not counted again) plus every layer's linear weights. This is the
      r that truncate mode uses.
    * matmul_ratio: FLOPs of an exact prefill of `prompt_tokens` tokens over those of a predicted one, as
      `kvpred bench` counts them where values are not deferred (bench.predicted_flops: the auxiliary layers
      predicted mode runs, the predictor, the base's pass over the last `tail` prompt tokens; attention included).
      On a CPU the bench defers values (kvpred.deferred), which changes their arithmetic, so its "full" ratio there
      differs by a few percent. matmul_ratio_linear is its limit for long prompts without attention (with the
      paper's tail of 1).
    """
    from .bench import Dims, aux_run, exact_flops, param_count, predicted_flops

    n, base, aux, pc = prompt_tokens, model.base.config, model.aux.config, model.predictor.config
    exact, predicted = exact_flops(base, n), predicted_flops(base, aux, pc, n, tail=tail)
    b = Dims.of(base)
    linear = b.linear_params() / (aux_run(aux, pc)[0] + pc.multiply_adds_per_token())
    params_base, params_aux = param_count(base), param_count(aux)
    return {"param_ratio": params_base / params_aux, "params_base": params_base, "params_aux": params_aux,
            "matmul_ratio": exact / predicted, "matmul_ratio_linear": linear,
            "prompt_tokens": n, "exact_tail": tail, "exact_prefill_flops": exact, "predicted_prefill_flops": predicted,
            "predictor_params": sum(p.numel() for p in model.predictor.parameters())}


# ------------------------------------------------------------------ statistics
def confidence_interval(values: list[float], seed: int = 0, binary: bool = False
                        ) -> tuple[float, float | None, float | None]:
    """(mean, lo, hi), 95%: Wilson score interval for a `binary` metric (each value 0 or 1), percentile bootstrap of
    the mean otherwise (unlike a normal approximation, it stays inside the values' range: no negative bound for a
    loss or a share); no bounds (None) for one value of a metric that is not binary."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, None, None
    mean = float(x.mean())
    if binary:
        denom = 1 + Z95 ** 2 / n
        centre = (mean + Z95 ** 2 / (2 * n)) / denom
        half = Z95 * math.sqrt(mean * (1 - mean) / n + Z95 ** 2 / (4 * n * n)) / denom
        # Wilson's interval contains the sample proportion; min/max only absorb rounding at 0 and 1
        return mean, min(mean, max(0.0, centre - half)), max(mean, min(1.0, centre + half))
    if n < 2:
        return mean, None, None
    means = x[np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_SAMPLES, n))].mean(1)
    return mean, min(mean, float(np.percentile(means, 2.5))), max(mean, float(np.percentile(means, 97.5)))


def gap_recovered(value: list[float], exact: list[float], aux: list[float],
                  seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """(m - aux) / (exact - aux) of the means with a paired percentile-bootstrap 95% interval over items
    (the same items in all three modes). None where exact and aux agree, so the gap is undefined."""
    v, e, a = (np.asarray(x, dtype=float) for x in (value, exact, aux))
    if not len(v) == len(e) == len(a) or len(v) == 0:
        return None, None, None
    denom = e.mean() - a.mean()
    if abs(denom) <= 1e-6 * max(abs(e.mean()), abs(a.mean()), 1e-6):  # level within rounding: a ratio would be noise
        return None, None, None
    point = float((v.mean() - a.mean()) / denom)
    if len(v) < 2:  # one item: nothing to resample
        return point, None, None
    idx = np.random.default_rng(seed).integers(0, len(v), size=(BOOTSTRAP_SAMPLES, len(v)))
    d = e[idx].mean(1) - a[idx].mean(1)
    ok = np.abs(d) > 1e-12
    if ok.sum() < BOOTSTRAP_SAMPLES // 2:  # the denominator straddles zero too often to say anything
        return point, None, None
    boot = (v[idx].mean(1)[ok] - a[idx].mean(1)[ok]) / d[ok]
    return point, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def summarise(per_mode: dict[str, dict[str, list[float]]], seed: int = 0,
              binary: frozenset[str] = frozenset()) -> dict[str, dict[str, dict]]:
    """{mode: {metric: values}} -> {metric: {mode: {value, ci, n, gap_recovered, gap_ci}}}; `binary`: the metrics
    that are 0 or 1 per item (Wilson intervals) where every value is (pass@1 is, for greedy HumanEval)."""
    table: dict[str, dict[str, dict]] = {}
    for mode, metrics in per_mode.items():
        for metric, values in metrics.items():
            bernoulli = metric in binary and all(v in (0.0, 1.0) for v in values)
            mean, lo, hi = confidence_interval(values, seed, binary=bernoulli)
            entry = {"value": mean, "ci": [lo, hi], "n": len(values)}
            if "exact" in per_mode and "aux" in per_mode:
                gap, glo, ghi = gap_recovered(values, per_mode["exact"][metric], per_mode["aux"][metric], seed)
                entry.update(gap_recovered=gap, gap_ci=[glo, ghi])
            table.setdefault(metric, {})[mode] = entry
    return table


# ------------------------------------------------------------------ resumable unit cache
class ResultCache:
    """Unit results as JSON lines {sig, task, mode, key, result}; lines with another signature (other model
    or settings) are ignored, so a changed run never reuses stale results."""

    def __init__(self, path: Path | None):
        self.path, self.cut_short = path, False
        self.entries: dict[tuple[str, str, str, str], dict] = {}
        if path is not None and path.is_file():
            if path.stat().st_size:  # a last line cut short by a killed run: the next record starts a new line
                with path.open("rb") as f:
                    f.seek(-1, os.SEEK_END)
                    self.cut_short = f.read(1) != b"\n"
            with path.open(encoding="utf-8", errors="replace") as f:  # a damaged line is skipped, not fatal
                for line in f:
                    try:
                        rec = json.loads(line)
                        if isinstance(rec["result"], dict) and rec["result"]:  # else the unit runs again
                            self.entries[(rec["sig"], rec["task"], rec["mode"], rec["key"])] = rec["result"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by a killed run

    def get(self, sig: str, task: str, mode: str, key: str) -> dict | None:
        return self.entries.get((sig, task, mode, key))

    def put(self, sig: str, task: str, mode: str, results: list[tuple[str, dict]]) -> None:
        lines = []
        for key, result in results:
            self.entries[(sig, task, mode, key)] = result
            lines.append(json.dumps({"sig": sig, "task": task, "mode": mode, "key": key, "result": result}))
        if self.path is not None and lines:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("\n" * self.cut_short + "\n".join(lines) + "\n")
                f.flush()
            self.cut_short = False


def model_signature(model, name: str) -> dict:
    """What identifies the model's outputs: name, base and auxiliary fingerprints, predictor weights, dtype."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.predictor.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    def name_of(dtype: torch.dtype | None) -> str:
        return str(dtype or model.base.dtype).replace("torch.", "")

    return {"model": name, "base": fingerprint(model.base), "aux": fingerprint(model.aux),
            "predictor": h.hexdigest()[:16], "tokenizer": _tokenizer_digest(model.tokenizer),
            "dtype": name_of(None), "device": model.device.type,
            # what the auxiliary's prefill and the predictor compute in (bf16 on a CPU that has it, by default)
            "aux_compute_dtype": name_of(model.aux_compute_dtype),
            "predictor_compute_dtype": name_of(model.predictor_compute_dtype)}


def _tokenizer_digest(tokenizer) -> str:
    """What makes the tokenizer's ids and prompts: its vocabulary and rules, chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _digest([rules, tokenizer.chat_template, tokenizer.special_tokens_map])


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ the evaluation
def evaluate(model, specs, modes: list[str], options, *, limit: int | None = None, cache: ResultCache | None = None,
             model_name: str = "model", progress: bool = True) -> dict:
    """Run every task in every mode (exact first, so agreement can compare against it) and return the results
    document: model signature, flop_ratio, settings, and per task {kind, data, n, primary, higher_is_better,
    metrics: {metric: {mode: {value, ci, n, gap_recovered, gap_ci}}}, extra: {mode: ...}, seconds}."""
    from .tasks import KINDS, MODES, RunContext, data_digest

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise KVPredError(f"unknown modes {bad or modes}; choose from {', '.join(MODES)}")
    cache = cache or ResultCache(None)
    msig = model_signature(model, model_name)
    doc = {"version": RESULTS_VERSION, "model": model_name, "model_signature": msig,
           "flops": flop_ratio(model, tail=options.exact_tail),
           "truncate_ratio": options.ratio, "modes": list(modes), "limit": limit, "options": options.__dict__,
           "tasks": {}}
    for spec in specs:
        kind = KINDS[spec.kind]
        started = time.perf_counter()
        items = kind.build(model, spec, options, limit)
        if not items:
            raise KVPredError(f"task {spec.name}: no items in {spec.path}")
        units = kind.units(items)
        settings = {f: getattr(options, f) for f in kind.option_fields}
        task_modes = kind.modes(modes)
        tail = kind.exact_tail(model, options)  # predicted mode's; chats take the model's chat tail
        results: dict[str, dict[str, dict]] = {}
        data = data_digest(spec.path)
        for mode in task_modes:
            # what makes a unit result: model, task data (its files' contents too) and settings, r for truncate mode,
            # and the exact tail for predicted mode (named only when not the paper's 1)
            key = [msig, spec.kind, spec.path, data, settings, options.ratio if mode == "truncate" else None]
            sig = _digest(key + [tail] if mode == "predicted" and tail != 1 else key)
            pending = [u for u in units if cache.get(sig, spec.name, mode, u[0]) is None]
            if pending:
                bar = tqdm(total=len(pending), desc=f"{spec.name}/{mode}", disable=not progress, file=sys.stderr)
                ctx = RunContext(model, options, spec, results.get("exact"), bar)
                for batch in kind.run(ctx, mode, pending):
                    cache.put(sig, spec.name, mode, batch)
                bar.close()
            results[mode] = {key: cache.get(sig, spec.name, mode, key) for key, _ in units}
        try:
            per_mode = {mode: kind.metrics(items, results[mode], results.get("exact")) for mode in task_modes}
        except (KeyError, TypeError, ValueError) as err:
            if cache.path is None:
                raise
            raise KVPredError(f"task {spec.name}: {cache.path} holds item results this task cannot read "
                              f"({type(err).__name__}: {err}; edited by hand?): rerun with --no-resume") from err
        doc["tasks"][spec.name] = {
            "kind": spec.kind, "data": spec.path, "n": len(items), "primary": kind.primary,
            "higher_is_better": {m: kind.metrics_higher_is_better[m] for m in next(iter(per_mode.values()))},
            "exact_tail": tail,
            "metrics": summarise(per_mode, options.seed, kind.binary_metrics),
            "extra": {mode: e for mode in task_modes if (e := kind.extra(items, results[mode], mode))},
            "seconds": round(time.perf_counter() - started, 2)}
    return doc


# ------------------------------------------------------------------ reports
def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_report(doc: dict) -> str:
    f = doc["flops"]
    lines = [f"# kvpred eval: {doc['model']}", "",
             f"* command: `{doc.get('command', '')}`", *([f"* note: {doc['note']}"] if doc.get("note") else []),
             f"* device {doc['model_signature']['device']}, dtype {doc['model_signature']['dtype']} "
             f"(auxiliary prefill {doc['model_signature'].get('aux_compute_dtype', '?')}, predictor "
             f"{doc['model_signature'].get('predictor_compute_dtype', '?')}), "
             f"limit {doc['limit']}, batch {doc['options']['batch_size']}",
             f"* TTFT FLOPs reduction: params rule {f['param_ratio']:.2f}x "
             f"({f['params_base'] / 1e6:.1f}M / {f['params_aux'] / 1e6:.1f}M), matmul rule "
             f"{f['matmul_ratio']:.2f}x at {f['prompt_tokens']} tokens ({f['matmul_ratio_linear']:.2f}x linear "
             f"layers only); truncate keeps the last 1/{doc['truncate_ratio']:.2f} of each prompt",
             *([f"* predicted mode: the base runs the last {tail} prompt tokens itself (exact tail; the matmul rule "
                "above counts them)"] if (tail := doc["options"].get("exact_tail", 1)) != 1 else []),
             *[f"* {name}: predicted mode's exact tail is {task['exact_tail']} tokens (the model's chat tail)"
               for name, task in doc["tasks"].items()
               if task.get("exact_tail", 1) != doc["options"].get("exact_tail", 1)],
             "* cells: value [95% CI]; gap = (mode - aux) / (exact - aux), 1 = as good as exact, with a paired "
             "bootstrap 95% CI", ""]
    modes = doc["modes"]
    gap_modes = [m for m in modes if m not in ("exact", "aux")]
    head = ["task", "metric", "n"] + modes + [f"gap {m}" for m in gap_modes]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, task in doc["tasks"].items():
        for metric, by_mode in task["metrics"].items():
            arrow = "↑" if task["higher_is_better"][metric] else "↓"
            row = [name, f"{metric} {arrow}", str(task["n"])]
            for m in modes:
                e = by_mode.get(m)
                row.append(f"{_fmt(e['value'])} [{_fmt(e['ci'][0])}, {_fmt(e['ci'][1])}]" if e else "")
            for m in gap_modes:
                e = by_mode.get(m)
                if e is None or "gap_recovered" not in e:
                    row.append("")
                else:
                    row.append(f"{_fmt(e['gap_recovered'], 2)} [{_fmt(e['gap_ci'][0], 2)}, "
                               f"{_fmt(e['gap_ci'][1], 2)}]")
            lines.append("| " + " | ".join(row) + " |")
    for name, task in doc["tasks"].items():
        per_layer = task["extra"].get("predicted", {}).get("per_layer")
        if per_layer:
            lines += ["", f"## {name}: per-layer error of the predicted cache (mean over {task['n']} windows)", "",
                      "| layer | " + " | ".join(per_layer) + " |", "|---|" + "---|" * len(per_layer)]
            for layer in range(len(next(iter(per_layer.values())))):
                lines.append(f"| {layer} | " + " | ".join(_fmt(v[layer]) for v in per_layer.values()) + " |")
        by_length = {m: e["acc_by_length"] for m, e in task["extra"].items() if "acc_by_length" in e}
        if by_length:
            lengths = list(next(iter(by_length.values())))
            lines += ["", f"## {name}: accuracy by prompt length", "", "| mode | " + " | ".join(lengths) + " |",
                      "|---|" + "---|" * len(lengths)]
            lines += [f"| {m} | " + " | ".join(_fmt(acc[n]) for n in lengths) + " |" for m, acc in by_length.items()]
    return "\n".join(lines) + "\n"


def write_report(doc: dict, out: Path) -> Path:
    """Results JSON at `out` and the markdown report beside it (same name, .md); both written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    for path, text in ((out, json.dumps(doc, indent=2)), (md, markdown_report(doc))):
        tmp = temporary_name(path)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return md


# ------------------------------------------------------------------ CLI
def register(subparsers) -> None:
    from .cli import add_model_arguments, command_help
    from .tasks import BUILTIN_TASKS, EvalOptions

    d = EvalOptions()
    p = subparsers.add_parser(
        "eval", help=command_help("eval"),
        description="Run tasks in modes exact / aux / predicted / truncate on the same items; report each metric "
                    "with a 95% CI and the gap recovered (m - aux) / (exact - aux). Built-in tasks: "
                    f"{', '.join(BUILTIN_TASKS)}; or give NAME=PATH / a path to a .txt (held-out loss) or .jsonl "
                    "(multiple choice: query/choices/gold; QA: question/answer(s); LM: context/continuation; "
                    "HumanEval) file. Results are cached per item in OUT.items.jsonl, so a rerun resumes.")
    add_model_arguments(p)
    p.add_argument("--tasks", required=True,
                   help="comma-separated tasks, e.g. lambada,arc_easy,heldout,kv; NAME=PATH runs a built-in task on "
                        "other data, and chat=PATH measures agreement on chat prompts (.jsonl of \"messages\" or "
                        "of rendered chat \"text\")")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated (default: all four)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="items per forward")
    p.add_argument("--out", type=Path, default=Path("eval_results.json"),
                   help="results JSON; FILE.md (report) and FILE.items.jsonl (resume cache) go beside it")
    p.add_argument("--no-resume", action="store_true", help="ignore and overwrite the cached item results")
    p.add_argument("--data-dir", type=Path, default=None, help="where built-in task data lives "
                   "(default: $KVPRED_DATA or shared/data beside the project)")
    p.add_argument("--label", default=None, help="name of this variant in plots (default: the output's stem)")
    p.add_argument("--truncate-ratio", type=float, default=None,
                   help="r for truncate mode (default: the params-rule TTFT FLOPs reduction of the model)")
    p.add_argument("--ttft-speedup", default=None,
                   help="measured TTFT speedups over exact to record for `kvpred plot`, e.g. predicted=1.8,aux=2.2")
    p.add_argument("--exact-tail", type=int, default=d.exact_tail,
                   help="predicted mode: prompt tokens the base runs itself (the paper's 1)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of few-shot draws and sampling")
    p.add_argument("--fewshot", type=int, default=None, help="shots for QA / multiple choice "
                   "(default: triviaqa 1, others 0); drawn from the other rows of the same file")
    p.add_argument("--heldout-context", type=int, default=d.heldout_context,
                   help="heldout: context tokens (predicted in predicted mode)")
    p.add_argument("--heldout-continuation", type=int, default=d.heldout_continuation,
                   help="heldout: continuation tokens whose loss is measured")
    p.add_argument("--kv-length", type=int, default=d.kv_length,
                   help="kv: window tokens; all but the last are compared")
    p.add_argument("--agreement-prompt", type=int, default=d.agreement_prompt, help="agreement: prompt tokens")
    p.add_argument("--agreement-tokens", type=int, default=d.agreement_tokens,
                   help="agreement: greedy tokens compared with the exact base")
    p.add_argument("--qa-max-new-tokens", type=int, default=d.qa_max_new_tokens,
                   help="QA: most tokens per answer")
    p.add_argument("--retrieval-lengths", default=",".join(map(str, d.retrieval_lengths)),
                   help="prompt lengths in tokens for the pass-key task (those over the context are skipped)")
    p.add_argument("--retrieval-items", type=int, default=d.retrieval_items, help="items when no --limit")
    p.add_argument("--humaneval-samples", type=int, default=d.humaneval_samples,
                   help="1: greedy pass@1; n > 1: n samples per problem, pass@k for k in 1,10,100 up to n")
    p.add_argument("--humaneval-temperature", type=float, default=d.humaneval_temperature,
                   help="with --humaneval-samples > 1")
    p.add_argument("--humaneval-top-p", type=float, default=d.humaneval_top_p, help="with --humaneval-samples > 1")
    p.add_argument("--humaneval-max-new-tokens", type=int, default=d.humaneval_max_new_tokens,
                   help="most tokens per program")
    p.add_argument("--humaneval-timeout", type=float, default=d.humaneval_timeout, help="seconds per program")
    p.add_argument("--humaneval-workers", type=int, default=d.humaneval_workers,
                   help="programs run at once, each in its own subprocess")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cli)


def _parse_speedups(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        speedups = {k.strip(): float(v) for k, v in (pair.split("=") for pair in text.split(","))}
        if not all(0 < x < math.inf for x in speedups.values()):
            raise ValueError("a speedup is not a positive number")
        return speedups
    except ValueError as err:
        raise KVPredError(f"--ttft-speedup takes MODE=X pairs of positive numbers, e.g. predicted=1.8,aux=2.2; got "
                          f"{text!r}") from err


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed when run from a shell, else rebuilt from the parsed arguments."""
    if "eval" in sys.argv[1:2]:
        return "kvpred " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    parts = ["kvpred", "eval"]
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        parts += [f"--{key.replace('_', '-')}"] + ([] if value is True else [shlex.quote(str(value))])
    return " ".join(parts)


def check_builtin_data(specs, data_dir: Path) -> None:
    """Built-in tasks read their data from `data_dir`; where it is not there, say how to point at it (before the
    model loads)."""
    from .tasks import BUILTIN_TASKS

    for spec in specs:
        default = BUILTIN_TASKS[spec.name][1] if spec.name in BUILTIN_TASKS else None
        if default and spec.path == str(data_dir / default) and not Path(spec.path).is_file():
            raise KVPredError(f"task {spec.name!r} reads {spec.path}, which does not exist: point --data-dir or the "
                              f"KVPRED_DATA environment variable at the folder that holds {default}, or give the "
                              f"task its own file as {spec.name}=PATH")


def check_out(out: Path) -> None:
    """--out names a .json file, and it and what goes beside it (the .md report, the .items.jsonl cache) are new or
    an earlier run's: a user's own file of that name is never overwritten."""
    if out.suffix != ".json" or out.is_dir():
        raise KVPredError(f"--out {out} must name the results .json file (the report goes beside it, as .md)")
    for path in (out, out.with_suffix(".md"), out.with_suffix(".items.jsonl")):
        if path.exists() and not _earlier_output(path):
            raise KVPredError(f"{path} exists and is not kvpred eval output: give --out another name, so that it "
                              "is not overwritten")


def _earlier_output(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            if path.suffix == ".md":
                return f.read(13) == "# kvpred eval"
            if path.name.endswith(".items.jsonl"):
                first = f.readline()
                return not first.strip() or first.startswith('{"sig": ')  # a line a kill cut short too
            return "tasks" in json.load(f)
    except (ValueError, OSError, TypeError):
        return False


def run_cli(args: argparse.Namespace) -> int:
    from .cli import load_model
    from .tasks import EvalOptions, default_data_dir, parse_tasks

    if args.limit is not None and args.limit < 1:
        raise KVPredError(f"--limit must be at least 1, got {args.limit}")
    check_out(args.out)
    data_dir = args.data_dir or default_data_dir()
    specs = parse_tasks(args.tasks, data_dir)
    check_builtin_data(specs, data_dir)
    modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))  # each once
    speedups = _parse_speedups(args.ttft_speedup)
    try:
        lengths = [int(x) for x in args.retrieval_lengths.split(",")]
    except ValueError as err:
        raise KVPredError(f"--retrieval-lengths takes integers, got {args.retrieval_lengths!r}") from err
    if args.truncate_ratio is not None and not args.truncate_ratio >= 1:
        raise KVPredError(f"--truncate-ratio must be >= 1, got {args.truncate_ratio}")
    options = EvalOptions(  # checked here, before the model loads
        batch_size=args.batch_size, ratio=args.truncate_ratio or 1.0, exact_tail=args.exact_tail, seed=args.seed,
        fewshot=args.fewshot, heldout_context=args.heldout_context, heldout_continuation=args.heldout_continuation,
        kv_length=args.kv_length, agreement_prompt=args.agreement_prompt, agreement_tokens=args.agreement_tokens,
        qa_max_new_tokens=args.qa_max_new_tokens, retrieval_lengths=lengths, retrieval_items=args.retrieval_items,
        humaneval_samples=args.humaneval_samples, humaneval_temperature=args.humaneval_temperature,
        humaneval_top_p=args.humaneval_top_p, humaneval_max_new_tokens=args.humaneval_max_new_tokens,
        humaneval_timeout=args.humaneval_timeout, humaneval_workers=args.humaneval_workers)
    model = load_model(args)
    options.ratio = args.truncate_ratio or flop_ratio(model)["param_ratio"]
    cache_path = args.out.with_suffix(".items.jsonl")
    if args.no_resume:
        cache_path.unlink(missing_ok=True)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        doc = evaluate(model, specs, modes, options, limit=args.limit, cache=ResultCache(cache_path),
                       model_name=args.model, progress=not args.quiet)
    doc["label"] = args.label or args.out.stem
    doc["command"] = _command_line(args)
    if speedups:
        doc["ttft_speedup"] = speedups
    md = write_report(doc, args.out)
    print(markdown_report(doc))
    print(f"wrote {args.out} and {md}", file=sys.stderr)
    return 0
