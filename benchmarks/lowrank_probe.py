"""The factorised predictor without training: compress the shipped default's maps to rank r (`kvpred compress`'s
closed form, input statistics from training shards) and measure held-out NLL and first-token agreement on the CPU.

    python benchmarks/lowrank_probe.py TRAIN_SHARDS CODE_SHARDS MIX_SHARDS OUT.json 64 128 256
"""
import json, sys, torch, torch.nn.functional as F
from kvpred import KVPredictionModel
from kvpred.data import heldout_windows, PackedTokens
from kvpred.fit import factorise, input_moments
torch.set_num_threads(2)
m = KVPredictionModel.from_pretrained("smollm2-135m", dtype=torch.float32)
full = m.predictor
xtx = input_moments(m, PackedTokens(sys.argv[1], "train", seq_len=256, batch_size=16, seed=1), 65536)
sets = {"mix": heldout_windows(sys.argv[3], 256, 48), "code": heldout_windows(sys.argv[2], 256, 48)}
exact = {}
with torch.no_grad():
    for s, w in sets.items():
        logits, _ = m.prefill(w, mode="exact", exact_tail=65)
        exact[s] = (logits[:, 0].argmax(-1), F.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, -64:].flatten()).item())
res = {}
for r in [None] + [int(x) for x in sys.argv[5:]]:
    row = {"multiply_adds_per_token": full.config.multiply_adds_per_token()}
    m.predictor = full
    if r is not None:
        m.predictor, errors = factorise(full, xtx, r)
        row = {"multiply_adds_per_token": m.predictor.config.multiply_adds_per_token(), "rel_error_per_tap": errors}
    with torch.no_grad():
        for s, w in sets.items():
            logits, _ = m.prefill(w, mode="predicted", exact_tail=65)
            row[s] = {"nll": round(F.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, -64:].flatten()).item(), 3),
                      "agree": round((logits[:, 0].argmax(-1) == exact[s][0]).float().mean().item(), 3),
                      "exact_nll": round(exact[s][1], 3)}
    res[str(r)] = row
    print(r, row, flush=True)
json.dump({"command": "python " + " ".join(sys.argv), **res}, open(sys.argv[4], "w"), indent=1)
