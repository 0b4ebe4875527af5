"""Batch Group Normalization.

Zhou, Zhou & Gao, "Batch Group Normalization", 2020 (arXiv:2012.02782, Sec. 3). The C*H*W values
of each sample are laid out in (C, H, W) order and split into G consecutive groups of
L = C*H*W / G values; each statistic is over the whole batch and one group:

    mu_g = mean_{n, i in g} x_{n,i},   sigma_g^2 = mean_{n, i in g} (x_{n,i} - mu_g)^2
    y = gamma_c * (x - mu_g) / sqrt(sigma_g^2 + eps) + beta_c          (c: the value's channel)

so G sets how many values feed each statistic: N * C*H*W / G. G = C is BN exactly; G < C pools
channels (useful at small batch), G > C splits channels (useful at large batch). G must divide
C*H*W; when it does not divide C, a group holds parts of channels and which values it holds depends
on H*W, so the running statistics of a group mean something only at the spatial size they were
gathered at: such a layer records that size (the ``positions`` buffer, H*W, 0 until the first
training step) and refuses input of another size, in training and in eval, with a clear error.
Running mean and unbiased variance have size G (torch's momentum convention) and
are used in eval; the affine is per channel. The batch moments come from
:func:`normlayers.stats.batch_moments`, so a process group synchronises them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.batchnorm import check_channels
from normlayers.fused import no_grad_var_mean, scale_shift
from normlayers.groupnorm import compute_dtype
from normlayers.registry import register
from normlayers.stats import batch_moments, keep_format, single_value_error, unbiased, update_running


@register("bgn", "Batch Group Normalization (Zhou et al. 2020): over the batch and one of G groups of C*H*W")
class BatchGroupNorm(NormLayer):
    batch_dependent = True
    device_fold = ("num_features", "groups")

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ):
        super().__init__()
        check_eps_momentum("bgn", eps, momentum)
        if groups < 1:
            raise ValueError(f"bgn: groups must be a positive int, got {groups}")
        self.num_features = num_features
        self.groups = groups
        self.eps = eps
        self.momentum = momentum
        self.init_affine(num_features, affine)
        self.init_running_stats(groups)
        if num_features % groups:
            self.register_buffer("positions", torch.tensor(0, dtype=torch.long))
            # the same size as a Python int, so a forward never reads the buffer back from the device
            self._positions_seen = 0

    def forward(self, x: Tensor) -> Tensor:
        check_channels("bgn", x, self.num_features)
        batch, values = x.shape[0], x[0].numel()
        if values % self.groups:
            raise ValueError(
                f"bgn: groups={self.groups} does not divide the C*H*W={values} values of each sample "
                f"(input shape {tuple(x.shape)}); choose groups that divide {values}, e.g. a divisor of "
                f"num_features={self.num_features}"
            )
        if hasattr(self, "positions"):
            self._check_positions(x)
        if self.training and batch * values // self.groups <= 1:
            raise single_value_error("bgn", x)
        if self.training and not self.synchronised:
            return self._local_forward(x)
        if self.training:
            mean, var, count = batch_moments(x.reshape(batch, self.groups, -1), [0, 2], self.process_group, who="bgn")
            self.num_batches_tracked.add_(1)
            update_running(self.running_mean, mean.detach(), self.momentum, self.num_batches_tracked)
            update_running(self.running_var, unbiased(var.detach(), count), self.momentum, self.num_batches_tracked)
        else:
            mean, var = self.running_mean, self.running_var
        return self._normalize(x, mean, var)

    def _local_forward(self, x: Tensor) -> Tensor:
        """Unsynchronised training: the groups are the channels of an (N, G, L) view, so torch's own
        batch-norm kernel standardises them (and updates the running statistics, same convention),
        then the per-channel affine: about half the cost of the moments-and-affine chain on CPU."""
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            grouped = x.reshape(x.shape[0], self.groups, -1).to(dtype)
            self.num_batches_tracked.add_(1)
            if self.momentum is not None and self.running_mean.dtype == dtype:
                x_hat = F.batch_norm(grouped, self.running_mean, self.running_var, None, None, True,
                                     self.momentum, self.eps)
            else:  # a cumulative average (its factor is a tensor) or float64 input with float32 buffers
                with torch.no_grad():
                    var, mean = no_grad_var_mean(grouped, (0, 2), grouped.shape[0] * grouped.shape[2])
                    count = torch.tensor(float(grouped.shape[0] * grouped.shape[2]), dtype=dtype, device=x.device)
                    update_running(self.running_mean, mean, self.momentum, self.num_batches_tracked)
                    update_running(self.running_var, unbiased(var, count), self.momentum, self.num_batches_tracked)
                x_hat = F.batch_norm(grouped, None, None, None, None, True, 0.0, self.eps)
            x_hat = x_hat.reshape(x.shape[0], self.num_features, -1)
            if self.weight is not None:
                x_hat = scale_shift(x_hat, self.weight.to(dtype)[:, None],
                                    None if self.bias is None else self.bias.to(dtype)[:, None])
            elif self.bias is not None:
                x_hat = x_hat + self.bias.to(dtype)[:, None]
        return keep_format(x_hat.reshape(x.shape).to(x.dtype), x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the size was recorded: unknown size (0), set by the next training step
        if hasattr(self, "positions") and prefix + "positions" not in state_dict:
            state_dict[prefix + "positions"] = torch.zeros_like(self.positions)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if hasattr(self, "positions") and prefix + "positions" in state_dict:
            self._positions_seen = int(state_dict[prefix + "positions"])

    def _check_positions(self, x: Tensor) -> None:
        """Groups that split channels depend on H*W: keep the size the running statistics belong to."""
        positions, seen = x[0, 0].numel(), self._positions_seen
        if seen == 0:
            if self.training:
                self.positions.fill_(positions)
                self._positions_seen = positions
            return
        if positions != seen:
            raise ValueError(
                f"bgn: groups={self.groups} does not divide num_features={self.num_features}, so each group "
                f"holds parts of channels laid out for H*W={seen} positions (the size it was trained at); got "
                f"input of shape {tuple(x.shape)} with H*W={positions}; use inputs of the training size, or "
                f"groups dividing {self.num_features}"
            )
    def population_view(self, x: Tensor) -> tuple[Tensor, list[int]]:
        """The values each statistic covers (for :func:`normlayers.precise_stats`): one group of every sample."""
        return x.reshape(x.shape[0], self.groups, -1), [0, 2]

    def _normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        channels = self.num_features
        # Coefficients per channel when groups hold whole channels (as in BN), else per (channel, position).
        positions = 1 if channels % self.groups == 0 else x[0, 0].numel()
        repeats = channels * positions // self.groups
        with torch.autocast(device_type=x.device.type, enabled=False):
            scale = torch.rsqrt(var.to(dtype) + self.eps).repeat_interleave(repeats).reshape(channels, positions)
            mean = mean.to(dtype).repeat_interleave(repeats).reshape(channels, positions)
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)[:, None]
            shift = -mean * scale
            if self.bias is not None:
                shift = shift + self.bias.to(dtype)[:, None]
            y = scale_shift(x.reshape(x.shape[0], channels, -1).to(dtype), scale, shift)
        return y.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, groups={self.groups}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}")
