"""EvoNorm-B0 and EvoNorm-S0: evolved normalization-activation layers.

Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers", NeurIPS 2020 (Table 1 and
Sec. 4). With s^2_{dims}(x) the (biased) variance of x over the named dimensions, v_1, gamma, beta
learned per channel (v_1 and gamma start at 1, beta at 0):

    EvoNorm-B0:  y = x / max( sqrt(s^2_{b,w,h}(x) + eps),  v_1 * x + sqrt(s^2_{w,h}(x) + eps) ) * gamma + beta
    EvoNorm-S0:  y = x * sigmoid(v_1 * x) / sqrt(s^2_{w,h,c/g}(x) + eps) * gamma + beta

B0's batch variance s^2_{b,w,h} (over the batch and positions, per channel) is the only statistic
that crosses the batch: it comes from :func:`normlayers.stats.batch_moments`, so a process group
synchronises it, and its moving average (torch's momentum convention) replaces it in eval, as the
paper does; B0 keeps no running mean because it never subtracts one. The paper does not say whether
the moving variance is Bessel-corrected: ``unbiased_running=True`` (default) is torch's BatchNorm
convention, so a B0 layer's running variance means what a bn layer's does; ``False`` averages the
biased batch variance itself, as the paper's TensorFlow moving average of ``tf.nn.moments`` would. S0 uses the
per-sample group standard deviation (G groups, default 32 as for GN), so it is per sample. Both
replace the activation that would follow (``includes_activation``). The paper defines them on
convolutional feature maps, so input is NCHW. Each layer's elementwise part is one
``torch.autograd.Function`` with its backward written out (gradcheck-tested): autograd's chain of
small ops was 4-8x slower than BatchNorm2d on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.groupnorm import check_spatial, compute_dtype, resolve_groups
from normlayers.registry import register
from normlayers.stats import (
    batch_moments,
    check_values_per_statistic,
    keep_format,
    single_value_error,
    unbiased,
    update_running,
)


class _EvoNormB0Function(torch.autograd.Function):
    """B0 given its batch std s (per channel): y = x / max(s, v*x + sqrt(s^2_{w,h}(x) + eps)) * gamma + beta.

    Forward and backward written out: autograd's version of this chain keeps about twice as many
    full-size temporaries and is 4-8x slower than BatchNorm2d on CPU. The gradient reaching ``s``
    flows on through :func:`batch_moments` (and its all-reduce when synchronised).
    Checked against autograd of the plain equation and by ``gradcheck`` in float64 (tests).
    """

    @staticmethod
    def forward(ctx, x: Tensor, batch_std: Tensor | None, v: Tensor, weight: Tensor, bias: Tensor,
                eps: float) -> tuple[Tensor, Tensor]:
        """``batch_std`` of ``None``: the local batch's, from the per-sample moments computed here anyway
        (law of total variance: no extra pass over ``x``, and its gradient joins the instance term's pass).
        Returns ``(y, batch_var)``; ``batch_var`` (for the running average) carries no gradient."""
        spatial = tuple(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * len(spatial)
        v, weight, bias = (p.reshape(shape) for p in (v, weight, bias))
        mean = x.mean(dim=spatial, keepdim=True)
        # two-pass instance variance; vector_norm avoids one full-size temporary
        centered = x - mean
        instance_var = torch.linalg.vector_norm(centered, dim=spatial, keepdim=True).square() / x[0, 0].numel()
        instance_std = torch.sqrt(instance_var + eps)
        ctx.local_batch = batch_std is None
        if ctx.local_batch:
            batch_mean = mean.mean(0, keepdim=True)
            batch_var = instance_var.mean(0, keepdim=True) + (mean - batch_mean).square().mean(0, keepdim=True)
            s = torch.sqrt(batch_var + eps)
        else:
            s, batch_mean, batch_var = batch_std.reshape(shape), mean.new_zeros(()), batch_std.new_zeros(shape)
        # max(s, v*x + instance_std) = s + excess; excess > 0 marks where the instance branch wins.
        # (Written into the centred buffer: on CPU a fresh large tensor costs about as much as the
        # arithmetic, since the allocator hands it back to the OS.)
        excess = torch.addcmul(instance_std - s, x, v, out=centered).relu_()
        denominator = excess + s
        normalized = x / denominator
        ctx.save_for_backward(x, mean, instance_std, excess, denominator, normalized, v, weight, s, batch_mean)
        ctx.mark_non_differentiable(batch_var)
        return (normalized * weight).add_(bias), batch_var.flatten()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, _grad_batch_var: Tensor | None):
        x, mean, instance_std, excess, denominator, normalized, v, weight, s, batch_mean = ctx.saved_tensors
        spatial = tuple(range(2, x.dim()))
        per_channel = (0, *spatial)
        # one scratch buffer for the full-size products, reused in place (see forward)
        scratch = torch.mul(grad, normalized)
        grad_weight = scratch.sum(per_channel)
        grad_bias = grad.sum(per_channel)
        grad_x = torch.mul(grad, weight).div_(denominator)
        # -d loss / d denominator = grad * gamma * x / denominator^2; it goes to s or to the instance branch
        torch.mul(grad_x, normalized, out=scratch)
        total = scratch.sum(per_channel)
        branch = torch.ops.aten.threshold_backward.grad_input(scratch, excess, 0.0, grad_input=scratch)
        branch_per_sample = branch.sum(spatial, keepdim=True)
        grad_s = branch_per_sample.sum(0).flatten() - total
        grad_x.addcmul_(branch, v, value=-1.0)
        # instance_std = sqrt(mean((x - mean)^2) + eps): d/dx = (x - mean) / (positions * instance_std)
        k = -branch_per_sample / (x[0, 0].numel() * instance_std)
        shift = mean * k
        if ctx.local_batch:
            # s = sqrt(batch var + eps): d s / dx = (x - batch_mean) / (batch values * s), in the same pass
            k_batch = grad_s.reshape(s.shape) / (x.numel() // x.shape[1] * s)
            k, shift = k + k_batch, shift + batch_mean * k_batch
        grad_x.addcmul_(x, k).sub_(shift)
        grad_v = -branch.mul_(x).sum(per_channel)
        return grad_x, None if ctx.local_batch else grad_s, grad_v, grad_weight, grad_bias, None


class _EvoNormS0Function(torch.autograd.Function):
    """S0: y = x * sigmoid(v*x) / sqrt(s^2_{w,h,c/g}(x) + eps) * gamma + beta, forward and backward
    written out for the same reason as B0's (autograd's chain is about 4x BatchNorm2d on CPU).
    Checked against autograd of the plain equation and by ``gradcheck`` in float64 (tests).
    """

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
        x = x.contiguous()
        n, channels = x.shape[:2]
        shape = [1, channels] + [1] * (x.dim() - 2)
        gate = (x * v.reshape(shape)).sigmoid_()
        grouped = x.view(n, groups, -1)
        group_mean = grouped.mean(dim=2, keepdim=True)
        # two-pass group variance; vector_norm avoids one full-size temporary
        centered_norm = torch.linalg.vector_norm(grouped - group_mean, dim=2, keepdim=True)
        group_std = torch.sqrt(centered_norm.square() / grouped.shape[2] + eps)  # (N, G, 1)
        per_channel_inv_std = (1.0 / group_std).repeat_interleave(channels // groups, dim=1).reshape(n, channels)
        scale = (per_channel_inv_std * weight).reshape([n, channels] + [1] * (x.dim() - 2))
        gated = x * gate
        ctx.save_for_backward(x, v, weight, gate, gated, group_mean, group_std, per_channel_inv_std)
        ctx.groups = groups
        # multiply then add in place: on CPU addcmul with two broadcast operands is the slower of the two
        return (gated * scale).add_(bias.reshape(shape))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, v, weight, gate, gated, group_mean, group_std, per_channel_inv_std = ctx.saved_tensors
        grad = grad.contiguous()
        n, channels, groups = x.shape[0], x.shape[1], ctx.groups
        spatial = tuple(range(2, x.dim()))
        shape = [1, channels] + [1] * len(spatial)
        sample_shape = [n, channels] + [1] * len(spatial)
        # one scratch buffer for the full-size products, reused in place (fewer fresh large tensors)
        scratch = torch.mul(grad, gated)
        grad_scale = scratch.sum(spatial)  # (N, C): d loss / d (gamma_c / std of c's group)
        grad_weight = (grad_scale * per_channel_inv_std).sum(0)
        grad_bias = grad.sum((0, *spatial))
        grad_gated = grad * (per_channel_inv_std * weight).reshape(sample_shape)
        # d/dx [x sigmoid(v x)] = sigmoid + v x sigmoid (1 - sigmoid);  d/dv = x^2 sigmoid (1 - sigmoid)
        through_gate = torch.addcmul(gate, gate, gate, value=-1.0, out=scratch).mul_(x).mul_(grad_gated)
        grad_x = grad_gated.mul_(gate).addcmul_(through_gate, v.reshape(shape))
        grad_v = through_gate.mul_(x).sum((0, *spatial))
        # group std = sqrt(mean((x - mean)^2) + eps): d std / dx = (x - mean) / (L * std)
        grad_inv_std = (grad_scale * weight).view(n, groups, -1).sum(2, keepdim=True)  # (N, G, 1)
        values = x[0].numel() // groups
        k = -grad_inv_std / (group_std.square() * group_std * values)
        grad_x.view(n, groups, -1).addcmul_(x.view(n, groups, -1), k).sub_(group_mean * k)
        return grad_x, grad_v, grad_weight, grad_bias, None, None


class _EvoNorm(NormLayer):
    includes_activation = True

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        check_eps_momentum(self.norm_name, eps)
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))


@register("evonorm_b0", "EvoNorm-B0 (Liu et al. 2020): x / max(batch std, v*x + instance std); NCHW")
class EvoNormB0(_EvoNorm):
    batch_dependent = True
    device_fold = ("num_features",)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 unbiased_running: bool = True):
        super().__init__(num_features, eps)
        check_eps_momentum("evonorm_b0", eps, momentum)
        self.momentum = momentum
        self.unbiased_running = unbiased_running
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        check_spatial("evonorm_b0", x, self.num_features)
        check_values_per_statistic("evonorm_b0", x, x[0, 0].numel(), "instance (per sample and channel)",
                                   "evonorm_b0 needs feature maps larger than 1x1")
        dtype = compute_dtype(x)
        spatial = tuple(range(2, x.dim()))
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.training and not self.synchronised:
                batch_std = None  # the Function takes the local batch's from its per-sample moments
                values = x.numel() // x.shape[1]
                if values <= 1:  # a shape, not a tensor: no host synchronisation
                    raise single_value_error("evonorm_b0", x)
                count = torch.tensor(float(values), device=x.device)
            elif self.training:
                _, batch_var, count = batch_moments(x, [0, *spatial], self.process_group, who="evonorm_b0")
                batch_std = torch.sqrt(batch_var.to(dtype) + self.eps)
            else:
                batch_std = torch.sqrt(self.running_var.to(dtype) + self.eps)
            y, local_var = _EvoNormB0Function.apply(x.to(dtype), batch_std, self.v.to(dtype),
                                                    self.weight.to(dtype), self.bias.to(dtype), self.eps)
        if self.training:
            self.num_batches_tracked.add_(1)
            observed = (local_var if batch_std is None else batch_var).detach()
            update_running(self.running_var, unbiased(observed, count) if self.unbiased_running else observed,
                           self.momentum, self.num_batches_tracked)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"unbiased_running={self.unbiased_running}")


@register("evonorm_s0", "EvoNorm-S0 (Liu et al. 2020): x*sigmoid(v*x) / group std; NCHW")
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
        check_values_per_statistic("evonorm_s0", x, x[0].numel() // self.groups, "per-sample group",
                                   "use fewer groups or larger feature maps")
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = _EvoNormS0Function.apply(x.to(dtype), self.v.to(dtype), self.weight.to(dtype), self.bias.to(dtype),
                                         self.groups, self.eps)
        return keep_format(y.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"
