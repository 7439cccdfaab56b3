"""Specification of progressive cache refinement, adaptive fallback and multi-turn reuse (issue 7)."""
import argparse
import io
import json
import math
import re

import pytest
import torch

from kvpred.generation import TimedStreamer, chat_exact_tail, encode_prompts
from kvpred.model import KVPredictionModel, position_ids_from_mask
from kvpred.models import KVPredError
from kvpred.decoding import Pooled
from kvpred.refine import (ChatSession, Thresholds, _prefill, choose_policy, confidence, generate_refined,
                           measure_chat_tail, prefix_agreement, register, token_agreement, tradeoff_curve)
from kvpred.testing import CHAT_TEMPLATE, save_tiny_model

PROMPTS = ["The quick brown fox jumps over", "a", "Hello, world! This prompt is quite a lot longer than the others."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def same(tiny_llama):
    """aux == base with an identity predictor: predicted mode is exact mode."""
    return KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0)


@pytest.fixture(scope="module")
def pruned(tiny_llama):
    """An untrained layer-pruned auxiliary: predicted mode differs from exact mode."""
    return KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)


def batch(model, prompts=PROMPTS):
    return encode_prompts(model.tokenizer, prompts)


def chat_model(path, keep_ratio):
    model = KVPredictionModel.from_pretrained(path, keep_ratio=keep_ratio)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    return model


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize("tail", [1, 3])
def test_with_aux_equal_to_base_every_policy_reproduces_exact_mode(same, tail):
    ids, mask = batch(same)
    exact = same.generate(ids, mask, mode="exact", max_new_tokens=16)
    wary = Thresholds("entropy", off_below=0.0, eager_above=0.0)
    for refine in ("eager", "lazy", "off", "auto"):
        out, info = generate_refined(same, ids, mask, exact_tail=tail, max_new_tokens=16, refine=refine,
                                     chunk_size=8, thresholds=wary)
        assert torch.equal(out, exact), refine
        assert info["policy"] == ("eager" if refine == "auto" else refine)


def test_refine_off_is_plain_predicted_mode(pruned):
    ids, mask = batch(pruned)
    out, info = generate_refined(pruned, ids, mask, exact_tail=2, max_new_tokens=16, refine="off")
    assert torch.equal(out, pruned.generate(ids, mask, mode="predicted", exact_tail=2, max_new_tokens=16))
    assert not torch.equal(out, pruned.generate(ids, mask, mode="exact", max_new_tokens=16))
    assert info["exact_from"] is None and info["refined_per_step"] == [0] * 15


def test_the_first_token_is_predicted_modes_whatever_the_policy(pruned):
    ids, mask = batch(pruned)
    predicted = pruned.generate(ids, mask, mode="predicted", max_new_tokens=1)
    for refine in ("eager", "lazy", "off"):
        out, _ = generate_refined(pruned, ids, mask, max_new_tokens=1, refine=refine)
        assert torch.equal(out, predicted)


# ---------------------------------------------------------------- refinement
def test_after_the_switch_decoding_is_the_exact_continuation_of_the_tokens_so_far(pruned):
    """Teacher-forced: from the switch on, each row's tokens are exact greedy decoding of prompt + earlier tokens,
    checked on each row of a padded batch run alone."""
    ids, mask = batch(pruned)
    out, info = generate_refined(pruned, ids, mask, max_new_tokens=24, refine="eager", chunk_size=16)
    switch = info["exact_from"]
    assert switch is not None and 1 < switch < 24
    assert sum(info["refined_per_step"]) == ids.shape[1] + switch - 1  # the whole sequence before the switch
    new, eos = out[:, ids.shape[1]:], pruned.tokenizer.eos_token_id
    checked = 0
    for row, prompt in enumerate(PROMPTS):
        if eos in new[row, :switch]:  # the row ended before the switch: nothing after it but padding
            assert (new[row, switch:] == pruned.tokenizer.pad_token_id).all()
            continue
        prompt_ids, _ = encode_prompts(pruned.tokenizer, [prompt])
        prefix = torch.cat([prompt_ids[0], new[row, :switch]])[None]
        exact = pruned.generate(prefix, mode="exact", max_new_tokens=24 - switch)[0, prefix.shape[1]:]
        assert torch.equal(exact, new[row, switch:switch + len(exact)])  # generate stops a row at its eos
        assert (new[row, switch + len(exact):] == pruned.tokenizer.pad_token_id).all()
        checked += 1
    assert checked >= 2
    # the same prefix decoded without refinement goes elsewhere: refinement is what made the tail exact
    unrefined, _ = generate_refined(pruned, ids, mask, max_new_tokens=24, refine="off")
    assert not torch.equal(unrefined, out)


@pytest.mark.parametrize("refine, chunk, budget", [("eager", 16, 16), ("lazy", 16, 4), ("lazy", 4, 2)])
def test_each_step_refines_one_chunk_until_it_catches_up(pruned, refine, chunk, budget):
    ids, _ = batch(pruned, PROMPTS[:1])
    n = ids.shape[1]  # 30 tokens: catching up takes the first s with s * budget >= n + s - 1
    switch = math.ceil((n - 1) / (budget - 1))
    out, info = generate_refined(pruned, ids, max_new_tokens=switch + 4, refine=refine, chunk_size=chunk)
    assert info["exact_from"] == switch
    assert info["refined_per_step"][:switch - 1] == [budget] * (switch - 1)
    assert info["refined_per_step"][switch:] == [0] * 3
    assert len(info["step_s"]) == switch + 3
    assert info["decode_s_before_exact"] > 0 and info["decode_s_after_exact"] > 0


def test_refinement_overwrites_the_predicted_cache_in_place_with_the_exact_one(pruned):
    """No second cache: the pooled cache generate_refined decoded from ends up holding the exact base's K/V of
    the sequence, and the pool holds nothing else."""
    ids, mask = batch(pruned, PROMPTS[:1])
    pruned._steps.clear()
    out, info = generate_refined(pruned, ids, mask, max_new_tokens=12, refine="eager", chunk_size=16)
    assert info["exact_from"] is not None
    (cache,) = [pooled.cache for pooled in pruned._steps.entries.values()]
    cols = out.shape[1] - 1  # the last token was never fed
    _, exact = pruned.prefill(out[:, :cols], mode="exact")
    for layer, true in enumerate(exact.layers):
        torch.testing.assert_close(cache.key_arena[layer, :, :, :cols], true.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache.value_arena[layer, :, :, :cols], true.values, atol=1e-4, rtol=1e-4)


