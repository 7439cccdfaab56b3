"""What kvpred did with a sliding-window base before it capped sequences at the window: a tiny random Mistral with a
24-token window, a 30-token prompt and 10 greedy tokens, kvpred's exact mode (the CUDA-graph step on a GPU, the eager
step on a CPU) against transformers' own generate. The old limit is put back for the comparison.

    python benchmarks/sliding_window_probe.py --device cuda
"""
import argparse
import tempfile

import torch

from kvpred.model import KVPredictionModel
from kvpred.testing import save_tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    path = save_tiny_model(tempfile.mkdtemp() + "/mistral", arch="mistral", sliding_window=24)
    model = KVPredictionModel.from_pretrained(str(path), keep_layers=[0, 1, 2, 3], device=args.device)
    print(f"device {args.device}; kvpred's limit now: {model.context_length} tokens")
    KVPredictionModel.context_length = property(lambda self: 512)  # the limit before the cap
    torch.manual_seed(0)
    ids = torch.randint(3, 259, (4, 30), device=args.device)
    with torch.no_grad():
        hf = model.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                 pad_token_id=0)[:, 30:]
        for call in (1, 2):  # the first call runs the eager step; the pooled graph step from the second
            ours = model.generate(ids, mode="exact", max_new_tokens=10)[:, 30:]
            same = (ours == hf).float().mean().item()
            print(f"call {call}: kvpred exact mode vs transformers' generate past the window: {same:.2f} of "
                  "tokens equal")


if __name__ == "__main__":
    main()
