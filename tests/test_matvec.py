"""Specification of kvpred.matvec: few-row fp32 linear layers on a CPU give F.linear's results through the blocked
matrix-vector product; everything else is F.linear itself."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kvpred import matvec
from kvpred.matvec import use_blocked_matvec


def linear(out_features: int, in_features: int, bias: bool = False, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    use_blocked_matvec(layer)
    return layer


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("out_features,bias", [(96, False), (97, True), (10, True)])
@pytest.mark.parametrize("shape", [(1, 1, 40), (2, 1, 40), (4, 4, 40), (40,)])
def test_few_rows_give_f_linears_result(threads, out_features, bias, shape, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the number of row blocks follows it
    layer = linear(out_features, 40, bias)
    x = torch.randn(shape)
    expected = F.linear(x, layer.weight, layer.bias)
    got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_blocked_product_is_what_runs_for_few_rows_and_f_linear_otherwise(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append("bmm") or torch.matmul(*a))
    layer = linear(64, 32)
    layer(torch.randn(1, 1, 32))
    assert calls == ["bmm"]
    for x in (torch.randn(1, matvec.MAX_ROWS + 1, 32), torch.randn(0, 32)):
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    transposed = linear(32, 64)
    transposed.weight = nn.Parameter(torch.randn(64, 32).T)  # not contiguous: no view of it, so F.linear runs
    x = torch.randn(1, 64)
    assert torch.equal(transposed(x), F.linear(x, transposed.weight))
    bf16 = linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    assert torch.equal(bf16(x), F.linear(x, bf16.weight))
    assert calls == ["bmm"]


def test_gradients_flow_through_the_blocked_product():
    layer = linear(8, 6, bias=True)
    x = torch.randn(2, 6, requires_grad=True)
    layer(x).square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), [x, layer.weight])
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(layer.weight.grad, expected[1])


def test_kvp_models_on_a_cpu_use_it_and_keep_their_weights_and_names(tiny_llama):
    from kvpred.model import KVPredictionModel

    model = KVPredictionModel.from_pretrained(tiny_llama, keep_ratio=0.5)
    projections = [m for m in model.base.modules() if type(m) is nn.Linear]
    assert projections and all(m.forward.__func__ is matvec._forward for m in projections)
    assert all(m.forward.__func__ is matvec._forward for m in model.aux.modules() if type(m) is nn.Linear)
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.base.named_parameters())
