"""Specification of the training data pipeline: files -> packed token shards -> resumable, rank-sliced batches."""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kvpred.data
from kvpred.data import (PackedTokens, build_shards, check_tokenizer, expand_source, heldout_windows, read_meta,
                         register, sample_corpus, token_dtype)
from kvpred.model import KVPredictionModel
from kvpred.models import KVPredError, load_causal_lm
from kvpred.testing import CHAT_TEMPLATE, byte_tokenizer

TOK = byte_tokenizer()
EOS = TOK.eos_token_id


def make_corpus(root, n=40):
    """n distinct small documents spread over every supported text suffix and nested folders."""
    docs = {}
    for i in range(n):
        suffix = [".py", ".txt", ".md", ".rst"][i % 4]
        path = root / f"pkg{i % 3}" / f"doc{i:03d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"# document {i}\n" + f"def f{i}(x):\n    return x * {i}  # héllo ✓\n" * (1 + i % 5)
        path.write_text(text, encoding="utf-8")
        docs[path] = text
    (root / "pkg0" / "ignored.bin").write_bytes(b"\x00\x01")  # unknown suffix: not a document
    return [docs[p] for p in sorted(docs, key=lambda p: p.as_posix())]


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def split_tokens(out, split):
    meta = read_meta(out)
    return np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])


def split_documents(out, split):
    """The documents of a split, decoded back from its flat token stream."""
    tokens = split_tokens(out, split).tolist()
    assert tokens[-1] == EOS
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == EOS:
            docs.append(TOK.decode(tokens[start:i]))
            start = i + 1
    return docs


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    return src, make_corpus(src)


@pytest.fixture
def built(tmp_path, corpus):
    """A build with small shards, so that windows run across shard boundaries."""
    out = tmp_path / "tokens"
    build_shards([str(corpus[0])], TOK, out, shard_tokens=500, heldout_fraction=0.25, progress=False)
    return out


