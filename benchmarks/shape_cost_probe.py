"""First call at a new prompt length against a repeated one: what a server pays per new shape, which warmed-up
benchmarks hide. Random SmolLM2-135M-shaped weights (KVP-LP 4/30 layers, rank-128 hidden-state predictor), bf16,
batch 1, a fresh length each time:

* `prefill` (exact, and predicted: the auxiliary and the base's last token) with SDPA's default backends, cuDNN
  among them, and inside `kvpred.decoding.without_cudnn_attention`;
* `generate(max_new_tokens=1)`, which now runs inside that context.

    python benchmarks/shape_cost_probe.py
"""
import contextlib
import time
from types import SimpleNamespace

import torch

from kvpred.decoding import without_cudnn_attention
from kvpred.shapes import random_kvp_model


def timed(call) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call().cpu()  # on the host
    return (time.perf_counter() - start) * 1e3


def main():
    model = random_kvp_model("smollm2-135m", aux_keep=4 / 30, source="hidden", rank=128)
    model.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)  # random weights come without one
    model.generate(torch.randint(0, 1000, (1, 300), device="cuda"), max_new_tokens=4)  # start-up, pools, graphs
    print(torch.__version__, torch.cuda.get_device_name(), "bf16, batch 1; ms, first call at a new length / again")
    length = 1000
    for label, context in (("prefill, default SDPA backends", contextlib.nullcontext),
                           ("prefill, without cuDNN attention", without_cudnn_attention), ("generate", None)):
        for _ in range(4):
            length += 97
            ids = torch.randint(0, 1000, (1, length), device="cuda")
            row = []
            for mode in ("exact", "predicted"):
                if context is None:
                    def call():
                        return model.generate(ids, mode=mode, max_new_tokens=1)
                else:
                    def call():
                        with context():
                            return model.prefill(ids, mode=mode)[0]
                row.append(f"{mode} {timed(call):6.1f} / {timed(call):6.1f}")
            print(f"{label:34s} length {length}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
