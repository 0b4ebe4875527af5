"""The hand-written backwards (normlayers.fused, pn's function): gradcheck in float64, and the values
against torch's own reductions and layer norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from normlayers.fused import no_grad_var_mean, scale_shift, sum_of_squares, var_mean
from normlayers.positional import _PositionalNormFunction


def sample(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_(grad)


@pytest.mark.parametrize("dims", [(0, 2, 3), (2, 3), (0, 2), (1, 3), (0,)], ids=str)
def test_var_mean_matches_torch_and_its_gradient_checks(dims):
    x = sample(4, 3, 5, 2)
    count = 1
    for d in dims:
        count *= x.shape[d]
    var, mean = var_mean(x, dims, count)
    ref_var, ref_mean = torch.var_mean(x, dim=dims, correction=0)
    torch.testing.assert_close((var, mean), (ref_var, ref_mean))
    assert gradcheck(lambda t: var_mean(t, dims, count), (x,))
    nograd_var, nograd_mean = no_grad_var_mean(x.detach(), dims, count)
    torch.testing.assert_close((nograd_var, nograd_mean), (ref_var, ref_mean))


def test_sum_of_squares_over_leading_and_trailing_dims():
    x = sample(4, 3, 5, 2, grad=False)
    for dims in [(0, 2, 3), (2, 3), (1,), (0, 1)]:
        torch.testing.assert_close(sum_of_squares(x, dims), x.square().sum(dim=dims, keepdim=True))


def test_scale_shift_is_multiply_add():
    x, scale, shift = sample(4, 3, 5, 2, grad=False), sample(1, 3, 1, 1, grad=False), sample(1, 3, 1, 1, grad=False)
    torch.testing.assert_close(scale_shift(x, scale, shift), x * scale + shift)
    torch.testing.assert_close(scale_shift(x, scale, None), x * scale)


@pytest.mark.parametrize("affine", ["both", "none", "bias"])
def test_positional_norm_function_is_layer_norm_over_channels(affine):
    x = sample(3, 5, 4, 2)
    weight = sample(5) if affine == "both" else None
    bias = sample(5) if affine in ("both", "bias") else None
    y = _PositionalNormFunction.apply(x, weight, bias, 1e-5)
    ref = F.layer_norm(x.movedim(1, -1), (5,), weight, bias, 1e-5).movedim(-1, 1)
    torch.testing.assert_close(y, ref)
    inputs = tuple(t for t in (x, weight, bias) if t is not None)

    def call(*args):
        it = iter(args)
        return _PositionalNormFunction.apply(next(it), next(it) if weight is not None else None,
                                             next(it) if bias is not None else None, 1e-5)

    assert gradcheck(call, inputs)
