"""Specification of kvpred.decoding's generation loop (what `generate` runs, on CUDA-graph steps on a GPU): the same
tokens as transformers' generate (`transformers_loop=True`), for the same arguments. Here on the CPU, with the eager
step; with CUDA, on graph steps too."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from kvpred import decoding
from kvpred.decoding import Pooled, RollingBatch, StepPool, capacity_bucket
from kvpred.generation import encode_prompts
from kvpred.model import MODES, KVPredictionModel
from kvpred.models import KVPredError

PROMPTS = ["The quick brown fox jumps over", "a", "Hello, world! This prompt is longer than the others."]


@pytest.fixture(scope="module")
def model(tiny_llama):
    torch.manual_seed(0)
    return KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)


def both(model, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps loop, transformers' generate) on the same padded batch."""
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    return (model.generate(ids, mask, **kwargs), model.generate(ids, mask, transformers_loop=True, **kwargs))


@pytest.mark.parametrize("mode,tail", [("predicted", 1), ("predicted", 3), ("exact", 1)])
def test_greedy_tokens_match_transformers_generate(model, mode, tail):
    mine, theirs = both(model, mode=mode, exact_tail=tail, max_new_tokens=10)
    assert mine.shape == theirs.shape and torch.equal(mine, theirs)


def test_rows_that_end_are_padded_and_generation_stops_when_all_end(model):
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    free = model.generate(ids, mask, max_new_tokens=10)[:, ids.shape[1]:]
    eos = int(free[0, 2])  # row 0's third token ends it; other rows end where they happen to emit it
    mine, theirs = both(model, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(mine, theirs)
    assert mine[0, ids.shape[1] + 3:].eq(model.tokenizer.pad_token_id).all()


def test_the_bases_own_generation_settings_reach_neither_loop(model, monkeypatch):
    """A repetition penalty in the base's generation config (Qwen's Instruct models ship one) is not applied by
    kvpred's own loop; transformers' loop, which another argument selects, must give the same tokens."""
    monkeypatch.setattr(model.base.generation_config, "repetition_penalty", 5.0)
    plain, via_transformers = both(model, max_new_tokens=10)
    assert torch.equal(plain, via_transformers)
    penalised, _ = both(model, max_new_tokens=10, repetition_penalty=5.0)  # asked for in the call, it applies
    assert not torch.equal(penalised, plain)


def test_finished_rows_are_filled_with_the_pad_id_transformers_would_use(model, monkeypatch):
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    eos = int(model.generate(ids, mask, max_new_tokens=3)[0, ids.shape[1]])  # row 0 ends at once
    monkeypatch.setattr(model.base.generation_config, "pad_token_id", 7)  # differs from the tokenizer's pad
    mine, theirs = both(model, max_new_tokens=4, eos_token_id=eos)
    assert torch.equal(mine, theirs) and mine[0, ids.shape[1] + 1:].eq(7).all()


def test_the_prompt_may_come_as_inputs_as_transformers_names_it(model):
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    assert torch.equal(model.generate(inputs=ids, attention_mask=mask, max_new_tokens=3),
                       model.generate(ids, mask, max_new_tokens=3))
    with pytest.raises(KVPredError, match="give the prompt's token ids once"):
        model.generate(ids, inputs=ids)


def test_a_call_under_inference_mode_leaves_later_calls_free_to_decode(model):
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    model._steps.clear()  # the pooled cache is made by the call under inference mode
    with torch.inference_mode():
        inside = model.generate(ids, mask, max_new_tokens=5)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5), inside)  # on the same pooled cache


