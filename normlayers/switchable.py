"""Switchable Normalization (SN).

Luo, Ren, Peng, Zhang & Li, "Differentiable Learning-to-Normalize via Switchable Normalization",
ICLR 2019 (Sec. 2, Eq. 2-5). Each layer learns how much of Instance, Layer and Batch Normalization
to use, with separate importance weights for the means and for the variances. Over the positions
of sample n and channel c (IN), over the channels and positions of sample n (LN) and over the batch
and positions of channel c (BN):

    mu_in = mean_{h,w} x,               sigma2_in = mean_{h,w} (x - mu_in)^2
    mu_ln = mean_c mu_in,               sigma2_ln = mean_c (sigma2_in + mu_in^2) - mu_ln^2
    mu_bn = mean_{n,h,w} x,             sigma2_bn = mean_{n,h,w} (x - mu_bn)^2
    mu = sum_k w_k mu_k,   sigma2 = sum_k w'_k sigma2_k,   k in {in, ln, bn}
    w = softmax(lambda),   w' = softmax(lambda')                                   (Eq. 3)
    y = gamma (x - mu) / sqrt(sigma2 + eps) + beta

The LN moments are computed from the IN ones as the paper does, by the law of total variance
(mean_c sigma2_in + mean_c (mu_in - mu_ln)^2, the same value without E[x^2] - E[x]^2 cancelling).
lambda and lambda' (``mean_weight``, ``var_weight``, ordered in, ln, bn) start at one: equal
importance, as in the paper. The BN moments of the local batch are pooled from the IN ones the same
way (no further pass over x); synchronised over a process group, they come from
:func:`normlayers.stats.batch_moments` over the group's batches. Their running mean and unbiased variance
follow torch's momentum convention and replace them in eval, as the paper's SN does (the IN and
LN moments are per sample, so eval computes them from the input). IN needs spatial positions, so
the layer takes NCHW (or NCL) input only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.fused import scale_shift
from normlayers.groupnorm import check_spatial
from normlayers.registry import register
from normlayers.stats import _var_mean as two_pass_var_mean  # CPU-fast two-pass (N, C) moments
from normlayers.stats import (
    batch_moments,
    channel_shape,
    check_values_per_statistic,
    compute_dtype,
    keep_format,
    unbiased,
    update_running,
)

#: the order of the importance weights
MIXED = ("in", "ln", "bn")


@register("sn", "Switchable Normalization (Luo et al. 2019): learned softmax mix of IN, LN, BN moments; NCHW")
class SwitchableNorm(NormLayer):
    batch_dependent = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ):
        super().__init__()
        check_eps_momentum("sn", eps, momentum)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.init_affine(num_features, affine)
        self.mean_weight = nn.Parameter(torch.ones(len(MIXED)))
        self.var_weight = nn.Parameter(torch.ones(len(MIXED)))
        self.init_running_stats(num_features)

    def reset_parameters(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_spatial("sn", x, self.num_features)
        check_values_per_statistic("sn", x, x[0, 0].numel(), "instance (per sample and channel)",
                                   "sn mixes in Instance Normalization, which needs feature maps larger than 1x1")
        dtype = compute_dtype(x)
        spatial = tuple(range(2, x.dim()))
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(dtype)
            in_var, in_mean = two_pass_var_mean(xc, spatial, x[0, 0].numel())  # (N, C)
            ln_mean = in_mean.mean(1, keepdim=True)
            ln_var = (in_var + (in_mean - ln_mean).square()).mean(1, keepdim=True)
            if self.training and not self.synchronised:
                # the local batch's moments from the instance ones (law of total variance), as the
                # paper computes them: no further pass over x
                bn_mean = in_mean.mean(0)
                bn_var = (in_var + (in_mean - bn_mean).square()).mean(0)
                count = torch.tensor(float(x.numel() // x.shape[1]), dtype=dtype, device=x.device)
            elif self.training:
                bn_mean, bn_var, count = batch_moments(x, [0, *spatial], self.process_group, who="sn")
            else:
                bn_mean, bn_var = self.running_mean.to(dtype), self.running_var.to(dtype)
            if self.training:
                self.num_batches_tracked.add_(1)
                update_running(self.running_mean, bn_mean.detach(), self.momentum, self.num_batches_tracked)
                update_running(self.running_var, unbiased(bn_var.detach(), count), self.momentum,
                               self.num_batches_tracked)
            mean_w = torch.softmax(self.mean_weight.to(dtype), 0)
            var_w = torch.softmax(self.var_weight.to(dtype), 0)
            mean = mean_w[0] * in_mean + mean_w[1] * ln_mean + mean_w[2] * bn_mean[None]
            var = var_w[0] * in_var + var_w[1] * ln_var + var_w[2] * bn_var[None]
            scale = torch.rsqrt(var + self.eps)
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)
            shift = -mean * scale
            if self.bias is not None:
                shift = shift + self.bias.to(dtype)
            shape = [x.shape[0], *channel_shape(x)[1:]]
            y = scale_shift(xc, scale.reshape(shape), shift.reshape(shape))
        return keep_format(y.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
