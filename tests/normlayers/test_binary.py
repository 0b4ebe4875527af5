"""Binary building blocks against their equations: ApproxSign (Bi-Real Net), RSign and RPReLU
(ReActNet), and the binary conv's +-mean|W| weights with the clipped straight-through gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normlayers import BinaryConv2d, RPReLU, RSign, approx_sign, binarize_weight, standardize_weights


def approx_sign_derivative(x: torch.Tensor) -> torch.Tensor:
    """d/dx of Bi-Real Net's piecewise polynomial, branch by branch."""
    d = torch.zeros_like(x)
    left = (x >= -1) & (x < 0)
    right = (x >= 0) & (x < 1)
    d[left] = 2 + 2 * x[left]
    d[right] = 2 - 2 * x[right]
    return d


def test_approx_sign_forward_is_plus_minus_one_and_backward_its_derivative():
    x = torch.tensor([-2.0, -1.0, -0.75, -0.1, 0.0, 0.3, 0.999, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    up = torch.randn_like(x)
    out = approx_sign(x)
    assert out.tolist() == [-1, -1, -1, -1, 1, 1, 1, 1, 1] and out.dtype == torch.float64
    (grad,) = torch.autograd.grad(out, x, up)
    torch.testing.assert_close(grad, up * approx_sign_derivative(x.detach()))


def test_rsign_thresholds_per_channel():
    layer = RSign(3).double()
    with torch.no_grad():
        layer.alpha.copy_(torch.tensor([-0.5, 0.0, 0.4]))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    alpha = layer.alpha.detach().reshape(1, 3, 1, 1)
    assert torch.equal(out, torch.where(x.detach() >= alpha, 1.0, -1.0).double())
    up = torch.randn_like(out)
    gx, ga = torch.autograd.grad(out, (x, layer.alpha), up)
    d = approx_sign_derivative(x.detach() - alpha)
    torch.testing.assert_close(gx, up * d)
    torch.testing.assert_close(ga, -(up * d).sum(dim=(0, 2, 3)))


def test_rprelu_matches_its_equation():
    layer = RPReLU(3).double()
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor([0.2, -0.1, 0.0]))
        layer.beta.copy_(torch.tensor([0.25, 0.1, -0.3]))
        layer.zeta.copy_(torch.tensor([0.0, 0.5, -0.2]))
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    g, b, z = (t.detach().reshape(1, 3, 1, 1) for t in (layer.gamma, layer.beta, layer.zeta))
    expected = torch.where(x > g, x - g + z, b * (x - g) + z)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(RPReLU(3).double()(x[:, :, 0, 0]), torch.where(x[:, :, 0, 0] > 0, x[:, :, 0, 0],
                                                                              0.25 * x[:, :, 0, 0]))


def test_binary_weights_are_plus_minus_scale_per_output_channel():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) * 0.6
    wb = binarize_weight(w)
    for o in range(5):
        scale = w[o].abs().mean()
        assert set(wb[o].abs().unique().tolist()) == {scale.item()}
        assert torch.equal(torch.sign(wb[o]), torch.where(w[o] >= 0, 1.0, -1.0).double())


def test_binary_weight_gradient_is_the_clipped_identity():
    w = (torch.randn(4, 2, 3, 3, dtype=torch.float64) * 1.2).requires_grad_()
    up = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(binarize_weight(w), w, up)
    torch.testing.assert_close(grad, up * (w.detach().abs() <= 1).double())
    assert (w.detach().abs() > 1).any()


def test_binary_conv_convolves_with_the_binarised_weight():
    conv = BinaryConv2d(3, 4, 3, padding=1, bias=False).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = conv.weight.detach()
    wb = w.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.where(w >= 0, 1.0, -1.0).double()
    torch.testing.assert_close(conv(x), F.conv2d(x, wb, padding=1))


def test_binary_conv_binarises_the_standardised_weight():
    conv = standardize_weights(BinaryConv2d(3, 4, 3, bias=False), "scaled_ws", gamma=1.0)
    x = torch.randn(2, 3, 5, 5)
    w_hat = conv.weight.detach()  # standardised
    wb = w_hat.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.where(w_hat >= 0, 1.0, -1.0)
    torch.testing.assert_close(conv(x), F.conv2d(x, wb))
    conv(x).sum().backward()
    assert conv.parametrizations.weight.original.grad.abs().sum() > 0
