"""`kvpred eval` / `kvpred plot` / the lm-eval model, as specifications, on tiny random models and fixtures."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvpred import cli
from kvpred.bench import flop_ratio_full
from kvpred.evaluate import (ResultCache, confidence_interval, evaluate, flop_ratio, gap_recovered,
                             markdown_report, write_report)
from kvpred.model import KVPredictionModel
from kvpred.models import KVPredError
from kvpred.tasks import (KINDS, EvalOptions, Retrieval, default_data_dir, exact_match, execute_program, mode_prompt,
                          normalize_answer, parse_tasks, pass_at_k)
from kvpred.testing import CHAT_TEMPLATE, byte_tokenizer, save_tiny_model

DATA = Path(__file__).parent / "data"
TASKS = (f"kv={DATA}/tiny.txt,heldout={DATA}/tiny.txt,agreement={DATA}/tiny.txt,lambada={DATA}/lm.jsonl,"
         f"arc_easy={DATA}/mc.jsonl,triviaqa={DATA}/qa.jsonl,humaneval={DATA}/humaneval.jsonl,"
         f"retrieval={DATA}/tiny.txt")
MODES = ["exact", "aux", "predicted", "truncate"]


def small_options(model, **overrides) -> EvalOptions:
    opts = dict(batch_size=4, ratio=flop_ratio(model)["param_ratio"], kv_length=48, heldout_context=40,
                heldout_continuation=12, agreement_prompt=24, agreement_tokens=6, qa_max_new_tokens=6,
                retrieval_lengths=[384], humaneval_max_new_tokens=8, humaneval_timeout=5.0)
    opts.update(overrides)
    return EvalOptions(**opts)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="module")
def pruned(tiny_path) -> KVPredictionModel:
    return KVPredictionModel.from_pretrained(str(tiny_path), keep_ratio=0.5)


@pytest.fixture(scope="module")
def identity(tiny_path) -> KVPredictionModel:
    """aux == base (keep_ratio 1.0) with an identity predictor: predicted mode must equal exact."""
    return KVPredictionModel.from_pretrained(str(tiny_path), keep_ratio=1.0)


@pytest.fixture(scope="module")
def pruned_doc(pruned) -> dict:
    return evaluate(pruned, parse_tasks(TASKS, DATA), MODES, small_options(pruned), limit=3, progress=False)


@pytest.fixture(scope="module")
def identity_doc(identity) -> dict:
    return evaluate(identity, parse_tasks(TASKS, DATA), MODES, small_options(identity), limit=3, progress=False)


# ------------------------------------------------------------------ FLOPs and statistics
def test_flop_ratio_counts_one_embedding_and_the_layers_linear_weights_and_reports_both_rules(pruned, identity):
    base = pruned.base
    linear = sum(p.numel() for name, p in base.model.layers.named_parameters() if "norm" not in name)
    f = flop_ratio(pruned)
    assert f["params_base"] == base.model.embed_tokens.weight.numel() + linear  # METHOD 4, as the bench counts
    dropped = sum(p.numel() for i in (1, 3)
                  for name, p in base.model.layers[i].named_parameters() if "norm" not in name)
    assert f["params_base"] - f["params_aux"] == dropped
    assert f["param_ratio"] == pytest.approx(f["params_base"] / f["params_aux"])
    # the matmul rule is the benchmark's count of what predicted mode runs
    assert f["matmul_ratio"] == pytest.approx(flop_ratio_full(base.config, pruned.aux.config,
                                                              pruned.predictor.config, f["prompt_tokens"]))
    assert f["matmul_ratio_linear"] > f["param_ratio"]  # the aux's last layer runs only its Q/K/V projections
    same = flop_ratio(identity)
    assert same["param_ratio"] == 1.0
    assert 1 < same["matmul_ratio"] < 1.5 < f["matmul_ratio"]  # aux == base saves only its last layer's tail


def test_confidence_intervals_contain_the_mean():
    mean, lo, hi = confidence_interval([1, 0, 1, 1], binary=True)  # a 0/1 metric: Wilson interval
    assert mean == 0.75 and 0 <= lo < mean < hi <= 1
    mean, lo, hi = confidence_interval([2.0, 3.0, 4.5])
    assert mean == pytest.approx(3.1666, abs=1e-3) and lo < mean < hi
    assert confidence_interval([2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert confidence_interval([1, 1], binary=True)[1] < 1  # all successes still leave doubt with two items
    # a continuous metric whose values happen to be 0 or 1 is no proportion; one value of one has no interval
    assert confidence_interval([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0) and confidence_interval([2.5]) == (2.5, None, None)
    assert confidence_interval([1], binary=True)[1] > 0
    assert gap_recovered([0.5], [1.0], [0.0]) == (0.5, None, None)
    mean, lo, hi = confidence_interval([0.0, 0.0, 0.0, 0.05, 0.5])  # a share near 0: no negative bound
    assert 0.0 <= lo < mean < hi <= 0.5


def test_gap_recovered_is_one_at_exact_and_zero_at_aux_for_accuracies_and_losses():
    exact, aux = [1, 1, 1, 0], [0, 0, 1, 0]
    assert gap_recovered(exact, exact, aux)[0] == 1.0
    assert gap_recovered(aux, exact, aux)[0] == 0.0
    assert gap_recovered([1, 0, 1, 0], exact, aux)[0] == pytest.approx(0.5)
    # a loss (lower is better): halfway between aux's 4.0 and exact's 2.0 recovers half the gap
    point, lo, hi = gap_recovered([3.0, 3.2, 2.8], [2.0, 2.1, 1.9], [4.0, 4.2, 3.8])
    assert point == pytest.approx(0.5) and lo <= point <= hi
    assert gap_recovered([1, 1], [1, 1], [1, 1]) == (None, None, None)  # exact == aux: undefined
    assert gap_recovered([3.0], [2.5 + 1e-9], [2.5]) == (None, None, None)  # ... and level within rounding


def test_summaries_use_wilson_intervals_for_a_binary_capable_metric_only_where_every_value_is_0_or_1():
    from kvpred.evaluate import summarise

    greedy = summarise({"exact": {"pass@1": [0.0, 0.0, 0.0]}}, binary=frozenset({"pass@1"}))
    assert greedy["pass@1"]["exact"]["ci"][1] > 0.5  # Wilson: three failures leave much doubt
    sampled = summarise({"exact": {"pass@1": [0.25, 0.5, 0.0]}}, binary=frozenset({"pass@1"}))
    assert sampled["pass@1"]["exact"]["ci"][1] <= 0.5  # a bootstrap of the per-problem fractions


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 0, 5)  # k samples cannot be drawn from fewer


@pytest.mark.parametrize("flags, message", [
    (["--humaneval-samples", "0"], "--humaneval-samples 0"),
    (["--kv-length", "1"], "--kv-length 1"),
    (["--fewshot", "-1"], "--fewshot -1"),
    (["--truncate-ratio", "0.5"], "--truncate-ratio must be >= 1"),
    (["--humaneval-samples", "4", "--humaneval-temperature", "0"], "temperature must be"),
    (["--ttft-speedup", "predicted=nan"], "pairs of positive numbers"),
])
def test_eval_settings_out_of_range_are_refused_before_the_model_loads(tmp_path, capsys, flags, message):
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--tasks", f"lambada={DATA}/lm.jsonl", "--out",
            str(tmp_path / "r.json"), *flags]
    assert cli.main(argv) == 2 and message in capsys.readouterr().err


def test_answers_are_normalised_before_exact_match():
    assert normalize_answer("  The  Onion!") == "onion"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower"]) and not exact_match("Paris", ["London", "Rome"])


def test_qa_answers_come_in_the_usual_shapes_and_empty_ones_never_match():
    from functools import partial

    from kvpred.tasks import _qa_targets
    targets = partial(_qa_targets, where="qa.jsonl, row 1")
    assert targets({"answer": "Paris", "aliases": ["paris, France"]}) == ["Paris", "paris, France"]
    assert targets({"answers": {"text": ["Paris"], "answer_start": [0]}}) == ["Paris"]  # SQuAD's shape
    assert targets({"answer": 4}) == ["4"] and targets({"answer": 0}) == ["0"]
    assert targets({"answers": ["The", ".", "Seine"]}) == ["Seine"]  # "the" would match an empty generation
    with pytest.raises(KVPredError, match="qa.jsonl, row 1 has no answer"):
        targets({"answer": "the"})


def test_items_longer_than_the_context_are_cut_to_it_before_truncation_and_counted(pruned):
    """Truncate mode keeps 1/r of what the other modes see: cut after it, it would see what exact mode sees."""
    from kvpred.tasks import generate, score

    limit = pruned.context_length
    long, short = list(range(3, 3 + 200)) * 4, [5, 6, 7]  # 800 context tokens, more than the window
    requests = [(long, [9, 10]), (short, [9, 10])]
    with pytest.warns(UserWarning, match=f"1 of 2 contexts do not fit the {limit} tokens"):
        exact = dict(r for batch in score(pruned, requests, "exact") for r in batch)
    truncate = dict(r for batch in score(pruned, requests, "truncate", ratio=4.0) for r in batch)
    alone = dict(r for batch in score(pruned, [(long[-(limit - 1):][-((limit - 1 + 3) // 4):], [9, 10])], "exact")
                 for r in batch)
    assert truncate[0]["ll"] == pytest.approx(alone[0]["ll"], abs=1e-4) != pytest.approx(exact[0]["ll"], abs=1e-3)
    with pytest.warns(UserWarning, match="1 of 1 prompts do not fit"):
        list(generate(pruned, [long], "exact", max_new_tokens=2))


def test_kv_windows_longer_than_the_context_are_made_as_long_as_it_and_said_so(pruned):
    doc_tasks = parse_tasks(f"kv={DATA}/tiny.txt", DATA)
    opts = small_options(pruned, kv_length=pruned.context_length + 100)
    with pytest.warns(UserWarning, match=f"{pruned.context_length} tokens each instead"):
        doc = evaluate(pruned, doc_tasks, ["predicted"], opts, limit=2, progress=False)
    assert doc["tasks"]["kv"]["n"] == 2


def test_a_text_file_edited_between_evaluations_is_read_again(pruned, tmp_path):
    from kvpred.tasks import text_windows

    path = tmp_path / "notes.txt"
    path.write_text("a" * 64)
    first = text_windows(pruned.tokenizer, str(path), 16, None)
    path.write_text("b" * 64)
    assert text_windows(pruned.tokenizer, str(path), 16, None) != first


def test_chat_data_may_hold_line_separators_in_strings_and_be_gzipped(pruned, tmp_path):
    import gzip

    from kvpred.generation import chat_prompts
    from kvpred.testing import CHAT_TEMPLATE

    tokenizer = copy.deepcopy(pruned.tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    line = json.dumps({"messages": [{"role": "user", "content": "one\u2028two"}]}, ensure_ascii=False) + "\n"
    (tmp_path / "chats.jsonl").write_text(line, encoding="utf-8")
    with gzip.open(tmp_path / "chats.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(line)
    plain = chat_prompts([tmp_path / "chats.jsonl"], tokenizer, None)
    assert len(plain) == 1 and "one\u2028two" in plain[0]
    assert chat_prompts([tmp_path / "chats.jsonl.gz"], tokenizer, None) == plain


def test_the_tokenizer_is_part_of_what_cached_results_were_made_with(pruned):
    from kvpred.evaluate import model_signature

    before = model_signature(pruned, "m")
    tokenizer = pruned.tokenizer
    pruned.tokenizer = copy.deepcopy(tokenizer)
    pruned.tokenizer.chat_template = "{{ messages[0]['content'] }}"
    try:
        assert model_signature(pruned, "m")["tokenizer"] != before["tokenizer"]
    finally:
        pruned.tokenizer = tokenizer


def test_a_task_file_whose_name_holds_an_equals_sign_is_a_path(tmp_path):
    path = tmp_path / "k=v.jsonl"
    path.write_text(json.dumps({"query": "q", "choices": ["x", "y"], "gold": 0}) + "\n")
    (spec,) = parse_tasks(str(path), DATA)
    assert spec.path == str(path) and spec.kind == "mc"


@pytest.mark.parametrize("row, message", [
    ({"query": "q", "choices": ["a", "b"], "gold": 5}, "not an index into its 2 choices"),
    ({"query": "q", "choices": ["a", "b"], "gold": "A"}, "must be the index of the right choice"),
    ({"query": "q", "choices": [], "gold": 0}, "must be a list of two or more non-empty choices"),
    ({"query": "q", "choices": ["a"], "gold": 0}, "must be a list of two or more non-empty choices"),
    ({"query": "q", "choices": ["a", " "], "gold": 0}, "must be a list of two or more non-empty choices"),
])
def test_multiple_choice_rows_are_checked(pruned, tmp_path, row, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"query": "ok", "choices": ["x", "y"], "gold": "1"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(KVPredError, match=message):
        KINDS["mc"].build(pruned, parse_tasks(f"arc_easy={path}", DATA)[0], small_options(pruned), None)


@pytest.mark.parametrize("task, first, row, message", [
    ("arc_easy", {"query": "q", "choices": ["x"], "gold": 0}, {"choices": ["a"], "gold": 0}, "row 2 lacks query"),
    ("lambada", {"context": "a", "continuation": "b"}, ["a", "b"], "row 2: expected a JSON object, got list"),
    ("lambada", {"context": "a", "continuation": "b"}, {"context": "a"}, "row 2 lacks continuation"),
    ("lambada", {"context": "a", "continuation": "b"}, {"context": "a", "continuation": " "}, "continuation is empty"),
    ("triviaqa", {"question": "q", "answer": "a"}, {"answer": "a"}, "row 2 lacks question or context"),
    ("triviaqa", {"question": "q", "answer": "a"}, {"question": "q", "answer": "The"}, "row 2 has no answer"),
    ("triviaqa", {"question": "q", "answer": "a"}, {"question": "q", "answers": [["a"]]}, "row 2: 'answers' must hold"),
])
def test_a_later_row_that_does_not_fit_its_files_format_is_named(pruned, tmp_path, task, first, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    spec = parse_tasks(f"{task}={path}", DATA)[0]
    with pytest.raises(KVPredError, match=f"{path}.*{message}"):
        KINDS[spec.kind].build(pruned, spec, small_options(pruned), None)


def test_a_lambada_style_word_follows_a_space_or_the_contexts_own_whitespace(pruned, tmp_path):
    path = tmp_path / "lm.jsonl"
    rows = [{"context": "Line one.\n", "continuation": "Next"}, {"context": "The cat sat on the",
                                                                  "continuation": "mat"},
            {"context": "It was a", "continuation": " dog"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    items = KINDS["lm"].build(pruned, parse_tasks(f"lambada={path}", DATA)[0], small_options(pruned), None)
    texts = [pruned.tokenizer.decode(item["ctx"] + item["cont"]) for item in items]
    assert texts == ["Line one.\nNext", "The cat sat on the mat", "It was a dog"]


def test_acc_norm_divides_by_the_choice_text_as_lm_eval_does(pruned, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"query": "q", "choices": ["ab", "abcd"], "gold": "1"}) + "\n")
    items = KINDS["mc"].build(pruned, parse_tasks(f"arc_easy={path}", DATA)[0], small_options(pruned, fewshot=1), None)
    assert items[0]["gold"] == 1 and items[0]["chars"] == [2, 4]
    # summed, -3 beats -5.5; per character of the text, -5.5 / 4 beats -3 / 2 (counting the space, -3 / 3 would win)
    results = {"0.0": {"ll": -3.0}, "0.1": {"ll": -5.5}}
    assert KINDS["mc"].metrics(items, results, None) == {"acc": [0.0], "acc_norm": [1.0]}


def test_truncate_keeps_the_last_n_over_r_prompt_tokens():
    ids = list(range(10))
    assert mode_prompt(ids, "truncate", 2.5) == list(range(6, 10))  # ceil(10 / 2.5) = 4
    assert mode_prompt(ids, "truncate", 100.0) == [9]  # never empty
    assert mode_prompt(ids, "predicted", 2.5) == ids


def test_retrieval_refuses_filler_too_short_for_its_prompts(pruned, tmp_path):
    (tmp_path / "short.txt").write_text("Too little filler. " * 5)
    spec = parse_tasks(f"retrieval={tmp_path / 'short.txt'}", DATA)[0]
    with pytest.raises(KVPredError, match="fewer than the .* a 448-token prompt needs"):
        Retrieval().build(pruned, spec, small_options(pruned, retrieval_lengths=[448]), 2)


@pytest.mark.parametrize("ratio", [1.5, 2.0, 3.17])
def test_retrieval_places_the_key_where_truncation_drops_it(pruned, ratio):
    opts = small_options(pruned, retrieval_lengths=[448, 9999], ratio=ratio)  # 9999 exceeds the context: skipped
    items = Retrieval().build(pruned, parse_tasks(f"retrieval={DATA}/tiny.txt", DATA)[0], opts, 8)
    assert len({item["key"] for item in items}) == 8
    for item in items:
        assert len(item["prompt"]) == item["length"] == 448 and item["depth"] < 0.4  # byte tokens: long header
        text = pruned.tokenizer.decode(item["prompt"])
        assert f"pass key is {item['key']}" in text
        assert item["key"] not in pruned.tokenizer.decode(mode_prompt(item["prompt"], "truncate", ratio))


def test_retrieval_warns_at_lengths_where_truncation_keeps_the_key(pruned):
    opts = small_options(pruned, retrieval_lengths=[448], ratio=1.05)
    with pytest.warns(UserWarning, match="cannot state the key before its last 1/1.05, so truncate mode sees it"):
        items = Retrieval().build(pruned, parse_tasks(f"retrieval={DATA}/tiny.txt", DATA)[0], opts, 2)
    assert len(items) == 2


# ------------------------------------------------------------------ task specs and data
def test_task_formats_are_detected_from_file_contents(tmp_path):
    specs = parse_tasks(f"{DATA}/mc.jsonl,{DATA}/qa.jsonl,{DATA}/lm.jsonl,{DATA}/humaneval.jsonl,"
                        f"text={DATA}/*.txt,arc_easy", DATA)
    assert [(s.name, s.kind) for s in specs] == [("mc", "mc"), ("qa", "qa"), ("lm", "lm"),
                                                 ("humaneval", "humaneval"), ("text", "heldout"),
                                                 ("arc_easy", "mc")]
    assert specs[-1].path == str(DATA / "arc_easy.jsonl")
    with pytest.raises(KVPredError, match="unknown task 'nope'"):
        parse_tasks("nope", DATA)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"foo": 1}\n')
    with pytest.raises(KVPredError, match="cannot tell the task format"):
        parse_tasks(str(odd), DATA)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("mc.jsonl", "qa.jsonl"):
        (mixed / name).write_text((DATA / name).read_text())
    with pytest.raises(KVPredError, match="hold different task formats"):
        parse_tasks(str(mixed), DATA)


def test_chat_agreement_runs_predicted_mode_with_at_least_the_models_chat_tail(tiny_path, tmp_path):
    """chat=PATH (or a .jsonl of "messages"): agreement on chat prompts, whose predicted first token comes with the
    model's chat tail as for chat requests; a new chat tail is not answered from results cached for the old one."""

    model = KVPredictionModel.from_pretrained(str(tiny_path), keep_ratio=0.5)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    (tmp_path / "chats").mkdir()
    (tmp_path / "chats" / "a.jsonl").write_text((DATA / "chat.jsonl").read_text())
    assert [s.kind for s in parse_tasks(f"{DATA}/chat.jsonl,mine={tmp_path}/chats", DATA)] == ["chat", "chat"]
    with pytest.raises(KVPredError, match="needs a data file: chat=PATH"):
        parse_tasks("chat", DATA)
    specs, cache = parse_tasks(f"chat={DATA}/chat.jsonl", DATA), ResultCache(None)

    def first_token_agreement(tail: int) -> float:
        from kvpred.generation import chat_prompts

        hits = []
        for text in chat_prompts([DATA / "chat.jsonl"], model.tokenizer, None):
            ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            exact, mine = (model.generate(ids, mode=m, exact_tail=tail, max_new_tokens=1)[0, -1] for m in
                           ("exact", "predicted"))
            hits.append(float(exact == mine))
        return sum(hits) / len(hits)

    found = {}
    for chat_tail in (None, 1, 4096):  # None: the template's reply opening, 12 byte tokens; 4096: whole prompts
        model.config.chat_exact_tail = chat_tail
        doc = evaluate(model, specs, ["exact", "predicted"], small_options(model), cache=cache, progress=False)
        task = doc["tasks"]["chat"]
        assert task["n"] == 8 and task["metrics"]["first_token"]["exact"]["value"] == 1.0
        found[chat_tail] = task["metrics"]["first_token"]["predicted"]["value"]
        assert task["exact_tail"] == model.chat_tail
        assert (f"chat: predicted mode's exact tail is {model.chat_tail} tokens" in markdown_report(
            dict(doc, command="kvpred eval"))) == (model.chat_tail != 1)
        assert found[chat_tail] == pytest.approx(first_token_agreement(model.chat_tail))
    assert found[1] < 1.0 and found[4096] == 1.0  # the base ran every prompt token: nothing predicted