def test_calls_from_several_threads_give_each_its_own_tokens(model):
    from concurrent.futures import ThreadPoolExecutor

    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    alone = [model.generate(ids[i:i + 1], mask[i:i + 1], max_new_tokens=6) for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: model.generate(ids[i:i + 1], mask[i:i + 1], max_new_tokens=6),
                                 [i for i in range(len(PROMPTS)) for _ in range(3)]))
    assert all(torch.equal(out, alone[n // 3]) for n, out in enumerate(together))


class Ban(LogitsProcessor):
    def __init__(self, token: int):
        self.token, self.calls = token, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores.index_fill(1, torch.tensor([self.token]), float("-inf"))


class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_logits_processors_and_stopping_criteria_are_applied_as_transformers_does(model):
    ids, _ = encode_prompts(model.tokenizer, PROMPTS)
    greedy = model.generate(*encode_prompts(model.tokenizer, PROMPTS), max_new_tokens=6)
    banned = int(greedy[0, ids.shape[1]])
    outputs = []
    for transformers_loop, wrap in ((False, LogitsProcessorList), (True, LogitsProcessorList), (False, list)):
        ban = Ban(banned)  # a plain list of processors too, as transformers takes it
        outputs.append(model.generate(*encode_prompts(model.tokenizer, PROMPTS), max_new_tokens=8,
                                      transformers_loop=transformers_loop, logits_processor=wrap([ban]),
                                      stopping_criteria=StoppingCriteriaList([StopAfter(ids.shape[1] + 5)])))
        assert ban.calls == 5
    assert outputs[0].shape[1] == ids.shape[1] + 5 and torch.equal(*outputs[:2]) and torch.equal(*outputs[1:])
    assert not outputs[0][:, ids.shape[1]:].eq(banned).any()


def test_end_of_sequence_ids_follow_transformers(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    free = model.generate(ids, mask, max_new_tokens=6)[:, ids.shape[1]:]
    model.base.generation_config.eos_token_id = 0  # an id 0 ends rows (falsy, but set)
    model.base.generation_config.pad_token_id = 0
    ban_zero_late = LogitsProcessorList([ForceAt(ids.shape[1] + 2, 0)])
    mine, theirs = both(model, max_new_tokens=6, logits_processor=ban_zero_late)
    assert torch.equal(mine, theirs) and mine.shape[1] == ids.shape[1] + 3
    model.base.generation_config.eos_token_id = None  # no EOS, no pad: no row ends early, and nothing is needed
    model.tokenizer.eos_token, model.tokenizer.pad_token = None, None
    one = ids[:1, mask[0].bool()]
    assert torch.equal(model.generate(one, max_new_tokens=6), model.generate(one, max_new_tokens=6,
                                                                               transformers_loop=True))
    assert torch.equal(model.generate(one, max_new_tokens=6)[0, one.shape[1]:], free[0])


class ForceAt(LogitsProcessor):
    def __init__(self, length: int, token: int):
        self.length, self.token = length, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.length:
            scores = torch.full_like(scores, -1e4).index_fill(1, torch.tensor([self.token]), 0.0)
        return scores


def test_stop_strings_and_streaming(model):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    ids, mask = encode_prompts(model.tokenizer, PROMPTS[:1])
    free = model.generate(ids, mask, max_new_tokens=12)[0, ids.shape[1]:]
    stop = next(text for text in map(model.tokenizer.decode, free[2:].tolist()) if text.isalnum())
    streams = []
    for transformers_loop in (False, True):
        recorder = Recorder()
        out = model.generate(ids, mask, max_new_tokens=12, stop_strings=[stop], streamer=recorder,
                             transformers_loop=transformers_loop)
        streams.append((out, recorder))
    (mine, recorder), (theirs, _) = streams
    assert torch.equal(mine, theirs) and mine.shape[1] < ids.shape[1] + 12
    assert torch.equal(recorder.puts[0], ids) and recorder.ended
    assert torch.equal(torch.cat(recorder.puts[1:]), mine[0, ids.shape[1]:])


def test_sampling_with_top_k_of_one_is_greedy(model):
    torch.manual_seed(1)
    sampled, greedy = both(model, max_new_tokens=6, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("temperature, top_p", [(1e-40, 1.0), (1e-300, 1.0), (0.5, 1e-300)])
def test_a_vanishing_temperature_or_top_p_samples_the_likeliest_token(model, temperature, top_p):
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")], [5.0, 5.0, -1.0, 0.0]])
    for _ in range(20):
        token = decoding.sample(logits, True, temperature, top_p, 0)
        assert token[0] == 1 and token[1] in (0, 1)
    ids = torch.tensor([[5, 6, 7, 8]], device=model.device)
    for mode in MODES:  # kvpred's loop, and transformers' generate in aux mode
        greedy = model.generate(ids, mode=mode, max_new_tokens=3)
        assert torch.equal(model.generate(ids, mode=mode, max_new_tokens=3, do_sample=True, temperature=temperature,
                                          top_p=top_p), greedy)


def test_the_pool_reuses_a_cache_per_shape_and_keeps_the_most_recent(model):
    pool = StepPool(size=2)
    first = pool.get(model, 2, 100)
    assert pool.get(model, 2, 200) is first and first.cache.capacity == 256  # both round up to 256
    assert first.step is None and first.made_step(model) is first.step is first.made_step(model)
    pool.get(model, 2, 300)
    pool.get(model, 1, 10)
    assert pool.get(model, 2, 100) is not first  # evicted by the two newer shapes


def test_a_cache_the_pool_drops_is_freed_at_once_not_at_the_next_garbage_collection(model):
    """A cache and its layers (and its pending values) hold no cycle: on a GPU the pool's out-of-memory retry
    relies on the caches it drops being freed."""
    import gc
    import weakref

    model.generate(torch.randint(3, 259, (2, 20)), max_new_tokens=2)  # predicted, values deferred on a CPU
    arena = weakref.ref(next(iter(model._steps.entries.values())).cache.key_arena)
    gc.disable()
    try:
        model._steps.clear()
        assert arena() is None
    finally:
        gc.enable()


def test_a_pooled_cache_keeps_the_graphs_of_its_most_recent_chunk_widths_only(monkeypatch):
    """Widths come from requests (refine_chunk, exact_tail): each captured graph has its own memory pool."""
    from types import SimpleNamespace

    monkeypatch.setattr(decoding, "GraphChunk", lambda *args: SimpleNamespace(__call__=None))
    pooled, gpu = Pooled(cache=None), SimpleNamespace(device=torch.device("cuda"))
    for width in range(1, 21):
        assert pooled.run_chunk(gpu, torch.zeros(1, width), None, 0, None)
    assert list(pooled.chunks) == list(range(21 - decoding.MAX_CAPTURED, 21))


def test_capacities_round_up_to_powers_of_two_within_the_context():
    assert [capacity_bucket(n, 8192) for n in (1, 256, 257, 3000, 8192)] == [256, 256, 512, 4096, 8192]
    assert [capacity_bucket(n, 600) for n in (100, 300, 513, 600)] == [256, 512, 600, 600]
    assert capacity_bucket(100, 200) == 200


def test_the_pool_lets_go_of_its_caches_when_a_new_one_does_not_fit(model, monkeypatch):
    pool = StepPool(size=4)
    kept = pool.get(model, 1, 10)
    real, calls = model.new_cache, []

    def new_cache(*args):
        calls.append(args)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("no room")
        return real(*args)

    monkeypatch.setattr(model, "new_cache", new_cache)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    fresh = pool.get(model, 2, 10)
    assert len(calls) == 2 and list(pool.entries.values()) == [fresh]  # the old cache let go, then the retry fitted
    assert pool.get(model, 1, 10) is not kept


def decoded_alone(model, mode: str, tail: int, new_tokens: int = 6) -> list[list[int]]:
    """Each of PROMPTS's greedy continuation from `generate`, on its own."""
    return [model.generate(ids[None], mode=mode, exact_tail=tail, max_new_tokens=new_tokens)[0, len(ids):].tolist()
            for ids in (torch.tensor(model.tokenizer.encode(p), device=model.device) for p in PROMPTS)]


def greedy_step(batch: RollingBatch, running: dict[int, int], got: list[list[int]], new_tokens: int) -> None:
    """One step of every row of `batch`: each running prompt (row -> its index in PROMPTS) takes its greedy token
    into `got`, and leaves its row once it has `new_tokens` of them."""
    tokens = batch().argmax(-1)
    for row, i in list(running.items()):
        got[i].append(int(tokens[row]))
        if len(got[i]) == new_tokens:
            del running[row]
            batch.release(row)
    batch.feed(tokens)


def rolled(model, mode: str, rows: int, new_tokens: int, tail: int = 1, pooled: Pooled | None = None,
           at_once: int = 1, **batch_kw) -> list[list[int]]:
    """PROMPTS through a RollingBatch of `rows` rows, greedy: the first starts it, the others join as rows come
    free, `at_once` of them (left-padded together) at a step boundary."""
    batch = RollingBatch(model, pooled or Pooled(model.new_cache(rows, 256)), slot=64, **batch_kw)
    waiting, running = list(range(len(PROMPTS))), {}
    got: list[list[int]] = [[] for _ in PROMPTS]
    while waiting or running:
        if waiting and batch.fits(64, new_tokens):
            joining, waiting = waiting[:min(at_once, len(batch.free))], waiting[min(at_once, len(batch.free)):]
            ids, mask = encode_prompts(model.tokenizer, [PROMPTS[i] for i in joining])
            running.update(zip(batch.admit(ids.to(model.device), mask.to(model.device), mode, tail), joining))
        greedy_step(batch, running, got, new_tokens)
    return got


@pytest.mark.parametrize("mode,tail", [("exact", 1), ("predicted", 1), ("predicted", 3)])
def test_prompts_joining_a_rolling_batch_decode_what_they_decode_alone(model, mode, tail):
    """Continuous batching: prompts join between steps, one into the row another has left, and each gets the
    tokens generate gives it on its own (with an exact tail too; the prompt "a" is shorter than it)."""
    assert rolled(model, mode, rows=2, new_tokens=6, tail=tail) == decoded_alone(model, mode, tail)


def rolled_prefilled(model, mode: str, new_tokens: int, tail: int) -> tuple[list[list[int]], int]:
    """PROMPTS through a RollingBatch of 2 rows, greedy, one a join, each through `admit_prefilled` where a captured
    prompt pass serves it (its first token then comes from the pass), else `admit`; then the missed passes are
    captured. Returns the tokens and how many prompts joined through a pass."""
    batch = RollingBatch(model, Pooled(model.new_cache(2, 256)), slot=64, graph_joins=True)
    waiting, running, through = list(range(len(PROMPTS))), {}, 0
    got: list[list[int]] = [[] for _ in PROMPTS]
    while waiting or running:
        if waiting and batch.fits(64, new_tokens):
            i = waiting.pop(0)
            ids, mask = (t.to(model.device) for t in encode_prompts(model.tokenizer, [PROMPTS[i]]))
            joined = batch.admit_prefilled(ids, mode, tail, lambda logits: logits.argmax(-1))
            if joined is None:
                running[batch.admit(ids, mask, mode, tail)[0]] = i
            else:
                (row,), logits, (token,) = joined
                assert logits.shape == (1, model.base.config.vocab_size)
                got[i].append(int(token))
                running[row], through = i, through + 1
        greedy_step(batch, running, got, new_tokens)
    batch.capture_missed()
    return got, through


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
@pytest.mark.parametrize("mode,tail", [("exact", 1), ("predicted", 1), ("predicted", 3)])
def test_prompts_joining_through_a_captured_prompt_pass_decode_what_they_decode_alone(model, tiny_llama, mode, tail,
                                                                                      device):
    """A join through the prompt pass `generate` replays as a graph (on a CPU, run eagerly): the first batch finds
    none and joins the plain way, the passes it missed are made after it, and the next batch's prompts join
    through them, first token at once, then decode in their rows as they decode alone."""
    if device == "cuda":
        model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5, device="cuda")
    expected = decoded_alone(model, mode, tail)
    model._steps.clear()
    assert rolled_prefilled(model, mode, 6, tail) == (expected, 0)
    longer = sum(len(model.tokenizer.encode(p)) > tail for p in PROMPTS) if mode == "predicted" else len(PROMPTS)
    assert rolled_prefilled(model, mode, 6, tail) == (expected, longer)


def test_lone_joins_replay_their_prompt_passes_beside_the_pool_not_in_it(model):
    """The one-row cache whose captured prompt passes lone joins replay is kept apart from the pool's `size` most
    recent caches: a server's warm-up fills those with its rolling batches' caches, which a join must not evict."""
    model._steps.clear()
    pooled = [model._steps.get(model, rows, 256) for rows in range(1, model._steps.size + 1)]
    for _ in range(2):  # the first batch captures the passes, the second joins through them
        rolled_prefilled(model, "exact", 2, 1)
    assert list(map(id, model._steps.entries.values())) == list(map(id, pooled)) and model._steps.side is not None


def test_join_passes_captured_ahead_serve_the_first_lone_joins(model):
    """`kvpred serve --warm-up` captures the passes of lone joins beforehand (on a CPU here, run eagerly): the first
    batch's prompts then join through them too, and decode as they decode alone."""
    expected = decoded_alone(model, "predicted", 1)
    model._steps.clear()
    assert RollingBatch.capture_join_passes(model, 128, (1,)) == 2  # one length bucket, exact and predicted
    longer = sum(len(model.tokenizer.encode(p)) > 1 for p in PROMPTS)
    assert rolled_prefilled(model, "predicted", 6, 1) == (expected, longer)


def test_a_joining_prompt_copied_into_its_row_a_layer_at_a_time_decodes_the_same(model, monkeypatch):
    """The copy of a joining prompt's cache into its row, in groups of layers bounded in memory: groups of one."""
    alone = rolled(model, "predicted", rows=2, new_tokens=4)
    monkeypatch.setattr(decoding, "JOIN_COPY_BYTES", 1)
    assert rolled(model, "predicted", rows=2, new_tokens=4) == alone


@pytest.mark.parametrize("at_once", [1, 2])
def test_prompts_joining_pipelined_decode_what_they_decode_alone(model, at_once):
    """A pipelined join (what a GPU's rolling batch does once its step is a graph; here on a CPU, the step's parts
    run one after the other): the joining prompts' prefix is predicted into their rows group by group while the
    step runs for every row; alone and two left-padded prompts at once, into rows other prompts left."""
    alone = rolled(model, "predicted", rows=3, new_tokens=6, at_once=at_once)
    cache = model.new_cache(3, 256)
    pooled = Pooled(cache, step=decoding.GraphStep(model, cache))  # the static step, uncompiled on a CPU
    assert rolled(model, "predicted", rows=3, new_tokens=6, pooled=pooled, at_once=at_once, pipelined=True) == alone
    assert pooled.pipelines[1] is not False  # the joins went through the pipeline


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "hunyuan_v1_moe"])
def test_the_static_step_of_an_fp32_mixture_of_experts_base_decodes_like_the_eager_step(tiny_models, arch):
    """Outside bf16 a one-token static step runs transformers' batched experts (its grouped ones, the default, cannot
    be captured as a CUDA graph there): the tokens stay the eager step's, and the default comes back after the step."""
    moe = KVPredictionModel.from_pretrained(tiny_models[arch], keep_ratio=0.5)
    cache = moe.new_cache(3, 256)
    pooled = Pooled(cache, step=decoding.GraphStep(moe, cache))  # the static step, uncompiled on a CPU
    seen = []
    moe.base.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(moe.base.config._experts_implementation))
    assert rolled(moe, "predicted", rows=3, new_tokens=6, pooled=pooled) == rolled(moe, "predicted", rows=3,
                                                                                    new_tokens=6)
    assert "batched_mm" in seen and moe.base.config._experts_implementation == "grouped_mm"


def test_a_rolling_batch_takes_no_prompt_it_has_no_room_for(model):
    batch = RollingBatch(model, Pooled(model.new_cache(1, 256)), slot=10)
    assert batch.fits(11, 200) and not batch.fits(12, 200) and not batch.fits(5, 247)  # prompt columns; capacity
    batch.admit(*encode_prompts(model.tokenizer, ["hi"]), "exact")
    assert not batch.fits(2, 1)  # no free row


def test_warming_up_readies_a_pooled_cache_and_step_per_capacity_and_changes_no_tokens(model):
    ids, mask = encode_prompts(model.tokenizer, PROMPTS[:1])
    before = model.generate(ids, mask, max_new_tokens=5)
    model._steps.clear()
    assert model.warm_up((100, 300, 4096)) == [256, 512]  # buckets, capped at the tiny model's context of 512
    ready = dict(model._steps.entries)
    assert set(ready) == {(1, 256), (1, 512)} and all(pooled.step is not None for pooled in ready.values())
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5), before)
    assert model._steps.entries[(1, 256)] is ready[(1, 256)]  # the request found its cache and step ready


