"""Which auxiliary tap predicts each base layer best? Closed-form fits from the shipped (trained) auxiliary."""
import json, sys, time
import torch
from kvpred import KVPredictionModel
from kvpred.data import PackedTokens
from kvpred.fit import FitConfig, fit_predictor
from kvpred.predictor import KVPredictor, PredictorConfig

torch.set_num_threads(2)
MAPS = {
    "floor": [0] + [1] * 10 + [2] * 10 + [3] * 9,
    "nearest": [0] + [1] * 5 + [2] * 10 + [3] * 14,
    "deepest": [0] + [3] * 29,
}
name, tokens = sys.argv[1], int(sys.argv[2])
m = KVPredictionModel.from_pretrained("smollm2-135m", dtype=torch.float32, device="cpu")
pc = PredictorConfig(layer_map=MAPS[name], in_features=576, key_features=192, value_features=192, source="hidden")
m.predictor = KVPredictor(pc).to(torch.float32)
m.config.predictor = pc
batches = PackedTokens("/tmp/pyshards", "train", seq_len=512, batch_size=8)
t = time.time()
rep = fit_predictor(m, batches, FitConfig(tokens=tokens))
print(name, f"{time.time() - t:.0f}s", "key", [round(x, 3) for x in rep["key_rel_error_after"]])
print(name, "value", [round(x, 3) for x in rep["value_rel_error_after"]])
print(name, "mean key %.3f value %.3f" % (sum(rep["key_rel_error_after"]) / 30, sum(rep["value_rel_error_after"]) / 30))
m.save_pretrained(f"/tmp/tapx/{name}")
json.dump(rep, open(f"/tmp/tapx/{name}.json", "w"))
