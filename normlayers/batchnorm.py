"""Batch Normalization and the identity.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
Covariate Shift", ICML 2015. Per channel c, over the batch and spatial positions:

    mu_c = mean_{n,h,w} x,   sigma_c^2 = mean_{n,h,w} (x - mu_c)^2
    y = gamma_c * (x - mu_c) / sqrt(sigma_c^2 + eps) + beta_c

Running mean and (unbiased) variance follow torch's momentum convention and are used in eval.
Unsynchronised, the layer is torch's own ``BatchNorm``; with a process group the statistics come
from :func:`normlayers.stats.batch_moments` over the whole group.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.registry import register
from normlayers.stats import (
    affine,
    batch_moments,
    channel_shape,
    compute_dtype,
    keep_format,
    single_value_error,
    unbiased,
    update_running,
)


@register("none", "identity: no normalization")
class Identity(NormLayer):
    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def cast(param: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if param is None else param.to(dtype)


def check_channels(who: str, x: Tensor, num_features: int) -> None:
    """One clear error for input of the wrong rank or channel count."""
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(
            f"{who}: expected input (N, {num_features}) or (N, {num_features}, H, W), got shape {tuple(x.shape)}"
        )


@register("bn", "Batch Normalization (Ioffe & Szegedy 2015); NC or NCHW input")
class BatchNorm(_BatchNorm, NormLayer):
    batch_dependent = True
    device_fold = ("num_features",)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        check_eps_momentum(self.norm_name, eps, momentum)  # bn, and subclasses such as ic
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)

    def _check_input_dim(self, x: Tensor) -> None:
        check_channels("bn", x, self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not use_batch or not self.synchronised:
            if use_batch and x.numel() // x.shape[1] <= 1:
                raise single_value_error("bn", x)
            state = self.weight if self.weight is not None else self.running_mean
            if not (x.dtype == torch.float64 and state is not None and state.dtype != x.dtype):
                return super().forward(x)
            # float64 input, float32 state: torch's kernel would need the input cast to float32
            # (it refuses the mix); float64 statistics instead, as every other variant computes them
        return self._moments_forward(x, use_batch)

    def _moments_forward(self, x: Tensor, use_batch: bool) -> Tensor:
        """Through :func:`batch_moments` (synchronised, or float64 input with float32 state)."""
        if use_batch:
            dims = [0, *range(2, x.dim())]
            mean, var, count = batch_moments(x, dims, self.process_group, who="bn")
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                update_running(self.running_mean, mean, self.momentum, self.num_batches_tracked)
                update_running(self.running_var, unbiased(var, count), self.momentum, self.num_batches_tracked)
        else:
            mean, var = self.running_mean, self.running_var
        shape = channel_shape(x)
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = (x.to(dtype) - mean.to(dtype).reshape(shape)) * torch.rsqrt(var.to(dtype).reshape(shape) + self.eps)
            y = affine(y, cast(self.weight, dtype), cast(self.bias, dtype))
        return keep_format(y.to(x.dtype), x)
