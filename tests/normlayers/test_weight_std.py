"""Weight standardisation (ws, scaled_ws) against its equations: per-output-unit moments, gradcheck
of the parametrization for W and the gain in float64, and what standardize_weights touches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from normlayers import GAMMA_RELU, standardize_weights, trainable_weight
from normlayers.weight_std import ScaledWeightStandardization, WeightStandardization


def per_unit_moments(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1)
    return mean, ((flat - mean[:, None]) ** 2).mean(dim=1)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 12)])
def test_ws_gives_zero_mean_unit_variance_per_output_unit(shape):
    w = torch.randn(shape, dtype=torch.float64) * 3 + 0.7
    w_hat = WeightStandardization(shape[0])(w)
    mean, var = per_unit_moments(w_hat)
    _, var_in = per_unit_moments(w)
    assert w_hat.dtype == torch.float64
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-12, rtol=0)
    torch.testing.assert_close(var, var_in / (var_in + 1e-5))  # 1 up to eps


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 12)])
def test_scaled_ws_gives_zero_mean_and_variance_g2_gamma2_over_fan_in(shape):
    w = torch.randn(shape, dtype=torch.float64) * 2 - 0.3
    layer = ScaledWeightStandardization(shape[0]).double()
    with torch.no_grad():
        layer.gain.copy_(torch.rand(shape[0], dtype=torch.float64) + 0.5)
    w_hat = layer(w)
    fan_in = math.prod(shape[1:])
    mean, var = per_unit_moments(w_hat)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-12, rtol=0)
    torch.testing.assert_close(var, (layer.gain.detach() * GAMMA_RELU) ** 2 / fan_in)
    # the equation itself, written out: g * gamma * (W - mean) / sqrt(max(N var, 1e-4))
    flat = w.reshape(shape[0], -1)
    expected = (layer.gain.detach()[:, None] * GAMMA_RELU * (flat - flat.mean(1, keepdim=True))
                / torch.sqrt(torch.clamp(fan_in * flat.var(1, unbiased=False, keepdim=True), min=1e-4)))
    torch.testing.assert_close(w_hat.reshape(shape[0], -1), expected)


def test_scaled_ws_eps_bounds_a_constant_unit():
    w = torch.ones(2, 8, dtype=torch.float64)
    w[1] = torch.arange(8.0, dtype=torch.float64)
    out = ScaledWeightStandardization(2).double()(w)
    assert torch.isfinite(out).all() and (out[0] == 0).all()


def test_gradcheck_ws_and_scaled_ws_in_float64():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(WeightStandardization(4), (w,))
    layer = ScaledWeightStandardization(4).double()
    gain = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()

    def f(weight, g):
        return torch.func.functional_call(layer, {"gain": g}, (weight,))

    assert torch.autograd.gradcheck(f, (w, gain))


def test_gradient_reaches_raw_weight_and_gain_through_a_standardized_conv():
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    standardize_weights(conv, "scaled_ws")
    conv(torch.randn(2, 3, 5, 5, dtype=torch.float64)).square().sum().backward()
    raw, gain = trainable_weight(conv), conv.parametrizations.weight[0].gain
    assert raw.grad is not None and raw.grad.abs().sum() > 0 and gain.grad.abs().sum() > 0


def test_standardize_weights_covers_conv_and_linear_except_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 2))
    standardize_weights(model, "ws", skip=[model[3]])
    assert parametrize.is_parametrized(model[0], "weight") and parametrize.is_parametrized(model[2], "weight")
    assert not parametrize.is_parametrized(model[3])
    mean, var = per_unit_moments(model[2].weight.detach())
    assert mean.abs().max() < 1e-6 and (var - 1).abs().max() < 1e-3
    assert standardize_weights(nn.Linear(3, 3), "none").weight.__class__ is nn.Parameter


def test_bad_kind_and_fan_in_of_one_are_refused():
    with pytest.raises(ValueError, match="one of none, ws, scaled_ws"):
        standardize_weights(nn.Linear(3, 3), "wsx")
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        standardize_weights(nn.Linear(1, 3), "ws")


def test_bfloat16_weights_standardised_in_float32():
    w = torch.randn(4, 50) * 5 + 3
    out = WeightStandardization(4)(w.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), WeightStandardization(4)(w.bfloat16().float()), atol=0.02, rtol=0.02)
