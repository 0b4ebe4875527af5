"""``NormSyncPlugin``: synchronised statistics for every batch-dependent norm, as a Lightning plugin.

``Trainer(plugins=[NormSyncPlugin()], strategy="ddp", ...)`` makes every batch-dependent
normlayers layer compute its batch statistics over all processes (:func:`normlayers.convert_sync`);
Lightning applies it when fitting starts and reverts it at teardown. It replaces Lightning's
``sync_batchnorm=True``, which would turn every BatchNorm subclass into plain
``torch.nn.SyncBatchNorm`` (losing the variant's own forward), leave the other batch-dependent
variants local, and refuse CPU tensors (see :mod:`normlayers.sync`). With one process it changes
nothing.
"""

from __future__ import annotations

from pytorch_lightning.plugins import LayerSync
from torch import nn

from normlayers import convert_sync, revert_sync


class NormSyncPlugin(LayerSync):
    """Synchronise over ``group`` (``None``: the whole world of the strategy's processes)."""

    def __init__(self, group=None):
        self.group = group

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync(model, self.group)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync(model)
