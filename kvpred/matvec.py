"""Matrix-vector products for the linear layers of one-token forwards on a CPU (attention: kvpred.attention).

A one-token step reads every weight once, so it runs at the speed weights stream from memory. On the 2-core test
machine `F.linear` with a single fp32 row streams SmolLM2's layer weights at 16 GB/s, on one thread. The same
products as one batched matmul over row blocks of the weight (views, no copy), `W.view(blocks, -1, in) @ x`,
stream at 38 GB/s on two threads (30 GB/s on one): 11 instead of 26 ms for the step's 210 layer matmuls, and
2.5 instead of 7.2 ms for the LM head. In bf16 `F.linear` is the faster of the two, and with many rows (a prefill)
a matrix-matrix product is what runs, so those keep it. SmolLM2's CPU step takes 27-30 instead of 44-49 ms
(benchmarks/results/matvec).
"""
from __future__ import annotations

import math
import types

import torch
from torch import nn
from torch.nn import functional as F

MAX_ROWS = 16  # up to this many rows (batch x tokens) the blocked product was faster (fp32, 2 cores)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (not 0 < rows <= MAX_ROWS or x.device.type != "cpu" or weight.dtype != torch.float32
            or not weight.is_contiguous()):
        return F.linear(x, weight, self.bias)
    blocks = math.gcd(weight.shape[0], _threads())  # one per thread, where the rows divide evenly
    columns = x.reshape(rows, -1).T.expand(blocks, -1, -1)  # [blocks, in, rows]
    out = torch.bmm(weight.view(blocks, -1, weight.shape[1]), columns)  # [blocks, out / blocks, rows]
    # one row is already in order (the common case: a step at batch 1); more take a small transpose
    out = out.view(*x.shape[:-1], -1) if rows == 1 else out.permute(2, 0, 1).reshape(*x.shape[:-1], -1)
    return out if self.bias is None else out + self.bias


@torch.compiler.assume_constant_result
def _threads() -> int:
    """torch's intra-op threads; a compiled step (KVPredictionModel.compile_step) keeps the count it was traced with,
    since torch.compile cannot put the call itself in a graph."""
    return torch.get_num_threads()


def use_blocked_matvec(model: nn.Module) -> None:
    """Route `model`'s few-row fp32 linear layers on a CPU through the blocked product (module by module: names,
    weights and hooks are unchanged, and every other call still goes to F.linear)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_forward, module)
