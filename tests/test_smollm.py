"""End to end on the real SmolLM2-135M-Instruct base (the embedded default)."""
import json

import pytest
import torch

from kvpred.cli import main
from kvpred.generation import encode_prompts
from kvpred.model import KVPredictionModel

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def smollm():
    return KVPredictionModel.from_pretrained("smollm2-135m")


def test_embedded_default_loads_the_shipped_predictor(smollm):
    assert smollm.config.base == "smollm2-135m"
    assert smollm.base.config.num_hidden_layers == 30
    assert smollm.aux.config.num_hidden_layers < 30
    assert len(smollm.config.predictor.layer_map) == 30


def test_exact_mode_is_the_base_model(smollm):
    ids, mask = encode_prompts(smollm.tokenizer, ["The capital of France is"])
    out = smollm.generate(ids, mask, mode="exact", max_new_tokens=4)
    assert "Paris" in smollm.tokenizer.decode(out[0, ids.shape[1]:])


def test_all_modes_generate_for_a_padded_batch(smollm):
    ids, mask = encode_prompts(smollm.tokenizer, ["def fibonacci(n):", "Once upon a time, in a land far away,"])
    for mode in ("exact", "aux", "predicted"):
        out = smollm.generate(ids, mask, mode=mode, max_new_tokens=6)
        assert out.shape == (2, ids.shape[1] + 6)


def test_equivalence_on_the_real_model():
    model = KVPredictionModel.from_pretrained("smollm2-135m", keep_ratio=1.0)
    ids, mask = encode_prompts(model.tokenizer, ["import numpy as np\nimport torch\n", "The weather today is"])
    exact, _ = model.prefill(ids, mask, mode="exact")
    predicted, _ = model.prefill(ids, mask, mode="predicted")
    torch.testing.assert_close(predicted, exact, atol=2e-3, rtol=1e-3)


def test_cli_default_model(capsys):
    assert main(["generate", "--prompt", "Hello", "--max-new-tokens", "3", "--json", "--mode", "exact"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "smollm2-135m" and len(out["tokens"]) <= 3


def test_a_smollm_conversation_tokenized_turn_by_turn_is_tokenized_as_a_whole(smollm):
    """ChatSession tokenizes each turn's conversation only from the last special token before it on."""
    from kvpred.generation import ConversationTokenizer
    from tests.test_refine import Seen

    tok = Seen(smollm.tokenizer)
    tokenize = ConversationTokenizer(tok)
    messages, previous = [{"role": "system", "content": "You are a helpful assistant."}], ""
    for user, reply in (("What is the capital of France?", " Paris.\n"), ("And  of Spain?\n\n", "Madrid, I think"),
                        ("Thanks! ", "")):
        messages.append({"role": "user", "content": user})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenize(text) == tok(text, add_special_tokens=False).input_ids
        if previous:  # later turns: only what follows the previous text's last special token
            assert tok.texts[-2] == text[previous.rindex("<|im_start|>") + len("<|im_start|>"):]
        previous = text
        messages.append({"role": "assistant", "content": reply})
