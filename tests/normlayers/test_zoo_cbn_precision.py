"""Bound cbn past burn-in at a mean far above the spread, against its statistics written out in float64.

The conv's weights do not move between the iterations (no optimiser step), so the compensation is
zero and the statistics cbn uses are the plain average over the current and the k buffered
iterations: mu_bar = mean_i mu_i, sigma_bar^2 = mean_i E_i[x^2] - mu_bar^2 (Yao et al. 2021, Sec. 3),
computed here in float64 from the very float32 values the layer saw.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlayers import build_norm

EPS = 1e-5
K = 3


def bound_cbn(offset: float, dtype=torch.float32):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(0.5 * torch.eye(4)[:, :, None, None])
        conv.bias.fill_(offset)
    cbn = build_norm(f"cbn:k={K},burnin=0", 4)
    cbn.bind_preceding(conv)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    return conv.to(dtype), cbn


def reference(inputs: list[torch.Tensor], cbn, offset: float) -> torch.Tensor:
    """The output for the last of ``inputs`` (each iteration's conv output), all in float64, on the values
    less ``offset`` (an exact subtraction; the output does not depend on a common shift)."""
    values = [y.detach().double() - offset for y in inputs]
    means = torch.stack([v.mean(dim=(0, 2, 3)) for v in values])
    mean_squares = torch.stack([(v * v).mean(dim=(0, 2, 3)) for v in values])
    mean_bar = means.mean(0)
    var_bar = mean_squares.mean(0) - mean_bar**2
    shape = (1, -1, 1, 1)
    weight, bias = cbn.weight.detach().double(), cbn.bias.detach().double()
    return (values[-1] - mean_bar.reshape(shape)) / torch.sqrt(var_bar.reshape(shape) + EPS) \
        * weight.reshape(shape) + bias.reshape(shape)


# float32 inputs at these offsets are themselves rounded to offset * 6e-8; the old E[x^2] - E[x]^2
# in float32 was off by 3e-3, 0.6 and 190 here (std 0.5).
@pytest.mark.parametrize(("offset", "tolerance"), [(100.0, 1e-4), (1000.0, 1e-3), (1e4, 1e-2)])
def test_bound_cbn_keeps_precision_at_a_large_mean(offset, tolerance):
    conv, cbn = bound_cbn(offset)
    inputs = []
    for _ in range(K + 1):
        y_in = conv(torch.randn(8, 4, 5, 5))
        inputs.append(y_in)
        out = cbn(y_in)
    assert len(cbn._history) == K
    error = (out.double() - reference(inputs, cbn, offset)).abs().max().item()
    assert error < tolerance, f"offset {offset}: max error {error:.3g}"


def test_bound_cbn_in_float64_is_float64_exact():
    offset = 1e4
    conv, cbn = bound_cbn(offset, torch.float64)
    inputs = []
    for _ in range(K + 1):
        y_in = conv(torch.randn(8, 4, 5, 5, dtype=torch.float64))
        inputs.append(y_in)
        out = cbn(y_in)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(inputs, cbn, offset), rtol=0, atol=1e-10)
