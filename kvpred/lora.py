"""Low-rank adapters on the auxiliary's linear layers, as torch parametrizations (W -> W + B A).

They keep a trained auxiliary small enough to ship: only the factors (and the norms) are saved, and loading merges
them back into the weights (`merge_factors`). Module names and forward hooks stay as they were.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

TARGETS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj",
           "c_fc", "c_proj")
SUFFIX_A, SUFFIX_B = ".lora_A", ".lora_B"


class LowRankDelta(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # zero: training starts from the unadapted model
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A).to(weight.dtype)


def add_adapters(model: nn.Module, rank: int) -> list[str]:
    """Parametrize every target linear of `model`'s decoder layers; returns their weight names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS and ".layers." in f".{name}":
            delta = LowRankDelta(module.out_features, module.in_features, rank).to(module.weight.device)
            parametrize.register_parametrization(module, "weight", delta)
            names.append(f"{name}.weight")
    return names


def adapter_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<weight name>.lora_A": A, "<weight name>.lora_B": B} for every adapted weight."""
    factors = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            delta = module.parametrizations.weight[0]
            factors[f"{name}.weight{SUFFIX_A}"] = delta.A.detach()
            factors[f"{name}.weight{SUFFIX_B}"] = delta.B.detach()
    return factors


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its weight and drop the parametrization (inference runs plain linears)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@torch.no_grad()
def merge_factors(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Add saved B @ A products into the plain weights of `model`."""
    state = model.state_dict()
    for name_a, a in factors.items():
        if not name_a.endswith(SUFFIX_A):
            continue
        weight_name = name_a[: -len(SUFFIX_A)]
        b = factors[weight_name + SUFFIX_B]
        weight = state[weight_name]
        weight.add_((b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)).to(weight.dtype))


@torch.no_grad()
def compact_factors(factors: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """Each B @ A as its best rank-`rank` factorisation (truncated SVD; exact where the rank is not above `rank`).
    Training from a trained checkpoint appends new factors to the old ones, so their rank grows round by round while
    the product often needs far fewer. Returns the new factors and the largest relative error (Frobenius) of a
    product."""
    out, worst = dict(factors), 0.0
    for name_a in [n for n in factors if n.endswith(SUFFIX_A)]:
        name_b = name_a[: -len(SUFFIX_A)] + SUFFIX_B
        a, b = factors[name_a].double(), factors[name_b].double()
        qb, rb = torch.linalg.qr(b)  # B A = Qb (Rb Ra^T) Qa^T: the SVD of a small r x r core
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        k = min(rank, len(s))
        worst = max(worst, (s[k:].square().sum() / s.square().sum().clamp_min(1e-30)).sqrt().item())
        out[name_b] = (qb @ u[:, :k] * s[:k]).to(factors[name_b].dtype)
        out[name_a] = (vh[:k] @ qa.T).to(factors[name_a].dtype)
    return out, worst
