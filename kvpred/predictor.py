"""The KV predictor: per base layer, one linear map (with bias) for keys and one for values (METHOD 1.5)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SOURCES = ("kv", "hidden")


@dataclass
class PredictorConfig:
    layer_map: list[int]  # aux layer j_i whose outputs feed base layer i; len == number of base layers
    in_features: int  # width of one input vector: aux kv_heads*head_dim ("kv") or aux hidden size ("hidden")
    key_features: int  # base kv_heads * head_dim
    value_features: int  # base kv_heads * head_dim (value head dim may differ from the key's)
    source: str = "kv"  # "kv": aux keys before RoPE and values; "hidden": the aux layer's normed input

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"predictor source must be one of {SOURCES}, got {self.source!r}")


class KVPredictor(nn.Module):
    """All 2*n_base linears stored stacked, so the whole prediction is two batched matmuls.

    Maps act on merged heads and per token, as in the paper: [B, T, h_A*hd_A] -> [B, T, h_B*hd_B].
    """

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        n = len(config.layer_map)
        self.register_buffer("layer_map", torch.tensor(config.layer_map, dtype=torch.long), persistent=False)
        self.key_weight = nn.Parameter(torch.empty(n, config.key_features, config.in_features))
        self.key_bias = nn.Parameter(torch.empty(n, config.key_features))
        self.value_weight = nn.Parameter(torch.empty(n, config.value_features, config.in_features))
        self.value_bias = nn.Parameter(torch.empty(n, config.value_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per layer (the paper's choice for KVP-C)."""
        bound = 1 / math.sqrt(self.config.in_features)
        for weight in (self.key_weight, self.value_weight):
            for w in weight.data:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        for bias in (self.key_bias, self.value_bias):
            nn.init.uniform_(bias.data, -bound, bound)

    @torch.no_grad()
    def set_identity(self) -> None:
        """W = I, b = 0: a KVP-LP auxiliary copied from the base then starts out predicting its own KV."""
        c = self.config
        if not c.in_features == c.key_features == c.value_features:
            raise ValueError(f"identity predictor needs equal widths, got in={c.in_features} "
                             f"key={c.key_features} value={c.value_features}")
        eye = torch.eye(c.in_features, dtype=self.key_weight.dtype, device=self.key_weight.device)
        for weight, bias in ((self.key_weight, self.key_bias), (self.value_weight, self.value_bias)):
            weight.copy_(eye.expand_as(weight))
            bias.zero_()

    def forward(self, key_in: torch.Tensor, value_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key_in, value_in: [L_aux, B, T, in] -> keys [L_base, B, T, key], values [L_base, B, T, value]."""
        return self._project(key_in, self.key_weight, self.key_bias), self._project(value_in, self.value_weight,
                                                                                 self.value_bias)

    def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        _, b, t, d = x.shape
        x = x.index_select(0, self.layer_map).reshape(len(self.config.layer_map), b * t, d)  # [L, B*T, in]
        y = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # [L, B*T, out]
        return y.view(y.shape[0], b, t, -1)  # [L, B, T, out]
