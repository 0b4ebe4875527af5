"""Lightning callbacks a sweep job adds to every run it trains."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.environments import SLURMEnvironment


class SubmititRequeuesOnly(Callback):
    """Switches off Lightning's own SLURM auto-requeue, so that only submitit requeues.

    Lightning would otherwise also catch the requeue signal, mark the MLflow run finished and
    requeue the job a second time. ``setup`` runs before Lightning installs its signal handlers.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False
