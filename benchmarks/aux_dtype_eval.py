"""`kvpred eval` twice in one process on the same items: the auxiliary's prefill in the model's dtype
(KVPredictionModel.aux_dtype = None) and under bf16 autocast (what "auto" picks on CPUs with bf16 dot products).
Arguments go to the eval; each run writes --out's stem with _fp32 / _bf16.

    python benchmarks/aux_dtype_eval.py --model smollm2-135m --tasks agreement,heldout,lambada --limit 200 \
        --modes exact,aux,predicted --out benchmarks/results/aux_bf16/eval.json
"""
import argparse

import torch

from kvpred.cli import main
from kvpred.model import KVPredictionModel

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", required=True)
    args, eval_args = parser.parse_known_args()
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        KVPredictionModel.aux_dtype = dtype
        print(f"===== auxiliary prefill: {name}", flush=True)
        main(["eval", *eval_args, "--out", args.out.replace(".json", f"_{name}.json")])
