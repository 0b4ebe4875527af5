"""Inside a Slurm job only submitit may requeue: the trainer keeps Lightning's SLURM environment
(ranks, addresses) but turns its own auto-requeue off."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.plugins.environments import SLURMEnvironment

from trainer.run import slurm_plugins

# The variables an sbatch job step has; with them Lightning would pick SLURMEnvironment(auto_requeue=True).
SLURM_STEP = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "normlab-x", "SLURM_JOB_ID": "7",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "vm"}


def _environment(plugins) -> object:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, plugins=plugins or None)
    return trainer._accelerator_connector.cluster_environment


def test_lightning_slurm_auto_requeue_is_switched_off_in_a_job(monkeypatch):
    for name, value in SLURM_STEP.items():
        monkeypatch.setenv(name, value)
    default = _environment(None)
    assert isinstance(default, SLURMEnvironment) and default.auto_requeue  # what we must avoid
    ours = _environment(slurm_plugins())
    assert isinstance(ours, SLURMEnvironment) and ours.auto_requeue is False


def test_no_slurm_plugin_outside_slurm(monkeypatch):
    for name in SLURM_STEP:
        monkeypatch.delenv(name, raising=False)
    assert slurm_plugins() == []