# ------------------------------------------------------------------ every task, every mode
def test_every_task_reports_every_mode_with_intervals_around_the_value(pruned_doc):
    expected = {"kv": ["predicted"], "humaneval": MODES}
    for name, task in pruned_doc["tasks"].items():
        assert task["primary"] in task["metrics"]
        for metric, by_mode in task["metrics"].items():
            assert sorted(by_mode) == sorted(expected.get(name, MODES)), (name, metric)
            for mode, entry in by_mode.items():
                lo, hi = entry["ci"]
                assert entry["n"] == task["n"] and lo <= entry["value"] <= hi, (name, metric, mode, entry)
                if name != "kv":
                    assert "gap_recovered" in entry
    assert {t: d["n"] for t, d in pruned_doc["tasks"].items()} == {
        "kv": 3, "heldout": 3, "agreement": 3, "lambada": 3, "arc_easy": 3, "triviaqa": 3, "humaneval": 2,
        "retrieval": 3}


def test_exact_mode_agrees_with_itself(pruned_doc):
    for metric, by_mode in pruned_doc["tasks"]["agreement"]["metrics"].items():
        assert by_mode["exact"]["value"] == 1.0, metric


def test_predicted_cache_errors_are_zero_for_identity_and_positive_when_pruned(pruned_doc, identity_doc):
    kv = pruned_doc["tasks"]["kv"]
    layers = kv["extra"]["predicted"]["per_layer"]["value_rel_l1"]
    assert len(layers) == 4 and layers[0] < 1e-5  # layer 0 is kept and first: its inputs are exact
    assert kv["metrics"]["value_rel_l1"]["predicted"]["value"] > 0.05
    assert kv["metrics"]["key_cos_err"]["predicted"]["value"] > 0.01
    for metric, by_mode in identity_doc["tasks"]["kv"]["metrics"].items():
        assert by_mode["predicted"]["value"] < 1e-4, metric


