from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.nn.layers import RELU_GAMMA, GlobalAvgPool, ScaledWSConv2d, SqueezeExcite, WSConv2d


def reference_ws(w: torch.Tensor, eps: float) -> torch.Tensor:
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (w - mean) / torch.sqrt(var + eps)


def reference_scaled_ws(w, gain, gamma, eps):
    n = w[0].numel()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return gain.view(-1, 1, 1, 1) * gamma * (w - mean) / torch.sqrt(n * var + eps)


def test_relu_gamma_makes_relu_of_a_unit_gaussian_unit_variance():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (RELU_GAMMA * torch.relu(z)).var().item() == pytest.approx(1.0, abs=0.005)
    assert pytest.approx(math.sqrt(2 / (1 - 1 / math.pi))) == RELU_GAMMA


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_ws_conv_equals_reference_expression(eps):
    torch.manual_seed(0)
    conv = WSConv2d(3, 8, 3, padding=1, bias=True, eps=eps)
    with torch.no_grad():
        conv.weight.mul_(3).add_(0.5)  # a non-standard weight, so standardization matters
    x = torch.randn(4, 3, 10, 10)
    expected = F.conv2d(x, reference_ws(conv.weight, eps), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert conv.eps == eps


def test_ws_default_eps_and_standardized_moments():
    conv = WSConv2d(16, 32, 3)
    assert conv.eps == 1e-5
    w_hat = conv.standardized_weight()
    flat = w_hat.reshape(32, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(32), atol=1e-5, rtol=0)
    # biased variance with eps inside the root: var(w_hat) = var / (var + eps), just below 1
    var = conv.weight.detach().reshape(32, -1).var(1, unbiased=False)
    torch.testing.assert_close(flat.var(1, unbiased=False), var / (var + 1e-5))
    with torch.no_grad():
        conv.weight.mul_(100)  # var >> eps: the standardized variance is 1
    flat = conv.standardized_weight().reshape(32, -1)
    torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(32), atol=1e-4, rtol=0)


def test_ws_gradient_reaches_raw_weight_as_autograd_of_the_reference():
    torch.manual_seed(1)
    conv = WSConv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    conv(x).pow(2).sum().backward()
    grad = conv.weight.grad.clone()
    assert grad.abs().sum() > 0

    w = conv.weight.detach().clone().requires_grad_(True)
    F.conv2d(x, reference_ws(w, conv.eps), conv.bias).pow(2).sum().backward()
    torch.testing.assert_close(grad, w.grad, rtol=1e-3, atol=1e-3)


def _count_standardizations(conv, monkeypatch) -> list[int]:
    calls = [0]
    original = type(conv).standardized_weight

    def counting(self):
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(type(conv), "standardized_weight", counting)
    return calls


@pytest.mark.parametrize("cls", [WSConv2d, ScaledWSConv2d])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_eval_cache_reuses_weight_and_gives_identical_outputs(cls, mode, monkeypatch):
    torch.manual_seed(2)
    conv = cls(3, 8, 3).eval()
    calls = _count_standardizations(conv, monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    with mode():
        first = conv(x)
        second = conv(x)
    assert calls[0] == 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():
        fresh = F.conv2d(x, conv.standardized_weight(), conv.bias)
    torch.testing.assert_close(first, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [WSConv2d, ScaledWSConv2d])
def test_eval_cache_is_invalidated_by_an_optimizer_step(cls, monkeypatch):
    torch.manual_seed(3)
    conv = cls(3, 8, 3)
    x = torch.randn(2, 3, 8, 8)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv.eval()
    with torch.no_grad():
        before = conv(x)
    conv.train()
    conv(x).pow(2).mean().backward()
    opt.step()
    conv.eval()
    calls = _count_standardizations(conv, monkeypatch)
    with torch.no_grad():
        after = conv(x)
        reference = F.conv2d(x, conv.standardized_weight(), conv.bias)
    assert calls[0] == 2  # recomputed for the forward, once more for the reference
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, rtol=0, atol=0)


