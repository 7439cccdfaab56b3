"""Time and peak memory of making the shipped default's pruned auxiliary (layers 0, 10, 20, 29 of SmolLM2-135M),
the old way (deepcopy the whole base, then drop layers) or the new one (`models.prune_layers`: copy only the kept
layers). One process per measurement, so the peak resident set is that way's own: python measure.py old|new"""
import copy
import resource
import sys
import time

import torch

from kvpred import models

KEEP = [0, 10, 20, 29]


def old_way(base):
    pruned = copy.deepcopy(base)
    pruned.model.layers = torch.nn.ModuleList(pruned.model.layers[i] for i in KEEP)
    return pruned


base, _ = models.load_causal_lm("smollm2-135m", torch.float32, "cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
aux = old_way(base) if sys.argv[1] == "old" else models.prune_layers(base, KEEP)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dropped = sum(p.numel() * p.element_size() for i, layer in enumerate(base.model.layers) if i not in KEEP
              for p in layer.parameters())
print(f"{sys.argv[1]}: {seconds:.2f} s, peak RSS +{(peak - before) / 1024:.0f} MiB over the loaded base "
      f"(dropped layers: {dropped / 2**20:.0f} MiB in float32)")
