"""Does a CUDA-graph capture that fails half-way leave torch's CUDA RNG unusable, and what restores it?

Each case starts a fresh process (the poisoned state would leak between cases), makes a capture fail inside
`torch.cuda.graph` (a host read of a device tensor, which capture forbids), then draws random numbers on the GPU.

    python benchmarks/capture_rng_probe.py
"""
from __future__ import annotations

import subprocess
import sys

CASE = r"""
import torch
case = {case!r}
x = torch.ones(4, device="cuda")  # initialises CUDA, and with it the default generators
gen = torch.cuda.default_generators[0]
saved = gen.clone_state() if case == "restore" else None
graph = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(graph):
        y = x * 2
        if case != "clean":
            y.sum().item()  # a host read: the capture fails here
except Exception as err:
    print("capture failed:", type(err).__name__, str(err).splitlines()[0][:100])
if saved is not None:
    gen.graphsafe_set_state(saved)
try:
    print("randint after:", torch.randint(0, 100, (3,), device="cuda").tolist())
    print("multinomial after:", torch.multinomial(torch.ones(1, 8, device="cuda"), 1).tolist())
    z = torch.ones(4, device="cuda")
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        w = z + torch.rand(4, device="cuda")
    g2.replay()
    print("a later capture with RNG replays:", bool((w >= 1).all()))
    print("RESULT", case, "ok")
except Exception as err:
    print("RESULT", case, "broken:", type(err).__name__, str(err).splitlines()[0][:120])
"""

for case in ("clean", "plain", "restore"):
    out = subprocess.run([sys.executable, "-c", CASE.format(case=case)], capture_output=True, text=True)
    print(f"--- {case}\n{out.stdout}{out.stderr[-600:]}")
