"""Feasibility probe for a cheaper predictor: replace the shipped default's maps by input-whitened rank-r
approximations shared by all base layers that read the same auxiliary tap, and measure held-out NLL and first-token
agreement on the CPU. Training-free: no factorised predictor exists in kvpred yet; this measures what one would lose.

    python benchmarks/lowrank_probe.py TRAIN_SHARDS CODE_SHARDS MIX_SHARDS OUT.json 64 128 256
"""
import json, sys, torch, torch.nn.functional as F
from kvpred import KVPredictionModel
from kvpred.data import heldout_windows, PackedTokens
torch.set_num_threads(2)
m = KVPredictionModel.from_pretrained("smollm2-135m", dtype=torch.float32)
p = m.predictor
lm = p.layer_map.tolist()
# input covariance per tap from training windows
data = PackedTokens(sys.argv[1], "train", seq_len=256, batch_size=16, seed=1)
ids = next(iter(data))  # [16, 256] training tokens for the input covariance
with torch.no_grad():
    key_in, value_in = m.aux_inputs(ids, None, None)  # [taps, B, T, in]
X = key_in.flatten(1, 2).double()  # [taps, N, in]
X = torch.cat([X, torch.ones(*X.shape[:2], 1, dtype=X.dtype)], -1)
cov = X.transpose(1, 2) @ X / X.shape[1]  # [taps, in+1, in+1]
W0 = {n: t.detach().clone() for n, t in p.state_dict().items()}

def lowrank(r):
    out = {k: v.clone() for k, v in W0.items()}
    for tap in sorted(set(lm)):
        layers = [i for i, j in enumerate(lm) if j == tap]
        M = torch.cat([torch.cat([W0[f"{kind}_weight"][i], W0[f"{kind}_bias"][i][:, None]], 1)
                       for i in layers for kind in ("key", "value")]).double()  # [out, in+1]
        e, V = torch.linalg.eigh(cov[tap] + 1e-6 * torch.eye(cov.shape[-1], dtype=torch.double))
        half, ihalf = V @ torch.diag(e.sqrt()) @ V.T, V @ torch.diag(e.rsqrt()) @ V.T
        U, S, Vh = torch.linalg.svd(M @ half, full_matrices=False)
        Mr = (U[:, :r] * S[:r]) @ Vh[:r] @ ihalf
        rows = iter(Mr.split(W0["key_weight"].shape[1]))
        for i in layers:
            for kind in ("key", "value"):
                blk = next(rows).float()
                out[f"{kind}_weight"][i], out[f"{kind}_bias"][i] = blk[:, :-1], blk[:, -1]
    return out

sets = {"mix": heldout_windows(sys.argv[3], 256, 48), "code": heldout_windows(sys.argv[2], 256, 48)}
exact = {}
with torch.no_grad():
    for s, w in sets.items():
        logits, _ = m.prefill(w, mode="exact", exact_tail=65)
        exact[s] = (logits[:, 0].argmax(-1), F.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, -64:].flatten()).item())
res = {}
for r in [None] + [int(x) for x in sys.argv[5:]]:
    p.load_state_dict(W0 if r is None else lowrank(r))
    row = {}
    with torch.no_grad():
        for s, w in sets.items():
            logits, _ = m.prefill(w, mode="predicted", exact_tail=65)
            row[s] = {"nll": round(F.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, -64:].flatten()).item(), 3),
                      "agree": round((logits[:, 0].argmax(-1) == exact[s][0]).float().mean().item(), 3),
                      "exact_nll": round(exact[s][1], 3)}
    res[str(r)] = row
    print(r, row, flush=True)
json.dump({"command": "python " + " ".join(sys.argv), **res}, open(sys.argv[4], "w"), indent=1)
