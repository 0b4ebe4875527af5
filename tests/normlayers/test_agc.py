"""Adaptive gradient clipping against Eq. 3 of Brock et al. 2021, written out unit by unit."""

from __future__ import annotations

import pytest
import torch

from normlayers import adaptive_clip_grad_

LAMBDA = 0.05
EPS = 1e-3


def expected_unit(w_i: torch.Tensor, g_i: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The paper's rule for one unit, on plain norms."""
    w_norm = max(float(w_i.norm()), EPS)
    g_norm = float(g_i.norm())
    if g_norm / w_norm > LAMBDA:
        return LAMBDA * w_norm / g_norm * g_i, True
    return g_i, False


def test_each_unit_of_a_conv_weight_follows_the_formula():
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    w[5] = 0.0  # a zero unit: clipped against eps, not against 0
    sizes = torch.tensor([0.001, 0.5, 0.01, 2.0, 0.0001, 0.01], dtype=torch.float64)
    g = torch.randn_like(w) * sizes[:, None, None, None]
    p = w.clone().requires_grad_()
    p.grad = g.clone()
    adaptive_clip_grad_([p], LAMBDA)
    clipped = []
    for i in range(6):
        want, was_clipped = expected_unit(w[i], g[i])
        clipped.append(was_clipped)
        torch.testing.assert_close(p.grad[i], want, rtol=1e-12, atol=1e-15)
    assert any(clipped) and not all(clipped)
    assert p.grad.dtype == torch.float64


def test_one_dimensional_parameters_are_clipped_elementwise():
    b = torch.tensor([1.0, 0.0, -2.0, 0.5], dtype=torch.float64)
    g = torch.tensor([0.01, 0.01, -1.0, 0.001], dtype=torch.float64)
    p = b.clone().requires_grad_()
    p.grad = g.clone()
    adaptive_clip_grad_([p], LAMBDA)
    for i in range(4):
        want, _ = expected_unit(b[i : i + 1], g[i : i + 1])
        torch.testing.assert_close(p.grad[i : i + 1], want)
    assert p.grad[0] == 0.01 and p.grad[2] == pytest.approx(-0.1)


def test_parameters_without_gradient_and_bad_lambda():
    p = torch.randn(3, 3, requires_grad=True)
    adaptive_clip_grad_([p], LAMBDA)
    assert p.grad is None
    with pytest.raises(ValueError, match="lambda > 0"):
        adaptive_clip_grad_([p], 0.0)
