"""Batch statistics: the one place where statistics cross the batch (and, when asked, processes).

Every batch-dependent layer gets its mean and variance from :func:`batch_moments`. With a process
group it packs the sample count, the sums and the sums of squares of its slice (in float64, built
from the slice's own two-pass mean and variance) into a single tensor and all-reduces it once, so
the statistics equal those of one process holding the whole global batch, whatever the per-rank
batch sizes. The all-reduce is differentiable (the backward of a sum all-reduce is a sum all-reduce
of the gradients). Statistics are computed with autocast off, in float32 for float32 and
low-precision input and in float64 for float64 input (:func:`compute_dtype`). Synchronised, the
variance is E[x^2] - E[x]^2 of float64 sums, which keeps float32 statistics exact but leaves float64
ones a relative error of about 1e-16 * (mean / std)^2 (4e-8 at mean 1e4, std 0.5); locally, float64
statistics are two-pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from normlayers.fused import var_mean as fused_var_mean


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum all-reduce: each rank's output is the group's sum, so the gradient that
    reaches a rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def reduce_sum(packed: Tensor, group) -> Tensor:
    """Sum ``packed`` over the process group, with gradients flowing back to every rank."""
    return _AllReduceSum.apply(packed, group)


def batch_moments(
    x: Tensor,
    dims: Sequence[int],
    group=None,
    who: str = "normalization layer",
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of ``x`` over ``dims``, in :func:`compute_dtype`, and the number of values.

    Returns ``(mean, var, count)``; ``mean`` and ``var`` have the shape of ``x`` with ``dims``
    removed, ``count`` is a scalar tensor of the same dtype (values per statistic, over the whole group).
    ``group`` of ``None`` means the local batch only. Raises ``ValueError`` when a local statistic
    would come from a single value (``who`` names the layer in the message). The check reads shapes
    only: no value leaves the device, so a forward makes no host synchronisation and compiles as one
    graph. Synchronised, the group's count is known only after the all-reduce; refusing on it would
    cost one host synchronisation per layer per step, so a group holding a single value per
    statistic gets a zero variance (and an all-empty group a zero mean) instead of an error.
    """
    dims = tuple(d % x.dim() for d in dims)
    dtype = compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.to(dtype)
        local_count = 1
        for d in dims:
            local_count *= x.shape[d]
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            if local_count <= 1:
                raise single_value_error(who, x)
            var, mean = _var_mean(xf, dims, local_count)
            return mean, var, torch.tensor(float(local_count), dtype=dtype, device=x.device)
        if local_count > 0:
            # Local moments by torch's stable two-pass var_mean, shifted to the origin in float64: the float32
            # E[x^2] - E[x]^2 of the global values loses the variance once |mean| >> std (0.5% error at
            # mean/std = 100, 70% at 1000). The sum is rebuilt from the same local mean so the two agree.
            local_var, local_mean = _var_mean(xf, dims, local_count)
            mean64 = local_mean.double()  # one cast, so the backward also sums the mean's two paths in float64
            sums = mean64 * local_count
            sq_sums = (local_var.double() + mean64.square()) * local_count
        else:
            # an empty slice adds zeros but stays in the graph, so this rank joins the backward all-reduce
            zeros = xf.sum(dim=dims).double()
            sums, sq_sums = zeros, zeros
        count = torch.full((1,), float(local_count), dtype=torch.float64, device=x.device)
        packed = torch.cat([count, sums.reshape(-1), sq_sums.reshape(-1)])
        total = reduce_sum(packed, group)
        n = total[0]
        k = sums.numel()
        safe_n = n.clamp_min(1.0)  # a group without values: zeros, not NaN (see the docstring)
        mean = total[1 : 1 + k] / safe_n
        var = (total[1 + k :] / safe_n - mean * mean).clamp_min(0.0)
        return mean.to(dtype).reshape(sums.shape), var.to(dtype).reshape(sums.shape), n.to(dtype).detach()


def blocks_gram(centred: Tensor) -> Tensor:
    """sum over n and p of ``centred[n, g, :, p] centred[n, g, :, p]^T``: (N, G, d, P) -> (G, d, d).

    Computed on the blocks as they lie in an NCHW tensor (one d x P matrix per sample and group), so
    the input is never transposed into (G, d, N*P) first; (N, C) input (P = 1) is one (G, d, N) product.
    """
    if centred.shape[-1] == 1:
        vectors = centred.squeeze(-1).permute(1, 2, 0)
        return vectors @ vectors.transpose(1, 2)
    return (centred @ centred.transpose(-1, -2)).sum(0)


def blocks_apply(matrices: Tensor, blocks: Tensor) -> Tensor:
    """``matrices[g] @ blocks[n, g]`` for every sample n: (G, d, d) x (N, G, d, P) -> (N, G, d, P)."""
    if blocks.shape[-1] == 1:
        return (matrices @ blocks.squeeze(-1).permute(1, 2, 0)).permute(2, 0, 1).unsqueeze(-1)
    return matrices @ blocks