def test_warming_up_makes_no_more_shapes_than_the_pool_keeps(model, monkeypatch):
    monkeypatch.setattr(model, "_steps", StepPool(size=1))
    assert model.warm_up((300, 100)) == [256]
    assert list(model._steps.entries) == [(1, 256)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode,tail,arch", [("predicted", 1, "llama"), ("predicted", 3, "llama"), ("exact", 1, "llama"),
                                           ("predicted", 3, "smollm3"), ("predicted", 1, "gemma"),
                                           ("predicted", 1, "granite"), ("predicted", 1, "olmo2"),
                                           ("predicted", 3, "gemma2"), ("predicted", 3, "gemma3_text"),
                                           ("predicted", 1, "phi3"), ("predicted", 3, "glm"),
                                           ("predicted", 1, "cohere"), ("predicted", 3, "cohere2"),
                                           ("predicted", 3, "exaone4"), ("predicted", 1, "starcoder2"),
                                           ("predicted", 1, "nemotron"), ("predicted", 1, "olmoe"),
                                           ("predicted", 1, "apertus"), ("predicted", 1, "granitemoe"),
                                           ("predicted", 1, "glm4_moe")])
def test_graph_steps_give_transformers_tokens_on_a_gpu(tiny_models, mode, tail, arch):
    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(tiny_models[arch], keep_ratio=0.5, device="cuda")
    model.pipelined_first_step = False  # the plain path here; kvpred.pipeline has its own specification
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    ids, mask = ids.cuda(), mask.cuda()
    for _ in range(3):  # later calls replay the pooled graphs: the step, and a longer tail's first tokens as a chunk
        mine = model.generate(ids, mask, mode=mode, exact_tail=tail, max_new_tokens=10)
        theirs = model.generate(ids, mask, mode=mode, exact_tail=tail, max_new_tokens=10, transformers_loop=True)
        assert torch.equal(mine, theirs)
    chunks = [chunk for pooled in model._steps.entries.values() for chunk in pooled.chunks.values()]
    assert [type(chunk).__name__ for chunk in chunks] == (["GraphChunk"] if tail > 1 else [])
    assert {type(pooled.step).__name__ for pooled in model._steps.entries.values()} == {"GraphStep"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["exact", "predicted"])
