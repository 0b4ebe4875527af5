"""Binary building blocks: sign activations with straight-through gradients, ReActNet's RSign and
RPReLU, and a convolution with binary weights.

Liu et al., "Bi-Real Net", ECCV 2018 (Eq. 6-7), ApproxSign: the forward is sign(x) (+1 for
x >= 0, -1 otherwise); the backward uses the derivative of the piecewise quadratic

    F(x) = -1 (x < -1),  2x + x^2 (-1 <= x < 0),  2x - x^2 (0 <= x < 1),  1 (x >= 1)
    dF/dx = 2 + 2x (-1 <= x < 0),  2 - 2x (0 <= x < 1),  0 otherwise   (= max(0, 2 - 2|x|))

Liu et al., "ReActNet", ECCV 2020 (Eq. 3-4): per channel c, with learnable alpha, beta, gamma, zeta,

    RSign:   x_b = +1 if x >= alpha_c else -1        (gradient: ApproxSign at x - alpha_c)
    RPReLU:  f(x) = x - gamma_c + zeta_c             if x > gamma_c
                    beta_c * (x - gamma_c) + zeta_c  otherwise

Binary weights (XNOR-Net's scale, Rastegari et al. 2016; ReActNet's straight-through estimator):
per output channel o, W_b = mean(|W_o|) * sign(W_o); the scale is treated as a constant and the
gradient passes straight through where |W| <= 1 (dL/dW = dL/dW_b * 1[|W| <= 1]). Under a weight
parametrization (:mod:`normlayers.weight_std`) the binarised weight is the standardised one, as in
Chen et al., "BNN - BN = ?", CVPRW 2021. The scale is computed in float32 for half/bfloat16 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _sign(x: Tensor) -> Tensor:
    """+1 for x >= 0, -1 otherwise (torch.sign gives 0 at 0, which is not a binary value)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)


class _BinaryWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        dims = tuple(range(1, w.dim()))
        scale = w.to(torch.promote_types(w.dtype, torch.float32)).abs().mean(dim=dims, keepdim=True)
        return (scale * _sign(w)).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


def approx_sign(x: Tensor) -> Tensor:
    """sign(x) in {-1, +1}, with Bi-Real Net's ApproxSign gradient."""
    return _ApproxSign.apply(x)


def binarize_weight(weight: Tensor) -> Tensor:
    """mean(|W_o|) * sign(W_o) per output unit o, with the gradient clipped to |W| <= 1."""
    return _BinaryWeight.apply(weight)


def _channel_shape(x: Tensor, num_features: int, who: str) -> list[int]:
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(f"{who}: expected (N, {num_features}, ...) input, got shape {tuple(x.shape)}")
    return [1, num_features] + [1] * (x.dim() - 2)


class RSign(nn.Module):
    """ReActNet's sign with a learnable per-channel threshold alpha (zeros at init)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.alpha = nn.Parameter(torch.zeros(num_features))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.alpha)

    def forward(self, x: Tensor) -> Tensor:
        return approx_sign(x - self.alpha.to(x.dtype).reshape(_channel_shape(x, self.num_features, "rsign")))

    def extra_repr(self) -> str:
        return str(self.num_features)


class RPReLU(nn.Module):
    """ReActNet's PReLU with learnable per-channel input shift gamma and output shift zeta."""

    def __init__(self, num_features: int, slope: float = 0.25):
        super().__init__()
        self.num_features, self.slope = num_features, slope
        self.gamma = nn.Parameter(torch.zeros(num_features))
        self.beta = nn.Parameter(torch.empty(num_features))
        self.zeta = nn.Parameter(torch.zeros(num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gamma)
        nn.init.constant_(self.beta, self.slope)
        nn.init.zeros_(self.zeta)

    def forward(self, x: Tensor) -> Tensor:
        shape = _channel_shape(x, self.num_features, "rprelu")
        shifted = x - self.gamma.to(x.dtype).reshape(shape)
        return F.prelu(shifted, self.beta.to(x.dtype)) + self.zeta.to(x.dtype).reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, slope={self.slope}"


class BinaryConv2d(nn.Conv2d):
    """A Conv2d whose weight is binarised per output channel (mean|W| * sign(W)) in every forward.

    ``self.weight`` stays the real-valued latent weight the optimiser updates (or, under a weight
    parametrization, its standardised value); the binarised copy is made on the fly.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, binarize_weight(self.weight), self.bias)
