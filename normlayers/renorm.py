"""Batch Renormalization.

Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models",
NeurIPS 2017 (Algorithm 1). Per channel, with the batch moments over (N, H, W) and the running
mean mu and running standard deviation sigma:

    mu_B = mean x,   sigma_B = sqrt(mean (x - mu_B)^2 + eps)
    r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
    mu <- mu + momentum * (mu_B - mu),   sigma <- sigma + momentum * (sigma_B - sigma)

and in eval y = gamma * (x - mu) / sigma + beta. r = 1, d = 0 is BN. The running statistics are
the mean and the *standard deviation* (moving average of sigma_B, eps included, as in the
algorithm), with torch's momentum convention (``momentum=None``: cumulative average).

Schedule (Sec. 4 of the paper): plain BN (r_max = 1, d_max = 0) for the first ``warmup_steps``
training steps, then the limits grow linearly to reach ``r_max`` at step ``r_max_steps`` and
``d_max`` at ``d_max_steps`` (paper: 5k, 40k and 25k steps, r_max = 3, d_max = 5). The step is the
layer's own ``num_batches_tracked`` buffer (one per training forward), so the schedule survives a
``state_dict`` round trip and needs no trainer hook; it is evaluated on the device (no sync).
The batch moments come from :func:`normlayers.stats.batch_moments`, so a process group
synchronises them.
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
from normlayers.stats import batch_moments, channel_shape, single_value_error, update_running


@register("brn", "Batch Renormalization (Ioffe 2017): r_max/d_max with warm-up schedule, running mean and std")
class BatchRenorm(NormLayer):
    batch_dependent = True
    device_fold = ("num_features",)

    def __init__(
        self,
        num_features: int,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ):
        super().__init__()
        check_eps_momentum("brn", eps, momentum)
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"brn: need r_max >= 1 and d_max >= 0 (1 and 0 are plain BN), got r_max={r_max}, "
                             f"d_max={d_max}")
        if min(warmup_steps, r_max_steps, d_max_steps) < 0:
            raise ValueError(f"brn: step counts must be >= 0, got warmup_steps={warmup_steps}, "
                             f"r_max_steps={r_max_steps}, d_max_steps={d_max_steps}")
        self.num_features = num_features
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps
        self.eps = eps
        self.momentum = momentum
        self.init_affine(num_features, affine)
        self.init_running_stats(num_features, spread="running_std")

    def _progress(self, end: int) -> Tensor:
        """0 until the warm-up ends, then linear to 1 at step ``end`` (a tensor: no host sync)."""
        step = self.num_batches_tracked.float()
        if end <= self.warmup_steps:
            return (step >= self.warmup_steps).float()
        return ((step - self.warmup_steps) / (end - self.warmup_steps)).clamp(0.0, 1.0)

    def limits(self) -> tuple[Tensor, Tensor]:
        """The current (r_max, d_max) of the schedule."""
        r_limit = 1.0 + (self.r_max - 1.0) * self._progress(self.r_max_steps)
        d_limit = self.d_max * self._progress(self.d_max_steps)
        return r_limit, d_limit

    def forward(self, x: Tensor) -> Tensor:
        check_channels("brn", x, self.num_features)
        dtype = compute_dtype(x)
        if self.training and not self.synchronised:
            return self._local_forward(x, dtype)
        if not self.training:
            mean, scale = self.running_mean.to(dtype), 1.0 / self.running_std.to(dtype)
            offset = None
        else:
            batch_mean, batch_var, _ = batch_moments(x, [0, *range(2, x.dim())], self.process_group, who="brn")
            with torch.autocast(device_type=x.device.type, enabled=False):
                batch_std = torch.sqrt(batch_var + self.eps)
                r, offset = self._correction_and_update(batch_mean, batch_std)
                mean, scale = batch_mean.to(dtype), r.to(dtype) / batch_std.to(dtype)
                offset = offset.to(dtype)
        # y = gamma * ((x - mean) * scale + d) + beta, folded into one multiply and one add per element
        with torch.autocast(device_type=x.device.type, enabled=False):
            shift = -mean * scale if offset is None else offset - mean * scale
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)
                shift = shift * self.weight.to(dtype)
            if self.bias is not None:
                shift = shift + self.bias.to(dtype)
            shape = channel_shape(x)
            y = scale_shift(x.to(dtype), scale.reshape(shape), shift.reshape(shape))
        return y.to(x.dtype)

    @torch.no_grad()
    def _correction_and_update(self, batch_mean: Tensor, batch_std: Tensor) -> tuple[Tensor, Tensor]:
        """r and d of the current schedule (no gradient), then the running mean and std moved."""
        r_limit, d_limit = self.limits()
        # detached explicitly as well: under torch.compile a no_grad region's result that
        # feeds a differentiable expression was found to carry a gradient (aot_eager)
        r = (batch_std.detach() / self.running_std).clamp(1.0 / r_limit, r_limit)
        offset = ((batch_mean.detach() - self.running_mean) / self.running_std).clamp(-d_limit, d_limit)
        self.num_batches_tracked.add_(1)
        update_running(self.running_mean, batch_mean.detach(), self.momentum, self.num_batches_tracked)
        update_running(self.running_std, batch_std.detach(), self.momentum, self.num_batches_tracked)
        return r.detach(), offset.detach()

    def _local_forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """Unsynchronised training: with r and d constants, y = BN(x) with weight gamma * r and bias
        gamma * d + beta, so torch's own batch-norm kernel computes it (and its backward through the
        batch moments); the moments for r, d and the running statistics come from one no-grad pass."""
        dims = [0, *range(2, x.dim())]
        values = x.numel() // x.shape[1]
        if values <= 1:
            raise single_value_error("brn", x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(dtype)
            with torch.no_grad():
                batch_var, batch_mean = no_grad_var_mean(xf, dims, values)
            r, offset = self._correction_and_update(batch_mean, torch.sqrt(batch_var + self.eps))
            weight, bias = r.to(dtype), offset.to(dtype)
            if self.weight is not None:
                weight, bias = weight * self.weight.to(dtype), bias * self.weight.to(dtype)
            if self.bias is not None:
                bias = bias + self.bias.to(dtype)
            y = F.batch_norm(xf, None, None, weight, bias, training=True, momentum=0.0, eps=self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}")