# ---------------------------------------------------------------- packing
def test_packing_round_trip_reproduces_documents_joined_by_eos(tmp_path, corpus):
    src, docs = corpus
    out = tmp_path / "tokens"
    meta = build_shards([str(src)], TOK, out, shard_tokens=300, heldout_fraction=0.0, progress=False)
    expected = [t for d in docs for t in ids(d) + [EOS]]
    assert meta["dtype"] == "uint16" and meta["tokens"] == len(expected) == meta["splits"]["train"]["tokens"]
    assert len(meta["splits"]["train"]["shards"]) == -(-len(expected) // 300)
    (folder,) = out.glob("shards-*")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", folder.name]
    assert sorted(p.name for p in folder.iterdir()) == [f"train_{i:05d}.bin" for i in
                                                        range(len(meta["splits"]["train"]["shards"]))]
    assert split_documents(out, "train") == docs

    seq_len, batch_size = 16, 3
    batches = PackedTokens(out, seq_len=seq_len, batch_size=batch_size, shuffle=False)
    assert batches.steps_per_epoch == len(expected) // seq_len // batch_size
    got = torch.cat([next(batches) for _ in range(batches.steps_per_epoch)])
    assert got.dtype == torch.long and got.shape == (batches.steps_per_epoch * batch_size, seq_len)
    assert got.flatten().tolist() == expected[:got.numel()]
    assert TOK.decode(got.flatten().tolist()) == "</s>".join(docs)[:len(TOK.decode(got.flatten().tolist()))]


def test_windows_do_not_depend_on_shard_size(tmp_path, corpus):
    a = build_shards([str(corpus[0])], TOK, tmp_path / "a", shard_tokens=97, heldout_fraction=0.2, progress=False)
    b = build_shards([str(corpus[0])], TOK, tmp_path / "b", shard_tokens=10 ** 6, heldout_fraction=0.2,
                     progress=False)
    assert len(a["splits"]["train"]["shards"]) > 1 == len(b["splits"]["train"]["shards"])
    x, y = (PackedTokens(tmp_path / d, seq_len=32, batch_size=2, seed=1) for d in "ab")
    for _ in range(5):
        assert torch.equal(next(x), next(y))


def test_a_rebuild_replaces_the_previous_build(tmp_path, corpus):
    out = tmp_path / "tokens"
    build_shards([str(corpus[0])], TOK, out, shard_tokens=100, heldout_fraction=0.0, progress=False)
    meta = build_shards([str(corpus[0])], TOK, out, shard_tokens=10 ** 6, heldout_fraction=0.0, progress=False)
    (folder,) = out.glob("shards-*")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", folder.name] and read_meta(out) == meta
    assert [p.name for p in folder.iterdir()] == ["train_00000.bin"]
    out.joinpath("train_00000.bin").write_bytes(b"a shard of a build made before shard folders")
    assert build_shards([str(corpus[0])], TOK, out, shard_tokens=10 ** 6, heldout_fraction=0.0,
                        progress=False) == meta  # the same text again: the same folder, kept
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", folder.name]


def test_a_build_killed_as_it_switches_leaves_the_earlier_build_whole(tmp_path, corpus, monkeypatch):
    """Killed after its shards are in place, before meta.json names them: the earlier build still reads."""
    out = tmp_path / "tokens"
    meta = build_shards([str(corpus[0])], TOK, out, shard_tokens=100, heldout_fraction=0.0, progress=False)
    before = split_tokens(out, "train")
    written = kvpred.data._write_atomic

    def killed_at_meta(path, payload):
        if path.name == "meta.json":
            raise KeyboardInterrupt
        written(path, payload)

    monkeypatch.setattr(kvpred.data, "_write_atomic", killed_at_meta)
    with pytest.raises(KeyboardInterrupt):
        build_shards([str(corpus[0])], TOK, out, shard_tokens=70, heldout_fraction=0.0, progress=False)
    assert read_meta(out) == meta and np.array_equal(split_tokens(out, "train"), before)
    monkeypatch.setattr(kvpred.data, "_write_atomic", written)
    newer = build_shards([str(corpus[0])], TOK, out, shard_tokens=70, heldout_fraction=0.0, progress=False)
    assert len(newer["splits"]["train"]["shards"]) > len(meta["splits"]["train"]["shards"])
    assert np.array_equal(split_tokens(out, "train"), before) and len(list(out.glob("shards-*"))) == 1


def test_a_build_keeps_the_users_files_in_its_folder_and_refuses_a_meta_json_it_did_not_write(tmp_path, corpus):
    out = tmp_path / "tokens"
    out.mkdir()
    mine = {"notes.txt": b"notes", "train_weights.bin": b"weights", "heldout_old.bin": b"old"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    build_shards([str(corpus[0])], TOK, out, heldout_fraction=0.0, progress=False)
    assert all((out / name).read_bytes() == data for name, data in mine.items())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text('{"my": "settings"}')
    with pytest.raises(KVPredError, match="holds a meta.json that is not a kvpred token build's"):
        build_shards([str(corpus[0])], TOK, tmp_path / "other", heldout_fraction=0.0, progress=False)
    assert (tmp_path / "other" / "meta.json").read_text() == '{"my": "settings"}'


def test_a_failed_build_leaves_the_previous_build_whole(tmp_path, corpus):
    out = tmp_path / "tokens"
    meta = build_shards([str(corpus[0])], TOK, out, shard_tokens=500, progress=False)
    (folder,) = out.glob("shards-*")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(KVPredError, match="no string field 'text'"):
        build_shards([str(bad)], TOK, out, shard_tokens=7, progress=False)
    assert read_meta(out) == meta and sorted(p.name for p in out.iterdir()) == ["meta.json", folder.name]
    assert sorted(folder.glob("*")) == sorted(out / s["file"] for split in meta["splits"].values()
                                              for s in split["shards"])
    assert split_tokens(out, "train").size == meta["splits"]["train"]["tokens"]


def test_a_build_clears_what_a_killed_build_left_but_not_a_running_ones(tmp_path, corpus):
    out = tmp_path / "tokens"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".build-{dead.pid}-x").mkdir(parents=True)  # what a SIGKILLed build leaves behind
    (out / f".build-{os.getpid()}-y").mkdir()  # a build still running in this process
    build_shards([str(corpus[0])], TOK, out, shard_tokens=10 ** 6, heldout_fraction=0.0, progress=False)
    (folder,) = out.glob("shards-*")
    assert sorted(p.name for p in out.iterdir()) == [f".build-{os.getpid()}-y", "meta.json", folder.name]


def test_file_names_that_are_not_utf8_are_shuffled_like_any_other(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "plain.txt").write_text("one document")
    (src / b"caf\xe9.txt".decode("utf-8", "surrogateescape")).write_text("another document")
    assert len(expand_source(str(src), shuffle=True)) == 2


def test_max_tokens_caps_the_build_and_earlier_sources_come_first(tmp_path, corpus):
    prose = tmp_path / "prose.md"
    prose.write_text("Prose first. " * 20)
    out = tmp_path / "tokens"
    meta = build_shards([str(prose), str(corpus[0])], TOK, out, max_tokens=700, heldout_fraction=0.0, progress=False)
    assert meta["tokens"] == 700 and meta["capped"]
    tokens = split_tokens(out, "train").tolist()
    prose_tokens = ids(prose.read_text()) + [EOS]
    assert len(tokens) == 700 and tokens[:len(prose_tokens)] == prose_tokens
    assert [s["tokens"] for s in meta["sources"]] == [len(prose_tokens), 700 - len(prose_tokens)]


def test_duplicates_and_empty_documents_are_dropped_and_counted(tmp_path, corpus):
    src, docs = corpus
    (src / "copy.txt").write_text(docs[0])
    (src / "blank.md").write_text("  \n")
    meta = build_shards([str(src)], TOK, tmp_path / "t", heldout_fraction=0.0, progress=False)
    assert meta["skipped"]["duplicate_documents"] == 1 and meta["skipped"]["empty_documents"] == 1
    assert meta["splits"]["train"]["documents"] == len(docs)


# ---------------------------------------------------------------- held-out split
def test_heldout_split_is_by_document_disjoint_and_deterministic(tmp_path, corpus, built):
    train, heldout = split_documents(built, "train"), split_documents(built, "heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(corpus[1])
    again = tmp_path / "again"
    build_shards([str(corpus[0])], TOK, again, shard_tokens=10 ** 6, heldout_fraction=0.25, progress=False)
    assert split_documents(again, "heldout") == heldout


def hash_rank(text):
    """The documented split rule's number for a document: the first 8 bytes of its text's sha1, in [0, 1)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2.0 ** 64


def test_a_split_that_would_hold_out_nothing_holds_out_the_document_with_the_smallest_hash(tmp_path, corpus):
    """Documents go to the held-out split when their hash falls below heldout_fraction, exactly as before; only when
    that leaves it empty (few documents), the one whose hash is smallest goes there, and the train split keeps the
    others in their order, across shard boundaries."""
    src, docs = corpus
    fraction = 0.25
    meta = build_shards([str(src)], TOK, tmp_path / "many", heldout_fraction=fraction, progress=False)
    assert split_documents(tmp_path / "many", "heldout") == [d for d in docs if hash_rank(d) < fraction]
    assert meta["splits"]["heldout"]["documents"] > 1

    few = tmp_path / "few"
    few.mkdir()
    for i, d in enumerate(docs[:6]):
        (few / f"doc{i}.py").write_text(d)
    smallest = min(docs[:6], key=hash_rank)
    assert hash_rank(smallest) > 1e-6  # the rule alone would hold out nothing
    meta = build_shards([str(few)], TOK, tmp_path / "t", shard_tokens=50, heldout_fraction=1e-6, progress=False)
    assert split_documents(tmp_path / "t", "heldout") == [smallest]
    assert split_documents(tmp_path / "t", "train") == [d for d in docs[:6] if d != smallest]
    assert meta["splits"]["heldout"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 5
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert sorted(str(p.relative_to(tmp_path / "t")) for p in (tmp_path / "t").glob("*/train_*.bin")) == \
        [s["file"] for s in meta["splits"]["train"]["shards"]]  # no shard of the first pass is left over

    meta = build_shards([str(few)], TOK, tmp_path / "none", heldout_fraction=0.0, progress=False)
    assert meta["splits"]["heldout"]["documents"] == 0  # asked for no held-out split


def test_heldout_windows_are_fixed_and_spread_over_the_heldout_split(built):
    windows = heldout_windows(built, seq_len=8, n=5)
    assert windows.shape == (5, 8) and windows.dtype == torch.long
    assert torch.equal(windows, heldout_windows(built, seq_len=8, n=5))
    stream = split_tokens(built, "heldout").astype(np.int64)
    assert torch.equal(windows[0], torch.from_numpy(stream[:8]))  # first and last windows of the split
    last = (len(stream) // 8 - 1) * 8
    assert torch.equal(windows[-1], torch.from_numpy(stream[last:last + 8]))
    with pytest.raises(KVPredError, match="held-out split has"):
        heldout_windows(built, seq_len=8, n=10 ** 6)


def test_a_build_that_would_hold_no_training_tokens_is_refused_and_the_earlier_build_kept(tmp_path, corpus, built):
    before = read_meta(built)
    with pytest.raises(KVPredError, match="would hold no training tokens: all .* went to held-out documents"):
        build_shards([str(corpus[0])], TOK, built, heldout_fraction=0.9999, progress=False)
    assert read_meta(built) == before


def test_a_build_without_a_heldout_split_says_so(tmp_path, corpus):
    build_shards([str(corpus[0])], TOK, tmp_path / "t", heldout_fraction=0.0, progress=False)
    with pytest.raises(KVPredError, match="no held-out split .built with --heldout-fraction 0"):
        heldout_windows(tmp_path / "t", seq_len=8, n=2)


# ---------------------------------------------------------------- shuffling, resume, ranks
def test_each_epoch_is_a_fresh_permutation_of_all_windows(built):
    batches = PackedTokens(built, seq_len=16, batch_size=4, seed=7)
    spe = batches.steps_per_epoch
    n = batches.stream.n_windows
    epoch0 = np.concatenate([batches.window_indices(s) for s in range(spe)])
    epoch1 = np.concatenate([batches.window_indices(s) for s in range(spe, 2 * spe)])
    assert len(set(epoch0.tolist())) == len(epoch0) == spe * 4 > n - 4
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, PackedTokens(built, seq_len=16, batch_size=4, seed=8).window_indices(0))


def test_resume_from_state_dict_gives_exactly_the_next_batches(built):
    uninterrupted = PackedTokens(built, seq_len=16, batch_size=4, seed=3)
    spe = uninterrupted.steps_per_epoch
    k = spe + 2  # past an epoch boundary
    for _ in range(k):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # as saved in a checkpoint
    assert (state["step"], state["epoch"], state["cursor"], state["seed"]) == (k, 1, 2 * 4, 3)
    expected = [next(uninterrupted) for _ in range(spe + 1)]

    resumed = PackedTokens(built, seq_len=16, batch_size=4, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(next(resumed), want)


def test_resume_refuses_a_different_data_layout(built):
    state = PackedTokens(built, seq_len=16, batch_size=4).state_dict()
    with pytest.raises(KVPredError, match="global_batch_size"):
        PackedTokens(built, seq_len=16, batch_size=2).load_state_dict(state)
    with pytest.raises(KVPredError, match="seq_len"):
        PackedTokens(built, seq_len=8, batch_size=4).load_state_dict(state)


def test_resume_refuses_a_build_rebuilt_from_other_text_of_the_same_size(tmp_path, corpus):
    built = tmp_path / "tokens"
    build_shards([str(corpus[0])], TOK, built, shard_tokens=500, heldout_fraction=0.0, progress=False)
    state = PackedTokens(built, seq_len=16, batch_size=4).state_dict()
    other = tmp_path / "other"
    other.mkdir()
    for f in (f for f in corpus[0].rglob("*") if f.is_file()):  # the same layout and sizes, other letters
        (other / f.relative_to(corpus[0])).parent.mkdir(parents=True, exist_ok=True)
        (other / f.relative_to(corpus[0])).write_bytes(f.read_bytes().replace(b"x", b"y"))
    build_shards([str(other)], TOK, built, shard_tokens=500, heldout_fraction=0.0, progress=False)
    again = PackedTokens(built, seq_len=16, batch_size=4)
    assert again.state_dict()["tokens"] == state["tokens"]
    with pytest.raises(KVPredError, match="hold other tokens than the run was trained on"):
        again.load_state_dict(state)
    del state["content"]  # a checkpoint from before builds recorded their content resumes as before
    again.load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_together_take_exactly_the_single_process_global_batch(built, world_size):
    single = PackedTokens(built, seq_len=8, batch_size=2 * world_size, seed=5)
    ranks = [PackedTokens(built, seq_len=8, batch_size=2, rank=r, world_size=world_size, seed=5)
             for r in range(world_size)]
    assert {r.steps_per_epoch for r in ranks} == {single.steps_per_epoch}
    for step in range(single.steps_per_epoch + 2):
        want = next(single)
        assert torch.equal(torch.cat([next(r) for r in ranks]), want)
        assert torch.equal(ranks[1].global_batch(step), want)


# ---------------------------------------------------------------- sources
def test_several_builds_joined_by_commas_are_read_as_one(tmp_path, corpus, built):
    other = tmp_path / "other"
    build_shards([str(corpus[0])], TOK, other, shard_tokens=700, heldout_fraction=0.5, progress=False)
    joined = f"{built},{other}"
    check_tokenizer(joined, TOK)
    stream = PackedTokens(joined, "train", seq_len=16, batch_size=2).stream
    expected = np.concatenate([split_tokens(built, "train"), split_tokens(other, "train")])
    assert stream.tokens == len(expected) and np.array_equal(stream.read(0, len(expected)), expected)
    assert heldout_windows(joined, 16, 4).shape == (4, 16)


def test_sampled_documents_come_in_batch_files_and_a_killed_run_resumes(tiny_llama, tmp_path):
    """`kvpred data sample`: documents from the base itself, each opened by one of the openings, ready to build."""
    model, tok = load_causal_lm(tiny_llama)
    options = dict(batch_size=2, max_new_tokens=6, openings=["Alpha", "Beta", "Gamma"], progress=False)
    total = sample_corpus(model, tok, tmp_path / "s", 20, **options)
    files = sorted((tmp_path / "s").glob("sample_*.jsonl"))
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(files) >= 2 and total >= 20 and sum(line["tokens"] for line in lines) == total
    assert all(line["text"].startswith(("Alpha", "Beta", "Gamma")) for line in lines)
    before = [f.read_text() for f in files]
    files[-1].unlink()  # killed before the last batch was written
    assert sample_corpus(model, tok, tmp_path / "s", 20, **options) == total
    assert [f.read_text() for f in sorted((tmp_path / "s").glob("sample_*.jsonl"))] == before
    files[0].unlink()  # a user removed an early batch: asking for more never overwrites a later one
    sample_corpus(model, tok, tmp_path / "s", total + 1, **options)
    assert [f.read_text() for f in sorted((tmp_path / "s").glob("sample_*.jsonl"))][:len(files) - 1] == before[1:]
    files[0].write_text(before[0])
    for extra in sorted((tmp_path / "s").glob("sample_*.jsonl"))[len(files):]:
        extra.unlink()
    meta = build_shards([str(tmp_path / "s")], tok, tmp_path / "tokens", heldout_fraction=0.0, progress=False)
    assert meta["splits"]["train"]["documents"] == len(set(line["text"] for line in lines))
    with pytest.raises(KVPredError, match="whole-word"):  # a byte tokenizer has no words to open documents with
        sample_corpus(model, tok, tmp_path / "t", 20, batch_size=2, progress=False)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "sample", "--model", tiny_llama, "--out", str(tmp_path / "u"), "--tokens", "0"])
    with pytest.raises(KVPredError, match="must be positive"):
        args.func(args)


def test_sampling_resumes_only_with_the_settings_a_folder_was_started_with(tiny_llama, tmp_path):
    """Another seed, length or kind of document would mix two corpora in one folder without a word."""
    model, tok = load_causal_lm(tiny_llama)
    tok.chat_template = CHAT_TEMPLATE
    options = dict(batch_size=2, max_new_tokens=6, openings=["Alpha", "Beta"], progress=False)
    total = sample_corpus(model, tok, tmp_path / "s", 8, **options)
    for changed, message in ((dict(seed=1), "seed 0 -> 1"), (dict(max_new_tokens=7), "max_new_tokens 6 -> 7"),
                             (dict(chat=True), "chat False -> True")):
        with pytest.raises(KVPredError, match=f"other settings \\({message}"):
            sample_corpus(model, tok, tmp_path / "s", total + 1, **{**options, **changed})
    assert sample_corpus(model, tok, tmp_path / "s", total + 1, **options) > total  # the same settings resume


def test_sampled_documents_must_fit_the_models_positions(tiny_llama, tmp_path):
    model, tok = load_causal_lm(tiny_llama)
    limit = model.config.max_position_embeddings
    with pytest.raises(KVPredError, match=f"beyond the model's position limit of {limit}: lower --max-new-tokens"):
        sample_corpus(model, tok, tmp_path / "s", 8, max_new_tokens=limit, openings=["Alpha"], progress=False)
    assert not (tmp_path / "s").exists()  # refused before anything was made


def test_sampled_chats_are_turns_in_the_chat_template_with_both_sides_written_by_the_model(tiny_llama, tmp_path):
    """`kvpred data sample --chat`: a user message sampled after the template's opening, then the reply to it."""
    model, tok = load_causal_lm(tiny_llama)
    with pytest.raises(KVPredError, match="no chat template"):
        sample_corpus(model, tok, tmp_path / "none", 20, chat=True, progress=False)
    tok.chat_template = CHAT_TEMPLATE
    total = sample_corpus(model, tok, tmp_path / "c", 40, batch_size=3, max_new_tokens=5, user_tokens=4, chat=True,
                          progress=False)
    lines = [json.loads(line) for f in sorted((tmp_path / "c").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert total >= 40 and sum(line["tokens"] for line in lines) == total
    for line in lines:
        user, reply = line["text"].removeprefix("<user>").split("\n<assistant>")
        assert user and len(ids(user)) <= 3 * 4 and line["tokens"] <= 4 + 5  # a stray byte decodes to U+FFFD: 3 bytes
        assert not line["text"].endswith(TOK.eos_token)  # the shards add EOS after each document


def test_sampled_chats_of_several_turns_follow_up_on_the_conversation(tiny_llama, tmp_path):
    """--turns N: each later user message is sampled after the conversation so far, rendered, then its reply."""
    model, tok = load_causal_lm(tiny_llama)
    tok.chat_template = CHAT_TEMPLATE
    sampled_after, generate = [], model.generate

    def recording(**kwargs):
        sampled_after.extend(tok.batch_decode(kwargs["input_ids"], skip_special_tokens=True))
        return generate(**kwargs)

    model.generate = recording
    total = sample_corpus(model, tok, tmp_path / "c", 1, batch_size=4, max_new_tokens=5, user_tokens=4, chat=True,
                          turns=3, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "c" / "sample_00000.jsonl").read_text().splitlines()]
    assert sum(line["tokens"] for line in lines) == total
    exchanges = [line["text"].count("<assistant>") for line in lines]
    assert all(1 <= n <= 3 for n in exchanges) and max(exchanges) > 1
    for line, n in zip(lines, exchanges):
        assert line["text"].startswith("<user>") and line["text"].count("<user>") == n
        if n > 1:  # the second user message followed the first exchange
            second = line["text"].index("\n<user>") + len("\n<user>")
            assert line["text"][:second] in sampled_after
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "sample", "--model", tiny_llama, "--out", str(tmp_path / "u"), "--tokens", "9",
                              "--turns", "2"])
    with pytest.raises(KVPredError, match="add --chat"):
        args.func(args)


def test_evaluation_data_is_refused(tmp_path):
    for source in ["/work/shared/data", "/work/shared/data/wikitext2-test.txt", "/work/shared/data/*.jsonl"]:
        with pytest.raises(KVPredError, match="evaluation data"):
            build_shards([source], TOK, tmp_path / "t", progress=False)
    elsewhere = tmp_path / "x" / "shared" / "data"  # any shared/data folder, e.g. a copy of the evaluation sets
    elsewhere.mkdir(parents=True)
    (elsewhere / "lambada.txt").write_text("evaluation text")
    with pytest.raises(KVPredError, match="evaluation data"):
        build_shards([str(tmp_path / "x")], TOK, tmp_path / "t", progress=False)
    link = tmp_path / "innocent"
    link.symlink_to(elsewhere)
    with pytest.raises(KVPredError, match="evaluation data"):
        build_shards([str(link)], TOK, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_jsonl_documents_come_from_the_text_field(tmp_path):
    rows = [{"content": "first row", "id": 1}, {"content": "second row", "id": 2}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    build_shards([str(path)], TOK, tmp_path / "t", text_field="content", heldout_fraction=0.0, progress=False)
    assert split_documents(tmp_path / "t", "train") == ["first row", "second row"]
    with pytest.raises(KVPredError, match=r"rows.jsonl:1 has no string field 'text'.*--text-field"):
        build_shards([str(path)], TOK, tmp_path / "u", progress=False)


def test_jsonl_lines_end_at_newlines_only_and_a_byte_order_mark_is_no_text(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": t}, ensure_ascii=False)
                                                 for t in ("one\u2028line", "two")).encode() + b"\r\n")
    (tmp_path / "doc.txt").write_bytes(b"\xef\xbb\xbfplain")
    build_shards([str(path), str(tmp_path / "doc.txt")], TOK, tmp_path / "t", heldout_fraction=0.0, progress=False)
    assert split_documents(tmp_path / "t", "train") == ["one\u2028line", "two", "plain"]


def test_each_file_is_read_once_whichever_links_or_globs_reach_it(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "B.TXT").write_text("bravo")  # suffixes in any case
    (src / ".hidden.txt").write_text("hidden")
    (src / "loop").symlink_to(src)  # a link back up the tree
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c.txt").write_text("charlie")
    (src / "linked").symlink_to(outside)  # a linked folder is walked like any other
    for source in (str(src), f"{src}/**"):
        names = sorted(f.name for f in expand_source(source))
        assert names == ["B.TXT", "a.txt", "c.txt"], source


def test_sampled_documents_open_with_whole_words_of_byte_level_and_sentencepiece_vocabularies():
    from kvpred.data import topic_words

    class Vocab:
        def __init__(self, tokens):
            self.tokens = tokens

        def __len__(self):
            return len(self.tokens)

        def convert_ids_to_tokens(self, ids):
            return [self.tokens[i] for i in ids]

    assert topic_words(Vocab(["Ġhouse", "Ġa", "hous", "ĠHouse"])) == ["House"]
    assert topic_words(Vocab(["▁river", "▁of", "riv", "▁x2yz"])) == ["River"]


def test_a_folder_of_other_jsonl_files_is_refused_for_sampling(tiny_llama, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sample_00000.jsonl").write_text('{"text": "mine"}\n')
    model, tok = load_causal_lm(str(tiny_llama))
    with pytest.raises(KVPredError, match="is not a batch of sampled documents"):
        sample_corpus(model, tok, tmp_path / "out", 10, max_new_tokens=16, openings=["Hello"], progress=False)


def test_a_token_build_given_twice_is_refused(built):
    with pytest.raises(KVPredError, match="names a token build twice"):
        PackedTokens(f"{built},{built}/", seq_len=16, batch_size=4)


def test_globs_expand_and_exclusions_apply(tmp_path, corpus):
    src = corpus[0]
    assert [p.name for p in expand_source(str(src / "pkg1" / "*.py"))] == ["doc004.py", "doc016.py", "doc028.py"]
    assert len(expand_source(str(src / "**" / "*.md"))) == 10
    assert all("pkg1" not in p.as_posix() for p in expand_source(str(src), exclude=["*/pkg1/*"]))
    shuffled = expand_source(str(src), shuffle=True)
    assert shuffled != expand_source(str(src)) and sorted(shuffled) == sorted(expand_source(str(src)))
    assert shuffled == expand_source(str(src), shuffle=True)


def test_empty_or_missing_sources_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"x")
    with pytest.raises(KVPredError, match="matches no .py/.txt/.md/.rst/.jsonl files"):
        build_shards([str(empty)], TOK, tmp_path / "t", progress=False)
    with pytest.raises(KVPredError, match="matches no"):
        build_shards([str(tmp_path / "*.rst")], TOK, tmp_path / "t", progress=False)
    with pytest.raises(KVPredError, match="does not exist"):
        build_shards([str(tmp_path / "nope")], TOK, tmp_path / "t", progress=False)
    (empty / "blank.txt").write_text("")
    with pytest.raises(KVPredError, match="holds no text"):
        build_shards([str(empty)], TOK, tmp_path / "t", progress=False)
    with pytest.raises(KVPredError, match="no finished token build"):
        PackedTokens(tmp_path / "t", seq_len=8, batch_size=1)


def test_a_corrupt_build_or_a_file_for_out_is_a_clear_error(tmp_path, corpus, built):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(KVPredError, match="is a file; give a folder for the token shards"):
        build_shards([str(corpus[0])], TOK, tmp_path / "afile", progress=False)
    with pytest.raises(KVPredError, match="output folder for the token shards is empty"):
        build_shards([str(corpus[0])], TOK, "", progress=False)  # not the current directory
    with pytest.raises(KVPredError, match="a source is empty"):
        build_shards([""], TOK, tmp_path / "tokens", progress=False)
    meta = json.loads((built / "meta.json").read_text())
    for broken in ("{not json", "{}", json.dumps(dict(meta, splits={"train": {"shards": [{"file": 3}]}}))):
        (built / "meta.json").write_text(broken)
        with pytest.raises(KVPredError, match="meta.json is corrupt"):
            read_meta(built)


def test_data_info_checks_every_shard(tmp_path, built, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "info", str(built)])
    shard = sorted(built.glob("shards-*/train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    with pytest.raises(KVPredError, match="is missing or not .* bytes as meta.json says"):
        args.func(args)
    shard.unlink()
    with pytest.raises(KVPredError, match="is missing"):
        args.func(args)


def test_sampling_settings_are_checked_before_the_model_loads(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for flag, value, message in (("--temperature", "0", "temperature must be"), ("--top-p", "1.5", "top_p must")):
        args = parser.parse_args(["data", "sample", "--model", str(tmp_path / "no-model"), "--out",
                                  str(tmp_path / "s"), "--tokens", "10", flag, value])
        with pytest.raises(KVPredError, match=message):
            args.func(args)


def test_too_little_data_for_a_batch_is_a_clear_error(built):
    with pytest.raises(KVPredError, match="fewer than one global batch"):
        PackedTokens(built, seq_len=64, batch_size=1000)


def test_tokenizer_mismatch_is_detected(built):
    check_tokenizer(built, TOK)
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(KVPredError, match="rebuild"):
        check_tokenizer(built, other)
    assert token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# ---------------------------------------------------------------- command line
def test_cli_builds_shards_with_the_models_tokenizer(tmp_path, corpus, capsys):
    model = tmp_path / "model"
    TOK.save_pretrained(model)  # a folder with only a tokenizer is all `data build` needs
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "build", "--model", str(model), "--sources", str(corpus[0]), "--out",
                              str(tmp_path / "t"), "--shard-tokens", "1000", "--max-tokens", "2000",
                              "--heldout-fraction", "0.1", "--exclude", "*/pkg2/*"])
    assert args.func(args) == 0
    meta = read_meta(tmp_path / "t")
    assert meta["tokens"] == 2000 and meta["heldout_fraction"] == 0.1 and meta["exclude"] == ["*/pkg2/*"]
    assert meta["tokenizer"]["vocab_size"] == len(TOK) and meta["tokenizer"]["name"] == str(model)
    assert "2,000 tokens" in capsys.readouterr().out
    args = parser.parse_args(["data", "info", str(tmp_path / "t")])
    assert args.func(args) == 0 and "train:" in capsys.readouterr().out


def test_cli_builds_shards_for_a_kvpred_checkpoint_with_its_bases_tokenizer(tmp_path, corpus, tiny_llama):
    KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5).save_pretrained(tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "build", "--model", str(tmp_path / "ckpt"), "--sources", str(corpus[0]),
                              "--out", str(tmp_path / "t")])
    assert args.func(args) == 0 and read_meta(tmp_path / "t")["tokenizer"]["vocab_size"] == len(TOK)


@pytest.mark.smollm
def test_smollm2_tokens_are_uint16_and_round_trip(tmp_path):
    from transformers import AutoTokenizer

    from kvpred.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    text = "def add(a, b):\n    return a + b\n"
    (tmp_path / "a.py").write_text(text)
    meta = build_shards([str(tmp_path / "a.py")], tok, tmp_path / "t", heldout_fraction=0.0, progress=False)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 49152
    tokens = split_tokens(tmp_path / "t", "train").tolist()
    assert tokens[-1] == tok.eos_token_id and tok.decode(tokens[:-1]) == text
