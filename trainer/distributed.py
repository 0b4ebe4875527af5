"""What a run spread over processes and nodes needs besides Lightning's DDP.

Ranks, world size and the rendezvous address come from Lightning's ``SLURMEnvironment`` inside a
Slurm job (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_NODEID``; ``MASTER_ADDR`` is the first node of
the step's node list, ``MASTER_PORT`` 15000 + the job id's last four digits unless set). This module
adds two things:

- :class:`NodeNames`: records on the MLflow run which nodes its ranks ran on (tag ``nodes``, the
  names in rank order without repeats, and ``num_nodes``), at every start, so a resumed run shows
  where it ran last. The node's name is Slurm's (``SLURMD_NODENAME``), else the host name.
- :class:`ResumedMLFlowLogger`: an ``MLFlowLogger`` that, continuing an MLflow run, does not log a
  metric again at a step it already has: a resumed run redoes the steps since its last checkpoint,
  and those were logged before the interruption (deterministic training gives the same values).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def rank_node_names() -> list[str]:
    """The node name of every rank, in rank order (a collective: every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [node_name()]
    names: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, node_name())
    return [str(name) for name in names]


class NodeNames(Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = list(dict.fromkeys(rank_node_names()))
        logger = trainer.logger
        if trainer.is_global_zero and isinstance(logger, MLFlowLogger):
            logger.experiment.set_tag(logger.run_id, "nodes", ",".join(names))
            logger.experiment.set_tag(logger.run_id, "num_nodes", str(len(names)))


class ResumedMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger``; given a ``run_id`` to continue, steps already logged per metric are skipped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._continues = kwargs.get("run_id") is not None
        self._logged_through: dict[str, int] | None = None

    def _last_logged_steps(self) -> dict[str, int]:
        if self._logged_through is None:
            self._logged_through = {}
            if self._continues:
                client, run_id = self.experiment, self.run_id
                for key in client.get_run(run_id).data.metrics:
                    self._logged_through[key] = max(m.step for m in client.get_metric_history(run_id, key))
        return self._logged_through

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        done = self._last_logged_steps()
        at = step or 0
        fresh = {key: value for key, value in metrics.items() if at > done.get(key, -1)}
        if fresh:
            super().log_metrics(fresh, step)
