"""Ghost Batch Normalization.

Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization gap in
large batch training of neural networks", NeurIPS 2017 (Sec. 4, Algorithm 1). The batch of N
samples is split into N / v consecutive "ghost" batches of ``virtual_batch`` = v samples, and
each is batch-normalized with its own statistics. For ghost batch k and channel c:

    mu_{k,c} = mean_{n in k, h, w} x,   sigma_{k,c}^2 = mean_{n in k, h, w} (x - mu_{k,c})^2
    y = gamma_c * (x - mu_{k,c}) / sqrt(sigma_{k,c}^2 + eps) + beta_c

v = N is plain BN. Eval uses the running statistics, like BN. The running mean and unbiased
variance are updated once per ghost batch, in order. The paper does not say with which momentum
(its Algorithm 1 is written for one ghost batch). ``running_update="per_step"`` (default) uses
``momentum / (N / v)`` per ghost batch, as composer's GhostBatchNorm does, so a step moves them
about as far as one BN step would and a momentum tuned for BN keeps its meaning whatever v is.
``running_update="per_ghost"`` applies the full ``momentum`` at every ghost batch, as a BN layer
run on the ghost batches one after another would (the running statistics then forget K times
faster per step). The K sequential updates are applied in closed form: weight a(1-a)^(K-1-k) for
ghost batch k, a the per-ghost-batch momentum. ``momentum=None`` keeps torch's cumulative average
over steps, of the ghost batches' mean, in both.

Synchronised (``process_group`` set, see :func:`normlayers.convert_sync`): the ghost batches are
those of the global batch (the ranks' batches concatenated in rank order), cut exactly as one
process holding the whole batch would cut them; a ghost batch may span two ranks. Statistics come
from :func:`normlayers.sync.ghost_moments`; ``virtual_batch`` must divide the (global) batch.
Unsynchronised, the ghost batches are a reshape of the local batch and their statistics come from
:func:`normlayers.stats.batch_moments` in one reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers.base import NormLayer, check_eps_momentum
from normlayers.batchnorm import check_channels
from normlayers.fused import scale_shift
from normlayers.groupnorm import compute_dtype
from normlayers.registry import register
from normlayers.stats import batch_moments, keep_format, unbiased, update_running
from normlayers.sync import ghost_moments

#: the momentum of one ghost batch's update: momentum / (N / v) ("per_step") or momentum ("per_ghost")
RUNNING_UPDATES = ("per_step", "per_ghost")


@register("ghost", "Ghost Batch Normalization (Hoffer et al. 2017): BN over virtual batches; NC or NCHW")
class GhostBatchNorm(NormLayer):
    batch_dependent = True
    device_fold = ("num_features",)

    def __init__(
        self,
        num_features: int,
        virtual_batch: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        running_update: str = "per_step",
    ):
        super().__init__()
        check_eps_momentum("ghost", eps, momentum)
        if running_update not in RUNNING_UPDATES:
            raise ValueError(
                f"ghost: running_update must be one of {', '.join(RUNNING_UPDATES)}, got {running_update!r}"
            )
        self.running_update = running_update
        if virtual_batch < 1:
            raise ValueError(f"ghost: virtual_batch must be a positive number of samples, got {virtual_batch}")
        self.num_features = num_features
        self.virtual_batch = virtual_batch
        self.eps = eps
        self.momentum = momentum
        self.init_affine(num_features, affine)
        self.init_running_stats(num_features)

    def forward(self, x: Tensor) -> Tensor:
        check_channels("ghost", x, self.num_features)
        if not self.training:
            return self._normalize(x.unsqueeze(0), self.running_mean[None], self.running_var[None]).squeeze(0)
        if self.virtual_batch * x[0, 0].numel() <= 1 and not self.synchronised:
            raise ValueError(
                f"ghost: training needs more than one value per statistic, but virtual_batch=1 on input of shape "
                f"{tuple(x.shape)} gives one; use virtual_batch >= 2 (or a per-sample norm: gn, ln, frn)"
            )
        if self.synchronised:
            moments = ghost_moments(x, self.virtual_batch, self.process_group, who="ghost")
            count = moments.count
            self._update_running(moments.mean.detach(), unbiased(moments.var.detach(), count), len(moments.mean))
            # each sample as a ghost batch of one, with the statistics of the ghost batch it belongs to
            index = moments.ghost_of_sample
            return self._normalize(x.unsqueeze(1), moments.mean[index], moments.var[index]).squeeze(1)
        # locally the ghost batches are a reshape: one fused reduction instead of a per-sample gather
        batch = x.shape[0]
        if batch % self.virtual_batch:
            raise ValueError(
                f"ghost: virtual_batch={self.virtual_batch} does not divide the batch of {batch} samples; "
                f"use a batch size that is a multiple of {self.virtual_batch} or a virtual_batch that divides {batch}"
            )
        chunks = batch // self.virtual_batch
        dtype = compute_dtype(x)
        if self.momentum is not None and self.running_mean.dtype == dtype:
            return self._native_forward(x, chunks, dtype)
        ghosts = x.reshape(chunks, self.virtual_batch, *x.shape[1:])
        mean, var, count = batch_moments(ghosts, [1, *range(3, ghosts.dim())], who="ghost")
        self._update_running(mean.detach(), unbiased(var.detach(), count), chunks)
        return self._normalize(ghosts, mean, var).reshape(x.shape)

    def _native_forward(self, x: Tensor, chunks: int, dtype: torch.dtype) -> Tensor:
        """Each ghost batch is a contiguous slice of the batch: torch's own batch-norm kernel on each,
        in order, which also applies the K sequential running updates (momentum per ghost batch as
        :meth:`_update_running` does in closed form); about half the cost of the moments chain on CPU."""
        per_chunk = self.momentum / chunks if self.running_update == "per_step" else self.momentum
        self.num_batches_tracked.add_(1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight = None if self.weight is None else self.weight.to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            parts = [F.batch_norm(ghost, self.running_mean, self.running_var, weight, bias, True, per_chunk, self.eps)
                     for ghost in x.to(dtype).split(self.virtual_batch)]
            y = torch.cat(parts) if chunks > 1 else parts[0]
        return keep_format(y.to(x.dtype), x)

    def _normalize(self, ghosts: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """``ghosts`` is (K, v, C, ...), ``mean`` and ``var`` are (K, C)."""
        dtype = compute_dtype(ghosts)
        shape = [ghosts.shape[0], 1, self.num_features] + [1] * (ghosts.dim() - 3)
        with torch.autocast(device_type=ghosts.device.type, enabled=False):
            scale = torch.rsqrt(var.to(dtype) + self.eps)
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)
            shift = -mean.to(dtype) * scale
            if self.bias is not None:
                shift = shift + self.bias.to(dtype)
            y = scale_shift(ghosts.to(dtype), scale.reshape(shape), shift.reshape(shape))
        return y.to(ghosts.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, chunks: int) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            update_running(self.running_mean, mean.mean(0), None, self.num_batches_tracked)
            update_running(self.running_var, var.mean(0), None, self.num_batches_tracked)
            return
        per_chunk = self.momentum / chunks if self.running_update == "per_step" else self.momentum
        effective = 1.0 - (1.0 - per_chunk) ** chunks
        if effective == 0.0:
            return
        # after K updates running = (1-a)^K running + sum_k a(1-a)^(K-1-k) stat_k; as one lerp:
        exponents = torch.arange(chunks - 1, -1, -1, device=mean.device, dtype=mean.dtype)
        weights = (per_chunk * (1.0 - per_chunk) ** exponents / effective)[:, None]
        update_running(self.running_mean, (weights * mean).sum(0), effective, self.num_batches_tracked)
        update_running(self.running_var, (weights * var).sum(0), effective, self.num_batches_tracked)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, virtual_batch={self.virtual_batch}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, running_update={self.running_update}")