def test_a_captured_refinement_chunk_writes_the_exact_cache_of_a_padded_batch(pruned, monkeypatch):
    """GraphChunk (refinement's chunk on a GPU) attends over the whole buffer under its own mask. Run here with its
    "graph" replaying the eager body, chunk by chunk over a left-padded batch whose cache first held predicted K/V,
    it leaves the exact cache in every row's real columns, with the last chunk ending where the sequence does."""
    from kvpred import decoding

    ids, mask = batch(pruned)
    b, n = ids.shape
    pos = position_ids_from_mask(mask)
    cache, config = pruned.new_cache(b, 256), pruned.base.config

    class Replayed:  # stands in for _capture's CUDAGraph on the CPU: runs the body as it was captured, once at once
        def __init__(self, body, device, before_warm_up=lambda: None):
            self.body, self.captured = body, (config._attn_implementation, cache.step_slot)
            before_warm_up()
            self.replay()

        def replay(self):
            previous = config._attn_implementation
            config._attn_implementation, cache.step_slot = self.captured
            try:
                self.body()
            finally:
                config._attn_implementation, cache.step_slot = previous, None

    monkeypatch.setattr(decoding, "_capture", Replayed)
    pruned.predict_into(cache, ids, mask, exact_tail=1)
    width, chunk = 24, None
    for end in (24, 48, n):  # the last chunk, [n - 24, n), recomputes columns that are already exact
        start = end - width
        args = ids[:, start:end], pos[:, start:end], start, mask[:, :end]
        if chunk is None:
            chunk = decoding.GraphChunk(pruned, cache, *args)
        else:
            chunk(*args)
    _, exact = pruned.prefill(ids, mask, mode="exact")  # the exact cache of all n columns
    real = mask.bool()
    for layer, true in enumerate(exact.layers):
        for row in range(b):
            cols = real[row]
            torch.testing.assert_close(cache.key_arena[layer, row, :, :n][:, cols], true.keys[row][:, cols],
                                       atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cache.value_arena[layer, row, :, :n][:, cols], true.values[row][:, cols],
                                       atol=1e-4, rtol=1e-4)


def test_a_prompt_within_the_exact_tail_is_exact_from_the_first_token(pruned):
    ids, _ = batch(pruned, ["abc"])
    out, info = generate_refined(pruned, ids, exact_tail=3, max_new_tokens=6, refine="off")
    assert info["exact_from"] == 0 and info["decode_s_before_exact"] is None
    assert torch.equal(out, pruned.generate(ids, mode="exact", max_new_tokens=6))


def test_refinement_that_never_catches_up_reports_no_switch(pruned):
    ids, mask = batch(pruned)
    _, info = generate_refined(pruned, ids, mask, max_new_tokens=5, refine="eager", chunk_size=4)
    assert info["exact_from"] is None and info["refined_per_step"] == [4] * 4
    assert info["decode_s_after_exact"] is None


def test_sampling_streaming_and_stopping(pruned):
    ids, _ = batch(pruned, PROMPTS[:1])
    greedy, _ = generate_refined(pruned, ids, max_new_tokens=10, chunk_size=8)
    # a nucleus this small keeps only the most likely token: sampling becomes greedy
    nucleus, _ = generate_refined(pruned, ids, max_new_tokens=10, chunk_size=8, do_sample=True, top_p=1e-6)
    assert torch.equal(nucleus, greedy)
    top1, _ = generate_refined(pruned, ids, max_new_tokens=10, chunk_size=8, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)
    torch.manual_seed(0)
    first, _ = generate_refined(pruned, ids, max_new_tokens=10, do_sample=True, temperature=5.0)
    torch.manual_seed(0)
    assert torch.equal(generate_refined(pruned, ids, max_new_tokens=10, do_sample=True, temperature=5.0)[0], first)
    streamer = TimedStreamer(pruned.tokenizer)
    _, info = generate_refined(pruned, ids, max_new_tokens=10, streamer=streamer)
    assert streamer.first_token_at is not None and info["ttft_s"] > 0
    stop = int(greedy[0, ids.shape[1] + 3])  # the 4th new token: generation ends right after emitting it
    stopped, info = generate_refined(pruned, ids, max_new_tokens=10, chunk_size=8, eos_token_id=stop)
    assert stop not in greedy[0, ids.shape[1]:ids.shape[1] + 3].tolist()
    assert torch.equal(stopped, greedy[:, :ids.shape[1] + 4]) and info["new_tokens"] == 4


def test_bad_arguments_fail_with_clear_errors(pruned):
    ids, _ = batch(pruned, PROMPTS[:1])
    with pytest.raises(KVPredError, match="unknown refine policy"):
        generate_refined(pruned, ids, refine="sometimes")
    with pytest.raises(KVPredError, match="chunk_size must be >= 2"):
        generate_refined(pruned, ids, chunk_size=1)
    with pytest.raises(KVPredError, match="max_new_tokens must be >= 1"):
        generate_refined(pruned, ids, max_new_tokens=0)
    with pytest.raises(KVPredError, match="context limit"):
        generate_refined(pruned, ids, max_new_tokens=1000)
    with pytest.raises(KVPredError, match="exact_tail >= 2"):
        generate_refined(pruned, ids, refine="auto", thresholds=Thresholds("kv_error", 0.1, 0.5))
    # a tail over the whole prompt predicts nothing: nothing to decide, whatever the signal
    seq, info = generate_refined(pruned, ids[:, :2], exact_tail=4, max_new_tokens=2, refine="auto",
                                 thresholds=Thresholds("kv_error", 0.1, 0.5))
    assert info["policy"] == "off" and info["exact_from"] == 0


# ---------------------------------------------------------------- adaptive fallback
def test_a_row_with_nothing_predicted_has_no_kv_error_beside_a_longer_one(pruned):
    """Its cache is exact (all of it is in the tail), as when it runs alone, whatever the auxiliary makes of it."""
    short, longer = torch.tensor([[7, 8]]), torch.tensor([[3, 4, 5, 6, 7, 8]])
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), longer])
    mask = torch.tensor([[0, 0, 0, 0, 1, 1], [1] * 6])
    signal = confidence(pruned, ids, mask, exact_tail=2)
    assert signal["kv_error"][0] == 0 and signal["kv_error"][1] > 0.1
    assert "kv_error" not in confidence(pruned, short, exact_tail=2)


