"""EvoNorm-B0 and EvoNorm-S0: evolved normalization-activation layers.

Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers", NeurIPS 2020 (Table 1 and
Sec. 4). With s^2_{dims}(x) the (biased) variance of x over the named dimensions, v_1, gamma, beta
learned per channel (v_1 and gamma start at 1, beta at 0):

    EvoNorm-B0:  y = x / max( sqrt(s^2_{b,w,h}(x) + eps),  v_1 * x + sqrt(s^2_{w,h}(x) + eps) ) * gamma + beta
    EvoNorm-S0:  y = x * sigmoid(v_1 * x) / sqrt(s^2_{w,h,c/g}(x) + eps) * gamma + beta

B0's batch variance s^2_{b,w,h} (over the batch and positions, per channel) is the only statistic
that crosses the batch: it comes from :func:`normlayers.stats.batch_moments`, so a process group
synchronises it, and its moving average (torch's momentum convention, unbiased) replaces it in
eval, as the paper does; B0 keeps no running mean because it never subtracts one. S0 uses the
per-sample group standard deviation (G groups, default 32 as for GN), so it is per sample. Both
replace the activation that would follow (``includes_activation``). The paper defines them on
convolutional feature maps, so input is NCHW.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlayers.base import NormLayer
from normlayers.groupnorm import check_spatial, compute_dtype, resolve_groups
from normlayers.registry import register
from normlayers.stats import batch_moments, unbiased, update_running


def _variance(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Biased variance over ``dims`` (kept), two-pass: stable, and much faster on CPU than torch.var."""
    return (x - x.mean(dim=dims, keepdim=True)).square().mean(dim=dims, keepdim=True)


class _EvoNorm(NormLayer):
    includes_activation = True

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))

    def _per_channel(self, x: Tensor, param: Tensor, dtype: torch.dtype) -> Tensor:
        return param.to(dtype).reshape([1, self.num_features] + [1] * (x.dim() - 2))


@register("evonorm_b0", "EvoNorm-B0 (Liu et al. 2020): batch variance + instance std, includes activation; NCHW")
class EvoNormB0(_EvoNorm):
    batch_dependent = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, eps)
        self.momentum = momentum
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        check_spatial("evonorm_b0", x, self.num_features)
        dtype = compute_dtype(x)
        spatial = tuple(range(2, x.dim()))
        if self.training:
            _, batch_var, count = batch_moments(x, [0, *spatial], self.process_group, who="evonorm_b0")
            self.num_batches_tracked.add_(1)
            update_running(self.running_var, unbiased(batch_var.detach(), count), self.momentum,
                           self.num_batches_tracked)
        else:
            batch_var = self.running_var
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(dtype)
            batch_std = self._per_channel(x, torch.sqrt(batch_var.to(dtype) + self.eps), dtype)
            instance_std = torch.sqrt(_variance(xc, spatial) + self.eps)
            # max(a, b) as a + relu(b - a): same values, and a much cheaper backward than torch.maximum's
            excess = torch.relu(torch.addcmul(instance_std - batch_std, xc, self._per_channel(x, self.v, dtype)))
            denominator = excess + batch_std
            y = torch.addcmul(self._per_channel(x, self.bias, dtype), xc / denominator,
                              self._per_channel(x, self.weight, dtype))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


@register("evonorm_s0", "EvoNorm-S0 (Liu et al. 2020): x*sigmoid(v*x) / group std, includes activation; NCHW")
class EvoNormS0(_EvoNorm):
    def __init__(
        self,
        num_features: int,
        groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
    ):
        super().__init__(num_features, eps)
        self.groups = resolve_groups("evonorm_s0", num_features, groups, group_size)

    def forward(self, x: Tensor) -> Tensor:
        check_spatial("evonorm_s0", x, self.num_features)
        dtype = compute_dtype(x)
        n = x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(dtype)
            group_var = _variance(xc.reshape(n, self.groups, -1), (2,)).squeeze(2)
            # one scale per (sample, channel): gamma_c / group std of the channel's group
            inv_std = torch.rsqrt(group_var + self.eps).repeat_interleave(self.num_features // self.groups, dim=1)
            scale = (inv_std * self.weight.to(dtype)).reshape([n, self.num_features] + [1] * (x.dim() - 2))
            gated = xc * torch.sigmoid(xc * self._per_channel(x, self.v, dtype))
            y = torch.addcmul(self._per_channel(x, self.bias, dtype), gated, scale)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"
