"""First call at a new prompt length against a repeated one: what a server pays per new shape, which warmed-up
benchmarks hide. Random SmolLM2-135M-shaped weights (KVP-LP 4/30 layers, rank-128 hidden-state predictor), bf16,
batch 1; `generate(max_new_tokens=1)` timed to the token on the host, for each SDPA backend setting.

    python benchmarks/shape_cost_probe.py
"""
import time
from types import SimpleNamespace

import torch

from kvpred.shapes import random_kvp_model


def timed(model, ids, mode):
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, mode=mode, max_new_tokens=1)[:, -1].tolist()
    return (time.perf_counter() - start) * 1e3


def main():
    model = random_kvp_model("smollm2-135m", aux_keep=4 / 30, source="hidden", rank=128)
    model.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)  # random weights come without one
    model.generate(torch.randint(0, 1000, (1, 300), device="cuda"), max_new_tokens=4)  # start-up, pools, graphs
    print(torch.__version__, torch.cuda.get_device_name(), "cudnn sdp enabled:", torch.backends.cuda.cudnn_sdp_enabled())
    for cudnn in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        for length in ((1000, 1001, 1037, 1500, 1999) if cudnn else (1003, 1004, 1041, 1503, 1995)):
            ids = torch.randint(0, 1000, (1, length), device="cuda")
            row = []
            for mode in ("exact", "predicted"):
                first, again = timed(model, ids, mode), timed(model, ids, mode)
                row.append(f"{mode} first {first:6.1f} again {again:6.1f}")
            print(f"cudnn_sdp={cudnn} length {length}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
