"""Synchronised statistics: batch statistics over a process group, for every batch-dependent variant.

What is synchronised
    Every :class:`~normlayers.NormLayer` whose ``batch_dependent`` is true (``bn``, ``brn``, ``bgn``,
    ``evonorm_b0``, ``ghost``, ``sn``, ``dbn``, ``iternorm`` and the batch-dependent advanced variants;
    the whitening layers through :func:`normlayers.stats.batch_covariance`, the others through
    :func:`normlayers.stats.batch_moments`). :func:`convert_sync` sets
    the layer's ``process_group``; the layer then takes its cross-batch statistics over the union
    of the group's batches. Per-sample statistics (EvoNorm-B0's instance std, IEBN's pooling, ...) and
    parameters are untouched; parameters are averaged by DDP as usual.

How
    A layer's batch statistics come from :func:`normlayers.stats.batch_moments`. With a group set,
    each rank packs its sample count, sums and sums of squares (float64, from its own two-pass
    mean and variance, so a mean much larger than the spread loses nothing) into one tensor and
    all-reduces it once: one collective per layer call, and counts may differ between ranks
    (3 and 5 give exactly what one process with 8 gets). The all-reduce is differentiable
    (its backward all-reduces the gradients of those sums), so input and parameter gradients are
    those of the global batch too. Running statistics are updated from the global statistics, so
    they are identical on every rank.

Ghost batches
    Ghost Batch Normalization (Hoffer et al. 2017) normalises each virtual batch of
    ``virtual_batch`` consecutive samples on its own. Synchronised, the ghost batches are those of
    the global batch: the ranks' batches concatenated in rank order are cut into ghost batches
    exactly as one process holding them all would cut them, and each ghost batch's statistics are
    reduced over its samples wherever they live (a ghost batch spans two ranks when a rank's batch
    is not a multiple of ``virtual_batch``). The result, running statistics included, does not
    depend on how the batch is split across devices, and ``virtual_batch`` keeps its meaning (it is
    not multiplied by the number of ranks). Placing its samples in the global batch costs a ghost
    layer one more, tiny collective (the ranks' sample counts) before its packed all-reduce; see
    :func:`ghost_moments`.

Why not Lightning's ``sync_batchnorm=True``
    It calls ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which replaces every
    ``_BatchNorm`` subclass (our ``bn`` and ``ic``) by a plain ``torch.nn.SyncBatchNorm``: the
    variant's own forward (IC's dropout) silently becomes plain BN. The other batch-dependent
    variants (``brn``, ``bgn``, ``evonorm_b0``, ``ghost``, ...) are left unsynchronised without a
    word. torch's SyncBatchNorm also refuses CPU tensors, so it cannot train on gloo/CPU at all.
    :func:`convert_sync` keeps every layer's class and forward and only sets its process group;
    ``trainer.norm_sync.NormSyncPlugin`` applies it through Lightning's ``LayerSync`` interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlayers.base import NormLayer
from normlayers.stats import compute_dtype, reduce_sum, single_value_error


def convert_sync(model: nn.Module, group=None) -> nn.Module:
    """Make every batch-dependent normlayers layer in ``model`` compute its statistics over ``group``.

    ``group`` of ``None`` means the whole world (``torch.distributed.group.WORLD``). Works in place
    and returns ``model``. torch's own BatchNorm modules are rejected: they would stay local.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "convert_sync: torch.distributed is not initialised; call torch.distributed.init_process_group "
            "first (Lightning's DDP strategy does so before it applies NormSyncPlugin)"
        )
    foreign = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and not isinstance(module, (NormLayer, nn.SyncBatchNorm))
    ]
    if foreign:
        raise ValueError(
            f"convert_sync: {', '.join(foreign)} is torch's {type(model.get_submodule(foreign[0])).__name__}, "
            f"which convert_sync cannot synchronise; build it with normlayers.build_norm('bn', channels)"
        )
    virtual = [name or type(model).__name__ for name, module in model.named_modules()
               if isinstance(module, NormLayer) and module.virtual_devices > 1]
    if virtual:
        raise ValueError(f"convert_sync: {virtual[0]} has virtual devices (set_virtual_devices); virtual devices and "
                         f"synchronised statistics do not combine")
    group = dist.group.WORLD if group is None else group
    for module in model.modules():
        if isinstance(module, NormLayer) and module.batch_dependent:
            module.process_group = group
    return model