def test_confidence_signals_see_a_perfect_and_an_untrained_predictor(same, pruned):
    ids, mask = batch(same)
    perfect, untrained = confidence(same, ids, mask, exact_tail=4), confidence(pruned, ids, mask, exact_tail=4)
    assert set(perfect) == {"entropy", "tail_nll", "kv_error"} and perfect["entropy"].shape == (3,)
    assert perfect["kv_error"].max() < 1e-4 and untrained["kv_error"][[0, 2]].min() > 0.1
    assert untrained["kv_error"][1] == 0  # "a": all of it in the tail, nothing predicted
    # with aux == base the signals are those of the exact base: tail NLL of the known tail tokens
    logits, _ = same.prefill(ids, mask, mode="exact", exact_tail=4)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, -3:], reduction="none")
    real = mask[:, -3:] * mask[:, -4:-1]  # padded tail tokens, and a row's first after padding, do not count
    torch.testing.assert_close(perfect["tail_nll"], (nll * real).sum(-1) / real.sum(-1).clamp(min=1),
                               atol=1e-4, rtol=1e-4)
    assert set(confidence(same, ids, mask, exact_tail=1)) == {"entropy"}


def test_a_rows_signals_do_not_depend_on_how_far_its_batch_pads_it(pruned):
    alone = confidence(pruned, *batch(pruned, ["ab"]), exact_tail=4)
    padded = confidence(pruned, *batch(pruned, ["ab", "The quick brown fox"]), exact_tail=4)
    for name in alone:
        torch.testing.assert_close(padded[name][0], alone[name][0], atol=1e-4, rtol=1e-4)


def test_entropy_tracks_how_sure_the_base_is(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    ids, mask = batch(model)
    norm = model.base.model.norm.weight
    with torch.no_grad():
        norm.mul_(100.0)  # logits x100: a near one-hot distribution
    sure = confidence(model, ids, mask)["entropy"]
    with torch.no_grad():
        norm.zero_()  # all logits 0: the uniform distribution
    unsure = confidence(model, ids, mask)["entropy"]
    assert sure.max() < 0.5
    torch.testing.assert_close(unsure, torch.full((3,), math.log(model.base.config.vocab_size)))
    assert choose_policy({"entropy": sure}) == "off" and choose_policy({"entropy": unsure}) == "eager"


def test_choose_policy_on_constructed_signals():
    t = Thresholds("kv_error", off_below=0.2, eager_above=0.6)
    assert choose_policy({"kv_error": 0.1}, t) == "off"
    assert choose_policy({"kv_error": 0.4}, t) == "lazy"
    assert choose_policy({"kv_error": 0.9}, t) == "eager"
    # a batch shares one cache: the least trustworthy row decides
    assert choose_policy({"kv_error": torch.tensor([0.1, 0.1, 0.7])}, t) == "eager"
    assert choose_policy({"kv_error": torch.tensor([0.1, 0.3])}, t) == "lazy"
    with pytest.raises(KVPredError, match="not available"):
        choose_policy({"entropy": 1.0}, t)
    with pytest.raises(KVPredError, match="off_below <= eager_above"):
        Thresholds("entropy", off_below=2.0, eager_above=1.0)
    with pytest.raises(KVPredError, match="unknown confidence signal"):
        Thresholds("perplexity")


def test_auto_refines_only_when_the_signal_says_so(pruned):
    ids, mask = batch(pruned)
    predicted = pruned.generate(ids, mask, mode="predicted", exact_tail=2, max_new_tokens=8)
    trusting = Thresholds("kv_error", off_below=100.0, eager_above=100.0)
    out, info = generate_refined(pruned, ids, mask, exact_tail=2, max_new_tokens=8, refine="auto",
                                 thresholds=trusting)
    assert info["policy"] == "off" and torch.equal(out, predicted)
    assert len(info["signal"]["kv_error"]) == 3
    wary = Thresholds("kv_error", off_below=0.0, eager_above=0.0)
    _, info = generate_refined(pruned, ids, mask, exact_tail=2, max_new_tokens=8, refine="auto", thresholds=wary,
                               chunk_size=64)
    assert info["policy"] == "eager" and info["exact_from"] == 1


def test_auto_on_entropy_reads_the_first_tokens_own_distribution(pruned):
    """The entropy needs no extra pass: auto computes it from the logits of generate's own first token."""
    ids, mask = batch(pruned)
    _, info = generate_refined(pruned, ids, mask, max_new_tokens=2, refine="auto")
    assert set(info["signal"]) == {"entropy"}
    expected = confidence(pruned, ids, mask)["entropy"]
    torch.testing.assert_close(torch.tensor(info["signal"]["entropy"]), expected, atol=1e-4, rtol=1e-4)


def test_tradeoff_curve_from_per_request_measurements():
    signal, off, refined = [0.1, 0.5, 0.9, 0.3], [1.0, 0.5, 0.0, 0.75], [1.0, 1.0, 1.0, 1.0]
    rows = tradeoff_curve(signal, off, refined, [-1.0, 0.4, 2.0])
    assert [r["fraction_refined"] for r in rows] == [1.0, 0.5, 0.0]
    assert [r["agreement"] for r in rows] == [1.0, (1.0 + 1.0 + 1.0 + 0.75) / 4, (1.0 + 0.5 + 0.0 + 0.75) / 4]
    with pytest.raises(KVPredError, match="equally long"):
        tradeoff_curve([0.1], [1.0, 0.5], [1.0], [0.0])


def test_agreement_measures():
    new = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4]])
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert token_agreement(new, ref, 0).tolist() == [1.0, 0.75]
    assert prefix_agreement(new, ref, 0).tolist() == [1.0, 0.25]
    assert token_agreement(new[:, :2], ref, 0).tolist() == [0.5, 0.25]  # a row that stopped early is padded


# ---------------------------------------------------------------- multi-turn reuse
TURNS = ["Hi there", "What is two and two?", "ok"]


@pytest.mark.parametrize("arch, refine", [("llama", "eager"), ("llama", "lazy"), ("llama", "auto"),
                                          ("mistral", "eager")])  # mistral: a sliding-window base
