"""Recompute the `flops` field of `kvpred eval` JSONs made before kvpred.evaluate.flop_ratio used kvpred bench's
count (the old matmul rule counted a full-rank predictor and every auxiliary layer, though hidden-state predicted
mode stops at the deepest tap), and rewrite their markdown reports. Ratios depend only on shapes, so an untrained
model of the variant's shape serves.

    python benchmarks/results/h100/round2/refresh_flops.py FILE.json:KEEP_LAYERS:RANK ...   (RANK "full" or an int)
"""
import json, sys
from dataclasses import replace
from pathlib import Path
from kvpred import KVPredictionModel
from kvpred.evaluate import flop_ratio, write_report
from kvpred.predictor import KVPredictor

NOTE = "flops recomputed after the accounting fix (benchmarks/results/h100/round2/refresh_flops.py); the run's old matmul rule: "
for arg in sys.argv[1:]:
    path, keep, rank = arg.split(":")
    m = KVPredictionModel.from_pretrained("smollm2-135m", keep_layers=[int(k) for k in keep.split(",")], source="hidden")
    m.predictor = KVPredictor(replace(m.predictor.config, rank=None if rank == "full" else int(rank)))
    doc = json.loads(Path(path).read_text())
    old = doc["flops"]["matmul_ratio"]
    doc["flops"] = flop_ratio(m, doc["flops"]["prompt_tokens"])
    doc["note"] = NOTE + f"{old:.2f}x"
    write_report(doc, Path(path))
    print(path, f"matmul_ratio {old:.2f} -> {doc['flops']['matmul_ratio']:.2f}")
