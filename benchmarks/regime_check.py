"""Per-position first-token agreement with the exact base in the paper's training regime (every position attends to
predicted keys/values, its own included) and in the inference regime (its own true key/value: `--exact-self`).

    python benchmarks/regime_check.py MODEL [MODEL ...]   # 32 WikiText windows of 256 tokens, positions 16-255
"""
import sys

import torch

from kvpred import KVPredictionModel
from kvpred.model import capture
from kvpred.train import Distillation, TrainConfig

WIKITEXT = "/work/shared/data/wikitext2-test.txt"


@torch.no_grad()
def agreement(model: KVPredictionModel, ids: torch.Tensor, exact_self: bool) -> float:
    exact = model.base(input_ids=ids).logits.argmax(-1)
    with capture(model.aux, model.predictor.config.source) as taps:
        model.aux(input_ids=ids)
    keys, values = model.base_kv(*model.predictor(*taps.stacked()), torch.arange(ids.shape[1]).expand_as(ids))
    logits = Distillation(model, TrainConfig(exact_self=exact_self)).base_logits(ids, keys, values)
    return (logits.argmax(-1) == exact).float()[:, 16:].mean().item()


def main(names: list[str]) -> None:
    for name in names:
        model = KVPredictionModel.from_pretrained(name)
        tokens = model.tokenizer(open(WIKITEXT).read()[:400000]).input_ids
        ids = torch.tensor([tokens[i * 1024:i * 1024 + 256] for i in range(32)])
        paper, inference = agreement(model, ids, False), agreement(model, ids, True)
        print(f"{name}: paper regime {paper:.3f}, inference regime (exact self) {inference:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