def test_chat_session_with_aux_equal_to_base_replies_like_exact_mode(tiny_models, arch, refine):
    model = chat_model(tiny_models[arch], 1.0)
    session = ChatSession(model, system="be brief", exact_tail=2, refine=refine, chunk_size=8)
    for turn, text in enumerate(TURNS):
        conversation = session.conversation_ids(session.messages + [{"role": "user", "content": text}])
        exact = model.generate(conversation, mode="exact", max_new_tokens=12)[0, conversation.shape[1]:]
        before = session.tokens[0, :-1]  # the columns cached after the previous reply
        reply = session.send(text, max_new_tokens=12)
        assert torch.equal(session.tokens[0, conversation.shape[1]:], exact)
        assert reply == session.messages[-1]["content"] and session.messages[-2]["content"] == text
        # later turns reuse every cached column the new conversation starts with; with aux == base the base is
        # never dearer than the auxiliary, so after the first turn it runs the new columns itself
        common = int((before == conversation[0, :len(before)]).long().cumprod(0).sum())
        info = session.last_info
        assert info["reused_tokens"] == common and (common > 0) == (turn > 0)
        assert info["predicted_tokens"] == (0 if turn > 0 else conversation.shape[1] - 2)


def test_after_an_exact_history_a_turn_is_predicted_only_where_that_costs_fewer_flops(tiny_llama):
    """The auxiliary keeps no cache, so predicting a new turn costs P_aux * (whole conversation) against
    P_base * (new tokens) for the base alone: a short follow-up runs exactly, a long document is predicted."""
    model = chat_model(tiny_llama, 0.25)  # 1 of 4 layers: the base costs 4x the auxiliary per token
    session = ChatSession(model, refine="eager", chunk_size=8)
    session.send("Tell me a long story about " + "the sea " * 20, max_new_tokens=4)
    session.send("ok", max_new_tokens=4)
    assert session.last_info["reused_tokens"] > 0 and session.last_info["predicted_tokens"] == 0
    session.send("Now summarise this: " + "pasted words " * 12, max_new_tokens=4)
    assert session.last_info["predicted_tokens"] > 0


def test_the_auxiliary_reads_only_what_its_cache_lacks_and_predicts_as_if_it_read_everything(tiny_llama):
    model = chat_model(tiny_llama, 0.5)
    session = ChatSession(model, exact_tail=1, refine="off")  # predicted columns stay in the cache to be compared
    first = session.conversation_ids([{"role": "user", "content": TURNS[0]}]).shape[1]
    session.send(TURNS[0], max_new_tokens=4)
    assert session.aux_cache.get_seq_length() == first - 1  # all but the last prompt token, which the base ran
    text = "Now summarise this: " + "pasted words " * 12
    for edit_history in (False, True):  # then the first turn is edited: the auxiliary must read it all again
        if edit_history:
            session.messages[0]["content"] = "Hi"
        read_before = session.aux_cache.get_seq_length()
        conversation = session.conversation_ids(session.messages + [{"role": "user", "content": text}])
        n, read = conversation.shape[1], []
        hook = model.aux.model.embed_tokens.register_forward_hook(lambda m, a, out: read.append(a[0].shape[1]))
        session.send(text, max_new_tokens=4)
        hook.remove()
        reuse = session.last_info["reused_tokens"]
        assert session.last_info["predicted_tokens"] == n - 1 - reuse > 0
        assert read == [n - 1 - (0 if edit_history else read_before)]  # not the columns it has read already
        fresh = Pooled(model.new_cache(1, n))  # the same prefill with an auxiliary that reads the whole conversation
        _prefill(model, conversation, torch.ones_like(conversation), 1, fresh)
        for mine, theirs in zip(session.cache.slices(n - 1), fresh.cache.slices(n - 1)):
            torch.testing.assert_close(mine[..., reuse:, :], theirs[..., reuse:, :], atol=1e-4, rtol=1e-4)


def test_chat_prompts_let_the_base_run_the_template_tokens_that_open_the_reply(tiny_llama):
    """A predictor trained on plain text predicts a chat template's special tokens badly, so chats run the tokens
    after the last user message ("\\n<assistant>" here, a byte each) through the base unless told otherwise."""
    model = chat_model(tiny_llama, 0.5)
    opening = model.tokenizer("\n<assistant>", add_special_tokens=False).input_ids
    assert chat_exact_tail(model.tokenizer) == model.chat_tail == len(opening) == 12
    assert ChatSession(model).exact_tail == 12 and ChatSession(model, exact_tail=1).exact_tail == 1
    model.tokenizer.chat_template = None
    assert chat_exact_tail(model.tokenizer) == 1  # no template: the paper's one token


def test_a_checkpoint_trained_on_chats_records_its_own_chat_tail(tiny_llama, tmp_path):
    """One measured to answer chats as well with a shorter tail says so in its config; a bad value is refused."""
    model = chat_model(tiny_llama, 0.5)
    model.config.chat_exact_tail = 1
    model.save_pretrained(tmp_path / "m")
    again = KVPredictionModel.from_pretrained(str(tmp_path / "m"))
    again.tokenizer.chat_template = CHAT_TEMPLATE
    assert again.chat_tail == 1 and ChatSession(again).exact_tail == 1
    config = json.loads((tmp_path / "m" / "kvpred_config.json").read_text())
    (tmp_path / "m" / "kvpred_config.json").write_text(json.dumps(dict(config, chat_exact_tail=0)))
    with pytest.raises(KVPredError, match="chat_exact_tail must be a positive integer"):
        KVPredictionModel.from_pretrained(str(tmp_path / "m"))


