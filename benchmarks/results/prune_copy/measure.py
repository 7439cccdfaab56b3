"""Time and peak memory of making a pruned auxiliary the old way (deepcopy the whole base, then drop layers) or the
new one (`models.prune_layers`: copy only the kept layers and share the rest with the base). One process per
measurement, so each peak is that way's own.
    python measure.py old|new                       the shipped default's layers 0, 10, 20, 29 of SmolLM2-135M (CPU)
    python measure.py old|new SHAPE                 a random-weight base of a public shape on CUDA, bf16, 1/4 kept"""
import copy
import resource
import sys
import time

import torch

from kvpred import models
from kvpred.shapes import random_causal_lm, shape_config


def old_way(base, keep):
    pruned = copy.deepcopy(base)
    pruned.model.layers = torch.nn.ModuleList(pruned.model.layers[i] for i in keep)
    return pruned


way, shape = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
if shape is None:
    base, _ = models.load_causal_lm("smollm2-135m", torch.float32, "cpu")
    keep = [0, 10, 20, 29]
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
else:
    base = random_causal_lm(shape_config(shape), torch.bfloat16, "cuda")
    keep = models.keep_layers_for_ratio(base.config.num_hidden_layers, 0.25)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    peak = torch.cuda.max_memory_allocated
before = peak()
start = time.perf_counter()
aux = old_way(base, keep) if way == "old" else models.prune_layers(base, keep)
if shape is not None:
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
dropped = sum(p.numel() * p.element_size() for i, layer in enumerate(base.model.layers) if i not in keep
              for p in layer.parameters())
shared = {id(p) for p in base.parameters()}
kept = sum(p.numel() * p.element_size() for p in aux.parameters())
own = sum(p.numel() * p.element_size() for p in aux.parameters() if id(p) not in shared)
print(f"{shape or 'smollm2-135m'} {way}: {seconds:.2f} s, peak {'GPU memory' if shape else 'RSS'} "
      f"+{(peak() - before) / 2**20:.0f} MiB over the loaded base; the auxiliary's parameters {kept / 2**20:.0f} MiB, "
      f"{own / 2**20:.0f} MiB of them its own; the dropped layers {dropped / 2**20:.0f} MiB")
