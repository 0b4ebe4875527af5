"""What a run spread over processes and nodes needs besides Lightning's DDP.

Ranks, world size and the rendezvous address come from Lightning's ``SLURMEnvironment`` inside a
Slurm job (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_NODEID``; ``MASTER_ADDR`` is the first node of
the step's node list, ``MASTER_PORT`` 15000 + the job id's last four digits unless set). This module
adds :class:`NodeNames`: records on the MLflow run which nodes its ranks ran on (tag ``nodes``, the
  names in rank order without repeats, and ``num_nodes``), at every start, so a resumed run shows
  where it ran last. The node's name is Slurm's (``SLURMD_NODENAME``), else the host name.
(A resumed run logs no step twice: :mod:`trainer.step_once_logger`.)
"""

from __future__ import annotations

import os
import socket

import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import MLFlowLogger

from trainer import tracking


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
            logger.experiment.set_tag(logger.run_id, tracking.NODES_TAG, ",".join(names))
            logger.experiment.set_tag(logger.run_id, tracking.NUM_NODES_TAG, str(len(names)))
