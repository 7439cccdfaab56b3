"""Specification of `kvpred serve`, the OpenAI-compatible server (issue 6). The server runs in-process on a free
loopback port with a tiny random model; clients are the official `openai` package and plain httpx."""
import asyncio
import functools
import json
import re
import socket
import statistics
import time
from pathlib import Path

import httpx
import pytest
import torch
from openai import AsyncOpenAI, OpenAI

from kvpred.cli import build_parser
from kvpred.decoding import Pooled, RollingBatch
from kvpred.generation import visible_text
from kvpred.model import KVPredictionModel
from kvpred.models import KVPredError
from kvpred.serve import APIError, Job, Metrics, Scheduler, ServeConfig, create_app, serve_in_thread
from kvpred.testing import CHAT_TEMPLATE

NAME = "tiny"
TASKS = Path(__file__).parent / "data" / "serve"


@pytest.fixture(scope="module")
def model(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    return model


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """A second copy of the served model for in-process expectations: the server's worker is its model's only user."""
    reference = KVPredictionModel.from_pretrained(tiny_llama)
    reference.tokenizer.chat_template = CHAT_TEMPLATE
    return reference


@pytest.fixture(scope="module")
def server(model):
    with serve_in_thread(create_app(model, ServeConfig(model_name=NAME))) as url:
        yield url


@pytest.fixture
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


def in_process(model, ids: list[int], mode: str, max_new_tokens: int, exact_tail: int = 1) -> str:
    out = model.generate(torch.tensor([ids]), mode=mode, max_new_tokens=max_new_tokens, exact_tail=exact_tail)
    return model.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample, 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and ",".join(sorted(re.findall(r'\w+="[^"]*"', sample))) == want:
            return float(value)
    return 0.0


# ---------------------------------------------------------------- completions
@pytest.mark.parametrize("mode", ["exact", "aux", "predicted"])
def test_greedy_completion_is_what_the_model_generates_in_that_mode(client, reference, mode):
    prompt = "The quick brown fox"
    resp = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"kv_mode": mode})
    ids = reference.tokenizer.encode(prompt)
    assert resp.choices[0].text == in_process(reference, ids, mode, 10)
    assert resp.model_extra["kv_mode"] == mode and resp.model_extra["ttft_s"] > 0
    assert resp.usage.prompt_tokens == len(ids) and 1 <= resp.usage.completion_tokens <= 10
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_server_default_mode_applies_when_the_request_names_none(client):
    resp = client.completions.create(model=NAME, prompt="abc", max_tokens=2, temperature=0)
    assert resp.model_extra["kv_mode"] == "predicted"


def test_streamed_completion_reassembles_the_non_streamed_text(client):
    kwargs = dict(model=NAME, prompt="Hello there", max_tokens=12, temperature=0, extra_body={"kv_mode": "exact"})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    first = chunks[0].model_extra
    assert first["kv_mode"] == "exact" and first["ttft_s"] > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len("Hello there")


def test_a_batch_with_an_exact_tail_generates_what_the_model_does_in_process(client, reference):
    prompts = ["The quick brown fox", "Hello there, friend"]  # two prompts: a rolling batch, also on a CPU
    got = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0,
                                    extra_body={"kv_mode": "predicted", "exact_tail": 3})
    for choice, prompt in zip(got.choices, prompts):
        ids = torch.tensor([reference.tokenizer.encode(prompt)])
        out = reference.generate(ids, mode="predicted", exact_tail=3, max_new_tokens=6)[0, ids.shape[1]:]
        assert choice.text == reference.tokenizer.decode(out, skip_special_tokens=True)


def test_a_rolling_batch_reports_the_logprobs_a_batch_run_to_its_end_does(model):
    body = {"model": NAME, "prompt": ["The quick brown fox", "Hi"], "max_tokens": 4, "temperature": 0,
            "logprobs": 2, "kv_mode": "predicted"}
    answers = []
    for continuous in (True, False):
        with serve_in_thread(create_app(model, ServeConfig(model_name=NAME, continuous_batching=continuous))) as url:
            answers.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"])
    rolled, whole = answers
    for a, b in zip(rolled, whole):
        assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert a["logprobs"]["top_logprobs"][0].keys() == b["logprobs"]["top_logprobs"][0].keys()
        assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-4)


def test_prompt_may_be_strings_or_token_ids_and_each_prompt_is_a_choice(client, reference):
    ids = reference.tokenizer.encode("abc")
    kwargs = dict(model=NAME, max_tokens=6, temperature=0, extra_body={"kv_mode": "exact"})
    text = client.completions.create(prompt="abc", **kwargs).choices[0].text
    assert client.completions.create(prompt=ids, **kwargs).choices[0].text == text
    both = client.completions.create(prompt=[ids, reference.tokenizer.encode("xyz")], **kwargs)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == text
    assert [c.text for c in client.completions.create(prompt=["abc", "xyz"], **kwargs).choices] == \
        [c.text for c in both.choices]


