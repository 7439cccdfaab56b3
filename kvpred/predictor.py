"""The KV predictor: per base layer, one linear map (with bias) for keys and one for values (METHOD 1.5).

With `rank` set (hidden-state input only), each map is factorised: every auxiliary tap is first projected to `rank`
dimensions, shared by all the base layers that read it, keys and values alike; each base layer then maps that code
to its keys and values. For SmolLM2's 30 layers read from 576-wide taps this cuts the predictor's multiply-adds from
6.6M to 13.2k x rank per token."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

SOURCES = ("kv", "hidden")


@dataclass
class PredictorConfig:
    layer_map: list[int]  # aux layer j_i whose outputs feed base layer i; len == number of base layers
    in_features: int  # width of one input vector: aux kv_heads*head_dim ("kv") or aux hidden size ("hidden")
    key_features: int  # base kv_heads * head_dim
    value_features: int  # base kv_heads * head_dim (value head dim may differ from the key's)
    source: str = "kv"  # "kv": aux keys before RoPE and values; "hidden": the aux layer's normed input
    rank: int | None = None  # None: full-rank maps; else the factorised predictor's code width per tap

    def __post_init__(self) -> None:
        if not (isinstance(self.layer_map, list) and self.layer_map
                and all(type(j) is int and j >= 0 for j in self.layer_map)):
            raise ValueError(f"layer_map must be a non-empty list of auxiliary layer numbers, got {self.layer_map!r}")
        widths = (self.in_features, self.key_features, self.value_features)
        if not all(type(w) is int and w >= 1 for w in widths):
            raise ValueError(f"in_features, key_features and value_features must be positive integers, got {widths}")
        if self.source not in SOURCES:
            raise ValueError(f"predictor source must be one of {SOURCES}, got {self.source!r}")
        if self.rank is not None and (self.source != "hidden" or self.rank < 1):
            raise ValueError(f"a factorised predictor (rank {self.rank}) needs a positive rank and hidden-state "
                             f"input (the kv source's inputs are already narrow), got source {self.source!r}")

    @property
    def taps(self) -> list[int]:
        """The auxiliary taps the layer map reads, in order."""
        return sorted(set(self.layer_map))

    def multiply_adds_per_token(self, values: bool = True) -> int:
        """Matmul multiply-adds of one token's prediction, all base layers, keys and (unless `values` is False: they
        are deferred, see kvpred.deferred) values."""
        out = len(self.layer_map) * (self.key_features + (self.value_features if values else 0))
        if self.rank is None:
            return self.in_features * out
        return len(self.taps) * self.in_features * self.rank + self.rank * out


class KVPredictor(nn.Module):
    """All 2*n_base linears stored stacked, so the whole prediction is a few batched matmuls.

    Maps act on merged heads and per token, as in the paper: [B, T, h_A*hd_A] -> [B, T, h_B*hd_B]. Full rank:
    `key_weight` [L, key, in]; factorised: `down` [taps, rank, in], then `key_weight` [L, key, rank] (values alike).
    """

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        n, width = len(config.layer_map), config.rank or config.in_features
        self.register_buffer("layer_map", torch.tensor(config.layer_map, dtype=torch.long), persistent=False)
        if config.rank is not None:
            taps = config.taps
            self.register_buffer("taps", torch.tensor(taps, dtype=torch.long), persistent=False)
            self.register_buffer("code_of_layer", torch.tensor([taps.index(j) for j in config.layer_map]),
                                 persistent=False)
            self.down = nn.Parameter(torch.empty(len(taps), config.rank, config.in_features))
        self.key_weight = nn.Parameter(torch.empty(n, config.key_features, width))
        self.key_bias = nn.Parameter(torch.empty(n, config.key_features))
        self.value_weight = nn.Parameter(torch.empty(n, config.value_features, width))
        self.value_bias = nn.Parameter(torch.empty(n, config.value_features))
        self._casts: dict = {}  # see cast
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per layer (the paper's choice for KVP-C)."""
        bound = 1 / math.sqrt(self.config.in_features)
        for weight in (self.key_weight, self.value_weight) + ((self.down,) if self.config.rank else ()):
            for w in weight.data:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        for bias in (self.key_bias, self.value_bias):
            nn.init.uniform_(bias.data, -bound, bound)

    @torch.no_grad()
    def set_identity(self) -> None:
        """W = I, b = 0: a KVP-LP auxiliary copied from the base then starts out predicting its own KV."""
        c = self.config
        if c.rank is not None or not c.in_features == c.key_features == c.value_features:
            raise ValueError(f"identity predictor needs equal widths, got in={c.in_features} "
                             f"key={c.key_features} value={c.value_features}")
        eye = torch.eye(c.in_features, dtype=self.key_weight.dtype, device=self.key_weight.device)
        for weight, bias in ((self.key_weight, self.key_bias), (self.value_weight, self.value_bias)):
            weight.copy_(eye.expand_as(weight))
            bias.zero_()

    def forward(self, key_in: torch.Tensor, value_in: torch.Tensor,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """key_in, value_in: [L_aux, B, T, in] -> keys [L_base, B, T, key], values [L_base, B, T, value]; with
        `dtype`, the matmuls run and keys and values come out in it (see `keys_and_value_inputs`)."""
        keys, (inputs, index) = self.keys_and_value_inputs(key_in, value_in, dtype)
        weight, bias = self.cast((self.value_weight, self.value_bias), dtype)
        return keys, self._project(inputs.to(weight.dtype).index_select(0, index), weight, bias)

    def keys_and_value_inputs(self, key_in: torch.Tensor, value_in: torch.Tensor, dtype: torch.dtype | None = None
                              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The keys [L_base, B, T, key], and what the value maps read without running them: (inputs [M, B, T, w],
        index [L_base]); base layer l's values are `inputs[index[l]] @ value_weight[l].T + value_bias[l]`.

        With `dtype` (bf16 on a CPU with bf16 dot products), the matmuls run in it and the keys come out in it, as
        does a factorised predictor's code. For inference: the cast weights carry no gradient."""
        if self.config.rank is not None:  # hidden input: key_in is value_in, one code serves both
            _, b, t, d = key_in.shape
            (down,) = self.cast((self.down,), dtype)
            if key_in.shape[0] != len(self.config.taps):  # else the inputs are the taps (sorted, distinct)
                key_in = key_in.index_select(0, self.taps)
            taps = key_in.to(down.dtype).reshape(len(self.config.taps), b * t, d)
            code = torch.bmm(taps, down.transpose(1, 2)).view(len(self.config.taps), b, t, -1)  # [taps, B, T, r]
            key_src = value_src = (code, self.code_of_layer)
        else:
            key_src, value_src = (key_in, self.layer_map), (value_in, self.layer_map)
        weight, bias = self.cast((self.key_weight, self.key_bias), dtype)
        keys = self._project(key_src[0].to(weight.dtype).index_select(0, key_src[1]), weight, bias)
        return keys, value_src

    def group(self, key_x: torch.Tensor, value_x: torch.Tensor, layers: range,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [len(layers), B, T, *] (views) of base `layers`, which all read one auxiliary tap, whose
        inputs are key_x, value_x [B, T, in]: the unit of kvpred.pipeline. One matmul per kind over the group's
        stacked maps; `dtype` as in `keys_and_value_inputs`."""
        if self.config.rank is not None:
            (down,) = self.cast((self.down,), dtype)
            code = key_x.to(down.dtype) @ down[self.config.taps.index(self.config.layer_map[layers.start])].T
            key_x = value_x = code  # [B, T, rank]
        picked = slice(layers.start, layers.stop)
        out = []
        for x, params in ((key_x, (self.key_weight, self.key_bias)), (value_x, (self.value_weight, self.value_bias))):
            weight, bias = (p[picked] for p in self.cast(params, dtype))
            y = F.linear(x.to(weight.dtype), weight.flatten(0, 1), bias.flatten())  # [B, T, L * out]
            out.append(y.view(*y.shape[:-1], len(layers), -1).permute(2, 0, 1, 3))
        return out[0], out[1]

    def cast(self, params: tuple[nn.Parameter, ...], dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        """`params` in `dtype` (as they are when None or already in it). Casts are kept until a parameter is
        replaced or updated in place (an optimiser step bumps its version), so a chunked prediction casts once."""
        if dtype is None or all(p.dtype == dtype for p in params):
            return params
        stamp = tuple((p.data_ptr(), p._version) for p in params)
        key = (tuple(id(p) for p in params), dtype)
        kept = self._casts.get(key)
        if kept is None or kept[0] != stamp:
            kept = self._casts[key] = (stamp, tuple(p.detach().to(dtype) for p in params))
        return kept[1]

    @staticmethod
    def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [L, B, T, in] through per-layer maps -> [L, B, T, out]."""
        n, b, t, d = x.shape
        y = torch.baddbmm(bias.unsqueeze(1), x.reshape(n, b * t, d), weight.transpose(1, 2))  # [L, B*T, out]
        return y.view(n, b, t, -1)