def test_chat_session_keeps_an_exact_cache_of_earlier_turns(tiny_llama):
    model = chat_model(tiny_llama, 0.5)
    session = ChatSession(model, refine="lazy", chunk_size=8)
    for text in TURNS[:2]:
        session.send(text, max_new_tokens=6)
        assert session.last_info["refined_after_reply"] > 0  # lazy refinement finished after the reply
        history = session.tokens[:, :-1]
        _, exact = model.prefill(history, mode="exact")
        assert session.cache.get_seq_length() == history.shape[1] == session.exact_cols
        for mine, true in zip(session.cache.layers, exact.layers):
            torch.testing.assert_close(mine.keys, true.keys, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(mine.values, true.values, atol=1e-4, rtol=1e-4)
    assert session.last_info["reused_tokens"] > 0  # the second turn was predicted on top of the first's cache


def test_a_turn_that_outgrows_the_session_cache_moves_it_to_a_larger_one(tiny_llama, monkeypatch):
    monkeypatch.setattr("kvpred.refine.capacity_bucket", lambda tokens, _: tokens)  # every turn outgrows its cache
    model = chat_model(tiny_llama, 1.0)
    session = ChatSession(model, refine="eager", chunk_size=8)
    capacities = []
    for text in TURNS:
        conversation = session.conversation_ids(session.messages + [{"role": "user", "content": text}])
        exact = model.generate(conversation, mode="exact", max_new_tokens=6)[0, conversation.shape[1]:]
        session.send(text, max_new_tokens=6)
        assert torch.equal(session.tokens[0, conversation.shape[1]:], exact)
        capacities.append(session.cache.capacity)
    assert capacities == sorted(set(capacities))  # a new, larger cache each turn
    assert session.last_info["reused_tokens"] > 0  # with the earlier columns carried over


def test_a_session_past_half_its_cache_grows_it_after_the_reply_not_before_the_next_first_token(tiny_llama):
    model = chat_model(tiny_llama, 1.0)  # aux == base: replies equal exact mode's
    session = ChatSession(model, refine="eager", chunk_size=64)
    session.send("word " * 25, max_new_tokens=6)  # about 150 byte tokens in a cache of 256
    assert 2 * session.cached > 256 and session.cache.capacity == 512
    assert session.cache.get_seq_length() == session.cached
    grown = session.pooled
    conversation = session.conversation_ids(session.messages + [{"role": "user", "content": TURNS[1]}])
    exact = model.generate(conversation, mode="exact", max_new_tokens=6)[0, conversation.shape[1]:]
    session.send(TURNS[1], max_new_tokens=6)
    assert session.pooled is grown and session.last_info["reused_tokens"] > 0  # the columns moved with it
    assert torch.equal(session.tokens[0, conversation.shape[1]:], exact)


def test_a_session_goes_on_after_the_model_is_cast_computing_its_history_again(tiny_llama):
    model = chat_model(tiny_llama, keep_ratio=1.0)
    session = ChatSession(model, refine="off")
    session.send("hello there, how are you?", max_new_tokens=4)
    model.to(torch.bfloat16)
    reply = session.send("and tomorrow?", max_new_tokens=4)
    assert session.last_info["reused_tokens"] == 0 and session.cache.key_arena.dtype == torch.bfloat16
    fresh = ChatSession(model, refine="off")
    fresh.messages = session.messages[:2]  # the same history, never cached in float32
    assert fresh.send("and tomorrow?", max_new_tokens=4) == reply


def test_a_session_cache_does_not_grow_past_the_context_length(tiny_llama):
    session = ChatSession(chat_model(tiny_llama, 1.0), refine="eager", chunk_size=64)
    session.send("word " * 60, max_new_tokens=6)  # over half of a 512-column cache, and the context is 512
    assert 2 * session.cached > 512 and session.cache.capacity == 512


def test_a_session_cache_grows_to_the_context_length_when_that_is_not_a_power_of_two(tiny_llama):
    model = chat_model(tiny_llama, 1.0)
    for config in (model.base.config, model.aux.config):
        config.max_position_embeddings = 400
    session = ChatSession(model, refine="eager", chunk_size=64)
    session.send("word " * 25, max_new_tokens=6)  # past half of 256 columns: the cache grows, to 400 and no more
    assert 2 * session.cached > 256 and session.cache.capacity == 400


def test_a_reply_that_never_steps_still_leaves_the_next_turn_a_step(tiny_llama):
    model = chat_model(tiny_llama, 0.5)
    session = ChatSession(model, refine="off")
    session.send(TURNS[0], max_new_tokens=1)  # decoding stops at its first token, before any step
    assert session.pooled.step is not None  # made after the reply (a CUDA graph on a GPU)


def test_chat_session_without_refinement_keeps_only_the_exact_prefix(tiny_llama):
    model = chat_model(tiny_llama, 0.5)
    session = ChatSession(model, refine="off")
    session.send(TURNS[0], max_new_tokens=4)
    assert session.exact_cols == 0 and session.last_info["refined_after_reply"] == 0


def test_auto_still_decides_for_a_turn_it_need_not_predict_when_earlier_turns_stayed_approximate(tiny_llama):
    model = chat_model(tiny_llama, 0.5)
    session = ChatSession(model, refine="auto", chunk_size=8, exact_tail=12,
                          thresholds=Thresholds(off_below=1e9, eager_above=1e9))  # auto trusts the prediction
    session.send(TURNS[0], max_new_tokens=6)
    assert session.last_info["policy"] == "off" and session.exact_cols == 0
    session.thresholds, session.exact_tail = Thresholds(off_below=-1.0, eager_above=-1.0), 200  # ... now refines
    session.send("Ok", max_new_tokens=6)  # the base runs the whole new turn: nothing of it predicted
    assert session.last_info["predicted_tokens"] == 0 and session.last_info["policy"] == "eager"
    assert session.exact_cols == session.cache.get_seq_length()  # the first turn's columns were refined too


def test_a_session_turn_with_nothing_to_generate_or_text_no_tokenizer_takes_is_a_clear_error(tiny_llama):
    session = ChatSession(chat_model(tiny_llama, 0.5))
    with pytest.raises(KVPredError, match="max_new_tokens must be >= 1"):
        session.send("hi", max_new_tokens=0)
    with pytest.raises(KVPredError, match="message is not valid UTF-8"):
        session.send(b"hi \xff".decode("utf-8", "surrogateescape"))
    assert session.messages == []  # neither turn happened


def test_chat_session_checks_its_settings_before_the_first_turn(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(KVPredError, match="exact_tail must be >= 1"):
        ChatSession(model, exact_tail=0)
    model.tokenizer.chat_template = None
    with pytest.raises(KVPredError, match="no chat template"):
        ChatSession(model)


class Seen:
    """A tokenizer that notes the texts it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text, **kwargs):
        self.texts.append(text)
        return self.tokenizer(text, **kwargs)


def test_a_conversation_is_tokenized_from_the_previous_texts_last_added_token_on():
    from kvpred.generation import ConversationTokenizer
    from kvpred.testing import byte_tokenizer

    tok = Seen(byte_tokenizer())
    tokenize = ConversationTokenizer(tok)
    first = "<s>hello there</s><s>assistant\n"
    second = first + "fine thanks</s><s>user\nhow are you?</s><s>assistant\n"
    for text in (first, second, second + "ok"):
        assert tokenize(text) == tok(text, add_special_tokens=False).input_ids
    assert tok.texts[::2] == [first, "assistant\nfine thanks</s><s>user\nhow are you?</s><s>assistant\n",
                              "assistant\nok"]
    assert tokenize("<s>another chat") == tok("<s>another chat", add_special_tokens=False).input_ids
    assert tok.texts[-2] == "<s>another chat"  # not an extension: tokenized whole


def test_kept_conversations_go_on_in_turns_each_from_its_own_last_added_token():
    """As a server sees stateless clients: several conversations, each sent whole at every turn, interleaved."""
    from kvpred.generation import ConversationTokenizer
    from kvpred.testing import byte_tokenizer

    tok = Seen(byte_tokenizer())
    tokenize = ConversationTokenizer(tok, keep=2)
    a, b = "<s>system</s><s>user: hi</s><s>", "<s>system</s><s>user: yo</s><s>"
    for text in (a, b, a + "hello</s><s>", b + "hey</s><s>", a + "hello</s><s>again</s><s>"):
        assert tokenize(text) == tok(text, add_special_tokens=False).input_ids
    # each from the last added token that ordinary text follows: the check then has something to compare
    assert tok.texts[::2] == [a, b, "user: hi</s><s>hello</s><s>", "user: yo</s><s>hey</s><s>",
                              "hello</s><s>again</s><s>"]
    assert len(tokenize.recent) == 2


def test_added_tokens_that_strip_the_space_after_them_or_a_metaspace_start_give_the_whole_texts_ids():
    """A prompt that ends with an added token leaves nothing after it to check: the cut is an earlier one."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kvpred.generation import ConversationTokenizer
    from kvpred.testing import byte_tokenizer

    stripping = byte_tokenizer()
    stripping.add_special_tokens({"additional_special_tokens": [AddedToken("<bot>", rstrip=True, special=True)]})
    chars = sorted(set("▁abcdefghijklmnopqrstuvwxyz"))
    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] + chars)}
    meta = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    meta.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    meta.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    sentencepiece_like = PreTrainedTokenizerFast(tokenizer_object=meta, bos_token="<s>", eos_token="</s>",
                                                 unk_token="<unk>", additional_special_tokens=["[INST]", "[/INST]"])
    for tok, turns in ((stripping, ["<user>hi\n<bot>", "<user>hi\n<bot> hello\n<user>more\n<bot>"]),
                       (sentencepiece_like, ["[INST]hi[/INST]", "[INST]hi[/INST]hello</s>[INST]more[/INST]"])):
        tokenize = ConversationTokenizer(tok)
        for text in turns:
            assert tokenize(text) == tok(text, add_special_tokens=False).input_ids