def test_stop_string_cuts_the_text_before_it(client):
    kwargs = dict(model=NAME, prompt="Once upon a time", temperature=0, extra_body={"kv_mode": "exact"})
    full = client.completions.create(max_tokens=16, **kwargs).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    resp = client.completions.create(max_tokens=16, stop=[stop], **kwargs).choices[0]
    assert resp.text == full[:full.index(stop)] and resp.finish_reason == "stop"
    streamed = client.completions.create(max_tokens=16, stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == resp.text


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_kvpreds_loop_serves_what_transformers_loop_serves(tiny_llama, device):
    """generate decodes with kvpred.decoding's loop (eager steps on a CPU, CUDA graphs on a GPU); the server answers
    as it does with transformers' loop: batches, stop strings, logprobs."""
    ours, theirs = (KVPredictionModel.from_pretrained(tiny_llama, device=device) for _ in range(2))
    theirs.generate = functools.partial(theirs.generate, transformers_loop=True)
    with serve_in_thread(create_app(ours, ServeConfig(model_name=NAME))) as ours_url, \
            serve_in_thread(create_app(theirs, ServeConfig(model_name=NAME))) as theirs_url:
        mine, reference = (OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                           for url in (ours_url, theirs_url))
        full = reference.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16,
                                            temperature=0).choices[0].text
        requests = [{"prompt": "The quick brown fox", "max_tokens": 10},
                    {"prompt": ["abc", "a longer prompt"], "max_tokens": 8, "extra_body": {"kv_mode": "exact"}},
                    {"prompt": "Once upon a time", "max_tokens": 16, "stop": [full[len(full) // 2:len(full) // 2 + 2]]},
                    {"prompt": "Hello", "max_tokens": 5, "logprobs": 2}]
        for kwargs in requests:
            got = mine.completions.create(model=NAME, temperature=0, **kwargs)
            want = reference.completions.create(model=NAME, temperature=0, **kwargs)
            assert [(c.text, c.finish_reason) for c in got.choices] == [(c.text, c.finish_reason) for c in want.choices]
            if "logprobs" in kwargs:
                assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
                assert got.choices[0].logprobs.token_logprobs == pytest.approx(want.choices[0].logprobs.token_logprobs,
                                                                               abs=1e-4)


def test_visible_text_holds_back_a_possible_stop_string_and_unfinished_characters():
    assert visible_text("hello wor", ("world",)) == ("hello ", False)
    assert visible_text("hello world!", ("world",)) == ("hello ", True)
    assert visible_text("caf\ufffd", ()) == ("caf", False)
    assert visible_text("abc", ("x", "bc")) == ("a", True)
    assert visible_text("abc", ("",)) == ("abc", False)  # an empty stop string never matches


def test_a_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=NAME, prompt="Random", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


# ---------------------------------------------------------------- scoring (echo + logprobs)
def test_response_text_and_logprob_tokens_join_as_the_text_reads():
    """A completion's text and its tokens' texts are what each adds after what came before: a SentencePiece word
    keeps its leading space after the prompt, and a BOS the tokenizer added shows as nothing, so that
    text_offset indexes the echoed prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kvpred.serve import decode_after
    from kvpred.testing import byte_tokenizer

    pieces = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "▁Hello": 2, "▁world": 3, "▁again": 4}, "</s>"))
    pieces.pre_tokenizer, pieces.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sentencepiece = PreTrainedTokenizerFast(tokenizer_object=pieces, bos_token="<s>", eos_token="</s>")
    assert sentencepiece.decode([3, 4]) == "world again"  # decoded alone, the space is gone
    assert decode_after(sentencepiece, [0, 2], [3, 4]) == " world again"
    with_bos = byte_tokenizer(add_bos=True)
    ids = with_bos("Hi there").input_ids
    assert ids[0] == with_bos.bos_token_id
    assert [decode_after(with_bos, ids[:i], ids[i:i + 1]) for i in range(3)] == ["", "H", "i"]
    assert "".join(decode_after(with_bos, ids[:i], ids[i:i + 1]) for i in range(len(ids))) == "Hi there"


def test_echo_logprobs_in_exact_mode_are_the_base_models_prompt_logprobs(http, reference):
    prompt = "The capital of France is Paris"
    body = http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 0, "echo": True,
                                              "logprobs": 1, "kv_mode": "exact"}).json()
    choice = choice_of(body)
    ids = torch.tensor([reference.tokenizer.encode(prompt)])
    logits = reference.base(ids).logits[0, :-1]  # [N-1, V]
    expected = torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and lp["tokens"] == list(prompt) and lp["token_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), expected, atol=1e-4, rtol=1e-4)
    # top_logprobs holds the best token: equal to the actual token's logprob exactly when that one is the argmax
    greedy = logits.argmax(-1) == ids[0, 1:]
    for top, actual, is_best in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:], greedy.tolist()):
        assert (max(top.values()) == actual) == is_best
    assert body["usage"]["completion_tokens"] == 0


def test_predicted_scoring_equals_exact_scoring_when_the_auxiliary_is_the_base(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0)  # identity predictor: exact KV
    with serve_in_thread(create_app(model, ServeConfig(model_name=NAME))) as url:
        def score(mode, **extra):
            body = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": NAME, "prompt": "Water freezes at zero degrees Celsius", "max_tokens": 0, "echo": True,
                "logprobs": 1, "kv_mode": mode, **extra}).json()
            return torch.tensor(choice_of(body)["logprobs"]["token_logprobs"][1:])

        exact = score("exact")
        torch.testing.assert_close(score("predicted"), exact, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(score("predicted", exact_tail=3), exact, atol=1e-4, rtol=1e-4)


def test_predicted_scoring_runs_the_base_over_a_predicted_cache_for_the_prompt_tail(http, reference):
    prompt, tail = "Two plus two equals four", 5
    body = http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 0, "echo": True,
                                              "logprobs": 0, "kv_mode": "predicted", "exact_tail": tail}).json()
    ids = torch.tensor([reference.tokenizer.encode(prompt)])
    logits, _ = reference.prefill(ids, mode="predicted", exact_tail=tail)  # [1, tail, V]
    expected = torch.log_softmax(logits[0, :-1].float(), -1).gather(1, ids[0, -tail + 1:, None])[:, 0]
    got = choice_of(body)["logprobs"]["token_logprobs"][-tail + 1:]
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-4, rtol=1e-4)


def choice_of(body: dict) -> dict:
    assert "error" not in body, body
    return body["choices"][0]


# ---------------------------------------------------------------- chat
def test_chat_uses_the_chat_template_and_streams(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    resp = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"kv_mode": "exact"})
    prompt = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<assistant>")
    assert resp.choices[0].message.content == in_process(reference, reference.tokenizer.encode(prompt), "exact", 8)
    assert resp.choices[0].message.role == "assistant" and resp.model_extra["kv_mode"] == "exact"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"kv_mode": "exact"}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model_extra["ttft_s"] > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == resp.choices[0].message.content


def test_a_chat_sent_whole_again_at_each_turn_gets_the_ids_of_the_whole_conversation(client, reference):
    """Stateless clients send the whole conversation every turn; the server tokenizes only what follows the last
    special token of the conversation it saw before (kvpred.generation.ConversationTokenizer)."""
    messages = [{"role": "user", "content": "Hi</s> there"}]  # "</s>": a special token of the byte tokenizer
    for _ in range(3):
        resp = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                              extra_body={"kv_mode": "exact"})
        prompt = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = reference.tokenizer(prompt, add_special_tokens=False).input_ids
        assert resp.usage.prompt_tokens == len(ids)
        assert resp.choices[0].message.content == in_process(reference, ids, "exact", 6)
        messages += [{"role": "assistant", "content": resp.choices[0].message.content},
                     {"role": "user", "content": "and</s> then?"}]


# ---------------------------------------------------------------- errors
BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", b'{"model": "tiny", "prompt": "x"', 400, None),
    "wrong type": ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    "prompt of wrong type": ("/v1/completions", {"model": NAME, "prompt": {"text": "x"}}, 400, "prompt"),
    "unknown kv_mode": ("/v1/completions", {"model": NAME, "prompt": "x", "kv_mode": "fast"}, 400, "kv_mode"),
    "exact_tail 0": ("/v1/completions", {"model": NAME, "prompt": "x", "exact_tail": 0}, 400, "exact_tail"),
    "stream_options without a stream": ("/v1/completions", {"model": NAME, "prompt": "x",
                                                            "stream_options": {"include_usage": True}}, 400, None),
    "max_tokens over context": ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 600}, 400,
                                "max_tokens"),
    "prompt over context": ("/v1/completions", {"model": NAME, "prompt": "x" * 600}, 400, "prompt"),
    "token id out of range": ("/v1/completions", {"model": NAME, "prompt": [5, 9999]}, 400, "prompt"),
    "empty prompt": ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    "n > 1": ("/v1/completions", {"model": NAME, "prompt": "x", "n": 2}, 400, "n"),
    "unknown model": ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    "chat without messages": ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    "chat filling the context": ("/v1/chat/completions", {"model": NAME, "messages": [
        {"role": "user", "content": "x" * 600}]}, 400, "messages"),
    "chat message of wrong type": ("/v1/chat/completions", {"model": NAME, "messages": ["hi"]}, 400, "messages"),
    "unknown chat role": ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]},
                          400, "messages"),
    "misspelt extension": ("/v1/completions", {"model": NAME, "prompt": "x", "kv_mod": "exact"}, 400, "kv_mod"),
    "unknown chat field": ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                                   "exact_tale": 2}, 400, "exact_tale"),
    # json.dumps escapes a lone surrogate as JSON may carry it ("\\ud800"), and writes NaN, which Python's JSON reads
    "lone surrogate in a prompt": ("/v1/completions", json.dumps({"model": NAME, "prompt": "\ud800x"}).encode(), 400,
                                   "prompt"),
    "lone surrogate in a message": ("/v1/chat/completions", json.dumps(
        {"model": NAME, "messages": [{"role": "user", "content": "\ud800"}]}).encode(), 400, "messages"),
    "lone surrogate to tokenize": ("/tokenize", json.dumps({"prompt": "\ud800"}).encode(), 400, "prompt"),
    "NaN temperature": ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "temperature": float("nan")}
                                                      ).encode(), 400, "temperature"),
    "seed beyond 64 bits": ("/v1/completions", {"model": NAME, "prompt": "x", "seed": 2 ** 70}, 400, "seed"),
    "more prompts than the queue holds": ("/v1/completions", {"model": NAME, "prompt": ["x"] * 65}, 400, "prompt"),
    # refused by their length in characters, before the event loop would spend seconds tokenizing them
    "megabytes of prompt": ("/v1/completions", {"model": NAME, "prompt": ["x", "y" * 10 ** 7]}, 400, "prompt"),
    "megabytes of messages": ("/v1/chat/completions", {"model": NAME, "messages": [
        {"role": "user", "content": "z" * 10 ** 7}]}, 400, "messages"),
    "megabytes to tokenize": ("/tokenize", {"prompt": "z" * 10 ** 7}, 400, "prompt"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_openai_error_json_and_the_server_keeps_serving(http, case):
    path, payload, status, param = BAD_REQUESTS[case]
    resp = (http.post(path, content=payload, headers={"content-type": "application/json"})
            if isinstance(payload, bytes) else http.post(path, json=payload))
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    ok = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


def test_openai_fields_kvpred_does_not_implement_are_ignored_where_they_cannot_change_the_reply(client, reference):
    resp = client.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0, user="u1",
                                     presence_penalty=0, frequency_penalty=0, logit_bias={},
                                     extra_body={"kv_mode": "exact"})
    assert resp.choices[0].text == in_process(reference, reference.tokenizer.encode("Hello"), "exact", 4)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("path, field", [
    ("/v1/completions", {"presence_penalty": 0.5}), ("/v1/completions", {"frequency_penalty": -0.1}),
    ("/v1/completions", {"logit_bias": {"5": 10}}), ("/v1/completions", {"best_of": 2}),
    ("/v1/completions", {"suffix": "end"}), ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"tools": [TOOL], "tool_choice": "required"}),
    ("/v1/chat/completions", {"top_logprobs": 3}),
])
def test_openai_fields_that_would_change_the_reply_are_refused_by_name(http, path, field):
    body = {"model": NAME, "max_tokens": 2, **field,
            **({"prompt": "Hi"} if path.endswith("/completions") and "chat" not in path else
               {"messages": [{"role": "user", "content": "Hi"}]})}
    resp = http.post(path, json=body)
    assert resp.status_code == 400 and next(iter(field)) in resp.json()["error"]["message"]


def test_null_fields_take_their_defaults_as_in_openai(client, reference):
    ids = reference.tokenizer.encode("Hello")
    resp = client.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0, top_p=None, n=None,
                                     echo=None, stream=None, extra_body={"kv_mode": "exact", "exact_tail": None})
    assert resp.choices[0].text == in_process(reference, ids, "exact", 4)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          temperature=None, top_p=None, n=None, logprobs=None, stream=None)
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_token_ids_beyond_a_smaller_auxiliary_table_are_a_400(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from kvpred.testing import byte_tokenizer, tiny_config

    config = tiny_config("llama", layers=2, hidden=32, heads=2, kv_heads=1)
    config.vocab_size = 200  # the base's tokenizer, fewer embedding rows (as Qwen2.5 0.5B against 7B)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "aux")
    byte_tokenizer().save_pretrained(tmp_path / "aux")
    model = KVPredictionModel.from_pretrained(tiny_llama, aux=str(tmp_path / "aux"))
    with serve_in_thread(create_app(model, ServeConfig(model_name=NAME, warm_up=()))) as url:
        bad = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": [5, 230], "max_tokens": 2})
        ok = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": [5, 120], "max_tokens": 2})
    assert bad.status_code == 400 and "[0, 200)" in bad.json()["error"]["message"]
    assert ok.status_code == 200


def make_job(mode="exact", temperature=0.0, seed=None) -> Job:
    return Job(index=0, prompt_ids=[5, 6], mode=mode, exact_tail=1, max_tokens=4, temperature=temperature, top_p=1.0,
               seed=seed, stops=(), logprobs=None, score_tail=None, arrived=0.0, sink=lambda event: None)


def test_queued_prompts_with_equal_settings_are_decoded_together_up_to_max_batch(model):
    scheduler = Scheduler(model, ServeConfig(max_batch=3), Metrics(lambda: 0))  # not started: we take by hand
    jobs = [make_job(), make_job("predicted"), make_job(), make_job(seed=1), make_job(), make_job(temperature=0.7),
            make_job(), make_job()]
    scheduler.submit(jobs)
    assert scheduler.next_batch() == [jobs[0], jobs[2], jobs[4]]
    assert scheduler.next_batch() == [jobs[1]]
    assert scheduler.next_batch() == [jobs[3]]  # a seeded request runs alone, so that its seed reproduces
    assert scheduler.next_batch() == [jobs[5]]  # sampling settings differ
    assert scheduler.next_batch() == [jobs[6], jobs[7]]


def test_prompts_whose_clients_left_free_their_queue_places_at_once(model):
    """Not when the worker reaches them after the generation under way: until then they made live clients' requests
    a 429 (queue full) and /health counted them as waiting."""
    scheduler = Scheduler(model, ServeConfig(max_queue=2), Metrics(lambda: 0))  # not started: the worker is busy
    gone = [make_job(), make_job()]
    scheduler.submit(gone)
    for job in gone:
        job.cancelled.set()  # as the handler does when its client disconnects or times out
    live = [make_job(), make_job()]
    scheduler.submit(live)
    assert [job.finish_reason for job in gone] == ["cancelled", "cancelled"] and scheduler.depth == 2
    live[0].cancelled.set()
    assert scheduler.depth == 1 and scheduler.next_batch() == [live[1]]


@pytest.mark.parametrize("mode", ["aux", "exact"])
def test_prompts_decoded_padded_batch_together_only_where_they_fit_the_context(model, mode):
    """Aux mode decodes padded: the longest prompt gets the most new tokens. A rolling batch (exact mode) gives each
    row columns of its own, so anything that fits alone joins it."""
    scheduler = Scheduler(model, ServeConfig(max_batch=8), Metrics(lambda: 0))  # not started: we take by hand
    context = model.context_length
    long_prompt, long_reply, short = make_job(mode), make_job(mode), make_job(mode)
    long_prompt.prompt_ids, long_prompt.max_tokens = [5] * (context - 8), 8
    long_reply.max_tokens = context - 4  # each fits alone; padded to the long prompt, the long reply would not
    scheduler.submit([long_prompt, long_reply, short])
    if mode == "aux":
        assert scheduler.next_batch() == [long_prompt, short]
        assert scheduler.next_batch() == [long_reply]
    else:
        assert scheduler.next_batch() == [long_prompt, long_reply, short]


@pytest.mark.parametrize("tail", [1, 4])
def test_a_queued_prompt_joins_the_running_batch_when_a_row_comes_free(tiny_llama, tail):
    """Continuous batching: a prompt queued while a batch decodes takes the row of a prompt that finished, and
    ends long before the batch's longest reply does, with the text it gets alone; also with a longer exact tail (as
    chats get), one longer than a prompt too."""
    model = KVPredictionModel.from_pretrained(tiny_llama)
    head = model.base.lm_head  # untie the LM head and zero EOS's row, so that greedy decoding never stops early
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    head.weight.data[model.tokenizer.eos_token_id] = 0
    finished = []

    def job(prompt: str, max_tokens: int) -> Job:
        return Job(index=0, prompt_ids=model.tokenizer.encode(prompt), mode="predicted", exact_tail=tail,
                   max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=None, stops=(), logprobs=None,
                   score_tail=None, arrived=0.0, sink=lambda event: event.finish_reason and finished.append(prompt))

    scheduler = Scheduler(model, ServeConfig(), Metrics(lambda: 0))  # not started: run by hand
    short, long, joining = job("Hi", 2), job("Go on", 200), job("Yes", 3)
    scheduler.submit([short, long])
    scheduler._running = batch = scheduler.next_batch()
    assert batch == [short, long]
    scheduler.submit([joining])
    scheduler._run(batch)
    assert finished == ["Hi", "Yes", "Go on"] and scheduler._running == [short, long, joining]
    for j in (short, long, joining):
        assert j.text == in_process(model, j.prompt_ids, "predicted", j.max_tokens, tail)


def test_a_batch_of_a_long_prompt_and_a_long_reply_gets_the_cache_columns_both_need(model):
    """Each fits the context (512) alone; in one rolling batch the long prompt's columns come before the long
    reply's, so the cache outgrows the context (columns are not positions)."""
    jobs = [Job(index=0, prompt_ids=model.tokenizer.encode(prompt), mode="exact", exact_tail=1, max_tokens=n,
                temperature=0.0, top_p=1.0, seed=None, stops=(), logprobs=None, score_tail=None, arrived=0.0,
                sink=lambda event: None) for prompt, n in (("x" * 400, 10), ("Go", 400))]
    scheduler = Scheduler(model, ServeConfig(), Metrics(lambda: 0))
    scheduler.submit(jobs)
    scheduler._running = batch = scheduler.next_batch()
    scheduler._run(batch)
    for job in jobs:
        assert job.finish_reason in ("stop", "length")
        assert job.text == in_process(model, job.prompt_ids, "exact", job.max_tokens)


@pytest.mark.parametrize("mode", ["exact", "predicted"])
def test_prompts_that_join_through_a_captured_prompt_pass_answer_as_in_process(model, mode, monkeypatch):
    """What a GPU's rolling batch does (here on a CPU, the passes run eagerly): a prompt that joins the running batch
    finds no captured pass in the first batch, joins the plain way, and the batch makes one after its end; in the
    next batch the same join goes through it and gets its first (here its only) token from it."""
    from kvpred import serve

    monkeypatch.setattr(serve, "RollingBatch", functools.partial(RollingBatch, graph_joins=True))
    through = []
    real = RollingBatch.admit_prefilled
    monkeypatch.setattr(RollingBatch, "admit_prefilled", lambda *args: through.append(real(*args)) or through[-1])
    scheduler = Scheduler(model, ServeConfig(), Metrics(lambda: 0))
    model._steps.clear()
    for _ in range(2):
        first, joining = make_job(mode), make_job(mode)
        joining.prompt_ids, joining.max_tokens, joining.logprobs = [7, 8], 1, 2
        scheduler.submit([first])
        scheduler._running = batch = scheduler.next_batch()
        scheduler.submit([joining])  # queued behind it: it joins after the first step
        scheduler._run(batch)
        for job in (first, joining):
            assert job.text == in_process(model, job.prompt_ids, mode, job.max_tokens)
            assert job.finish_reason == "length" and job.ttft_s is not None
        (entry,) = joining.token_logprobs  # what its token was drawn from: the pass's logits
        assert len(entry[2]) == 2
    # the batches' first prompts start them, before any column is free for a whole prompt: the plain way
    assert through[:3] == [None, None, None] and through[3] is not None and len(through) == 4


def test_on_a_cpu_a_lone_prompt_with_nothing_queued_runs_on_its_own(model):
    """A rolling batch has max_batch rows, and on a CPU each costs in every step."""
    scheduler, lone = Scheduler(model, ServeConfig(), Metrics(lambda: 0)), make_job("predicted")
    assert not scheduler._rolls([lone]) and scheduler._rolls([lone, make_job("predicted")])
    scheduler.submit([make_job("aux")])
    assert scheduler._rolls([lone])  # a prompt waits behind it
    assert not scheduler._rolls([make_job("aux"), make_job("aux")])  # aux mode has its own model and loop
    off = Scheduler(model, ServeConfig(continuous_batching=False), Metrics(lambda: 0))
    assert not off._rolls([lone, make_job("predicted")])


def test_no_prompt_joins_a_running_batch_ahead_of_an_older_one_that_cannot(model):
    scheduler = Scheduler(model, ServeConfig(), Metrics(lambda: 0))
    scheduler._running = []
    batch = RollingBatch(model, Pooled(model.new_cache(2, 256)), slot=10)
    older, later = make_job("aux"), make_job("predicted")
    scheduler.submit([older, later])
    assert scheduler._joinable(later.batch_key, batch) == []  # the aux prompt must wait for the batch to end
    scheduler._pending.popleft()
    assert scheduler._joinable(later.batch_key, batch) == [later] and scheduler._running == [later]


@pytest.mark.parametrize("flags", [["--port", "-1"], ["--port", "70000"], ["--max-queue", "0"]])
def test_serve_flags_that_cannot_work_are_refused_before_the_model_loads(flags, capsys, monkeypatch):
    from kvpred.cli import main

    monkeypatch.setattr(KVPredictionModel, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    try:
        code = main(["serve", "--model", "anything", *flags])
    except SystemExit as exit_:  # argparse's own refusal
        code = exit_.code
    assert code == 2 and flags[0] in capsys.readouterr().err


def test_serving_on_a_port_in_use_is_refused_before_the_model_loads(capsys, monkeypatch):
    import socket

    from kvpred.cli import main

    monkeypatch.setattr(KVPredictionModel, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "anything", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_the_queue_takes_all_of_a_request_or_none_of_it(model):
    scheduler = Scheduler(model, ServeConfig(max_queue=2), Metrics(lambda: 0))  # not started: nothing leaves it
    scheduler.submit([make_job()])
    with pytest.raises(APIError) as err:
        scheduler.submit([make_job(), make_job()])
    assert err.value.status == 429 and scheduler.depth == 1
    with pytest.raises(APIError) as err:  # more prompts than the queue ever holds: retrying cannot help
        scheduler.submit([make_job(), make_job(), make_job()])
    assert err.value.status == 400 and "--max-queue" in err.value.message and scheduler.depth == 1


def test_a_full_queue_answers_429(model, monkeypatch):
    import threading

    monkeypatch.setattr(Scheduler, "start", lambda self: None)  # no worker: the first prompt stays queued
    with serve_in_thread(create_app(model, ServeConfig(model_name=NAME, max_queue=1, warm_up=()))) as url:
        def waiting_client():  # keeps its place in the queue while it waits (a client that left frees it)
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x"}, timeout=3)

        first = threading.Thread(target=waiting_client)
        first.start()
        wait_for(lambda: httpx.get(f"{url}/health").json()["queue_depth"] == 1)
        resp = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x"})
        first.join()
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "queue_full"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_generation(tiny_llama, stream):
    model = KVPredictionModel.from_pretrained(tiny_llama)
    head = model.base.lm_head  # untie the LM head and zero EOS's row, so that greedy decoding never stops early
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    head.weight.data[model.tokenizer.eos_token_id] = 0
    body = {"model": NAME, "prompt": "Go", "max_tokens": 500, "temperature": 0, "stream": stream, "kv_mode": "exact"}
    with serve_in_thread(create_app(model, ServeConfig(model_name=NAME))) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as s:
                next(s.iter_lines())  # the first chunk: generation is running
        else:  # a raw socket, so that the client leaves exactly once the server has accepted the request
            payload = json.dumps(body).encode()
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as raw:
                raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                wait_for(lambda: metric(http.get("/metrics").text, "kvpred_requests_total", endpoint="completions",
                                        mode="exact"))
        wait_for(lambda: metric(http.get("/metrics").text, "kvpred_prompts_finished_total", mode="exact",
                                reason="cancelled"))
        text = http.get("/metrics").text
    assert metric(text, "kvpred_prompts_finished_total", mode="exact", reason="cancelled") == 1, text
    assert metric(text, "kvpred_generated_tokens_total", mode="exact") < 500


# ---------------------------------------------------------------- models, health, metrics, CLI
def test_models_health_and_metrics(client, http):
    assert {m.id for m in client.models.list()} == {NAME, "kvpred"}
    assert client.models.retrieve(NAME).id == NAME
    assert http.get("/v1/models/other").status_code == 404
    assert http.get("/health").json()["status"] == "ok"
    client.completions.create(model="kvpred", prompt="abc", max_tokens=3, extra_body={"kv_mode": "aux"})
    http.post("/v1/completions", json={"model": NAME, "prompt": "x", "kv_mode": "nope"})
    text = http.get("/metrics").text
    assert metric(text, "kvpred_time_to_first_token_seconds_count", mode="aux") >= 1
    assert metric(text, "kvpred_queue_wait_seconds_count", mode="aux") >= 1
    assert metric(text, "kvpred_generated_tokens_total", mode="aux") >= 1
    assert metric(text, "kvpred_requests_total", endpoint="completions", mode="aux") >= 1
    assert metric(text, "kvpred_errors_total", status="400") >= 1
    assert "kvpred_queue_depth 0.0" in text


def test_tokenizer_endpoints_serve_the_models_tokenizer(http, reference):
    ids = http.post("/tokenize", json={"prompt": "hi there", "add_special_tokens": False}).json()["tokens"]
    assert ids == reference.tokenizer.encode("hi there", add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "hi there"
    assert http.get("/tokenizer_info").json()["eos_token"] == reference.tokenizer.eos_token


def test_cli_has_a_serve_subcommand():
    args = build_parser().parse_args(["serve", "--model", "m", "--port", "9000", "--default-mode", "exact"])
    assert (args.port, args.default_mode, args.exact_tail) == (9000, "exact", 1) and callable(args.func)
    assert args.warm_up == (256, 512, 1024, 2048)
    assert build_parser().parse_args(["serve", "--warm-up", "none"]).warm_up == ()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--warm-up", "256,many"])


def test_a_compiled_step_needs_a_warm_up_to_compile_it():
    args = build_parser().parse_args(["serve", "--model", "m", "--compile-step", "--warm-up", "none"])
    with pytest.raises(KVPredError, match="--compile-step compiles each shape's step during the warm-up"):
        args.func(args)


def test_a_compiled_server_compiles_in_its_warm_up_only(tiny_llama):
    from torch._dynamo.utils import counters

    on_gpu = torch.cuda.is_available()
    model = KVPredictionModel.from_pretrained(tiny_llama, device="cuda" if on_gpu else "cpu")
    rows = 2 if on_gpu else 1  # a GPU server warms up its rolling batch; a CPU one runs a lone prompt on its own
    model.compile_step()
    try:
        with serve_in_thread(create_app(model, ServeConfig(warm_up=(256,), max_batch=2))) as url:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1 and set(model._steps.entries) == {(rows, 256)}
            reply = httpx.post(f"{url}/v1/completions", json={"model": "kvpred", "prompt": "x" * 300, "max_tokens": 3})
            assert reply.status_code == 200 and (rows, 512) in model._steps.entries  # a shape not warmed up
            assert counters["stats"]["unique_graphs"] == graphs  # ... ran the uncompiled step
    finally:
        torch.compiler.set_stance("default")


def test_the_server_warms_up_before_it_takes_requests(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama)
    with pytest.raises(KVPredError, match="--warm-up"):
        create_app(model, ServeConfig(warm_up=(256, 2)))
    with serve_in_thread(create_app(model, ServeConfig(warm_up=(256, 512), max_batch=2,
                                                       continuous_batching=False))) as url:
        assert set(model._steps.entries) == {(1, 256), (1, 512)}  # before the first request (on a GPU, of 2 rows)
        ready = model._steps.entries[(1, 256)]
        reply = httpx.post(f"{url}/v1/completions", json={"model": "kvpred", "prompt": "hello", "max_tokens": 3})
        assert reply.status_code == 200 and model._steps.entries[(1, 256)] is ready


# ---------------------------------------------------------------- load
def test_32_concurrent_streaming_clients_all_succeed(server, http):
    async def one(client: AsyncOpenAI, i: int) -> tuple[float, float, str]:
        start = time.perf_counter()
        stream = await client.completions.create(model=NAME, prompt=f"Request number {i}:", max_tokens=8,
                                                 stream=True, extra_body={"kv_mode": ("exact", "predicted")[i % 2]})
        ttft, server_ttft, finish = None, None, None
        async for chunk in stream:
            if ttft is None:
                ttft, server_ttft = time.perf_counter() - start, chunk.model_extra["ttft_s"]
            finish = chunk.choices[0].finish_reason or finish
        return ttft, server_ttft, finish

    async def run():
        async with AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert all(finish in ("stop", "length") for _, _, finish in results)
    client_ttft = sorted(r[0] for r in results)
    server_ttft = sorted(r[1] for r in results)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    text = http.get("/metrics").text
    batches = metric(text, "kvpred_batch_size_sum") / metric(text, "kvpred_batch_size_count")
    print(f"\n32 concurrent streams: client TTFT p50 {q(client_ttft, .5) * 1e3:.1f} ms, "
          f"p95 {q(client_ttft, .95) * 1e3:.1f} ms; server ttft_s p50 {statistics.median(server_ttft) * 1e3:.1f} ms, "
          f"p95 {q(server_ttft, .95) * 1e3:.1f} ms; mean batch {batches:.1f} prompts (whole session)")


# ---------------------------------------------------------------- lm-evaluation-harness
def test_lm_eval_local_completions_runs_against_the_server(server, http, monkeypatch):
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity: pip install 'lm-eval[api]'")
    lm_eval = pytest.importorskip("lm_eval", reason="pip install 'lm-eval[api]' to run lm-eval against the server")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(TASKS)  # the task YAMLs name their jsonl relative to the working directory
    before = http.get("/metrics").text
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["serve_tiny_mc", "serve_tiny_gen"], limit=4,
        model_args=f"base_url={server}/v1/completions,model={NAME},tokenizer_backend=remote,max_length=512",
        task_manager=TaskManager(include_path=str(TASKS)))["results"]
    assert 0 <= results["serve_tiny_mc"]["acc,none"] <= 1
    assert 0 <= results["serve_tiny_gen"]["exact_match,none"] <= 1
    after = http.get("/metrics").text
    count = lambda text: metric(text, "kvpred_requests_total", endpoint="completions", mode="predicted")  # noqa
    served = count(after) - count(before)
    assert served == 4 * 3 + 4  # a log-likelihood request per (item, choice), a generation request per item
    print(f"\nlm-eval {getattr(lm_eval, '__version__', '?')}: {json.dumps(results, default=str)}")


@pytest.mark.smollm
def test_smollm2_chat_over_http_matches_in_process_generation():
    model = KVPredictionModel.from_pretrained("smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    tail = model.chat_tail  # what a chat request that names no exact_tail gets
    expected = {mode: in_process(model, ids, mode, 12, tail) for mode in ("exact", "predicted")}  # before serving it
    with serve_in_thread(create_app(model, ServeConfig(model_name="smollm2-135m"))) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for mode, text in expected.items():
            resp = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=12,
                                                  temperature=0, extra_body={"kv_mode": mode})
            assert resp.choices[0].message.content == text and resp.model_extra["ttft_s"] > 0
