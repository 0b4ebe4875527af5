"""Precise (population) statistics for every layer that keeps running statistics.

Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (Sec. 3, "PreciseBN"; detectron2's
``update_bn_stats``): the EMA of batch statistics that BN evaluates with lags the weights and is
noisy, and much of BN's small-batch gap comes from it. Precise statistics replace it by the
population statistics of the final weights, computed exactly over many batches:

    mu = mean of every value a statistic covers, over all the batches
    sigma^2 = (sum (x - mu)^2) / (M - 1),  M = the number of those values

i.e. the plain mean and (Bessel-corrected, as torch keeps ``running_var``) variance of the pooled
values, not an average of per-batch variances (which misses the spread of the batch means). Each
layer's values are its inputs in a training-mode forward of the whole model, as detectron2 does, so
every earlier layer normalises as in training: with batch statistics, over the virtual devices'
slices when :func:`normlayers.set_virtual_devices` is set. The sums are accumulated in float64 per
batch from the batch's own two-pass moments (Chan et al.'s pairwise combination), so a mean far
from zero loses nothing.

Written back: ``running_mean`` and ``running_var`` when the layer has them; ``running_std`` (brn)
as sqrt(sigma^2 + eps), brn's own convention for it; EvoNorm-B0 has only ``running_var``. A layer
whose statistics are not per channel says which values each statistic covers with
``population_view(x) -> (view, dims)`` (bgn: per group of C*H*W). Every other buffer
(``num_batches_tracked``, a schedule's step) and the training mode are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlayers.base import NormLayer
from normlayers.virtual import folding_devices

SPREADS = ("running_var", "running_std")


def keeps_running_stats(module: nn.Module) -> bool:
    """A normlayers layer (or torch BatchNorm) with running statistics it evaluates with."""
    if isinstance(module, _BatchNorm) and not module.track_running_stats:
        return False
    if not isinstance(module, (NormLayer, _BatchNorm)):
        return False
    return any(getattr(module, name, None) is not None for name in SPREADS)


def population_view(layer: nn.Module, x: Tensor) -> tuple[Tensor, list[int]]:
    """``x`` as the layer's statistics see it, and the dims each statistic reduces (default: per channel)."""
    view = getattr(layer, "population_view", None)
    return view(x) if view is not None else (x, [0, *range(2, x.dim())])


class _Pooled:
    """Count, mean and sum of squared deviations of the values seen so far, per statistic, in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, values: Tensor, dims: list[int], devices: int = 1) -> None:
        """``devices`` > 1: ``values`` come from a folded forward (:mod:`normlayers.virtual`), so each
        statistic appears once per device, device-major; the devices' equal shares are pooled here."""
        n = 1
        for d in dims:
            n *= values.shape[d]
        var, mean = torch.var_mean(values.double(), dim=dims, correction=0)
        if devices > 1:
            var, mean = var.reshape(devices, -1), mean.reshape(devices, -1)
            pooled_mean = mean.mean(dim=0)
            var = var.mean(dim=0) + (mean - pooled_mean).square().mean(dim=0)
            mean, n = pooled_mean, n * devices
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total


@torch.no_grad()
def precise_stats(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Set every running statistic of ``model`` to the population statistics over ``batches``.

    ``batches`` yields model inputs (or ``(input, target)`` pairs). Returns the number of batches
    used. Raises ``ValueError`` when no batch is given or a statistic saw a single value.
    """
    layers = [m for m in model.modules() if keeps_running_stats(m)]
    pooled = {id(layer): _Pooled() for layer in layers}

    def collect(layer: nn.Module, inputs: tuple) -> None:
        # inside a folded forward the layer's channel and group counts are the fold's: its view of the folded
        # input holds every statistic once per device
        view, dims = population_view(layer, inputs[0])
        pooled[id(layer)].add(view, dims, folding_devices())

    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    modes = {module: module.training for module in model.modules()}
    hooks = [layer.register_forward_pre_hook(collect) for layer in layers]
    used = 0
    try:
        model.train()
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            used += 1
    finally:
        for hook in hooks:
            hook.remove()
        for name, buffer in model.named_buffers():
            buffer.copy_(saved[name])
        for module, training in modes.items():
            module.train(training)
    if not used:
        raise ValueError("precise_stats: no batches given; pass an iterable of model inputs")
    for layer in layers:
        stats = pooled[id(layer)]
        if stats.count <= 1:
            raise ValueError(f"precise_stats: {type(layer).__name__} saw one value per statistic; use more batches")
        var = stats.m2 / (stats.count - 1)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(stats.mean.reshape(layer.running_mean.shape))
        if getattr(layer, "running_var", None) is not None:
            layer.running_var.copy_(var.reshape(layer.running_var.shape))
        if getattr(layer, "running_std", None) is not None:
            layer.running_std.copy_(torch.sqrt(var + layer.eps).reshape(layer.running_std.shape))
    return used