def test_where_the_previous_ids_do_not_come_out_the_same_the_whole_conversation_is_tokenized():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from kvpred.generation import ConversationTokenizer

    merged = Tokenizer(models.BPE(vocab={"<s>": 0, "a": 1, "b": 2, "c": 3, "bc": 4}, merges=[("b", "c")]))
    tok = Seen(PreTrainedTokenizerFast(tokenizer_object=merged, bos_token="<s>"))
    tokenize = ConversationTokenizer(tok)
    assert tokenize("<s>ab") == [0, 1, 2]
    assert tokenize("<s>abc") == [0, 1, 4]  # "b" now merges with what follows it
    assert tok.texts[-1] == "<s>abc"


def test_chat_command_answers_each_line_and_reuses_the_cache(tmp_path, monkeypatch, capsys):
    path = save_tiny_model(tmp_path / "m")
    model = KVPredictionModel.from_pretrained(str(path), keep_ratio=0.5)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    model.tokenizer.save_pretrained(path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["chat", "--model", str(path), "--device", "cpu", "--max-new-tokens", "4",
                              "--refine", "lazy", "--verbose"])
    # the third line is too long for the context: it is refused, the chat goes on with its cache, and the exit
    # status says that a turn got no reply
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you?\n" + "q" * 600 + "\nand now?\n/reset\nhi\n"))
    assert args.func(args) == 1
    err = capsys.readouterr().err
    reused = [int(n) for n in re.findall(r"\[reused (\d+) of", err)]
    assert len(reused) == 4 and reused[0] == 0 and 0 < reused[1] < reused[2]
    assert reused[3] == 0 and "[new conversation]" in err  # /reset begins again with an empty cache
    assert "exceeds the context limit" in err and "type /reset" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert args.func(args) == 0
    args.max_new_tokens = 600
    with pytest.raises(KVPredError, match="--max-new-tokens must be in \\[1, 512\\)"):
        args.func(args)


def test_chat_at_a_terminal_asks_for_each_message_and_ends_on_ctrl_d(monkeypatch, capsys):
    from kvpred.refine import _typed_lines

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    typed = ["hello", "how are you?"]

    def fake_input(prompt):
        print(prompt, end="")
        if not typed:
            raise EOFError  # what input() raises on Ctrl+D
        return typed.pop(0)

    monkeypatch.setattr("builtins.input", fake_input)
    assert list(_typed_lines(Terminal())) == ["hello", "how are you?"]
    assert capsys.readouterr().out == "> > > "
    assert list(_typed_lines(io.StringIO("piped\n"))) == ["piped\n"]  # no prompt when not at a terminal


# ---------------------------------------------------------------- the real model
@pytest.mark.smollm
def test_refinement_on_smollm_becomes_the_exact_base_continuation():
    model = KVPredictionModel.from_pretrained("smollm2-135m")
    ids, _ = encode_prompts(model.tokenizer, ["The history of the Roman Empire begins with the founding of Rome, "
                                              "which according to legend happened in 753 BC when"])
    out, info = generate_refined(model, ids, max_new_tokens=12, chunk_size=8)
    switch = info["exact_from"]
    assert switch is not None and switch < 12
    prefix = out[:, :ids.shape[1] + switch]
    exact = model.generate(prefix, mode="exact", max_new_tokens=12 - switch)
    assert torch.equal(exact, out)


