"""Gradient preconditioning of a run (``optim.precondition``), as a Lightning callback.

``optim.precondition=bnp`` is Batch Normalization Preconditioning (Lange, Helfrich & Ye, JMLR 2022;
:mod:`normlayers.bnp`): :class:`BNPCallback` registers a :class:`normlayers.BNPreconditioner` on
the model's conv and linear layers when fitting starts and rewrites their gradients in
``on_before_optimizer_step`` (after the backward and, under 16-mixed, after unscaling; before
gradient clipping and the optimiser's step). Its running statistics are the callback's state, saved
in every checkpoint, so a resumed run continues with them. ``model.norm=none
optim.precondition=bnp`` is "BNP"; with a batch-dependent norm it is allowed but warns once.

Options: ``optim.bnp_momentum`` (weight of a step's batch in the running estimates),
``optim.bnp_eps``, ``optim.bnp_skip`` (layer types left plain: linear, conv1d, conv2d, conv3d).
Under DDP the statistics are local to each rank, unless ``trainer.sync_norm=true``: then they are
averaged over all ranks like every batch-dependent norm's statistics.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

import normlayers
from normlayers import BNPreconditioner, bnp

PRECONDITIONERS = ("none", "bnp")


def batch_dependent_warning(norm: Any, placement: str) -> str | None:
    """The one-time warning for BNP on top of a norm whose statistics come from the batch (or None)."""
    if placement == "none":
        return None
    cls = normlayers.norm_class(norm)
    if not cls.batch_dependent:
        return None
    return (f"optim.precondition=bnp with model.norm={cls.norm_name}, which normalises with batch statistics: "
            f"the two normalisations compound (BNP is meant to replace it: model.norm=none)")


class BNPCallback(Callback):
    """Batch Normalization Preconditioning of ``pl_module.model``'s conv and linear layers."""

    def __init__(self, momentum: float = bnp.DEFAULT_MOMENTUM, eps: float = bnp.DEFAULT_EPS,
                 skip: tuple[str, ...] | list[str] = (),
                 sync: bool = False, warning: str | None = None):
        bnp.check_options(momentum, eps, skip)
        self.momentum, self.eps, self.skip, self.sync, self.warning = momentum, eps, tuple(skip), sync, warning
        self.preconditioner: BNPreconditioner | None = None
        self._saved: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: dict) -> BNPCallback:
        optim, model = config["optim"], config["model"]
        return cls(optim["bnp_momentum"], optim["bnp_eps"], optim["bnp_skip"], config["trainer"]["sync_norm"],
                   batch_dependent_warning(model["norm"], model.get("norm_placement", "all")))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.preconditioner is not None:
            return
        if self.warning and trainer.is_global_zero:
            warnings.warn(self.warning, UserWarning, stacklevel=2)
        group = dist.group.WORLD if self.sync and trainer.world_size > 1 else None
        self.preconditioner = BNPreconditioner(pl_module.model, self.momentum, self.eps, self.skip, group)
        if self._saved is not None:
            self.preconditioner.load_state_dict(self._saved)
            self._saved = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.preconditioner.step()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.preconditioner is not None:
            self._saved = self.preconditioner.state_dict()
            self.preconditioner.remove()
            self.preconditioner = None

    def state_dict(self) -> dict[str, Any]:
        return self.preconditioner.state_dict() if self.preconditioner is not None else (self._saved or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.preconditioner is None:
            self._saved = state_dict
        else:
            self.preconditioner.load_state_dict(state_dict)


def preconditioner_callbacks(config: dict) -> list[Callback]:
    """The callbacks ``optim.precondition`` asks for (none for ``none``)."""
    if config["optim"].get("precondition", "none") == "bnp":
        return [BNPCallback.from_config(config)]
    return []
