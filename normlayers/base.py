"""The base class every normalization layer derives from."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn


class NormLayer(nn.Module):
    """A normalization layer with the properties models and the sync machinery rely on.

    ``batch_dependent``: in training, does the output of one sample depend on the others?
    Such layers compute their cross-batch statistics through :func:`normlayers.stats.batch_moments`
    and are synchronised by setting ``process_group`` (see :func:`normlayers.convert_sync`).

    ``includes_activation``: does the layer replace the activation that would follow it
    (FRN's TLU, EvoNorm, Proxy Norm)? Models then put no ReLU after it.

    ``needs_preceding_weight``: does it need the weight of the layer before it (Cross-Iteration
    BN)? Model builders call :meth:`bind_preceding` with that layer.
    """

    batch_dependent: ClassVar[bool] = False
    includes_activation: ClassVar[bool] = False
    needs_preceding_weight: ClassVar[bool] = False
    #: the spec name this class is registered under; set by the registry.
    norm_name: ClassVar[str] = ""

    #: ``None``: statistics over the local batch. A process group (or ``dist.group.WORLD``):
    #: statistics over the union of the group's batches.
    process_group: object | None = None

    def init_affine(self, num_features: int, affine: bool) -> None:
        """Per-channel scale (ones) and shift (zeros) as ``weight``/``bias``, or both ``None``."""
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

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