# ------------------------------------------------------------------ calibrated thresholds
def test_entropy_thresholds_cut_where_agreement_crosses_trust_and_distrust():
    from kvpred.refine import entropy_thresholds

    entropy = [0.1, 0.2, 0.3, 0.4, 1.0, 2.0, 3.0, 4.0]
    agree = [1, 1, 1, 0, 1, 1, 0, 0]
    t = entropy_thresholds(entropy, agree, trust=0.9, distrust=0.3)
    assert t.off_below == pytest.approx(0.35)  # the 3 lowest agree 3/3; the lowest 4 to 8 stay below 0.9
    assert t.eager_above == pytest.approx(2.5)  # the 2 highest agree 0/2; the highest 3 to 8 stay above 0.3
    never = entropy_thresholds(entropy, [0] * 8, trust=0.9, distrust=0.5)
    assert never.off_below < min(entropy) and never.eager_above < min(entropy)  # nothing trusted, all refined
    always = entropy_thresholds(entropy, [1] * 8, trust=0.9, distrust=0.5)
    assert always.off_below > max(entropy) and always.eager_above >= always.off_below  # all trusted
    # equal entropies fall on one side of any cut: the 2 lowest agree 1/2, but no cut separates them from the
    # third, and the lowest 1 or 3 agree less
    tied = entropy_thresholds([0.0, 1.0, 1.0, 2.0], [0, 1, 0, 0], trust=0.5, distrust=0.0)
    assert tied.off_below < 0.0


def test_calibrate_saves_thresholds_that_auto_refinement_then_uses(pruned, tmp_path, shards, capsys):
    from kvpred import cli
    from kvpred.refine import Thresholds

    pruned.save_pretrained(tmp_path / "model")
    argv = ["calibrate", "--model", str(tmp_path / "model"), "--data", shards, "--out", str(tmp_path / "calibrated"),
            "--prompts", "8", "--prompt-len", "24", "--batch-size", "4", "--device", "cpu"]
    assert cli.main(argv + ["--save-dtype", "bfloat16"]) == 0
    assert KVPredictionModel.from_pretrained(str(tmp_path / "calibrated")).config.refine_thresholds is not None
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(tmp_path / "calibrated" / "predictor.safetensors").values()} == {torch.bfloat16}
    assert cli.main(argv + ["--overwrite"]) == 0
    report = json.loads((tmp_path / "calibrated" / "calibration.json").read_text())
    assert report["prompts"] == 8 and 0 <= report["agreement"] <= 1
    assert report["off_fraction"] + report["lazy_fraction"] + report["eager_fraction"] == pytest.approx(1)
    calibrated = KVPredictionModel.from_pretrained(str(tmp_path / "calibrated"))
    assert Thresholds.for_model(calibrated).off_below == report["off_below"]
    # the saved thresholds decide "auto": all-trusting ones give "off", all-distrusting ones "eager"
    ids = torch.randint(3, 259, (1, 12))
    for saved, policy in (({"off_below": 1e9, "eager_above": 1e9}, "off"),
                          ({"off_below": -1, "eager_above": -1}, "eager")):
        calibrated.config.refine_thresholds = {"signal": "entropy", **saved}
        _, info = generate_refined(calibrated, ids, refine="auto", max_new_tokens=2)
        assert info["policy"] == policy
    assert cli.main(argv[:-2] + ["--trust", "0.2", "--distrust", "0.5"]) == 2
    assert "--distrust <= --trust" in capsys.readouterr().err
    for flag in ("--prompt-len", "--prompts"):  # one token predicts nothing; one prompt makes no threshold
        assert cli.main(argv + [flag, "1"]) == 2
        assert "need --prompts >= 2 windows of --prompt-len >= 2 tokens" in capsys.readouterr().err


def test_calibrate_measuring_in_bf16_saves_the_weights_as_they_were(tiny_llama, tmp_path, shards):
    from safetensors.torch import load_file

    from kvpred import cli

    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    with torch.no_grad():
        model.predictor.key_weight.add_(0.01 * torch.randn_like(model.predictor.key_weight))  # not bf16 numbers
    model.save_pretrained(tmp_path / "model")
    # bf16 is the serving dtype on a GPU, and what calibrate measures in there by default
    assert cli.main(["calibrate", "--model", str(tmp_path / "model"), "--data", shards, "--out",
                     str(tmp_path / "calibrated"), "--prompts", "4", "--prompt-len", "16", "--device", "cpu",
                     "--dtype", "bfloat16"]) == 0
    before = load_file(tmp_path / "model" / "predictor.safetensors")
    after = load_file(tmp_path / "calibrated" / "predictor.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)


# ------------------------------------------------------------------ calibrated chat tail
def write_chats(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_chat_prompts_are_read_up_to_the_opening_of_the_last_reply(tmp_path):
    """From OpenAI-style "messages" (the turns before the last assistant message) or from conversations already
    rendered in the template (`kvpred data sample --chat`), cut after the opening of their last reply."""
    from kvpred.generation import read_chat_prompts
    from kvpred.testing import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    chats = write_chats(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"}]},
        {"text": "<user>what is 2+2?\n<assistant>4\n<user>and 3+3?\n<assistant>6\n"},
        {"text": "<user>one more\n<assistant>sure\n"}])
    assert read_chat_prompts(chats, tok, 10) == [
        "<user>hi\n<assistant>hello\n<user>how are you?\n<assistant>",
        "<user>what is 2+2?\n<assistant>4\n<user>and 3+3?\n<assistant>",
        "<user>one more\n<assistant>"]
    assert len(read_chat_prompts(str(tmp_path), tok, 2)) == 2  # a folder, capped
    held = tmp_path / "shared" / "data"  # evaluation sets calibrate nothing, as they train nothing
    held.mkdir(parents=True)
    (held / "chats.jsonl").write_text((tmp_path / "chats.jsonl").read_text())
    with pytest.raises(KVPredError, match="evaluation data"):
        read_chat_prompts(str(held), tok, 10)


@pytest.mark.parametrize("line, error", [
    ({"text": "plain prose, no chat at all"}, "not a chat in this tokenizer's template"),
    ({"messages": [{"role": "system", "content": "be brief"}]}, "no user message"),
    ({"messages": [{"role": "user"}]}, 'needs a "role" and a "content" string'),
    ({"prompt": "hi"}, 'neither a "messages" list nor a "text" string'),
    ("[1, 2", "is not valid JSON")])
def test_a_chat_line_that_is_not_a_conversation_is_a_clear_error_naming_its_line(tmp_path, line, error):
    from kvpred.generation import read_chat_prompts
    from kvpred.testing import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"text": "<user>fine\n<assistant>"}) + "\n" + (line if isinstance(line, str)
                                                                            else json.dumps(line)) + "\n")
    with pytest.raises(KVPredError, match=re.escape("chats.jsonl:2")) as err:
        read_chat_prompts(str(path), tok, 10)
    assert error in str(err.value)
    tok.chat_template = None
    with pytest.raises(KVPredError, match="no chat template"):
        read_chat_prompts(str(path), tok, 10)


