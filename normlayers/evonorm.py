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
from torch.autograd.function import once_differentiable

from normlayers.base import NormLayer
from normlayers.groupnorm import check_spatial, compute_dtype, resolve_groups
from normlayers.registry import register
from normlayers.stats import batch_moments, unbiased, update_running


class _EvoNormB0Function(torch.autograd.Function):
    """B0 given its batch std s (per channel): y = x / max(s, v*x + sqrt(s^2_{w,h}(x) + eps)) * gamma + beta.

    Forward and backward written out: autograd's version of this chain keeps about twice as many
    full-size temporaries and is 4-8x slower than BatchNorm2d on CPU. The gradient reaching ``s``
    flows on through :func:`batch_moments` (and its all-reduce when synchronised).
    Checked against autograd of the plain equation and by ``gradcheck`` in float64 (tests).
    """

    @staticmethod
    def forward(ctx, x: Tensor, batch_std: Tensor, v: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        spatial = tuple(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * len(spatial)
        s, v, weight, bias = (p.reshape(shape) for p in (batch_std, v, weight, bias))
        mean = x.mean(dim=spatial, keepdim=True)
        # two-pass instance variance; vector_norm avoids one full-size temporary
        centered_norm = torch.linalg.vector_norm(x - mean, dim=spatial, keepdim=True)
        instance_std = torch.sqrt(centered_norm.square() / x[0, 0].numel() + eps)
        # max(s, v*x + instance_std) = s + excess; excess > 0 marks where the instance branch wins
        excess = torch.addcmul(instance_std - s, x, v).relu_()
        denominator = excess + s
        ctx.save_for_backward(x, mean, instance_std, excess, denominator, v, weight)
        return torch.addcmul(bias, x / denominator, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, mean, instance_std, excess, denominator, v, weight = ctx.saved_tensors
        spatial = tuple(range(2, x.dim()))
        per_channel = (0, *spatial)
        normalized = x / denominator
        grad_weight = (grad * normalized).sum(per_channel)
        grad_bias = grad.sum(per_channel)
        grad_x = (grad * weight).div_(denominator)
        # d y / d denominator = -gamma * x / denominator^2; it goes to s or to the instance branch
        neg_grad_denominator = grad_x * normalized
        neg_grad_branch = torch.ops.aten.threshold_backward(neg_grad_denominator, excess, 0.0)  # where excess > 0
        grad_s = neg_grad_branch.sum(per_channel) - neg_grad_denominator.sum(per_channel)
        grad_v = -(neg_grad_branch * x).sum(per_channel)
        grad_x.addcmul_(neg_grad_branch, v, value=-1.0)
        # instance_std = sqrt(mean((x - mean)^2) + eps): d/dx = (x - mean) / (positions * instance_std)
        k = -neg_grad_branch.sum(spatial, keepdim=True) / (x[0, 0].numel() * instance_std)
        grad_x.addcmul_(x, k).sub_(mean * k)
        return grad_x, grad_s, grad_v, grad_weight, grad_bias, None


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
            batch_std = torch.sqrt(batch_var.to(dtype) + self.eps)
            y = _EvoNormB0Function.apply(x.to(dtype), batch_std, self.v.to(dtype), self.weight.to(dtype),
                                         self.bias.to(dtype), self.eps)
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
            grouped = xc.reshape(n, self.groups, -1)
            # two-pass group variance; vector_norm avoids one full-size temporary
            centered_norm = torch.linalg.vector_norm(grouped - grouped.mean(dim=2, keepdim=True), dim=2)
            group_var = centered_norm.square() / grouped.shape[2]
            # one scale per (sample, channel): gamma_c / group std of the channel's group
            inv_std = torch.rsqrt(group_var + self.eps).repeat_interleave(self.num_features // self.groups, dim=1)
            scale = (inv_std * self.weight.to(dtype)).reshape([n, self.num_features] + [1] * (x.dim() - 2))
            gated = xc * torch.sigmoid(xc * self._per_channel(x, self.v, dtype))
            y = torch.addcmul(self._per_channel(x, self.bias, dtype), gated, scale)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"
