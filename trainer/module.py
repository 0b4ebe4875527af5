"""``NormClassifier``: the LightningModule of every normlab run.

Use it in your own code::

    from trainer import NormClassifier, load_config

    cfg = load_config(None, ["model.norm=gn:groups=4", "data.batch_size=8"])
    module = NormClassifier(cfg, num_classes=10, in_channels=1, image_size=8)
    pl.Trainer(max_epochs=3).fit(module, datamodule=...)

It builds ``cfg.model`` (see :mod:`trainer.models`), trains it with cross-entropy and SGD
(momentum or Nesterov; weight decay on conv/linear weights only, never on norm parameters or
biases; linear warm-up; cosine, step or constant schedule; the lr optionally scaled linearly in
the global batch), and logs ``train_loss``, ``train_acc`` (epoch means), ``val_loss``, ``val_acc``,
``val_acc_top5`` (more than 5 classes) and ``lr`` (every ``trainer.log_every_n_steps`` steps).
With ``probes.fisher_every_n_steps > 0`` it brings its own :class:`~trainer.probes.FisherProbe`
callback (``configure_callbacks``), so the probe comes with the module wherever it is trained;
so does ``optim.precondition=bnp``'s :class:`~trainer.precondition.BNPCallback`.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from normlayers import NormLayer
from trainer.models import build_model
from trainer.precondition import preconditioner_callbacks
from trainer.probes import FisherProbe


def effective_lr(optim: Any, global_batch_size: int) -> float:
    """``optim.lr``, scaled by ``global_batch / base_batch_size`` under ``lr_scaling=linear``."""
    if optim["lr_scaling"] == "linear":
        return optim["lr"] * global_batch_size / optim["base_batch_size"]
    return optim["lr"]


def lr_factor(step: int, total: int, warmup: int, optim: Any) -> float:
    """Multiplier of the effective lr at optimizer step ``step`` of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if optim["schedule"] == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if optim["schedule"] == "step":
        return optim["step_gamma"] ** sum(progress >= m for m in optim["step_milestones"])
    return 1.0


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights of conv/linear layers; none on norm parameters and biases."""
    exempt: set[int] = set()
    for module in model.modules():
        if isinstance(module, (NormLayer, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            exempt.update(id(p) for p in module.parameters())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if id(p) in exempt or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class NormClassifier(pl.LightningModule):
    """An image classifier whose normalization layers come from one spec.

    ``config``: a full experiment config (``trainer.load_config``) or its plain-dict form;
    ``num_classes``, ``in_channels``, ``image_size``: the data's shape.
    """

    def __init__(self, config: DictConfig | dict, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        self.save_hyperparameters(logger=False)  # MLflow params are the flattened config, logged by the runner
        self.config = config
        self.model = build_model(config["model"], num_classes, in_channels, image_size)
        self.channels_last = bool(config["trainer"]["channels_last"])
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None

    def configure_callbacks(self) -> list[pl.Callback]:
        probes, optim = self.config["probes"], self.config["optim"]
        every = probes.get("fisher_every_n_steps", 0)
        if not every:
            return preconditioner_callbacks(self.config)
        return [FisherProbe(every, probes["fisher_iterations"], probes["fisher_batch"], optim["momentum"],
                            optim["nesterov"], self.config["seed"])] + preconditioner_callbacks(self.config)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._seen = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Epoch means are accumulated here and logged once per epoch: a self.log call per step
        # costs Lightning about a millisecond of bookkeeping, 10% of a small step.
        self._loss_sum += loss.detach() * len(y)
        self._seen += len(y)
        self.train_acc.update(logits.detach(), y)
        step = self.trainer.global_step
        if self.logger is not None and step % self.trainer.log_every_n_steps == 0:
            self.logger.log_metrics({"lr": self.optimizers().param_groups[0]["lr"]}, step=step)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._log_train_epoch()

    def on_train_epoch_end(self) -> None:
        if self._seen:  # the epoch was cut short (max_steps, divergence): log what it saw
            self._log_train_epoch()

    def _log_train_epoch(self) -> None:
        # logged at the last batch rather than at epoch end, so that callbacks' epoch-end hooks see them
        self.log("train_loss", self._loss_sum / self._seen, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train_acc", self.train_acc.compute(), on_step=False, on_epoch=True, sync_dist=True)
        self.train_acc.reset()
        self._seen = 0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        n = len(y)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True, batch_size=n)
        self.val_acc.update(logits, y)
        self.log("val_acc", self.val_acc, on_epoch=True, batch_size=n)
        if self.val_acc_top5 is not None:
            self.val_acc_top5.update(logits, y)
            self.log("val_acc_top5", self.val_acc_top5, on_epoch=True, batch_size=n)

    def global_batch_size(self) -> int:
        return self.config["data"]["batch_size"] * self.trainer.world_size

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.config["optim"]
        lr = effective_lr(optim, self.global_batch_size())
        groups = parameter_groups(self.model, optim["weight_decay"])
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=optim["momentum"], nesterov=optim["nesterov"])
        total = int(self.trainer.estimated_stepping_batches)
        # known once the line above set up the data; not set up (infinite) when max_steps alone bounds training
        batches = self.trainer.num_training_batches
        per_epoch = max(1, int(batches) if math.isfinite(batches) else total)
        warmup = round(optim["warmup_epochs"] * per_epoch)
        scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, optim))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
