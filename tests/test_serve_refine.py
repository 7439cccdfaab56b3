"""Specification of progressive refinement, adaptive fallback and multi-turn reuse in `kvpred serve` (issue 7):
the request fields refine, refine_chunk and session. Tiny random models served in-process on a free loopback port;
clients are the official `openai` package and plain httpx."""
import re

import httpx
import pytest
import torch
from openai import OpenAI

from kvpred.cli import build_parser
from kvpred.decoding import GraphStep
from kvpred.model import KVPredictionModel
from kvpred.refine import ChatSession, generate_refined
from kvpred.serve import Job, Metrics, Scheduler, ServeConfig, create_app, serve_in_thread
from kvpred.testing import CHAT_TEMPLATE

NAME = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}]


pytestmark = pytest.mark.usefixtures("one_thread")


def chat_model(path: str, keep_ratio: float) -> KVPredictionModel:
    model = KVPredictionModel.from_pretrained(path, keep_ratio=keep_ratio)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    return model


@pytest.fixture(scope="module")
def same_url(tiny_llama):
    """aux == base with an identity predictor: predicted mode is exact mode, refined or not."""
    app = create_app(chat_model(tiny_llama, 1.0), ServeConfig(model_name=NAME, max_sessions=2))
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def pruned_url(tiny_llama):
    """An untrained layer-pruned auxiliary: predicted mode differs from exact mode, so refinement shows."""
    with serve_in_thread(create_app(chat_model(tiny_llama, 0.5), ServeConfig(model_name=NAME))) as url:
        yield url


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """A copy of the pruned served model for in-process expectations (the server's worker owns its own)."""
    return chat_model(tiny_llama, 0.5)


@pytest.fixture
def same(same_url):
    return OpenAI(base_url=f"{same_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def pruned(pruned_url):
    return OpenAI(base_url=f"{pruned_url}/v1", api_key="unused", max_retries=0)


def complete(client: OpenAI, prompt: str = PROMPT, max_tokens: int = 24, **extra):
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body=extra)


def chat(client: OpenAI, messages: list[dict], max_tokens: int = 16, **extra):
    return client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize("refine", ["eager", "lazy"])
def test_refined_generation_with_aux_equal_to_base_is_exact_modes_greedy_text(same, refine):
    exact = complete(same, kv_mode="exact")
    resp = complete(same, kv_mode="predicted", refine=refine, refine_chunk=8)
    assert resp.choices[0].text == exact.choices[0].text and exact.usage.completion_tokens > 8
    assert resp.model_extra["refine"] == refine and resp.model_extra["kv_mode"] == "predicted"
    assert resp.model_extra["ttft_s"] > 0 and exact.model_extra["refine"] == "off"
    messages_exact = chat(same, CHAT, kv_mode="exact").choices[0].message.content
    assert chat(same, CHAT, refine=refine, refine_chunk=8).choices[0].message.content == messages_exact


def test_the_server_runs_generate_refined(pruned, reference):
    """With a pruned auxiliary, eager refinement changes the text; the server's is generate_refined's."""
    ids = torch.tensor([reference.tokenizer.encode(PROMPT)])
    out, info = generate_refined(reference, ids, max_new_tokens=24, refine="eager", chunk_size=8)
    assert info["exact_from"] is not None  # the switch to the exact cache happened within the reply
    expected = reference.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    resp = complete(pruned, refine="eager", refine_chunk=8)
    assert resp.choices[0].text == expected and resp.model_extra["refine"] == "eager"
    assert complete(pruned, refine="off").choices[0].text != expected


def test_auto_reports_the_policy_it_chose(pruned, reference):
    ids = torch.tensor([reference.tokenizer.encode(PROMPT)])
    out, info = generate_refined(reference, ids, max_new_tokens=12, refine="auto", chunk_size=8)
    resp = complete(pruned, max_tokens=12, refine="auto", refine_chunk=8)
    assert resp.model_extra["refine"] == info["policy"] and info["policy"] in ("eager", "lazy", "off")
    assert resp.choices[0].text == reference.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    two = pruned.completions.create(model=NAME, prompt=[PROMPT, "abc"], max_tokens=6, temperature=0,
                                    extra_body={"refine": "auto"})
    assert two.model_extra["refine"] in ("eager", "lazy", "off") and len(two.choices) == 2


def test_the_servers_refine_option_applies_where_refinement_can_run(tiny_llama):
    with serve_in_thread(create_app(chat_model(tiny_llama, 0.5), ServeConfig(model_name=NAME, refine="lazy",
                                                                              refine_chunk=8))) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert complete(client, max_tokens=4).model_extra["refine"] == "lazy"
        assert complete(client, max_tokens=4, refine="off").model_extra["refine"] == "off"
        assert complete(client, max_tokens=4, kv_mode="exact").model_extra["refine"] == "off"
        scored = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1)
        assert scored.model_extra["refine"] == "lazy" and scored.choices[0].logprobs.token_logprobs[1] is not None


def test_refined_generations_return_the_logprobs_of_their_tokens(same):
    """With aux == base a refined generation is exact mode's, so its generated-token logprobs are exact mode's."""
    refined = complete(same, max_tokens=8, refine="eager", refine_chunk=8, logprobs=2)
    exact = complete(same, max_tokens=8, kv_mode="exact", logprobs=2)
    assert refined.model_extra["refine"] == "eager"
    mine, theirs = refined.choices[0].logprobs, exact.choices[0].logprobs
    assert mine.tokens == theirs.tokens and len(mine.tokens) == 8
    assert mine.token_logprobs == pytest.approx(theirs.token_logprobs, abs=1e-4)


# ---------------------------------------------------------------- streaming and stopping
def test_a_refined_stream_reassembles_the_non_streamed_text(pruned):
    whole = complete(pruned, refine="eager", refine_chunk=8)
    chunks = list(pruned.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            extra_body={"refine": "eager", "refine_chunk": 8}))
    texts = [c.choices[0].text for c in chunks]
    assert sum(bool(t) for t in texts) > 1 and "".join(texts) == whole.choices[0].text
    assert chunks[0].model_extra["ttft_s"] > 0 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["refine"] == "eager"
    streamed = pruned.chat.completions.create(model=NAME, messages=CHAT, max_tokens=16, temperature=0, stream=True,
                                              extra_body={"refine": "auto", "refine_chunk": 8})
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == chat(pruned, CHAT, refine="auto", refine_chunk=8).choices[0].message.content
    assert chunks[-1].model_extra["refine"] in ("eager", "lazy", "off")


def test_a_stop_string_ends_a_refined_generation(pruned):
    full = complete(pruned, refine="eager", refine_chunk=8).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    resp = pruned.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"refine": "eager", "refine_chunk": 8})
    assert resp.choices[0].text == full[:full.index(stop)] and resp.choices[0].finish_reason == "stop"
    assert resp.model_extra["refine"] == "eager"
    assert complete(pruned, refine="eager", refine_chunk=8).choices[0].text == full  # and the server goes on


def test_a_client_leaving_a_refined_stream_cancels_its_generation(tiny_llama):
    model = chat_model(tiny_llama, 0.5)
    head = model.base.lm_head  # untie the LM head and zero EOS's row, so that greedy decoding never stops early
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    head.weight.data[model.tokenizer.eos_token_id] = 0
    steps = []  # one base forward per prefill or decode step (refinement runs the backbone alone)
    model.base.register_forward_hook(lambda *args: steps.append(1))
    body = {"model": NAME, "prompt": "Go", "max_tokens": 500, "temperature": 0, "stream": True, "refine": "eager"}
    with serve_in_thread(create_app(model, ServeConfig(model_name=NAME))) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as s:
            next(s.iter_lines())
        finished = 'kvpred_prompts_finished_total{mode="predicted",reason="cancelled"} 1.0'
        for _ in range(1500):
            if finished in (text := http.get("/metrics").text):
                break
    assert finished in text
    assert metric(text, 'kvpred_generated_tokens_total{mode="predicted"}') < 500 and len(steps) < 500


# ---------------------------------------------------------------- multi-turn reuse
def two_turns(client: OpenAI, session: str, refine: str = "eager", max_tokens: int = 12):
    first = chat(client, CHAT, max_tokens, session=session, refine=refine, refine_chunk=8)
    reply = first.choices[0].message.content
    messages = CHAT + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    return first, messages, chat(client, messages, max_tokens, session=session, refine=refine, refine_chunk=8)


def test_a_session_reuses_earlier_turns_and_replies_like_exact_mode(same, same_url):
    first, messages, second = two_turns(same, "s-exact")
    assert first.model_extra["session"] == "s-exact" and first.model_extra["reused_tokens"] == 0
    prompt_tokens = first.usage.prompt_tokens
    assert second.model_extra["reused_tokens"] >= prompt_tokens  # the first turn's prompt came from the cache
    assert second.model_extra["refine"] == "eager"
    exact = chat(same, messages, kv_mode="exact", max_tokens=12)
    assert second.choices[0].message.content == exact.choices[0].message.content
    assert "session" not in exact.model_extra
    assert metric(httpx.get(f"{same_url}/metrics").text, "kvpred_session_reused_tokens_total") >= prompt_tokens


@pytest.mark.parametrize("refine", ["eager", "off", "auto"])
def test_a_session_turn_is_chat_sessions_turn(pruned, reference, refine):
    session = ChatSession(reference, system=CHAT[0]["content"], refine=refine, chunk_size=8)
    replies = [session.send(CHAT[1]["content"], max_new_tokens=12), session.send("And then?", max_new_tokens=12)]
    first, _, second = two_turns(pruned, f"s-{refine}", refine)
    assert [first.choices[0].message.content, second.choices[0].message.content] == replies
    assert second.model_extra["reused_tokens"] == session.last_info["reused_tokens"] > 0
    assert second.model_extra["refine"] == session.last_info["policy"]


def test_a_streamed_session_turn_reports_its_reuse_in_the_last_chunk(pruned):
    _, messages, second = two_turns(pruned, "s-whole")  # the same two turns, the second one not streamed
    chat(pruned, CHAT, 12, session="s-stream", refine="eager", refine_chunk=8)
    chunks = list(pruned.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, extra_body={"session": "s-stream", "refine": "eager",
                                                                          "refine_chunk": 8}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == second.choices[0].message.content
    last = chunks[-1].model_extra
    assert last["session"] == "s-stream" and last["reused_tokens"] == second.model_extra["reused_tokens"] > 0


def test_a_session_turn_cut_by_a_stop_string_leaves_earlier_turns_reusable(same):
    first, messages, second = two_turns(same, "s-cut")  # two whole turns; the third is cut short
    messages = messages + [{"role": "assistant", "content": second.choices[0].message.content},
                           {"role": "user", "content": "Tell me more."}]
    full = chat(same, messages, kv_mode="exact").choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = same.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stop=[stop],
                                       extra_body={"session": "s-cut"})
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.model_extra["reused_tokens"] >= first.usage.prompt_tokens
    follow = messages + [{"role": "assistant", "content": cut.choices[0].message.content},
                         {"role": "user", "content": "ok"}]
    resp = chat(same, follow, session="s-cut")
    assert resp.model_extra["reused_tokens"] >= cut.model_extra["reused_tokens"]
    assert resp.choices[0].message.content == chat(same, follow, kv_mode="exact").choices[0].message.content


def test_messages_that_do_not_extend_the_session_start_it_over(same):
    chat(same, CHAT, session="s-over")
    other = [CHAT[0], {"role": "user", "content": "Something else entirely"}]
    resp = chat(same, other, session="s-over")
    assert resp.model_extra["reused_tokens"] == 0
    follow = other + [{"role": "assistant", "content": resp.choices[0].message.content},
                      {"role": "user", "content": "ok"}]
    assert chat(same, follow, session="s-over").model_extra["reused_tokens"] > 0


