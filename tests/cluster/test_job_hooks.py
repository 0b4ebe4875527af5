"""Inside a Slurm job, only submitit may requeue: the callback every sweep job adds turns Lightning's off."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.plugins.environments import SLURMEnvironment

from cluster.lightning_hooks import SubmititRequeuesOnly


def test_lightning_slurm_auto_requeue_is_switched_off(monkeypatch):
    # The variables an sbatch job step has: Lightning then picks its SLURM environment, auto-requeue on.
    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "normlab-x",
                        "SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SLURM_NODELIST": "vm"}.items():
        monkeypatch.setenv(name, value)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[SubmititRequeuesOnly()])
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    SubmititRequeuesOnly().setup(trainer, pl.LightningModule(), "fit")
    assert environment.auto_requeue is False
