"""Cross-Iteration Batch Normalization (CBN).

Yao, Cao, Zheng, Huang & Lin, "Cross-Iteration Batch Normalization", CVPR 2021 (arXiv:2002.05712),
Sec. 3. Reference code: github.com/Howal/Cross-iterationBatchNorm (``mmdet/models/utils/CBN.py``).

Layer l normalises the output of the weight layer before it, whose weights at iteration t are
theta_t. Per channel, over the batch and positions, iteration t's statistics are the mean and the
mean square, mu_t(theta_t) = E[x], nu_t(theta_t) = E[x^2]. Statistics of iteration t - tau were
computed with theta_{t-tau}; a first-order Taylor expansion in the preceding layer's weights
(the paper shows the gradients w.r.t. earlier layers are negligible) carries them to theta_t:

    mu_{t-tau}(theta_t) ~ mu_{t-tau}(theta_{t-tau}) + d mu_{t-tau}/d theta_{t-tau} . (theta_t - theta_{t-tau})
    nu_{t-tau}(theta_t) ~ nu_{t-tau}(theta_{t-tau}) + d nu_{t-tau}/d theta_{t-tau} . (theta_t - theta_{t-tau})

The mean is linear in theta, so its compensation is exact; the mean square's is first order.
Channel c of a convolution or linear layer depends only on row c of its weight (and bias), so the
gradient of sum_c mu_c w.r.t. theta holds each channel's own gradient in row c, and the dot product
is taken row by row. The statistics actually used average the current iteration with the last k:

    mu_bar = 1/n sum_tau mu_{t-tau}(theta_t),   nu_bar = 1/n sum_tau nu_{t-tau}(theta_t),
    sigma_bar^2 = nu_bar - mu_bar^2,            y = gamma (x - mu_bar) / sqrt(sigma_bar^2 + eps) + beta

where, as in the reference code, a buffered iteration whose compensated variance nu - mu^2 is
negative is discarded per channel and n counts the iterations kept (the paper's Eq. for nu_bar
clamps with max(nu, mu^2) instead). Each iteration is kept as its mean and variance (not the mean
square) and sigma_bar^2 is pooled by the law of total variance, mean(var_i) + mean((mu_i - mu_bar)^2):
the same quantity, without E[x^2] - E[x]^2 cancelling when |mean| >> std. The buffer is used only after a burn-in
of ``burnin`` training steps of this layer's own counter (``num_batches_tracked``); it is filled
during the last k of them. Defaults: k = 3 as in the reference code; burnin = 500 steps (the
reference burns in for 8 of 12 epochs of detection training: set it per experiment). ``k = 0`` is
plain BN. ``compensate = False`` averages the raw buffered statistics (the paper's "naive"
baseline). The buffered statistics and gradients are constants: gradients flow through the current
iteration's statistics only.

Running mean and (unbiased) variance track the current batch's statistics with torch's momentum
convention, and eval uses them, as BN does. The buffer is training state, not model state: it is
not saved in ``state_dict`` and refills within k steps after a resume.

Synchronised (``process_group`` set), the statistics are the group's, from
:func:`normlayers.stats.batch_moments`; each rank differentiates its own slice's share of them, and
the compensation terms (k x 2 x C values) are summed over the group in one more all-reduce, made
only in steps that use the buffer.

A model binds the preceding layer with ``layer.bind_preceding(conv)`` (a ``Conv1d/2d/3d`` or
``Linear`` with ``num_features`` output channels). The reference is kept out of the module tree,
so the conv's parameters are not counted twice in ``parameters()`` or ``state_dict()``.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from normlayers.base import NormLayer, check_eps_momentum, check_weight_layer
from normlayers.batchnorm import check_channels
from normlayers.fused import scale_shift
from normlayers.registry import register
from normlayers.stats import batch_moments, channel_shape, compute_dtype, keep_format, unbiased, update_running


class _Iteration(NamedTuple):
    """One buffered iteration: its mean and (biased) variance, their gradients and the weights they
    were taken at."""

    mean: Tensor
    var: Tensor
    grad_mean: tuple[Tensor, ...]
    grad_var: tuple[Tensor, ...]
    params: tuple[Tensor, ...]


def normalize_with(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> Tensor:
    """gamma (x - mean) / sqrt(var + eps) + beta in float32 (float64 for float64 input), with the
    per-channel scale formed first (two passes over x; subtracting the mean first keeps precision
    when |mean| >> std)."""
    dtype = compute_dtype(x)
    scale = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shape = channel_shape(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        centred = x.to(dtype) - mean.to(dtype).reshape(shape)
        if bias is None:
            return keep_format((centred * scale.reshape(shape)).to(x.dtype), x)
        return keep_format(scale_shift(centred, scale.reshape(shape), bias.to(dtype).reshape(shape)).to(x.dtype), x)


def _per_channel_dot(grads: tuple[Tensor, ...], deltas: tuple[Tensor, ...]) -> Tensor:
    return sum((g * d.to(g.dtype)).reshape(g.shape[0], -1).sum(1) for g, d in zip(grads, deltas, strict=True))


@register("cbn", "Cross-Iteration BN (Yao et al. 2020): current + last k iterations, Taylor-compensated")
class CrossIterationBatchNorm(NormLayer):
    batch_dependent = True
    needs_preceding_weight = True
    device_state = ("_history",)  # each (virtual) device buffers its own past iterations

    def __init__(
        self,
        num_features: int,
        k: int = 3,
        burnin: int = 500,
        compensate: bool = True,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ):
        super().__init__()
        if k < 0:
            raise ValueError(f"cbn: k (previous iterations to use) must be >= 0, got {k}")
        if burnin < 0:
            raise ValueError(f"cbn: burnin (steps before the buffer is used) must be >= 0, got {burnin}")
        check_eps_momentum("cbn", eps, momentum)
        self.num_features = num_features
        self.k = k
        self.burnin = burnin
        self.compensate = compensate
        self.eps = eps
        self.momentum = momentum
        self.init_affine(num_features, affine)
        self.init_running_stats(num_features)
        self._history: deque[_Iteration] = deque(maxlen=max(k, 1))
        # a plain attribute, not a submodule: the conv belongs to the model, not to this layer
        self.__dict__["_preceding"] = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, k={self.k}, burnin={self.burnin}, compensate={self.compensate}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )

    def bind_preceding(self, module: nn.Module) -> None:
        check_weight_layer("cbn", module, self.num_features)
        self.__dict__["_preceding"] = module
        self._history.clear()

    @property
    def preceding(self) -> nn.Module | None:
        return self.__dict__["_preceding"]

    def _preceding_params(self) -> tuple[Tensor, ...]:
        conv = self.preceding
        params = [conv.weight]
        if conv.bias is not None and conv.bias.requires_grad:
            params.append(conv.bias)
        return tuple(params)

    def compensated_history(self) -> list[tuple[Tensor, Tensor]]:
        """The buffered iterations' (mean, biased variance) per channel, carried to the current weights
        (newest first); with ``compensate=False``, as they were recorded.

        The paper compensates the mean mu and the mean square nu and takes nu - mu^2. The same
        first-order step written on the variance is, exactly, var + dvar . delta - (dmu . delta)^2
        (dvar = dnu - 2 mu dmu): no E[x^2] - E[x]^2 is ever formed, so a mean far above the spread
        costs no precision (in float32 the mean-square form loses the variance at |mean|/std ~ 1e3).
        """
        if not self._history:
            return []
        if not self.compensate:
            return [(it.mean, it.var) for it in self._history]
        now = tuple(p.detach() for p in self._preceding_params())
        corrections = torch.stack([
            torch.stack([_per_channel_dot(it.grad_mean, deltas), _per_channel_dot(it.grad_var, deltas)])
            for it in self._history
            for deltas in [tuple(n - p for n, p in zip(now, it.params, strict=True))]
        ])
        if self.synchronised:
            # each rank holds its slice's share of the gradients: the sum over ranks is the global one
            dist.all_reduce(corrections, group=self.process_group)
        return [(it.mean + c[0], it.var + c[1] - c[0] * c[0]) for it, c in zip(self._history, corrections, strict=True)]

    def _record(self, x: Tensor, dims: list[int], mean: Tensor, var: Tensor, count: Tensor) -> None:
        """Buffer this iteration: its statistics, their gradients w.r.t. the preceding layer, its weights."""
        params = self._preceding_params()
        if self.synchronised:
            # Differentiate this rank's share instead of the global statistics: no all-reduce in this
            # backward; the shares are summed in compensated_history. With s_r = n_r / N, the global
            # mean is sum_r s_r mu_r and var = sum_r s_r (var_r + (mu_r - mu)^2), whose gradient is
            # the sum over ranks of the gradient of s_r (var_r + (mu_r - mu)^2) with mu held fixed.
            local_mean, local_var, local_count = batch_moments(x, dims, None, who="cbn")
            share = local_count / count
            outputs = (local_mean * share, (local_var + (local_mean - mean.detach()).square()) * share)
        else:
            outputs = (mean, var)
        ones = torch.ones_like(mean)
        # sum over channels of mu_c: row c of the gradient is d mu_c / d theta_c (see the docstring)
        grad_mean = torch.autograd.grad(outputs[0], params, ones, retain_graph=True, allow_unused=True)
        grad_var = torch.autograd.grad(outputs[1], params, ones, retain_graph=True, allow_unused=True)
        if any(g is None for g in grad_mean + grad_var):
            raise ValueError(
                "cbn: the input does not depend on the bound layer's weight; call bind_preceding with the "
                "layer whose output this layer normalises"
            )
        dtype = mean.dtype
        self._history.appendleft(_Iteration(
            mean.detach(), var.detach(),
            tuple(g.detach().to(dtype) for g in grad_mean), tuple(g.detach().to(dtype) for g in grad_var),
            tuple(p.detach().clone() for p in params),
        ))

    def _combine(self, batch_mean: Tensor, batch_var: Tensor) -> tuple[Tensor, Tensor]:
        """mu_bar and sigma_bar^2 over the current and the buffered iterations with valid variance.

        sigma_bar^2 = mean_i nu_i - mu_bar^2 is pooled by the law of total variance,
        mean_i var_i + mean_i (mu_i - mu_bar)^2: the same value without the cancellation."""
        iterations = [(batch_mean, batch_var, torch.ones_like(batch_mean))]
        for old_mean, old_var in self.compensated_history():
            iterations.append((old_mean, old_var, (old_var >= 0).to(batch_mean.dtype)))
        kept = sum(valid for _, _, valid in iterations)
        mean = sum(m * valid for m, _, valid in iterations) / kept
        within = sum(v * valid for _, v, valid in iterations) / kept
        between = sum((m - mean).square() * valid for m, _, valid in iterations) / kept
        return mean, within + between

    def forward(self, x: Tensor) -> Tensor:
        check_channels("cbn", x, self.num_features)
        if not self.training:
            return normalize_with(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)

        dims = [0, *range(2, x.dim())]
        mean, var, count = batch_moments(x, dims, self.process_group, who="cbn")
        self.num_batches_tracked.add_(1)
        update_running(self.running_mean, mean, self.momentum, self.num_batches_tracked)
        update_running(self.running_var, unbiased(var, count), self.momentum, self.num_batches_tracked)

        conv = self.preceding
        cross_iteration = (
            self.k > 0 and conv is not None and torch.is_grad_enabled() and x.requires_grad
            and conv.weight.requires_grad
        )
        if cross_iteration:
            mean, var = self._cross_iteration(x, dims, mean, var, count)
        return normalize_with(x, mean, var, self.weight, self.bias, self.eps)

    @torch.compiler.disable
    def _cross_iteration(self, x: Tensor, dims: list[int], batch_mean: Tensor, batch_var: Tensor,
                         count: Tensor) -> tuple[Tensor, Tensor]:
        """The statistics pooled with the buffered iterations, and this one buffered.

        Driven from the host anyway (a Python buffer of iterations, autograd.grad inside the forward),
        so the step is read here only: plain BN steps (k=0, no bound layer, no grad) make no host
        synchronisation and compile as one graph. Run eagerly under torch.compile: traced, the step
        read and the buffer's length were guards that changed every step (a recompile per step until
        the limit); disabled, a compiled model breaks its graph here, once per layer call."""
        step = int(self.num_batches_tracked.item())
        mean, var = batch_mean, batch_var
        if step > self.burnin and self._history:
            mean, var = self._combine(batch_mean, batch_var)
        if step + self.k > self.burnin:
            self._record(x, dims, batch_mean, batch_var, count)
        return mean, var
