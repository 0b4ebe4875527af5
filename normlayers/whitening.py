"""Whitening over the batch: Decorrelated Batch Normalization and Iterative Normalization.

Huang, Yang, Lang & Deng, "Decorrelated Batch Normalization", CVPR 2018 (Sec. 3, Algorithm 1), and
Huang, Zhou, Zhu, Liu & Shao, "Iterative Normalization: Beyond Standardization towards Efficient
Whitening", CVPR 2019 (Sec. 3, Algorithm 1). The C channels are split into G groups of d = C / G;
for each group, the d-dimensional vectors x_m (one per sample and position, m = 1..M, M = N*H*W)
are centred and whitened with the group's covariance:

    mu = 1/M sum_m x_m,   Sigma = 1/M sum_m (x_m - mu)(x_m - mu)^T + eps I
    x_hat = W (x - mu),   y_c = gamma_c x_hat_c + beta_c

* ``dbn``: ZCA whitening, W = Sigma^{-1/2} = U diag(lambda)^{-1/2} U^T from the eigendecomposition
  Sigma = U diag(lambda) U^T (DBN's Eq. 7; ZCA rather than PCA whitening, because it is the one that
  stays closest to x, avoiding the stochastic axis swapping of Sec. 3.1). Backward goes through
  ``torch.linalg.eigh``.
* ``iternorm``: the same Sigma^{-1/2} by T Newton-Schulz iterations, no eigendecomposition
  (IterNorm's Eq. 5-7): Sigma_N = Sigma / tr(Sigma), P_0 = I,
  P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2, W = P_T / sqrt(tr(Sigma)). Dividing by the trace puts
  the eigenvalues in (0, 1], where the iteration converges; T (``iterations``, default 5 as in the
  paper) trades exactness for speed and acts as a regulariser (the paper's point: partial
  whitening). P_k is computed in the equivalent, numerically stable coupled form (see
  :func:`newton_schulz_whitening`).

Defaults: group size d = gcd(16, C) for dbn and gcd(64, C) for iternorm (each paper's default
group size: 16 and 64), or ``groups`` / ``group_size``. The covariance is biased (1/M), as both
papers write it. Running statistics follow torch's momentum convention: ``running_mean`` (C) and
``running_whitening`` (G, d, d), the moving average of the batch's W, as both authors' codes keep
it; eval uses them. NC and NCHW input. Statistics in float32 (float64 for float64 input), autocast
off; the batch statistics come from :func:`normlayers.stats.batch_covariance`, which synchronises
them over a process group in one all-reduce, as :func:`~normlayers.stats.batch_moments` does for
the other variants (a whitening matrix needs the cross-channel moments, which per-channel moments
cannot give). Both work on the (N, G, d, H*W) view of the input, one d x H*W block per sample and
group, so the input is never transposed into (G, d, N*H*W) and the output comes back in NCHW order
(:func:`~normlayers.stats.blocks_gram`, :func:`~normlayers.stats.blocks_apply`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.batchnorm import check_channels
from normlayers.groupnorm import resolve_groups
from normlayers.registry import register
from normlayers.stats import (
    batch_covariance,
    blocks_apply,
    compute_dtype,
    keep_format,
    single_value_error,
    update_running,
)


def zca_whitening(sigma: Tensor) -> Tensor:
    """Sigma^{-1/2} of symmetric positive definite matrices (..., d, d) by eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
    return (eigenvectors * eigenvalues.rsqrt().unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)


def newton_schulz_whitening(sigma: Tensor, iterations: int) -> Tensor:
    """Sigma^{-1/2} of SPD matrices (..., d, d) by ``iterations`` Newton-Schulz steps on Sigma / tr(Sigma).

    The coupled form Y_0 = Sigma_N, Z_0 = I, M = (3 I - Z Y) / 2, Y <- Y M, Z <- M Z: Z_k equals the
    paper's P_k in exact arithmetic (all are polynomials in Sigma_N, Y_k = P_k Sigma_N) at the same
    three matrix products per step, but stays stable; the paper's form amplifies rounding errors
    (measured in float64 on 8 correlated channels: 4e-7 from exact at T=10, 1e-2 at 15, diverges at 20).
    """
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    y = sigma / trace
    identity = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    z = identity
    for _ in range(iterations):
        m = 1.5 * identity - 0.5 * (z @ y)
        y, z = y @ m, m @ z
    return z * trace.rsqrt()