def test_only_the_most_recently_used_sessions_keep_their_cache(same, same_url):
    """The server keeps max_sessions=2: the least recently used session is dropped and starts over."""
    turns = {}
    for session in ("lru-a", "lru-b", "lru-c"):
        reply = chat(same, CHAT, session=session).choices[0].message.content
        turns[session] = CHAT + [{"role": "assistant", "content": reply}, {"role": "user", "content": "ok"}]
    assert chat(same, turns["lru-c"], session="lru-c").model_extra["reused_tokens"] > 0
    assert chat(same, turns["lru-a"], session="lru-a").model_extra["reused_tokens"] == 0  # evicted by lru-c
    assert metric(httpx.get(f"{same_url}/metrics").text, "kvpred_sessions") == 2


def test_a_new_session_starts_from_a_dropped_sessions_cache_and_replies_as_a_fresh_one(tiny_llama, reference):
    app = create_app(chat_model(tiny_llama, 0.5), ServeConfig(model_name=NAME, max_sessions=1))
    scheduler = app.state.scheduler
    with serve_in_thread(app) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chat(client, CHAT, session="first", refine="off")
        dropped = scheduler.sessions["first"].pooled
        other = [CHAT[0], {"role": "user", "content": "Something else entirely"}]
        reply = chat(client, other, session="second", refine="off").choices[0].message.content
        assert list(scheduler.sessions) == ["second"]  # max_sessions=1: "first" went, and "second" took its cache
        assert scheduler.sessions["second"].pooled is dropped and scheduler.spares == []
    fresh = ChatSession(reference, system=CHAT[0]["content"], refine="off")
    assert reply == fresh.send(other[1]["content"], max_new_tokens=16)  # what the old cache held is not read


# ---------------------------------------------------------------- automatic sessions (--auto-sessions)
@pytest.fixture
def auto(tiny_llama):
    """--auto-sessions with a pruned auxiliary, so that reuse changes replies; a server per test, since the stored
    conversations are what each test specifies."""
    app = create_app(chat_model(tiny_llama, 0.5), ServeConfig(model_name=NAME, auto_sessions=True))
    with serve_in_thread(app) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def continued(messages: list[dict], reply, user: str = "And then?") -> list[dict]:
    """What a stateless client sends next: the conversation so far, the reply (a response or a text) and a new turn."""
    text = reply if isinstance(reply, str) else reply.choices[0].message.content
    return messages + [{"role": "assistant", "content": text}, {"role": "user", "content": user}]


def test_with_auto_sessions_a_stateless_client_reuses_earlier_turns_as_a_named_session_does(auto):
    first = chat(auto, CHAT, 12)
    session = first.model_extra["session"]
    assert session.startswith("auto-") and first.model_extra["reused_tokens"] == 0
    second = chat(auto, continued(CHAT, first), 12)  # the whole conversation again, no session named
    assert second.model_extra["session"] == session
    assert second.model_extra["reused_tokens"] >= first.usage.prompt_tokens
    _, messages, named = two_turns(auto, "named", refine="off")
    assert messages == continued(CHAT, first)
    assert second.choices[0].message.content == named.choices[0].message.content
    assert second.model_extra["reused_tokens"] == named.model_extra["reused_tokens"]


def test_a_stored_conversation_is_continued_once_and_a_history_that_matches_none_starts_afresh(auto):
    first = chat(auto, CHAT)
    messages = continued(CHAT, first)
    second, again = chat(auto, messages), chat(auto, messages)  # two clients send the same history
    assert second.model_extra["session"] == first.model_extra["session"] and second.model_extra["reused_tokens"] > 0
    assert again.model_extra["reused_tokens"] == 0  # the stored conversation holds second's turn by now
    edited = chat(auto, continued(CHAT, "A reply this server never gave."))
    assert edited.model_extra["reused_tokens"] == 0
    sessions = {resp.model_extra["session"] for resp in (first, again, edited)}
    assert len(sessions) == 3 and all(session.startswith("auto-") for session in sessions)


