import os
import warnings

import pytest
import torch

from kvpred.data import build_shards
from kvpred.model import KVPredictionModel
from kvpred.testing import byte_tokenizer, save_tiny_model

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "ministral", "smollm3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma",
         "gemma2", "gemma3_text", "granite", "olmo", "olmo2", "olmo3", "seed_oss", "phi3", "stablelm", "glm", "glm4",
         "cohere", "cohere2", "exaone4", "helium", "ernie4_5", "starcoder2", "nemotron", "arcee", "apertus",
         "olmoe", "granitemoe", "glm4_moe", "hunyuan_v1_dense", "hunyuan_v1_moe"]
warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def fp32_predictor():
    """Predictor matmuls and the auxiliary's prefill in the model's dtype, so tests may compare predicted mode with
    the base to float precision on any CPU; the bf16 arithmetic chosen on CPUs with bf16 dot products has its own
    tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KVPredictionModel, "predictor_dtype", None)
        patch.setattr(KVPredictionModel, "aux_dtype", None)
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One random tiny base model folder per supported architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(save_tiny_model(root / arch, arch=arch, seed=i)) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """Token shards (byte tokenizer, 20% held out) of twelve small Python-like documents."""
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n" * 40
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (root / f"doc{i}.py").write_text(f"# document {i}\n" + text[i * 7:])
    out = root / "tokens"
    build_shards([str(root)], byte_tokenizer(), out, heldout_fraction=0.2, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on busy shared cores spinning threads slow them many-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
