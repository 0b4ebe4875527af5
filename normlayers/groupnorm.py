"""Per-sample normalization over groups of channels: Group, Layer and Instance Normalization.

Wu & He, "Group Normalization", ECCV 2018 (Eq. 1-3 and Sec. 3.1). For each sample n and each of
G groups of C/G channels, over the group's channels and all positions (the set S_i):

    mu_{n,g} = mean_{c in g, h, w} x,   sigma_{n,g}^2 = mean_{c in g, h, w} (x - mu_{n,g})^2
    y = gamma_c * (x - mu_{n,g}) / sqrt(sigma_{n,g}^2 + eps) + beta_c

Two special cases, as the GN paper notes (Fig. 2):

* G = 1 is Layer Normalization over (C, H, W) (Ba, Kiros & Hinton, "Layer Normalization", 2016),
  with the per-channel gamma, beta that convolutional networks use.
* G = C is Instance Normalization (Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The
  Missing Ingredient for Fast Stylization", 2016): mean and variance over (H, W) per sample and
  channel. Its options follow ``torch.nn.InstanceNorm2d``: no affine and no running statistics by
  default; with ``track_running_stats`` the batch average of the instance statistics is kept
  (torch's momentum convention, unbiased variance) and used in eval.

None of them mixes samples, so ``batch_dependent`` is False. Statistics are computed in (at least)
float32 with autocast off and the output is cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.batchnorm import cast, check_channels
from normlayers.registry import register
from normlayers.stats import check_values_per_statistic, compute_dtype, unbiased, update_running

DEFAULT_GROUPS = 32


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def resolve_groups(who: str, num_features: int, groups: int | None, group_size: int | None) -> int:
    """The number of groups from ``groups`` or ``group_size`` (one clear error if neither fits).

    With neither given: 32 groups as in the GN paper, or gcd(32, C) when 32 does not divide C, so
    that narrow layers (C = 16) still build.
    """
    if groups is not None and group_size is not None:
        raise ValueError(f"{who}: give groups or group_size, not both (got groups={groups}, group_size={group_size})")
    if group_size is not None:
        if group_size < 1 or num_features % group_size:
            raise ValueError(
                f"{who}: group_size={group_size} does not divide num_features={num_features}; "
                f"use one of {_divisors(num_features)}"
            )
        return num_features // group_size
    if groups is None:
        return math.gcd(DEFAULT_GROUPS, num_features)
    if groups < 1 or num_features % groups:
        raise ValueError(
            f"{who}: groups={groups} does not divide num_features={num_features}; "
            f"use one of {_divisors(num_features)}"
        )
    return groups


def check_spatial(who: str, x: Tensor, num_features: int) -> None:
    """For layers the paper defines on feature maps only: input must be (N, C, H, W) (or N, C, L)."""
    check_channels(who, x, num_features)
    if x.dim() < 3:
        raise ValueError(
            f"{who}: needs spatial input (N, {num_features}, H, W), got shape {tuple(x.shape)}; "
            f"for (N, C) features use ln, gn or bn"
        )


class _GroupedNorm(NormLayer):
    """GN with a fixed group count; LN and GN share it (torch's fused ``group_norm`` kernel)."""

    def __init__(self, num_features: int, groups: int, eps: float, affine: bool):
        super().__init__()
        check_eps_momentum(self.norm_name, eps)
        self.num_features = num_features
        self.groups = groups
        self.eps = eps
        self.init_affine(num_features, affine)

    def forward(self, x: Tensor) -> Tensor:
        check_channels(self.norm_name, x, self.num_features)
        check_values_per_statistic(self.norm_name, x, x[0].numel() // self.groups, "per-sample group",
                                   "use fewer groups or larger feature maps")
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.group_norm(x.to(dtype), self.groups, cast(self.weight, dtype), cast(self.bias, dtype), self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}, affine={self.affine}"


@register("gn", "Group Normalization (Wu & He 2018): per sample over C/G channels and H,W; default 32 groups")
class GroupNorm(_GroupedNorm):
    def __init__(
        self,
        num_features: int,
        groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
    ):
        super().__init__(num_features, resolve_groups("gn", num_features, groups, group_size), eps, affine)


@register("ln", "Layer Normalization (Ba et al. 2016): per sample over C,H,W; per-channel affine")
class LayerNorm(_GroupedNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_features, 1, eps, affine)


@register("in", "Instance Normalization (Ulyanov et al. 2016): per sample per channel over H,W; NCHW")
class InstanceNorm(NormLayer):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
    ):
        super().__init__()
        check_eps_momentum("in", eps, momentum)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.init_affine(num_features, affine)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        check_spatial("in", x, self.num_features)
        dtype = compute_dtype(x)
        weight, bias = cast(self.weight, dtype), cast(self.bias, dtype)
        use_input_stats = self.training or not self.track_running_stats
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(dtype)
            if not use_input_stats:
                y = F.batch_norm(xc, self.running_mean.to(dtype), self.running_var.to(dtype), weight, bias,
                                 False, 0.0, self.eps)
                return y.to(x.dtype)
            positions = xc[0, 0].numel()
            if positions <= 1:
                raise ValueError(
                    f"in: instance statistics need more than one spatial position, got shape {tuple(x.shape)}; "
                    f"use ln or gn for 1x1 feature maps"
                )
            if self.training and self.track_running_stats:
                self._track(xc, positions)
            y = F.group_norm(xc, self.num_features, weight, bias, self.eps)
        return y.to(x.dtype)

    @torch.no_grad()
    def _track(self, x: Tensor, positions: int) -> None:
        # torch's InstanceNorm convention: the batch average of each instance's mean and unbiased variance.
        var, mean = torch.var_mean(x.flatten(2), dim=2, correction=0)
        self.num_batches_tracked.add_(1)
        count = torch.tensor(float(positions), device=x.device)
        update_running(self.running_mean, mean.mean(0), self.momentum, self.num_batches_tracked)
        update_running(self.running_var, unbiased(var, count).mean(0), self.momentum, self.num_batches_tracked)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")