def test_an_auto_request_continues_the_longest_stored_conversation_its_history_extends(auto):
    chat(auto, CHAT)  # one client's first exchange
    first = chat(auto, CHAT)  # another's, alike
    messages = continued(CHAT, first)
    second = chat(auto, messages)
    third = chat(auto, continued(messages, second))  # extends both stored conversations
    assert third.model_extra["session"] == second.model_extra["session"]
    assert third.model_extra["reused_tokens"] >= second.usage.prompt_tokens


def test_sessions_a_client_named_are_never_continued_automatically(auto):
    first = chat(auto, CHAT, session="mine")
    messages = continued(CHAT, first)
    stateless = chat(auto, messages)
    assert stateless.model_extra["session"] != "mine" and stateless.model_extra["reused_tokens"] == 0
    assert chat(auto, messages, session="mine").model_extra["reused_tokens"] > 0  # still the client's to continue
    pinned_id = stateless.model_extra["session"]  # a client may pin its automatic session: then it is named
    pinned = chat(auto, continued(messages, stateless), session=pinned_id)
    assert pinned.model_extra["session"] == pinned_id and pinned.model_extra["reused_tokens"] > 0
    later = chat(auto, continued(continued(messages, stateless), pinned))
    assert later.model_extra["session"] != pinned_id and later.model_extra["reused_tokens"] == 0


def test_under_auto_sessions_requests_that_cannot_be_session_turns_run_as_without_it(auto, pruned):
    prefilled = CHAT + [{"role": "assistant", "content": "Well,"}]  # the reply's opening given: no new user turn
    for messages, max_tokens, extra in [(CHAT, 16, {"kv_mode": "exact"}), (prefilled, 16, {}), (CHAT, 0, {})]:
        resp = chat(auto, messages, max_tokens, **extra)
        assert "session" not in resp.model_extra and "reused_tokens" not in resp.model_extra
        assert resp.choices[0].message.content == chat(pruned, messages, max_tokens, **extra).choices[0].message.content


def test_without_auto_sessions_a_chat_request_that_names_no_session_runs_none(same):
    first = chat(same, CHAT)
    second = chat(same, continued(CHAT, first))
    assert not ServeConfig().auto_sessions
    assert all("session" not in resp.model_extra and "reused_tokens" not in resp.model_extra
               for resp in (first, second))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_a_gpu_the_first_session_takes_the_warm_ups_spare_cache_and_its_graph(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0, device="cuda")
    model.tokenizer.chat_template = CHAT_TEMPLATE
    app = create_app(model, ServeConfig(model_name=NAME, warm_up=(256,)))
    with serve_in_thread(app) as url:
        (spare,) = app.state.scheduler.spares
        assert isinstance(spare.step, GraphStep) and spare.cache.capacity == 256
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        first = chat(client, CHAT, session="gpu-spare")
        assert app.state.scheduler.sessions["gpu-spare"].pooled is spare
        assert first.choices[0].message.content == chat(client, CHAT, kv_mode="exact").choices[0].message.content


# ---------------------------------------------------------------- errors
BAD_REQUESTS = {
    "unknown refine policy": ("/v1/completions", {"prompt": "x", "refine": "sometimes"}, "refine", "refine"),
    "refine on exact": ("/v1/completions", {"prompt": "x", "refine": "eager", "kv_mode": "exact"}, "refine",
                        "predicted"),
    "refine on aux": ("/v1/chat/completions", {"messages": CHAT, "refine": "lazy", "kv_mode": "aux"}, "refine",
                      "predicted"),
    "refine_chunk 0": ("/v1/completions", {"prompt": "x", "refine": "eager", "refine_chunk": 0}, "refine_chunk",
                       ">= 2"),
    "refine_chunk 1": ("/v1/chat/completions", {"messages": CHAT, "refine_chunk": 1}, "refine_chunk", ">= 2"),
    "refine_chunk of wrong type": ("/v1/completions", {"prompt": "x", "refine_chunk": "8"}, "refine_chunk", "int"),
    "session on completions": ("/v1/completions", {"prompt": "x", "session": "s"}, "session", "chat"),
    "empty session id": ("/v1/chat/completions", {"messages": CHAT, "session": ""}, "session", "at least 1"),
    "session on exact": ("/v1/chat/completions", {"messages": CHAT, "session": "s", "kv_mode": "exact"}, "session",
                         "predicted"),
    "session ending on an assistant message": (
        "/v1/chat/completions", {"messages": CHAT + [{"role": "assistant", "content": "Hi"}], "session": "s"},
        "messages", "user message"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_refine_and_session_values_get_a_400_naming_the_field(same_url, case):
    path, payload, param, words = BAD_REQUESTS[case]
    with httpx.Client(base_url=same_url, timeout=60) as http:
        resp = http.post(path, json={"model": NAME, **payload})
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
        assert words in error["message"], error["message"]
        assert http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1}).status_code == 200