def test_the_chat_tail_is_the_shortest_within_tolerance_of_the_reply_openings_agreement():
    from kvpred.refine import shortest_tail_within

    agreement = {1: 0.50, 2: 0.68, 3: 0.71, 4: 0.69, 5: 0.73, 6: 0.72}  # 6: the whole reply opening
    assert shortest_tail_within(agreement, 0.02) == 3
    assert shortest_tail_within(agreement, 0.0) == 5  # as good as the opening, though shorter
    assert shortest_tail_within(agreement, 0.3) == 1


def test_chat_tails_are_measured_from_one_token_to_the_whole_reply_opening(tiny_llama):
    prompts = [f"<user>question number {i}, asked in a chat?\n<assistant>" for i in range(6)]
    same = chat_model(tiny_llama, 1.0)  # aux == base, identity predictor: every tail gives exact's first token
    tail, report = measure_chat_tail(same, prompts, batch_size=4, progress=False)
    assert tail == report["chat_exact_tail"] == 1 and report["chat_prompts"] == 6
    assert report["reply_opening_tokens"] == 12 and list(report["chat_first_token_agreement"]) == [
        str(w) for w in range(1, 13)]
    assert all(r["mean"] == 1.0 for r in report["chat_first_token_agreement"].values())
    pruned_chat = chat_model(tiny_llama, 0.5)  # an untrained auxiliary misses exact's first token on some prompts
    _, report = measure_chat_tail(pruned_chat, prompts, batch_size=4, progress=False)
    assert all(r["mean"] < 1.0 for r in report["chat_first_token_agreement"].values())


def test_calibrate_with_chats_records_the_chat_tail_and_keeps_the_thresholds(tmp_path, capsys):
    from transformers import AutoTokenizer

    from kvpred import cli

    base = save_tiny_model(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    model = KVPredictionModel.from_pretrained(str(base), keep_ratio=1.0)
    model.config.refine_thresholds = {"signal": "entropy", "off_below": 1.0, "eager_above": 2.0}
    model.save_pretrained(tmp_path / "model")
    chats = write_chats(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": f"question {i}?"}]}
                                                   for i in range(5)])
    argv = ["calibrate", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "calibrated"), "--device", "cpu"]
    assert cli.main(argv + ["--chats", chats]) == 0
    calibrated = KVPredictionModel.from_pretrained(str(tmp_path / "calibrated"))
    assert calibrated.config.chat_exact_tail == calibrated.chat_tail == 1  # aux == base: one token is enough
    assert calibrated.config.refine_thresholds == model.config.refine_thresholds  # not measured, so kept
    report = json.loads((tmp_path / "calibrated" / "calibration.json").read_text())
    assert report["chats"] == chats and report["chat_prompts"] == 5 and report["chat_exact_tail"] == 1
    assert cli.main(argv) == 2
    assert "nothing to calibrate" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_refinement_decodes_on_graph_steps_on_a_gpu(tiny_llama):
    """On CUDA, refinement runs on generate's pooled CUDA-graph steps and refines in captured chunks: "off" is
    generate's predicted mode, and after the switch the tokens are the exact base's continuation."""
    from kvpred.decoding import GraphChunk

    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5, device="cuda")
    ids, mask = (t.cuda() for t in batch(model))
    for _ in range(2):  # the second run replays the pooled graph
        off, _ = generate_refined(model, ids, mask, max_new_tokens=16, refine="off")
        assert torch.equal(off, model.generate(ids, mask, max_new_tokens=16))
        out, info = generate_refined(model, ids, mask, max_new_tokens=16, refine="eager", chunk_size=32)
        switch = info["exact_from"]
        assert switch is not None and 1 < switch < 16
        row = 2  # the longest prompt, unpadded
        prefix = out[row:row + 1, :ids.shape[1] + switch]
        exact = model.generate(prefix, mode="exact", max_new_tokens=16 - switch)[0]
        assert torch.equal(exact, out[row, :len(exact)])  # generate stops a row at its eos
    chunks = [chunk for pooled in model._steps.entries.values() for chunk in pooled.chunks.values()]
    assert chunks and all(isinstance(chunk, GraphChunk) for chunk in chunks)  # the refiner's chunks were graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_chat_turns_take_their_first_token_from_the_sessions_captured_step_on_a_gpu(tiny_llama):
    from kvpred.decoding import GraphStep
    from kvpred.pipeline import PipelinedPrefill

    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=1.0, device="cuda")  # aux == base: exact
    model.tokenizer.chat_template = CHAT_TEMPLATE
    session = ChatSession(model, refine="off")  # no exact history: every turn is predicted, its last token a step
    for text in TURNS:
        conversation = session.conversation_ids(session.messages + [{"role": "user", "content": text}])
        exact = model.generate(conversation, mode="exact", max_new_tokens=8)[0, conversation.shape[1]:]
        session.send(text, max_new_tokens=8)
        assert torch.equal(session.tokens[0, conversation.shape[1]:], exact)
        assert isinstance(session.pooled.step, GraphStep)  # captured after the first turn's first token
        # and its pipelined form, after the reply: later turns' first tokens run behind the auxiliary
        assert isinstance(session.pooled.pipelines.get(session.exact_tail), PipelinedPrefill)
    session.pooled.step = None  # as in a cache that has just grown
    session.send("one more", max_new_tokens=1)  # a reply that never steps
    assert isinstance(session.pooled.step, GraphStep)  # captured after the reply, for the next turn's first token
