"""Which mixture-of-experts step can be captured as a CUDA graph: per dtype and transformers experts implementation,
the note `make_step` gives (cuda-graph, or eager with the capture's error) for tiny random Mixtral and Qwen3-MoE bases.

    python benchmarks/moe_capture_probe.py   # on a GPU
"""
import tempfile

import torch

from kvpred.decoding import make_step
from kvpred.model import KVPredictionModel
from kvpred.testing import save_tiny_model

root = tempfile.mkdtemp()
for arch in ("mixtral", "qwen3_moe"):
    path = str(save_tiny_model(f"{root}/{arch}", arch=arch))
    for dtype in (torch.float32, torch.bfloat16):
        for implementation in ("grouped_mm", "batched_mm"):
            model = KVPredictionModel.from_pretrained(path, keep_ratio=0.5, device="cuda", dtype=dtype)
            model.base.config._experts_implementation = implementation
            _, note = make_step(model, model.new_cache(2, 64), True)
            print(f"{arch:10} {str(dtype):15} {implementation:11} {note}", flush=True)