# ---------------------------------------------------------------- scheduling and CLI
def make_job(refine="off", chunk=256, request_id="", session=None) -> Job:
    return Job(index=0, prompt_ids=[5, 6], mode="predicted", exact_tail=1, max_tokens=4, temperature=0.0, top_p=1.0,
               seed=None, stops=(), logprobs=None, score_tail=None, arrived=0.0, sink=lambda event: None,
               refine=refine, refine_chunk=chunk, request_id=request_id, session=session,
               messages=[{"role": "user", "content": "x"}] if session else None)


def test_refined_prompts_batch_with_equal_policies_auto_with_its_own_request_sessions_alone(tiny_llama):
    scheduler = Scheduler(KVPredictionModel.from_pretrained(tiny_llama), ServeConfig(), Metrics(lambda: 0))
    jobs = [make_job("eager"), make_job(), make_job("eager", 8), make_job("eager"), make_job("auto", request_id="r1"),
            make_job("auto", request_id="r2"), make_job("auto", request_id="r1"), make_job(session="s"),
            make_job(session="s"), make_job()]
    scheduler.submit(jobs)
    assert scheduler.next_batch() == [jobs[0], jobs[3]]
    assert scheduler.next_batch() == [jobs[1], jobs[9]]  # unrefined prompts batch as before
    assert scheduler.next_batch() == [jobs[2]]  # another chunk size
    assert scheduler.next_batch() == [jobs[4], jobs[6]]  # one auto decision per request
    assert scheduler.next_batch() == [jobs[5]]
    assert scheduler.next_batch() == [jobs[7]] and scheduler.next_batch() == [jobs[8]]


def test_cli_serve_takes_refine_and_session_options():
    args = build_parser().parse_args(["serve", "--refine", "auto", "--refine-chunk", "64", "--max-sessions", "4",
                                      "--auto-sessions"])
    assert (args.refine, args.refine_chunk, args.max_sessions, args.auto_sessions) == ("auto", 64, 4, True)
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.refine, defaults.auto_sessions) == ("off", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_refined_requests_and_session_turns_are_served_from_a_gpu(tiny_llama):
    """On CUDA the server's refined requests and session turns run on graph steps and captured refinement chunks;
    with aux == base they answer as exact mode does, logprobs included."""
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0, device="cuda")
    model.tokenizer.chat_template = CHAT_TEMPLATE
    with serve_in_thread(create_app(model, ServeConfig(model_name=NAME))) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(2):  # the second time on captured graphs
            refined = complete(client, max_tokens=12, refine="eager", refine_chunk=8, logprobs=2)
            exact = complete(client, max_tokens=12, kv_mode="exact", logprobs=2)
            assert refined.choices[0].logprobs.tokens == exact.choices[0].logprobs.tokens
            assert refined.choices[0].logprobs.token_logprobs == pytest.approx(
                exact.choices[0].logprobs.token_logprobs, abs=1e-3)
        first = chat(client, CHAT, session="gpu", refine="eager", refine_chunk=8)
        messages = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                           {"role": "user", "content": "And then what happened?"}]
        second = chat(client, messages, session="gpu", refine="eager", refine_chunk=8)
        assert second.model_extra["reused_tokens"] > 0
        assert second.choices[0].message.content == chat(client, messages, kv_mode="exact").choices[0].message.content