def test_eval_cache_is_invalidated_by_load_state_dict():
    torch.manual_seed(4)
    conv, other = WSConv2d(3, 8, 3).eval(), WSConv2d(3, 8, 3).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        conv(x)
        conv.load_state_dict(other.state_dict())
        torch.testing.assert_close(conv(x), other(x), rtol=0, atol=0)


def test_eval_cache_sees_in_place_writes_to_the_parameter_but_not_through_data():
    torch.manual_seed(6)
    conv = WSConv2d(3, 8, 3).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = conv(x)
        conv.weight.mul_(-1)  # in place on the parameter: its version counter moves
        flipped = conv(x)
        assert not torch.equal(flipped, before)
        conv.weight.data.mul_(-1)  # through .data: the documented limit, the cache is stale
        assert torch.equal(conv(x), flipped)
        conv.clear_weight_cache()
        torch.testing.assert_close(conv(x), before, rtol=0, atol=0)


def test_training_mode_does_not_cache(monkeypatch):
    conv = WSConv2d(3, 8, 3).train()
    calls = _count_standardizations(conv, monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        conv(x)
        conv(x)
    assert calls[0] == 2


def test_scaled_ws_equals_reference_expression():
    torch.manual_seed(5)
    conv = ScaledWSConv2d(6, 5, 3, padding=1, gamma=RELU_GAMMA, eps=1e-4)
    with torch.no_grad():
        conv.gain.copy_(torch.linspace(0.5, 2.0, 5))
        conv.weight.mul_(2).add_(0.3)
    x = torch.randn(3, 6, 7, 7)
    w_ref = reference_scaled_ws(conv.weight, conv.gain, RELU_GAMMA, 1e-4)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_ref, conv.bias, padding=1))
    assert conv.gain.requires_grad and conv.gain.shape == (5,)


def test_scaled_ws_default_gain_is_one_and_gain_gets_gradient():
    conv = ScaledWSConv2d(4, 4, 3)
    assert torch.equal(conv.gain.detach(), torch.ones(4))
    conv(torch.randn(2, 4, 6, 6)).sum().backward()
    assert conv.gain.grad is not None and conv.gain.grad.abs().sum() > 0


def test_scaled_ws_after_relu_preserves_unit_variance():
    """gamma undoes ReLU's variance loss: relu(N(0,1)) through a scaled-WS conv stays ~N(0,1)."""
    torch.manual_seed(6)
    conv = ScaledWSConv2d(64, 64, 3, padding=1, bias=False, gamma=RELU_GAMMA)
    x = torch.relu(torch.randn(32, 64, 16, 16))
    with torch.no_grad():
        var = conv(x).var().item()
        var_without_gamma = F.conv2d(x, conv.standardized_weight() / RELU_GAMMA, padding=1).var()
    assert var == pytest.approx(1.0, abs=0.15)
    assert var_without_gamma.item() < 0.5


def test_squeeze_excite_is_per_sample_and_keeps_shape():
    torch.manual_seed(7)
    se = SqueezeExcite(16)
    x = torch.randn(4, 16, 5, 5)
    y = se(x)
    assert y.shape == x.shape
    torch.testing.assert_close(se(x[:1]), y[:1])


def test_ws_conv_is_a_drop_in_conv2d():
    conv = WSConv2d(3, 8, 3, stride=2, padding=1, bias=False)
    assert isinstance(conv, nn.Conv2d)
    assert conv(torch.randn(1, 3, 9, 9)).shape == (1, 8, 5, 5)
    assert set(conv.state_dict()) == {"weight"}


def test_global_avg_pool_is_adaptive_avg_pool_bit_for_bit_forward_and_backward():
    torch.manual_seed(7)
    x = torch.randn(32, 16, 7, 7, requires_grad=True)
    ours, theirs = GlobalAvgPool()(x), F.adaptive_avg_pool2d(x, 1)
    assert torch.equal(ours, theirs)
    g = torch.randn_like(ours)
    (a,) = torch.autograd.grad(ours, x, g)
    (b,) = torch.autograd.grad(theirs, x, g)
    assert torch.equal(a, b)
