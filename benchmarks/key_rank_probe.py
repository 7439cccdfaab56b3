"""How few code dimensions do the shipped default's key maps need? Each tap's rank-128 code is re-expressed in a
basis ordered by what the keys read (SVD of the tap's stacked key maps in the metric of the code's covariance on
calibration text), the values' maps are re-expressed exactly, and the keys keep only the first KEY_RANK directions
(their mean goes to the bias). First-token agreement with the exact base on WikiText windows (CPU, fp32). The key maps
keep their width with the other columns zero, which computes what narrower maps would.

    python benchmarks/key_rank_probe.py CALIBRATION_SHARDS WINDOWS LENGTH KEY_RANKS   # e.g. shards/ 256 512 128,64,32
"""
import copy
import sys

import torch

from kvpred import KVPredictionModel
from kvpred.data import PackedTokens
from kvpred.fit import input_moments, mean_and_covariance
from kvpred.predictor import KVPredictor
from kvpred.tasks import text_windows


def narrow_keys(predictor: KVPredictor, xtx: torch.Tensor, key_rank: int) -> tuple[KVPredictor, list[float]]:
    """The factorised predictor with each tap's code re-expressed so that its first `key_rank` dimensions carry
    most of the keys (in the metric of the code's covariance), the keys reading only those, and the relative key
    error that leaves per tap, sqrt(dropped squared singular values / total)."""
    c, narrow, errors = predictor.config, copy.deepcopy(predictor), []
    for code, tap in enumerate(c.taps):
        layers = [i for i, j in enumerate(c.layer_map) if j == tap]
        down = predictor.down[code].double()
        mean, covariance = mean_and_covariance(xtx[tap])
        e, v = torch.linalg.eigh(down @ covariance @ down.T)
        e = e.clamp(min=e.max() * 1e-12)
        root, inverse_root = (v * e.sqrt()) @ v.T, (v * e.rsqrt()) @ v.T
        keys = torch.cat([predictor.key_weight[i] for i in layers]).double()
        power, basis = torch.linalg.eigh((keys @ root).T @ (keys @ root))  # what the keys read, per direction
        power, basis = power.flip(0).clamp(min=0), basis.flip(1)  # strongest first
        to_new, to_old = basis.T @ inverse_root, root @ basis  # new code = to_new @ old code; old = to_old @ new
        narrow.down.data[code] = to_new @ down
        new_keys = keys @ to_old
        dropped = new_keys[:, key_rank:] @ (to_new @ down @ mean)[key_rank:]  # the dropped part at the mean code
        new_keys[:, key_rank:] = 0
        for i, rows, extra in zip(layers, new_keys.split(c.key_features), dropped.split(c.key_features)):
            narrow.key_weight.data[i] = rows
            narrow.key_bias.data[i] = predictor.key_bias[i].double() + extra
            narrow.value_weight.data[i] = predictor.value_weight[i].double() @ to_old
        errors.append((power[key_rank:].sum() / power.sum()).sqrt().item())
    return narrow, errors


def multiply_adds_before_first_token(predictor: KVPredictor, key_rank: int) -> int:
    """Per token, with deferred values (kvpred.deferred, the CPU path): each tap's code, then the key maps."""
    c = predictor.config
    return len(c.taps) * c.in_features * c.rank + len(c.layer_map) * c.key_features * key_rank


def first_tokens(model: KVPredictionModel, windows: torch.Tensor, mode: str, batch: int = 16) -> torch.Tensor:
    return torch.cat([model.generate(windows[i:i + batch], mode=mode, max_new_tokens=1)[:, -1]
                      for i in range(0, len(windows), batch)])


def main(shards: str, n: int, length: int, key_ranks: list[int]) -> None:
    torch.set_grad_enabled(False)
    model = KVPredictionModel.from_pretrained("smollm2-135m", dtype=torch.float32)
    model.predictor_dtype = model.aux_dtype = torch.float32
    xtx = input_moments(model, PackedTokens(shards, "train", seq_len=512, batch_size=8), 131_072)
    wins = torch.tensor(text_windows(model.tokenizer, "../shared/data/wikitext2-test.txt", length, n))
    print(f"{len(wins)} WikiText windows of {length} tokens, shipped default, CPU fp32", flush=True)
    exact = first_tokens(model, wins, "exact")
    full = model.predictor
    reference = first_tokens(model, wins, "predicted")
    print(f"code rank 128 (shipped): agreement {(reference == exact).float().mean():.3f}", flush=True)
    for key_rank in key_ranks:
        model.predictor, errors = narrow_keys(full, xtx, key_rank)
        got = first_tokens(model, wins, "predicted")
        print(f"key rank {key_rank}: agreement {(got == exact).float().mean():.3f}, same as rank 128 "
              f"{(got == reference).float().mean():.3f}; key error dropped per tap "
              f"{', '.join(f'{e:.3f}' for e in errors)}; predictor multiply-adds per token before the first token "
              f"{multiply_adds_before_first_token(full, key_rank)} "
              f"(rank 128: {multiply_adds_before_first_token(full, 128)})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(x) for x in sys.argv[4].split(",")])