def test_identity_auxiliary_gives_predicted_metrics_equal_to_exact(identity_doc):
    for name, task in identity_doc["tasks"].items():
        if name == "kv":
            continue
        for metric, by_mode in task["metrics"].items():
            for mode in ("predicted", "aux", "truncate"):  # aux == base and r == 1: all equal exact
                assert by_mode[mode]["value"] == pytest.approx(by_mode["exact"]["value"], abs=1e-4), (name, metric)
            assert by_mode["predicted"]["gap_recovered"] is None  # exact == aux: no gap to recover


def test_an_exact_tail_over_the_whole_prompt_makes_predicted_mode_exact(pruned):
    """--exact-tail W: the base runs the last W prompt tokens in predicted mode. W past every prompt's length leaves
    nothing to predict, so predicted equals exact; and results cached for the paper's W = 1 are not reused."""
    specs = parse_tasks(f"heldout={DATA}/tiny.txt,agreement={DATA}/tiny.txt,lambada={DATA}/lm.jsonl,"
                        f"arc_easy={DATA}/mc.jsonl", DATA)
    cache = ResultCache(None)
    paper = evaluate(pruned, specs, ["exact", "predicted"], small_options(pruned), limit=3, cache=cache, progress=False)
    assert paper["tasks"]["heldout"]["metrics"]["nll"]["predicted"]["value"] != pytest.approx(
        paper["tasks"]["heldout"]["metrics"]["nll"]["exact"]["value"])
    whole = evaluate(pruned, specs, ["exact", "predicted"], small_options(pruned, exact_tail=4096), limit=3,
                     cache=cache, progress=False)
    for name, task in whole["tasks"].items():
        for metric, by_mode in task["metrics"].items():
            assert by_mode["predicted"]["value"] == pytest.approx(by_mode["exact"]["value"], abs=1e-4), (name, metric)
    assert whole["flops"]["exact_tail"] == 4096 and whole["flops"]["matmul_ratio"] == pytest.approx(1)
    assert "exact tail" in markdown_report(dict(whole, command="kvpred eval"))


