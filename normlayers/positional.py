"""Positional Normalization (PONO).

Li, Yang, Chen, Belongie & Weinberger, "Positional Normalization", NeurIPS 2019 (Eq. 1-2).
For each sample n and each spatial position (h, w), over the C channels:

    mu_{n,h,w} = mean_c x_{n,c,h,w},   sigma_{n,h,w} = sqrt(mean_c (x_{n,c,h,w} - mu_{n,h,w})^2 + eps)
    y = gamma_c * (x - mu_{n,h,w}) / sigma_{n,h,w} + beta_c

The paper removes (mu, sigma) at one layer and can re-inject them later ("moment shortcut"); that
is an architecture choice, so this layer is the normalization alone, with an optional per-channel
affine (on by default, as a drop-in replacement for the other layers). Defined on feature maps
(NCHW); per sample, so not batch dependent. On channels-last input it is torch's fused ``layer_norm``
over the (then contiguous) channel axis; on contiguous NCHW input, where that needed two transposing
copies each way (3.3x BatchNorm2d on CPU), :class:`_PositionalNormFunction` reduces over the channel
axis in place, with the layer-norm backward written out. The output keeps the input's memory format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.groupnorm import cast, check_spatial, compute_dtype
from normlayers.registry import register
from normlayers.stats import check_values_per_statistic


class _PositionalNormFunction(torch.autograd.Function):
    """y = (x - mean_c x) * rstd * gamma + beta over dim 1 of contiguous (N, C, ...) input, with
    LN's backward: dx = rstd (g - mean_c g - x_hat mean_c(g x_hat)), g = grad * gamma; the
    channel-weighted sums are batched matrix-vector products. Checked by ``gradcheck`` in float64
    and against ``layer_norm`` on the channels-last view (tests/normlayers/test_fused.py)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        channels = x.shape[1]
        mean = x.mean(dim=1, keepdim=True)
        x_hat = x - mean
        rstd = torch.rsqrt((x_hat * x_hat).mean(dim=1, keepdim=True).add_(eps))
        x_hat.mul_(rstd)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = x_hat if weight is None else x_hat * weight.reshape(shape)
        if bias is not None:
            y = y.add_(bias.reshape(shape)) if weight is not None else y + bias.reshape(shape)
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x_hat, rstd, weight = ctx.saved_tensors
        grad = grad.contiguous()
        n, channels = x_hat.shape[:2]
        shape = [1, channels] + [1] * (x_hat.dim() - 2)
        per_channel = (0, *range(2, x_hat.dim()))
        grad_x_hat = grad * x_hat
        grad_weight = grad_x_hat.sum(per_channel) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(per_channel) if ctx.has_bias and ctx.needs_input_grad[2] else None
        flat = (n, channels, -1)
        if weight is None:
            grad_mean = grad.mean(dim=1, keepdim=True)
            weighted_mean = grad_x_hat.mean(dim=1, keepdim=True)
            grad_x = grad - grad_mean
        else:
            # sum_c gamma_c v_c for every (n, position): a batched matrix-vector product, no temporary
            w = weight[None, None, :] / channels
            grad_mean = torch.matmul(w, grad.reshape(flat)).reshape(rstd.shape)
            weighted_mean = torch.matmul(w, grad_x_hat.reshape(flat)).reshape(rstd.shape)
            grad_x = (grad * weight.reshape(shape)).sub_(grad_mean)
        grad_x.addcmul_(x_hat, weighted_mean, value=-1.0).mul_(rstd)
        return grad_x, grad_weight, grad_bias, None


@register("pn", "Positional Normalization (Li et al. 2019): per sample per position over C; NCHW")
class PositionalNorm(NormLayer):
    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        check_eps_momentum("pn", eps)
        self.num_features = num_features
        self.eps = eps
        self.init_affine(num_features, affine)

    def forward(self, x: Tensor) -> Tensor:
        check_spatial("pn", x, self.num_features)
        check_values_per_statistic("pn", x, self.num_features, "per-position", "pn needs more than one channel")
        dtype = compute_dtype(x)
        channels_last = x.movedim(1, -1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if not channels_last.is_contiguous():
                y = _PositionalNormFunction.apply(x.to(dtype).contiguous(), cast(self.weight, dtype),
                                                  cast(self.bias, dtype), self.eps)
                return y.to(x.dtype)
            y = F.layer_norm(channels_last.to(dtype), (self.num_features,), cast(self.weight, dtype),
                             cast(self.bias, dtype), self.eps)
        # the output keeps the input's (channels-last) memory format
        return y.movedim(-1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
