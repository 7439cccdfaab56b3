"""Specification of kvpred.prefill_graphs: a prompt pass over a whole bucket of columns, the prompt right-padded to
it, gives each mode's first token, logits and cache as the unpadded pass does: replayed as a CUDA graph on a GPU, run
uncaptured on a CPU."""
from unittest.mock import patch

import pytest
import torch
import transformers
from packaging.version import Version

from kvpred.model import KVPredictionModel
from kvpred.prefill_graphs import BUCKET, MOST_TOKENS, PrefillGraph, bucket, served
from kvpred.refine import generate_refined
from kvpred.testing import EXPERTS, save_tiny_model
from tests.conftest import ARCHS
from tests.test_pipeline import plain_first_token



def test_prompts_share_a_graph_per_bucket_of_lengths():
    assert [bucket(n) for n in (1, BUCKET, BUCKET + 1, 2000)] == [BUCKET, BUCKET, 2 * BUCKET, 2048]
    assert served(1, MOST_TOKENS) and served(2, MOST_TOKENS // 2 - BUCKET + 1)
    assert not served(1, MOST_TOKENS + 1) and not served(2, MOST_TOKENS // 2 + 1)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


def uncapturable(arch: str, mode: str, tail: int) -> bool:
    """Whether transformers waits on the host in the pass, so that no graph can hold it: grouped experts outside bf16
    (their grouped matmul's offsets), Gemma 2's eager attention mask before transformers 5.21 (a scalar copied to the
    device). The auxiliary stops at its last tap's projections and a step of one token runs batched experts, so
    GLM-4-MoE's predicted pass of one exact token, whose first layer is dense, meets no grouped experts."""
    if arch == "gemma2":
        return Version(transformers.__version__) < Version("5.21")
    return arch in EXPERTS and not (arch == "glm4_moe" and mode == "predicted" and tail == 1)


def refused_on_cuda(arch: str, mode: str, tail: int, device: str, make) -> bool:
    """Whether `make()` is (rightly) refused: on CUDA, for an uncapturable pass."""
    if device != "cuda" or not uncapturable(arch, mode, tail):
        return False
    with pytest.raises(RuntimeError, match="synchronizing"):
        make()
    return True


def prompts(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(3, 259, (2, n), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["exact", "aux"])
def test_an_exact_or_auxiliary_pass_over_the_bucket_is_the_prompts_own(arch, mode, device, tiny_models):
    model = KVPredictionModel.from_pretrained(tiny_models[arch], keep_layers=[0, 2], device=device)
    cache, reference = (model.new_cache(2, BUCKET + 8, mode) for _ in range(2))
    make = lambda: PrefillGraph(model, cache, mode, batch=2, length=BUCKET, tail=2)  # noqa: E731
    if refused_on_cuda(arch, mode, 2, device, make):
        return
    graph = make()
    assert (graph.graph is not None) == (device == "cuda")
    for n, seed in [(40, 1), (19, 2), (BUCKET, 3)]:  # shorter after longer: the earlier prompt's tokens stay behind
        ids = prompts(n, seed, device)
        logits = model.prefill_into(reference, ids, mode=mode, exact_tail=2)
        assert torch.equal(graph(ids), logits[:, -1].argmax(-1))
        torch.testing.assert_close(graph.logits, logits, atol=1e-4, rtol=1e-4)
        assert cache.get_seq_length() == n
        # a GPU rounds matmuls of other shapes differently: up to 2e-5 apart there
        torch.testing.assert_close(cache.slices(n), reference.slices(n), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tail", [1, 4])
def test_a_predicted_pass_over_the_bucket_is_the_plain_paths(arch, tail, device, tiny_models):
    model = KVPredictionModel.from_pretrained(tiny_models[arch], keep_layers=[0, 2], device=device)
    cache = model.new_cache(2, BUCKET)
    make = lambda: PrefillGraph(model, cache, "predicted", batch=2, length=BUCKET, tail=tail)  # noqa: E731
    if refused_on_cuda(arch, "predicted", tail, device, make):
        return
    graph = make()
    assert (graph.graph is not None) == (device == "cuda")
    for n, seed in [(40, 1), (19, 2)]:
        ids = prompts(n, seed, device)
        token, logits, (keys, values) = plain_first_token(model, ids, tail=tail)
        assert torch.equal(graph(ids), token)
        torch.testing.assert_close(graph.logits, logits, atol=1e-4, rtol=1e-4)
        assert cache.get_seq_length() == n - 1  # as the pipelined step leaves it; the step wrote column n - 1
        got_keys, got_values = cache.slices(n)
        torch.testing.assert_close(got_keys, keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_values, values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_a_pooled_caches_predicted_passes_share_one_auxiliary_cache(device, tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_layers=[0, 2], device=device)
    pooled = model._steps.get(model, 2, 2 * BUCKET + 8)
    short, long = (pooled.prefill_graph(model, "predicted", prompts(n, 0, device), make=True) for n in (40, 200))
    assert short.aux_cache is long.aux_cache and long.aux_cache.capacity >= 2 * BUCKET
    for graph, n in [(long, 200), (short, 40), (long, 150)]:  # a shorter pass between: the longer ones stay right
        ids = prompts(n, n, device)
        token, logits, _ = plain_first_token(model, ids)
        assert torch.equal(graph(ids), token)
        torch.testing.assert_close(graph.logits, logits, atol=1e-4, rtol=1e-4)


def test_an_auxiliary_cache_too_small_for_the_pass_is_refused(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_layers=[0, 2])
    with pytest.raises(ValueError, match="cannot hold a pass of 2 x 256"):
        PrefillGraph(model, model.new_cache(2, 2 * BUCKET), "predicted", 2, 2 * BUCKET,
                     aux_cache=model.new_cache(2, BUCKET, "aux"))


def test_a_prompt_the_graph_cannot_take_is_refused(tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_layers=[0, 2])
    graph = PrefillGraph(model, model.new_cache(2, BUCKET), "predicted", batch=2, length=BUCKET)
    for ids in (prompts(BUCKET + 1, 0), prompts(1, 0), prompts(8, 0)[:1]):
        with pytest.raises(ValueError, match="cannot take prompts of shape"):
            graph(ids)
    with pytest.raises(ValueError, match="does not fit a cache"):
        PrefillGraph(model, model.new_cache(2, BUCKET - 1), "exact", batch=2, length=BUCKET)


def test_a_base_whose_rotary_tables_follow_the_forwards_length_gets_no_graph(tmp_path):
    """Longrope's short or long factors go by each forward's last position: a pass padded to its bucket could cross
    the original length where the prompt does not."""
    path = save_tiny_model(tmp_path / "longrope", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
        "short_factor": [1.0] * 8, "long_factor": [4.0] * 8})
    model = KVPredictionModel.from_pretrained(str(path), keep_ratio=0.5)
    for mode in ("exact", "aux", "predicted"):
        with pytest.raises(ValueError, match="rotary tables by each forward's length"):
            PrefillGraph(model, model.new_cache(1, BUCKET, mode), mode, batch=1, length=BUCKET)


@cuda_only
@pytest.mark.parametrize("mode", ["exact", "predicted"])
def test_on_cuda_generate_replays_a_prompt_pass_once_the_step_is_captured(mode, tiny_llama):
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_layers=[0, 2], device="cuda")
    ids = prompts(40, 1, "cuda")
    model.prefill_graphs = False
    plain = [model.generate(ids, mode=mode, max_new_tokens=8) for _ in range(2)]  # the first captures the step
    model.prefill_graphs = True
    graphed = [model.generate(ids, mode=mode, max_new_tokens=8) for _ in range(2)]  # the first captures after it
    assert all(torch.equal(got, plain[0]) for got in plain[1:] + graphed)
    (pooled,) = model._steps.entries.values()
    assert isinstance(pooled.prefills[(mode, 1, BUCKET)], PrefillGraph)


@pytest.mark.parametrize("refined", [False, True])
def test_generate_captures_for_a_shape_after_its_first_request_not_before_its_first_token(tiny_llama, refined):
    """The pipelined first step and the prompt pass's graph; a str stands for each, which the request would have
    called, had it been made before its own pass."""
    model = KVPredictionModel.from_pretrained(tiny_llama, keep_layers=[0, 2])
    ids = prompts(40, 1)
    pooled = model._steps.get(model, 2, 40 + 8)
    pooled.made_step(model).graph = object()  # as if the shape's step were a captured graph (no GPU here)
    made = []
    with (patch("kvpred.pipeline.PipelinedPrefill", lambda *args: made.append(args[2:]) or "pipeline"),
          patch("kvpred.prefill_graphs.PrefillGraph", lambda *args: made.append(args[2:5]) or "graph")):
        if refined:
            generate_refined(model, ids, refine="off", max_new_tokens=8)
        else:
            model.generate(ids, mode="predicted", max_new_tokens=8)
    assert made == [(1,), ("predicted", 2, BUCKET)]
    assert pooled.pipelines[1] == "pipeline" and pooled.prefill_graph(model, "predicted", ids) == "graph"
    assert pooled.prefill_graph(model, "predicted", prompts(MOST_TOKENS, 0)) is None  # 2 x MOST_TOKENS: too large