def test_markdown_report_has_a_row_per_task_metric(pruned_doc, tmp_path):
    doc = dict(pruned_doc, command="kvpred eval ...")
    md = write_report(doc, tmp_path / "r.json")
    text = md.read_text()
    assert json.loads((tmp_path / "r.json").read_text())["tasks"].keys() == pruned_doc["tasks"].keys()
    assert "| arc_easy | acc ↑ | 3 |" in text and "| heldout | nll ↓ | 3 |" in text
    assert "gap predicted" in text and "per-layer error" in text and text == markdown_report(doc)


# ------------------------------------------------------------------ HumanEval sandbox
PROBLEM = {"prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}


def _program(body: str) -> str:
    from kvpred.tasks import humaneval_program
    return humaneval_program(PROBLEM, body)


def test_sandbox_passes_a_correct_solution_and_fails_a_wrong_one():
    assert execute_program(_program("    return a + b\n")) == "passed"
    assert execute_program(_program("    return a - b\n")) == "failed"
    assert execute_program(_program("    return a +\n")) == "failed"  # syntax error


def test_sandbox_times_out_an_infinite_loop_and_blocks_the_network():
    assert execute_program(_program("    while True:\n        pass\n"), timeout=1.5) == "timeout"
    net = "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n    return a + b\n"
    assert execute_program(_program(net)) == "failed"


def test_sandbox_fails_programs_that_exit_early_and_survives_one_that_kills_its_parent():
    for early in ("    import sys\n    sys.exit(0)\n", "    raise SystemExit\n", "    import os\n    os._exit(0)\n"):
        assert execute_program(_program(early)) == "failed"  # exit status 0, but the checks never ran
    kill = "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
    assert execute_program(_program(kill)) == "failed"  # and this test process is still here to see it
    remove = "    import os\n    os.remove(__file__)\n    return a + b\n"
    assert execute_program(_program(remove)) == "failed"


def test_sandbox_guards_hold_for_the_posix_module_beneath_os(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("mine")
    for call in (f"posix.unlink({str(victim)!r})", "posix.kill(posix.getppid(), 9)", "posix.fork()"):
        assert execute_program(_program(f"    import posix\n    {call}\n    return a + b\n")) == "failed"
    assert victim.read_text() == "mine"


@pytest.mark.skipif(not shutil.which("bwrap"), reason="needs bubblewrap, which makes the file system read-only")
def test_sandbox_with_bubblewrap_cannot_write_outside_its_folder(tmp_path):
    target = tmp_path / "written.txt"
    assert execute_program(_program(f"    open({str(target)!r}, 'w').write('x')\n    return a + b\n")) == "failed"
    assert not target.exists()


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs util-linux's setpriv")
def test_sandboxed_programs_die_with_a_killed_evaluator(tmp_path):
    marker = f"kvpred-orphan-{os.getpid()}"
    program = f"import time\n{marker!r}\ntime.sleep(120)\n"
    evaluator = f"from kvpred.tasks import execute_program\nexecute_program({program!r}, timeout=120)\n"
    proc = subprocess.Popen([sys.executable, "-c", evaluator])
    deadline = time.monotonic() + 60
    while not _processes_running(marker) and time.monotonic() < deadline:  # the program has started
        time.sleep(0.2)
    assert _processes_running(marker)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _processes_running(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_running(marker)


def _processes_running(marker: str) -> bool:
    """Whether a process's program file holds `marker` (the sandbox's program.py is read back from /proc)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            script = next((a for a in cmdline.read_bytes().split(b"\0") if a.endswith(b"program.py")), None)
            if script and marker in Path(script.decode()).read_text():
                return True
        except OSError:
            continue
    return False


# ------------------------------------------------------------------ CLI, resume, plot
def test_cli_writes_json_and_markdown_and_resumes_from_the_item_cache(tiny_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res" / "eval.json"
    argv = ["eval", "--model", str(tiny_path), "--tasks", f"lambada={DATA}/lm.jsonl,arc_easy={DATA}/mc.jsonl",
            "--limit", "3", "--batch-size", "2", "--out", str(out), "--quiet", "--ttft-speedup", "predicted=1.5"]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert set(doc["tasks"]) == {"lambada", "arc_easy"} and doc["ttft_speedup"] == {"predicted": 1.5}
    assert doc["command"].startswith("kvpred eval") and out.with_suffix(".md").is_file()
    cached = out.with_suffix(".items.jsonl").read_text().splitlines()
    units = 3 + sum(len(json.loads(l)["choices"]) for l in (DATA / "mc.jsonl").read_text().splitlines()[:3])
    assert len(cached) == 4 * units  # one line per unit and mode

    def no_model_calls(*args, **kwargs):
        raise AssertionError("a resumed run must not recompute cached items")

    monkeypatch.setattr(KINDS["lm"], "run", no_model_calls)
    monkeypatch.setattr(KINDS["mc"], "run", no_model_calls)
    assert cli.main(argv) == 0
    again = json.loads(out.read_text())["tasks"]
    assert {t: d["metrics"] for t, d in again.items()} == {t: d["metrics"] for t, d in doc["tasks"].items()}
    assert len(out.with_suffix(".items.jsonl").read_text().splitlines()) == len(cached)
    edited = [json.loads(line) for line in cached]
    edited[0]["result"] = {"edited": True}  # valid JSON a task cannot read
    out.with_suffix(".items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert re.search("holds item results this task cannot read .*rerun with --no-resume", capsys.readouterr().err)


def test_cli_errors_are_clear(tiny_path, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tiny_path), "--tasks", "nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tiny_path), "--tasks", f"{DATA}/lm.jsonl", "--modes", "fast",
                     "--out", str(tmp_path / "x.json"), "--quiet"]) == 2
    assert "unknown modes" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["--data-dir", "KVPRED_DATA"])
def test_cli_says_how_to_point_at_missing_builtin_task_data(tiny_path, tmp_path, capsys, monkeypatch, how):
    """From an install outside the project tree the default data folder is not there."""
    missing = tmp_path / "no-data"
    monkeypatch.setenv("KVPRED_DATA", str(missing))
    argv = ["eval", "--model", str(tiny_path), "--tasks", "agreement", "--limit", "3",
            "--out", str(tmp_path / "x.json")]
    assert cli.main(argv + (["--data-dir", str(missing)] if how == "--data-dir" else [])) == 2
    err = capsys.readouterr().err
    assert f"task 'agreement' reads {missing / 'wikitext2-test.txt'}, which does not exist" in err
    assert "--data-dir or the KVPRED_DATA environment variable" in err and "agreement=PATH" in err


def test_result_cache_ignores_other_signatures_and_torn_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ResultCache(path)
    cache.put("sig", "t", "exact", [("0", {"ll": -1.0})])
    with path.open("a") as f:
        f.write('{"sig": "sig", "task": "t", "mode": "exact", "key": "1", "res')  # killed mid-write
    again = ResultCache(path)
    assert again.get("sig", "t", "exact", "0") == {"ll": -1.0}
    assert again.get("other", "t", "exact", "0") is None and again.get("sig", "t", "exact", "1") is None
    again.put("sig", "t", "exact", [("1", {"ll": -2.0})])  # after the torn line, on a line of its own
    with path.open("ab") as f:
        f.write(b"\xff\xfe not text\n")  # a damaged line: skipped like a torn one
    third = ResultCache(path)
    assert third.get("sig", "t", "exact", "1") == {"ll": -2.0} and third.get("sig", "t", "exact", "0") == {"ll": -1.0}
    with path.open("a") as f:  # valid JSON with no result in it: the unit runs again
        for key, result in (("2", {}), ("3", None), ("4", [1])):
            f.write(json.dumps({"sig": "sig", "task": "t", "mode": "exact", "key": key, "result": result}) + "\n")
    fourth = ResultCache(path)
    assert [fourth.get("sig", "t", "exact", k) for k in "234"] == [None, None, None]


def test_a_cache_never_serves_results_of_data_edited_since(tiny_path, tmp_path):
    data, out = tmp_path / "lm.jsonl", tmp_path / "eval.json"
    lines = (DATA / "lm.jsonl").read_text().splitlines()
    argv = ["eval", "--model", str(tiny_path), "--tasks", f"lambada={data}", "--modes", "exact", "--out", str(out),
            "--quiet"]
    results = []
    for chosen in (lines[:2], lines[2:4], lines[:2]):
        data.write_text("\n".join(chosen) + "\n")
        assert cli.main(argv) == 0
        results.append(json.loads(out.read_text())["tasks"]["lambada"]["metrics"])
    assert results[0] != results[1] and results[2] == results[0]  # the edit is seen; the first items stay cached


def test_input_files_that_are_not_utf8_are_named(tmp_path):
    from kvpred.generation import chat_prompts
    from kvpred.tasks import load_rows, text_windows

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(KVPredError, match="latin1.jsonl is not UTF-8"):
        load_rows(str(bad))
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(KVPredError, match="latin1.jsonl is not UTF-8"):
        chat_prompts([bad], tokenizer, None)
    with pytest.raises(KVPredError, match="latin1.jsonl is not UTF-8"):
        text_windows(byte_tokenizer(), str(bad), 8, None)


def test_a_byte_order_mark_at_the_start_of_an_input_file_is_no_text(tmp_path):
    from kvpred.tasks import load_rows, text_windows

    rows, text = tmp_path / "rows.jsonl", tmp_path / "notes.txt"
    rows.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n')  # as Windows editors save UTF-8
    text.write_bytes(b"\xef\xbb\xbf" + b"abcdefgh")
    assert load_rows(str(rows)) == [{"text": "ok"}]
    assert byte_tokenizer().decode(text_windows(byte_tokenizer(), str(text), 8, None)[0]) == "abcdefgh"


def test_an_out_that_would_lose_the_results_is_refused_before_the_model_loads(tiny_path, tmp_path, capsys):
    for out in (tmp_path / "report.md", tmp_path, tmp_path / "notes.py"):
        assert cli.main(["eval", "--model", "no-such-model", "--tasks", f"{DATA}/lm.jsonl", "--out", str(out)]) == 2
        assert "must name the results .json file" in capsys.readouterr().err
    (tmp_path / "README.md").write_text("# my notes\n")  # a user's file where the report would go
    (tmp_path / "data.json").write_text("[1, 2]")
    for out, mine in ((tmp_path / "README.json", "README.md"), (tmp_path / "data.json", "data.json")):
        assert cli.main(["eval", "--model", "no-such-model", "--tasks", f"{DATA}/lm.jsonl", "--out", str(out)]) == 2
        assert f"{mine} exists and is not kvpred eval output" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    (tmp_path / "killed.items.jsonl").write_text('{"sig": "0a1b')  # a run killed while writing its first line
    from kvpred.evaluate import check_out
    check_out(tmp_path / "killed.json")  # the same command resumes


def test_plot_draws_the_pareto_figure_with_a_ttft_panel(pruned_doc, tmp_path):
    from kvpred.plot import load_results, pareto_points

    first = dict(pruned_doc, label="lp50")
    second = dict(pruned_doc, label="lp50-fast", ttft_speedup={"predicted": 1.6, "aux": 1.9, "truncate": 1.9},
                  flops=dict(pruned_doc["flops"], param_ratio=3.0))
    paths = []
    for doc in (first, second):
        paths.append(tmp_path / f"{doc['label']}.json")
        paths[-1].write_text(json.dumps(doc))
    points = pareto_points(load_results(paths))
    assert {p["label"] for p in points} == {"lp50", "lp50-fast"}
    renamed = pareto_points(load_results([f"round 5={paths[0]}", paths[1]]))  # LABEL=PATH names a file's points
    assert {p["label"] for p in renamed} == {"round 5", "lp50-fast"}
    exact = [p for p in points if p["mode"] == "exact"]
    assert all(p["y"] == 1.0 and p["flops_x"] == 1.0 for p in exact)
    assert {p["flops_x"] for p in points if p["mode"] == "predicted"} == {pruned_doc["flops"]["param_ratio"], 3.0}
    truncated = pareto_points([dict(first, modes=["exact", "truncate"], truncate_ratio=5.0)])
    assert [p["flops_x"] for p in truncated if p["mode"] == "truncate"] == [5.0]  # the ratio it truncated by
    fewer = dict(second, tasks={name: task for name, task in list(second["tasks"].items())[:1]})
    with pytest.warns(UserWarning, match="average different tasks .*not comparable"):
        pareto_points([first, fewer])
    with pytest.raises(KVPredError, match="--tasks names nosuchtask, which no results file holds"):
        pareto_points([first], tasks=[next(iter(first["tasks"])), "nosuchtask"])
    out = tmp_path / "pareto.png"
    assert cli.main(["plot", "--results", *map(str, paths), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_the_pareto_front_and_one_label_for_points_on_top_of_each_other():
    from kvpred.plot import merged_labels, pareto_front

    points = [{"label": name, "x": x, "y": y} for name, x, y in
              [("a", 2.0, 0.70), ("b", 3.0, 0.65), ("c", 3.0, 0.60), ("d", 8.6, 0.640), ("e", 8.6, 0.641)]]
    assert [p["label"] for p in pareto_front(points, "x")] == ["a", "b", "e"]  # c and d are beaten on both axes
    assert merged_labels(points, "x", span=(6.6, 0.1)) == [(2.0, 0.7, "a"), (3.0, 0.6, "c"), (3.0, 0.65, "b"),
                                                          (8.6, 0.64, "d, e")]


def test_plot_takes_measured_speedups_from_a_ttft_benchmark(pruned_doc, tmp_path, capsys):
    results, bench = tmp_path / "r.json", tmp_path / "ttft.json"
    results.write_text(json.dumps(dict(pruned_doc, label="lp50")))
    rows = [{"batch": 1, "prompt_len": n, "exact_ms": 10.0 * n, "pred_ms": 2.0 * n, "aux_ms": n} for n in (512, 2048)]
    bench.write_text(json.dumps({"rows": rows}))
    argv = ["plot", "--results", str(results), "--out", str(tmp_path / "p.png"), "--ttft-bench", str(bench)]
    assert cli.main(argv + ["--ttft-length", "512"]) == 0
    assert "predicted  flops" in capsys.readouterr().out and (tmp_path / "p.png").is_file()
    from kvpred.plot import measured_speedups
    assert measured_speedups(bench) == {"predicted": 5.0, "aux": 10.0}
    assert cli.main(argv + ["--ttft-length", "1024"]) == 2
    assert "no batch-1 row at 1024" in capsys.readouterr().err
    bench.write_text(json.dumps({"rows": [dict(rows[0], pred_ms=0.0)]}))
    assert cli.main(argv) == 2 and "lacks positive exact_ms, pred_ms and aux_ms" in capsys.readouterr().err
    bench.write_text(json.dumps({"rows": [dict(rows[0], aux="KVP-LP 0.25"), dict(rows[0], aux="KVP-LP 0.50")]}))
    assert cli.main(argv) == 2 and "has 2 batch-1 rows at 512 tokens" in capsys.readouterr().err  # which is ours?


@pytest.mark.parametrize("change, message", [
    ({"out": "figs"}, "name a .png"),
    ({"flops": {"param_ratio": 2.0}, "x": "matmul"}, "no flops matmul_ratio"),
    ({"tasks": ["lambada"]}, "not a `kvpred eval` results file"),
    ({"task": {"metrics": {}}}, "lacks its primary metric"),
])
def test_plot_names_what_is_wrong_with_its_inputs(pruned_doc, tmp_path, capsys, change, message):
    doc = dict(pruned_doc, **{k: v for k, v in change.items() if k in ("flops", "tasks")})
    if "task" in change:
        doc["tasks"] = {name: change["task"] for name in doc["tasks"]}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    argv = ["plot", "--results", str(tmp_path / "r.json"), "--out", str(tmp_path / change.get("out", "p.png")),
            "--x", change.get("x", "param")]
    assert cli.main(argv) == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------ lm-evaluation-harness
def test_lm_eval_model_runs_local_tasks_and_predicted_equals_exact_for_identity(identity, monkeypatch, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(DATA)  # the task YAMLs name their jsonl files relative to tests/data
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from kvpred.lm_eval_model import KVPredLM

    assert get_model("kvpred") is KVPredLM
    manager = TaskManager(include_path=str(DATA / "lm_eval"))
    tasks = ["kvpred_tiny_mc", "kvpred_tiny_gen", "kvpred_tiny_ppl"]
    scores = {}
    for mode in ("exact", "predicted"):
        lm = KVPredLM(pretrained=identity, mode=mode, batch_size=4)
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=3)["results"]
        scores[mode] = {t: {k: v for k, v in res[t].items() if isinstance(v, float)} for t in tasks}
    assert scores["exact"]["kvpred_tiny_mc"]["acc,none"] >= 0
    assert math.isfinite(scores["exact"]["kvpred_tiny_ppl"]["bits_per_byte,none"])
    for task in tasks:
        for key, value in scores["exact"][task].items():
            assert scores["predicted"][task][key] == pytest.approx(value, rel=1e-4), (task, key)


@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos", "tokenizer-adds-bos"])
def test_lm_eval_model_in_exact_mode_scores_as_lm_evals_own_hf_model(tmp_path, add_bos):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from kvpred.lm_eval_model import KVPredLM

    path = str(save_tiny_model(tmp_path / "m", context=64, add_bos=add_bos))
    hf = HFLM(pretrained=path, device="cpu", batch_size=2)
    # lm-eval's default device is cuda:0; on a machine without one, both run on the CPU
    ours = KVPredLM(pretrained=path, mode="exact", batch_size=2,
                    device="cpu" if torch.cuda.is_available() else "cuda:0")
    pairs = [("", "abc"), ("abcdefgh" * 16, "xyz"), ("hello", " world")]  # an empty and an over-long context
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (mine, greedy), (theirs, their_greedy) in zip(ours.loglikelihood(requests, disable_tqdm=True),
                                                      hf.loglikelihood(requests, disable_tqdm=True)):
        assert mine == pytest.approx(theirs, rel=1e-4) and greedy == their_greedy
    rolling = [Instance("loglikelihood_rolling", {}, ("some text, " * 20,), 0)]  # longer than the window
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        hf.loglikelihood_rolling(rolling, disable_tqdm=True), rel=1e-4)
    texts = {}
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):  # lm-eval's aliases
        request = Instance("generate_until", {}, ("def add(a, b):", {"until": ["zzz"], key: 3}), 0)
        texts[key] = ours.generate_until([request], disable_tqdm=True)[0]
    assert len(set(texts.values())) == 1 and len(texts["max_gen_toks"].encode()) <= 3
    # settings beyond kvpred's own reach transformers' generate, as in lm-eval's hf model
    for settings in ({"do_sample": True, "temperature": 1.0, "top_k": 1}, {"repetition_penalty": 5.0}):
        request = [Instance("generate_until", {}, ("abcabc", {"until": ["zzz"], "max_gen_toks": 8, **settings}), 0)]
        assert ours.generate_until(request, disable_tqdm=True) == hf.generate_until(request, disable_tqdm=True)


@pytest.mark.parametrize("args, problem", [
    ({"exact_tail": "abc"}, "exact_tail must be a whole number"),
    ({"exact_tail": 2.5}, "exact_tail must be a whole number"),
    ({"max_gen_toks": 0}, "max_gen_toks must be a whole number >= 1"),
    ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
    ({"truncate_ratio": 0}, "truncate_ratio must be a number above 1"),
    ({"truncate_ratio": "nan"}, "truncate_ratio must be a number above 1"),
    ({"aux_dtype": "fp16"}, "aux_dtype must be auto, model or one of"),
])
def test_lm_eval_model_arguments_out_of_range_are_refused_by_name(pruned, args, problem):
    pytest.importorskip("lm_eval")
    from kvpred.lm_eval_model import KVPredLM

    with pytest.raises(KVPredError, match=problem):
        KVPredLM(pretrained=pruned, **args)


def test_lm_eval_model_applies_the_tokenizers_chat_template(pruned, monkeypatch):
    pytest.importorskip("lm_eval")
    from kvpred.lm_eval_model import KVPredLM

    lm = KVPredLM(pretrained=pruned)
    monkeypatch.setattr(pruned.tokenizer, "chat_template", CHAT_TEMPLATE)
    assert lm.chat_template(True) == CHAT_TEMPLATE and lm.chat_template(False) is None
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi\n<assistant>"
    monkeypatch.setattr(pruned.tokenizer, "chat_template", None)
    with pytest.raises(KVPredError, match="no chat template"):
        lm.chat_template(True)


def test_lm_eval_wrapper_command_registers_the_model(tmp_path):
    pytest.importorskip("lm_eval")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1")
    model = save_tiny_model(tmp_path / "m")
    proc = subprocess.run(
        [sys.executable, "-m", "kvpred.lm_eval_model", "run", "--model", "kvpred", "--model_args",
         f"pretrained={model},mode=predicted,exact_tail=2", "--device", "cpu", "--tasks", "kvpred_tiny_mc",
         "--include_path", str(DATA / "lm_eval"), "--limit", "2", "--output_path", str(tmp_path / "out")],
        cwd=DATA, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kvpred_tiny_mc" in proc.stdout and "acc" in proc.stdout


# ------------------------------------------------------------------ the real model
@pytest.mark.smollm
def test_smollm_identity_setting_scores_arc_easy_the_same_in_predicted_and_exact():
    model = KVPredictionModel.from_pretrained("smollm2-135m", keep_ratio=1.0)
    data = default_data_dir()
    if not (data / "arc_easy.jsonl").is_file():
        pytest.skip(f"evaluation data not found at {data}")
    doc = evaluate(model, parse_tasks("arc_easy", data), ["exact", "predicted"], small_options(model),
                   limit=8, progress=False)
    acc = doc["tasks"]["arc_easy"]["metrics"]["acc"]
    assert acc["predicted"]["value"] == acc["exact"]["value"] and acc["exact"]["value"] > 0.25


def test_sampled_humaneval_completions_depend_on_the_problem_not_on_batching_or_resuming(pruned, tmp_path):
    specs, runs = parse_tasks(f"humaneval={DATA}/humaneval.jsonl", DATA), []
    for batch_size, kept in ((4, 0), (2, 0), (4, 1)):  # the last: a run killed after its first problem, resumed
        path = tmp_path / f"cache{len(runs)}.jsonl"
        if kept:
            path.write_text("".join((tmp_path / "cache0.jsonl").read_text().splitlines(keepends=True)[:kept]))
        evaluate(pruned, specs, ["exact"], small_options(pruned, batch_size=batch_size, humaneval_samples=2),
                 cache=ResultCache(path), progress=False)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        runs.append({rec["key"]: rec["result"]["completions"] for rec in lines})
    assert len(runs[0]) == 2 and runs[0] == runs[1] == runs[2]