def test_a_compiled_step_gives_the_uncompiled_steps_tokens_on_a_gpu(tiny_llama, mode):
    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5, device="cuda")
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    ids, mask = ids.cuda(), mask.cuda()
    plain = model.generate(ids, mask, mode=mode, max_new_tokens=10)
    model.compile_step()
    assert model._steps.entries == {}  # the steps captured before are made again, compiled
    assert torch.equal(model.generate(ids, mask, mode=mode, max_new_tokens=10), plain)
    assert model._steps.entries and all(p.step.forward is model.compiled_step for p in model._steps.entries.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_capture_that_fails_half_way_leaves_sampling_working(tiny_llama, monkeypatch):
    """What the warm-ups cannot catch fails inside the capture; the step then falls back to eager decoding, which
    must still sample (a failed capture used to leave every later draw on the device raising)."""
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5, device="cuda")
    layer = model.base.model.layers[0]
    forward = layer.forward

    def fails_in_captures(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            torch.ones(1, device="cuda").item()  # a host read: the capture fails here, not in a warm-up
        return forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", fails_in_captures)
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    torch.manual_seed(0)
    out = model.generate(ids.cuda(), mask.cuda(), mode="exact", max_new_tokens=4, do_sample=True)
    assert out.shape == (len(PROMPTS), ids.shape[1] + 4)
    assert {type(pooled.step).__name__ for pooled in model._steps.entries.values()} == {"EagerStep"}
    assert torch.randint(0, 10, (3,), device="cuda").shape == (3,)


@pytest.mark.parametrize("mode", ["exact", "predicted"])
def test_on_a_cpu_a_compiled_step_gives_the_eager_steps_tokens(tiny_llama, mode):
    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    plain = model.generate(ids, mask, mode=mode, max_new_tokens=10)
    model.compile_step()
    for _ in range(2):  # the first call's first token takes the eager step (deferring its values), later ones not
        assert torch.equal(model.generate(ids, mask, mode=mode, max_new_tokens=10), plain)
    (pooled,) = model._steps.entries.values()
    assert pooled.step.forward is model.compiled_step and pooled.step.graph is None


def test_a_sliding_bases_compiled_step_traces_whole_and_decodes_past_its_window(tiny_models):
    """Gemma 3's sliding layers (16-token windows here) measure their window in the step's attention; a graph break
    there made each layer its own compile, and past dynamo's recompile limit the step ran uncompiled."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(tiny_models["gemma3_text"], keep_ratio=0.5)
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(6))
    plain = model.generate(ids, max_new_tokens=8)
    breaks = sum(counters["graph_break"].values())
    model.compile_step()
    for _ in range(2):
        assert torch.equal(model.generate(ids, max_new_tokens=8), plain)
    assert sum(counters["graph_break"].values()) == breaks


def test_on_a_cpu_a_rolling_batch_on_the_compiled_step_decodes_what_prompts_decode_alone(tiny_llama):
    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    alone = [model.generate(ids[None], max_new_tokens=6)[0, len(ids):].tolist()
             for ids in (torch.tensor(model.tokenizer.encode(p)) for p in PROMPTS)]
    model.compile_step()
    assert rolled(model, "predicted", rows=2, new_tokens=6) == alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode,tail", [("exact", 1), ("predicted", 1), ("predicted", 3)])
def test_a_rolling_batch_on_graph_steps_decodes_what_prompts_decode_alone(tiny_llama, mode, tail):
    torch.manual_seed(0)
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5, device="cuda")
    alone = [model.generate(ids[None].cuda(), mode=mode, exact_tail=tail, max_new_tokens=6)[0, len(ids):].tolist()
             for ids in (torch.tensor(model.tokenizer.encode(p)) for p in PROMPTS)]
    pooled = Pooled(model.new_cache(2, 256))
    assert rolled(model, mode, rows=2, new_tokens=6, tail=tail, pooled=pooled) == alone
    assert bool(pooled.pipelines) == (mode == "predicted" and tail == 1)  # such joins run pipelined on a GPU


def test_generation_runs_without_cudnn_attention_and_restores_it(model, monkeypatch):
    """cuDNN's SDPA plans per sequence length (49-741 ms at each new prompt length on an H100), so generate,
    generate_refined and ChatSession.send keep SDPA off it, and leave the process's setting as they found it."""
    from kvpred.refine import ChatSession, generate_refined

    seen = []

    class Probe(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(torch.backends.cuda.cudnn_sdp_enabled())
            return scores

    ids, mask = encode_prompts(model.tokenizer, PROMPTS)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    model.generate(ids, mask, max_new_tokens=2, logits_processor=LogitsProcessorList([Probe()]))
    generate_refined(model, ids, mask, max_new_tokens=2, logits_processor=LogitsProcessorList([Probe()]))
    monkeypatch.setattr(model.tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ChatSession(model).send("hello", max_new_tokens=2, logits_processor=LogitsProcessorList([Probe()]))
    assert seen == [False] * 6 and torch.backends.cuda.cudnn_sdp_enabled() == before
