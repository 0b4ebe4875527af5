"""An epoch's train metrics survive a kill right after its checkpoint.

Lightning saves the epoch-end checkpoint in ``on_train_epoch_end`` and logs the epoch's metrics
(``train_loss``, ``train_acc``) only after that hook: a run killed in between resumes at the next
epoch and that epoch's train metrics are never logged. The checkpoint therefore carries them, with
the step Lightning logs them at; on resume, any of them the MLflow run does not have at that step is
logged then (at most once: a metric already at that step is left alone).
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.callbacks import Callback

STATE_KEY = "normlab_epoch_metrics"
PREFIX = "train_"


class EpochMetricsInCheckpoint(Callback):
    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(PREFIX) and torch.is_tensor(v) and v.numel() == 1}
        # the step Lightning logs epoch-end metrics at (its _batches_that_stepped, less one)
        checkpoint[STATE_KEY] = {"step": trainer.fit_loop.epoch_loop._batches_that_stepped - 1, "metrics": metrics}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(STATE_KEY)

    def on_train_start(self, trainer, pl_module) -> None:
        pending, self._pending = self._pending, None
        logger = trainer.logger
        if not pending or not pending["metrics"] or logger is None or not trainer.is_global_zero:
            return
        client, run_id, step = logger.experiment, logger.run_id, pending["step"]
        missing = {name: value for name, value in pending["metrics"].items()
                   if step not in {m.step for m in client.get_metric_history(run_id, name)}}
        if missing:
            logger.log_metrics(missing, step=step)