def batch_covariance(x: Tensor, group=None, who: str = "normalization layer") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean and biased covariance of the d-dimensional vectors ``x[n, g, :, p]`` over ``n`` and ``p``
    (and over the process group).

    ``x`` is ``(N, G, d, P)``: an NCHW tensor's view with its C channels split into G groups of d and
    its P = H*W positions flattened, M = N*P vectors per group on this rank. Returns ``(mean (G, d),
    cov (G, d, d), count, centred)`` in :func:`compute_dtype`, ``centred`` being ``x`` minus the mean
    (what the whitening is applied to). The whitening layers' analogue of :func:`batch_moments`,
    synchronised the same way: each rank packs its count, its sums and its sums of outer products
    (float64, built from its own centred covariance) into one tensor and all-reduces it once,
    differentiably; ``centred`` is then centred on the group's mean.
    """
    dtype = compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.to(dtype)
        local_count = x.shape[0] * x.shape[3]
        synced = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
        if not synced:
            if local_count <= 1:
                raise single_value_error(who, x)
            mean = xf.mean(dim=(0, 3), keepdim=True)
            centred = xf - mean
            return mean.reshape(mean.shape[1:3]), blocks_gram(centred) / local_count, \
                torch.tensor(float(local_count), dtype=dtype, device=x.device), centred
        groups, dims = x.shape[1:3]
        if local_count > 0:
            local_mean = xf.mean(dim=(0, 3), keepdim=True)
            mean64 = local_mean.reshape(groups, dims, 1).double()
            sums = mean64.squeeze(2) * local_count
            outer = blocks_gram(xf - local_mean).double() + mean64 @ mean64.transpose(1, 2) * local_count
        else:
            zeros = xf.sum(dim=(0, 3)).double()
            sums, outer = zeros, zeros[:, :, None] * zeros[:, None, :]
        count = torch.full((1,), float(local_count), dtype=torch.float64, device=x.device)
        total = reduce_sum(torch.cat([count, sums.reshape(-1), outer.reshape(-1)]), group)
        n = total[0]
        safe_n = n.clamp_min(1.0)  # no host synchronisation on the group's count (see batch_moments)
        mean = total[1 : 1 + groups * dims].reshape(groups, dims) / safe_n
        cov = total[1 + groups * dims :].reshape(groups, dims, dims) / safe_n - mean[:, :, None] * mean[:, None, :]
        mean = mean.to(dtype)
        return mean, cov.to(dtype), n.to(dtype).detach(), xf - mean[None, :, :, None]


def _var_mean(xf: Tensor, dims: tuple[int, ...], count: int) -> tuple[Tensor, Tensor]:
    """Biased variance and mean over ``dims``, two-pass (as stable as ``torch.var_mean``). On CPU,
    ``var_mean`` over several dims is about 40x slower than a sum: :func:`normlayers.fused.var_mean`
    instead (the same two passes, its backward one pass over ``xf``)."""
    if xf.device.type != "cpu":
        return torch.var_mean(xf, dim=dims, correction=0)
    return fused_var_mean(xf, dims, count)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16 input, the input's own dtype when it is wider (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def keep_format(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in ``x``'s memory format: channels_last input gives channels_last output."""
    for dim, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == dim == y.dim() and not x.is_contiguous() and x.is_contiguous(memory_format=layout):
            return y.contiguous(memory_format=layout)
    return y


def check_values_per_statistic(who: str, x: Tensor, values: int, what: str, advice: str) -> None:
    """One clear error when a per-sample statistic (``what``, e.g. "group") would come from one value:
    its variance would be zero and the output the bias alone (or x / sqrt(eps)), in train and eval."""
    if values <= 1:
        raise ValueError(
            f"{who}: each {what} statistic needs more than one value, got {values} from input of shape "
            f"{tuple(x.shape)}; {advice}"
        )


def single_value_error(who: str, x: Tensor) -> ValueError:
    return ValueError(
        f"{who}: training needs more than one value per statistic to compute batch statistics, "
        f"got input of shape {tuple(x.shape)}; use a larger batch, a per-sample norm (gn, ln, in, "
        f"frn), or put the layer in eval mode"
    )


@torch.no_grad()
def update_running(
    running: Tensor, batch_value: Tensor, momentum: float | None, num_batches_tracked: Tensor | None
) -> None:
    """torch's convention: ``running = (1 - momentum) * running + momentum * batch``;
    ``momentum=None`` is the cumulative average over the batches seen so far (its factor stays a
    tensor on the device: no host synchronisation)."""
    if momentum is None and num_batches_tracked is not None:
        factor = 1.0 / num_batches_tracked.to(running.dtype)
    else:
        factor = 0.1 if momentum is None else momentum
    running.lerp_(batch_value.to(running.dtype), factor)


def unbiased(var: Tensor, count: Tensor) -> Tensor:
    """Bessel's correction of a biased variance from ``count`` values (as torch's running_var)."""
    return var * (count / (count - 1).clamp_min(1.0))


def channel_shape(x: Tensor, channel_dim: int = 1) -> list[int]:
    """Shape that broadcasts a per-channel vector against ``x`` (NC, NCL or NCHW)."""
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    return shape


def affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``y * weight + bias`` with per-channel parameters broadcast over dim 1."""
    if weight is not None:
        y = y * weight.reshape(channel_shape(y))
    if bias is not None:
        y = y + bias.reshape(channel_shape(y))
    return y
