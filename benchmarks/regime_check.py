"""Per-position first-token agreement with the exact base in the paper's training regime (every position attends to
predicted keys/values, its own included) and in the inference regime (its own true key/value: `--exact-self`).

    python benchmarks/regime_check.py MODEL [MODEL ...]   # 32 WikiText windows of 256 tokens, positions 16-255
"""
import sys

import torch

from kvpred import KVPredictionModel
from kvpred.tasks import default_data_dir
from kvpred.train import Distillation, TrainConfig

WIKITEXT = default_data_dir() / "wikitext2-test.txt"


@torch.no_grad()
def agreements(model: KVPredictionModel, ids: torch.Tensor) -> tuple[float, float]:
    """Agreement in the paper's regime and in the inference regime, over positions 16 onward."""
    exact = model.base(input_ids=ids).logits.argmax(-1)
    _, keys, values = Distillation(model, TrainConfig()).predicted_kv(ids)
    return tuple((Distillation(model, TrainConfig(exact_self=own)).base_logits(ids, keys, values).argmax(-1) == exact)
                 .float()[:, 16:].mean().item() for own in (False, True))


def main(names: list[str]) -> None:
    for name in names:
        model = KVPredictionModel.from_pretrained(name)
        tokens = model.tokenizer(open(WIKITEXT).read()[:400000]).input_ids
        ids = torch.tensor([tokens[i * 1024:i * 1024 + 256] for i in range(32)])
        paper, inference = agreements(model, ids)
        print(f"{name}: paper regime {paper:.3f}, inference regime (exact self) {inference:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