class _Whitening(NormLayer):
    """Shared by dbn and iternorm: grouping, statistics, running state and the affine."""

    batch_dependent = True
    default_group_size = 16

    def __init__(self, num_features: int, groups: int | None, group_size: int | None, eps: float,
                 momentum: float | None, affine: bool):
        super().__init__()
        who = self.norm_name
        check_eps_momentum(who, eps, momentum)
        if groups is None and group_size is None:
            group_size = math.gcd(self.default_group_size, num_features)
        self.num_features = num_features
        self.groups = resolve_groups(who, num_features, groups, group_size)
        self.eps = eps
        self.momentum = momentum
        self.init_affine(num_features, affine)
        size = num_features // self.groups
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_whitening", torch.eye(size).repeat(self.groups, 1, 1))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def whitening(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        self.running_mean.zero_()
        self.running_whitening.copy_(torch.eye(self.running_whitening.shape[-1]).expand_as(self.running_whitening))
        self.num_batches_tracked.zero_()
        if self.affine:
            torch.nn.init.ones_(self.weight)
            torch.nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_channels(self.norm_name, x, self.num_features)
        if self.training and x.numel() // self.num_features <= 1 and not self.synchronised:
            raise single_value_error(self.norm_name, x)
        dtype = compute_dtype(x)
        size = self.num_features // self.groups
        with torch.autocast(device_type=x.device.type, enabled=False):
            # (N, G, d, H*W): the d-dimensional vectors of each sample, group and position, a view of x
            blocks = x.to(dtype).reshape(x.shape[0], self.groups, size, -1)
            if self.training:
                mean, cov, _, centred = batch_covariance(blocks, self.process_group, who=self.norm_name)
                eye = torch.eye(size, dtype=dtype, device=x.device)
                whitening = self.whitening(cov + self.eps * eye)
                self.num_batches_tracked.add_(1)
                update_running(self.running_mean, mean.detach().reshape(-1), self.momentum, self.num_batches_tracked)
                update_running(self.running_whitening, whitening.detach(), self.momentum, self.num_batches_tracked)
            else:
                mean = self.running_mean.to(dtype).reshape(self.groups, size)
                whitening = self.running_whitening.to(dtype)
                centred = blocks - mean[None, :, :, None]
            # the affine's scale folded into the whitening matrix's rows (d x d values, not every value)
            if self.weight is not None:
                whitening = whitening * self.weight.to(dtype).reshape(self.groups, size, 1)
            white = blocks_apply(whitening, centred)
            if self.bias is not None:
                white = white + self.bias.to(dtype).reshape(1, self.groups, size, 1)
            y = white.reshape(x.shape)
        return keep_format(y.to(x.dtype).contiguous(), x)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, groups={self.groups}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}")


@register("dbn", "Decorrelated BN (Huang et al. 2018): ZCA whitening of channel groups by eigendecomposition")
class DecorrelatedBatchNorm(_Whitening):
    default_group_size = 16

    def __init__(
        self,
        num_features: int,
        groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ):
        super().__init__(num_features, groups, group_size, eps, momentum, affine)

    def whitening(self, sigma: Tensor) -> Tensor:
        return zca_whitening(sigma)


@register("iternorm", "Iterative Normalization (Huang et al. 2019): whitening by T Newton-Schulz iterations")
class IterativeNorm(_Whitening):
    default_group_size = 64

    def __init__(
        self,
        num_features: int,
        iterations: int = 5,
        groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ):
        if iterations < 1:
            raise ValueError(f"iternorm: iterations (Newton-Schulz steps T) must be >= 1, got {iterations}")
        super().__init__(num_features, groups, group_size, eps, momentum, affine)
        self.iterations = iterations

    def whitening(self, sigma: Tensor) -> Tensor:
        return newton_schulz_whitening(sigma, self.iterations)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iterations={self.iterations}"