def revert_sync(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync`: every normlayers layer in ``model`` goes back to local statistics."""
    for module in model.modules():
        if isinstance(module, NormLayer):
            module.process_group = None
    return model


@dataclass
class GhostMoments:
    """Per-channel statistics of the ghost batches a ghost layer's local samples belong to.

    ``mean``/``var`` (biased): ``(num_ghost_batches, C)`` in ghost-batch order over the global batch,
    float32 (float64 for float64 input); ``count``: values per statistic of one ghost batch (a scalar);
    ``ghost_of_sample``: ``(local N,)`` index of each local sample's ghost batch.
    """

    mean: Tensor
    var: Tensor
    count: Tensor
    ghost_of_sample: Tensor


def ghost_moments(x: Tensor, virtual_batch: int, group=None, who: str = "ghost") -> GhostMoments:
    """Mean and biased variance per channel (dim 1) of each ghost batch of ``virtual_batch`` samples.

    Without a group (or in a world of one) the ghost batches cut the local batch. With a group they
    cut the global batch, the ranks' batches concatenated in rank order: an all-reduce of the ranks'
    sample counts places the local samples, then one packed, differentiable all-reduce sums each
    ghost batch's float64 sums and sums of squares. ``virtual_batch`` must divide the (global) batch.
    """
    local_n, channels = x.shape[0], x.shape[1]
    positions = math.prod(x.shape[2:])
    synced = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
    offset, total_n = 0, local_n
    if synced:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        counts = torch.zeros(world, dtype=torch.int64, device=x.device)
        counts[rank] = local_n
        dist.all_reduce(counts, group=group)
        counts = counts.tolist()
        offset, total_n = sum(counts[:rank]), sum(counts)
    where = f"the global batch of {total_n} samples" if synced else f"the batch of {total_n} samples"
    if total_n == 0 or total_n % virtual_batch:
        raise ValueError(
            f"{who}: virtual_batch={virtual_batch} does not divide {where}; use a batch size that is a "
            f"multiple of {virtual_batch} or a virtual_batch that divides {total_n}"
        )
    if virtual_batch * positions <= 1:
        raise single_value_error(who, x)
    dtype = compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.to(dtype).reshape(local_n, channels, positions)
        # per-sample two-pass moments over the positions, combined per ghost batch in float64, so a
        # ghost batch split between ranks gets exactly the statistics of its samples together
        sample_var, sample_mean = torch.var_mean(xf, dim=2, unbiased=False)
        ghost_of_sample = torch.div(torch.arange(local_n, device=x.device) + offset, virtual_batch,
                                    rounding_mode="floor")
        num_ghosts = total_n // virtual_batch
        zeros = torch.zeros(num_ghosts, channels, dtype=torch.float64, device=x.device)
        mean64 = sample_mean.double()
        sums = zeros.index_add(0, ghost_of_sample, mean64 * positions)
        sq_sums = zeros.index_add(0, ghost_of_sample, (sample_var.double() + mean64.square()) * positions)
        if synced:
            sums, sq_sums = reduce_sum(torch.cat([sums, sq_sums], dim=1), group).split(channels, dim=1)
        count = float(virtual_batch * positions)
        mean = sums / count
        var = (sq_sums / count - mean * mean).clamp_min(0.0)
    return GhostMoments(
        mean=mean.to(dtype),
        var=var.to(dtype),
        count=torch.tensor(count, dtype=dtype, device=x.device),
        ghost_of_sample=ghost_of_sample,
    )
