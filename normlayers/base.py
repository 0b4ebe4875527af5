"""The base class every normalization layer derives from."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_weight_layer(who: str, module: nn.Module, num_features: int, also: str = "") -> nn.Module:
    """The weight layer a norm is bound to must be a conv or linear producing its ``num_features``
    channels; one clear ``ValueError`` otherwise (``also`` names what else the layer accepts)."""
    if not isinstance(module, WEIGHT_LAYERS):
        raise ValueError(
            f"{who}: bind_preceding takes the Conv1d/2d/3d or Linear whose output this layer normalises{also}; "
            f"got {type(module).__name__}"
        )
    if module.weight.shape[0] != num_features:
        raise ValueError(
            f"{who}: the bound {type(module).__name__} has {module.weight.shape[0]} output channels, "
            f"this layer normalises {num_features}"
        )
    return module



def check_eps_momentum(who: str, eps: float, momentum: float | None = None) -> None:
    """One clear error for the options most layers share: ``eps > 0``, ``momentum`` in [0, 1] or None."""
    if not eps > 0:
        raise ValueError(f"{who}: eps must be > 0, got {eps}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{who}: momentum must be in [0, 1] or None (cumulative average), got {momentum}")

class NormLayer(nn.Module):
    """A normalization layer with the properties models and the sync machinery rely on.

    ``batch_dependent``: in training, does the output of one sample depend on the others?
    Such layers compute their cross-batch statistics through :func:`normlayers.stats.batch_moments`
    and are synchronised by setting ``process_group`` (see :func:`normlayers.convert_sync`).

    ``includes_activation``: does the layer replace the activation that would follow it
    (FRN's TLU, EvoNorm, Proxy Norm)? Models then put no ReLU after it.

    ``needs_preceding_weight``: does it need the weight of the layer before it (Cross-Iteration
    BN)? Model builders call :meth:`bind_preceding` with that layer.

    ``before_weight_layer``: does it belong after the activation, right before the next weight
    layer (the IC layer)? Models place it there under ``model.norm_order=auto``.
    """

    batch_dependent: ClassVar[bool] = False
    includes_activation: ClassVar[bool] = False
    needs_preceding_weight: ClassVar[bool] = False
    before_weight_layer: ClassVar[bool] = False
    #: the spec name this class is registered under; set by the registry.
    norm_name: ClassVar[str] = ""

    #: ``None``: statistics over the local batch. A process group (or ``dist.group.WORLD``):
    #: statistics over the union of the group's batches.
    process_group: object | None = None

    #: 1: the batch is one device's. k > 1: the layer acts as k unsynchronised devices, each on one of
    #: k equal slices of the batch (see :func:`normlayers.set_virtual_devices`).
    virtual_devices: int = 1
    #: plain attributes (not buffers) holding training state that each virtual device keeps its own of
    device_state: ClassVar[tuple[str, ...]] = ()
    #: None: virtual devices run the forward once per slice. A tuple: the statistics are per channel (or
    #: group of channels) over batch and positions, so k devices fold into k x C channels with these
    #: attributes (channel and group counts) times k, in one forward (see :mod:`normlayers.virtual`)
    device_fold: ClassVar[tuple[str, ...] | None] = None

    def __call__(self, *args, **kwargs):
        if self.virtual_devices > 1:
            from normlayers.virtual import splits_batch, virtual_call

            if splits_batch(self):
                return virtual_call(self, super().__call__, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def init_affine(self, num_features: int, affine: bool) -> None:
        """Per-channel scale (ones) and shift (zeros) as ``weight``/``bias``, or both ``None``."""
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def init_scale_(self, value: float) -> None:
        """Set the learned per-channel scale (``weight``) to ``value`` (initial-scale studies, e.g. Bjorck
        et al. 2018); a layer without a learned scale has nothing to set."""
        if isinstance(getattr(self, "weight", None), nn.Parameter):
            with torch.no_grad():
                self.weight.fill_(value)

    def init_running_stats(self, size: int, spread: str = "running_var") -> None:
        """Buffers ``running_mean`` (zeros), ``spread`` (ones: ``running_var`` or ``running_std``) and
        ``num_batches_tracked``, as torch's BatchNorm keeps them."""
        self.register_buffer("running_mean", torch.zeros(size))
        self.register_buffer(spread, torch.ones(size))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def bind_preceding(self, module: nn.Module) -> None:
        """Hand the layer the module whose output it normalises (only used where needed)."""

    @property
    def synchronised(self) -> bool:
        return (
            self.process_group is not None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )
