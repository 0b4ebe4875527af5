"""``NormClassifier``: the LightningModule of every normlab run.

Use it in your own code, with your own model, like any LightningModule::

    from trainer import NormClassifier

    module = NormClassifier(my_model, num_classes=10, optim={"lr": 0.05, "schedule": "constant"})
    pl.Trainer(max_epochs=3).fit(module, train_dataloaders=..., val_dataloaders=...)

or from a normlab config (``NormClassifier.from_config(cfg, num_classes, in_channels, image_size)``,
which builds ``cfg.model``, see :mod:`trainer.models`). It trains with cross-entropy and SGD
(momentum or Nesterov; weight decay on conv/linear weights only, never on norm parameters or
biases; linear warm-up; cosine, step or constant schedule; the lr optionally scaled linearly in
the global batch), and logs ``train_loss``, ``train_acc`` (epoch means), ``val_loss``, ``val_acc``,
``val_acc_top5`` (more than 5 classes) and ``lr`` (every ``trainer.log_every_n_steps`` steps).
``optim.optimizer=adam`` swaps SGD for Adam; ``model.teacher`` trains on ReActNet's distributional loss
against a trained run (:mod:`trainer.distill`, logged as ``train_kd_loss``), ``model.init_from`` starts
from another run's weights (:mod:`trainer.checkpoints`), and ``trainer.gradient_clip_algorithm=agc``
clips adaptively in :meth:`NormClassifier.configure_gradient_clipping` (:mod:`normlayers.agc`).
With ``probes.fisher_every_n_steps > 0`` it brings its own :class:`~trainer.probes.FisherProbe`
callback (``configure_callbacks``), so the probe comes with the module wherever it is trained;
so does ``optim.precondition=bnp``'s :class:`~trainer.precondition.BNPCallback`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from normlayers import NormLayer, adaptive_clip_grad_, set_virtual_devices
from trainer.checkpoints import init_from
from trainer.config import OptimConfig
from trainer.distill import Teacher, distribution_loss
from trainer.models import build_model, classifier
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
    if optim["schedule"] == "linear":
        return max(0.0, 1.0 - progress)
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


def optim_settings(optim: Mapping[str, Any] | None) -> dict[str, Any]:
    """Optimiser settings: the ``optim`` section's keys (:class:`~trainer.config.OptimConfig`), defaults filled in."""
    settings = dataclasses.asdict(OptimConfig())
    unknown = sorted(set(optim or {}) - set(settings))
    if unknown:
        raise ValueError(f"optim: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(settings)}")
    settings.update(optim or {})
    return settings


class NormClassifier(pl.LightningModule):
    """An image classifier trained with cross-entropy and SGD.

    ``model``: the network, or a function of no arguments that builds it; ``num_classes``: its
    outputs; ``optim``: optimiser settings (the keys of the ``optim`` config section, defaults for
    the rest); ``batch_size``: the per-device batch, for ``optim.lr_scaling=linear`` (default
    ``optim.base_batch_size``: no scaling); ``channels_last``: NHWC memory format; ``fisher``:
    ``{"every_n_steps", "iterations", "batch"}`` of the Fisher probe, or None; ``seed``: the probe's;
    ``teacher``: a frozen network whose logits the student matches (:mod:`trainer.distill`) instead of
    the labels; ``agc_clip``: lambda of adaptive gradient clipping (every layer but the classifier);
    ``gradient_callbacks``: callbacks that come with the module and condition its gradients (e.g.
    :class:`~trainer.precondition.BNPCallback`).
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module], num_classes: int,
                 optim: Mapping[str, Any] | None = None, batch_size: int | None = None, channels_last: bool = False,
                 fisher: Mapping[str, int] | None = None, seed: int = 0,
                 teacher: Callable[[Tensor], Tensor] | None = None, agc_clip: float | None = None,
                 gradient_callbacks: Sequence[pl.Callback] = ()):
        super().__init__()
        # MLflow params are logged by the runner
        self.save_hyperparameters(ignore=["model", "teacher", "gradient_callbacks"], logger=False)
        self.optim = optim_settings(optim)
        self.batch_size = batch_size or self.optim["base_batch_size"]
        self.fisher = dict(fisher) if fisher else None
        self.seed = seed
        self.model = model if isinstance(model, nn.Module) else model()
        self.teacher = teacher
        self.agc_clip = agc_clip
        self.gradient_callbacks = tuple(gradient_callbacks)
        self.channels_last = channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None

    @classmethod
    def from_config(cls, config: DictConfig | dict, num_classes: int, in_channels: int,
                    image_size: int) -> NormClassifier:
        """The module a normlab experiment config describes, for data of that shape."""
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True, enum_to_str=True)  # checkpoints hold plain values
        probes = config["probes"]
        fisher = None
        if probes.get("fisher_every_n_steps", 0):
            fisher = {"every_n_steps": probes["fisher_every_n_steps"], "iterations": probes["fisher_iterations"],
                      "batch": probes["fisher_batch"]}
        model_cfg, t = config["model"], config["trainer"]
        model = build_model(model_cfg, num_classes, in_channels, image_size)
        set_virtual_devices(model, t.get("virtual_devices", 1))
        if model_cfg.get("init_from"):
            init_from(model, model_cfg["init_from"], config)
        teacher = Teacher(model_cfg["teacher"], config) if model_cfg.get("teacher") else None
        agc_clip = t["gradient_clip_val"] if t.get("gradient_clip_algorithm") == "agc" else None
        module = cls(model, num_classes, optim=config["optim"], batch_size=config["data"]["batch_size"],
                     channels_last=bool(t["channels_last"]), fisher=fisher, seed=config["seed"], teacher=teacher,
                     agc_clip=agc_clip, gradient_callbacks=preconditioner_callbacks(config))
        # checkpoints carry the run's config, so that trainer.checkpoints can rebuild the network
        module.hparams.update(config=config, in_channels=in_channels, image_size=image_size)
        return module

    def configure_callbacks(self) -> list[pl.Callback]:
        fisher = []
        if self.fisher:
            f, optim = self.fisher, self.optim
            fisher = [FisherProbe(f["every_n_steps"], f["iterations"], f["batch"], optim["momentum"],
                                  optim["nesterov"], self.seed)]
        return fisher + list(self.gradient_callbacks)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def on_train_start(self) -> None:
        # Lightning skips on_train_epoch_start when it resumes inside an epoch: the sums start here too
        # (the resumed epoch's train metrics then cover the batches after the restart).
        self._reset_epoch_sums()

    def on_train_epoch_start(self) -> None:
        self._reset_epoch_sums()

    def _reset_epoch_sums(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), device=self.device, dtype=torch.long)
        self._seen = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        objective = loss
        if self.teacher is not None:
            objective = distribution_loss(logits, self.teacher(x))
            self.log("train_kd_loss", objective.detach(), on_step=False, on_epoch=True, sync_dist=True)
        # Epoch means are accumulated here, on the device, and logged once per epoch: a self.log call per
        # step costs Lightning about a millisecond of bookkeeping, 10% of a small step, and a torchmetrics
        # update another 1% (train_acc is top-1 over the epoch: a count does it).
        self._loss_sum += loss.detach() * len(y)
        self._correct += (logits.detach().argmax(1) == y).sum()
        self._seen += len(y)
        step = self.trainer.global_step
        if self.logger is not None and step % self.trainer.log_every_n_steps == 0:
            self.logger.log_metrics({"lr": self.optimizers().param_groups[0]["lr"]}, step=step)
        return objective

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._log_train_epoch()

    def on_train_epoch_end(self) -> None:
        if self._seen:  # the epoch was cut short (max_steps, divergence): log what it saw
            self._log_train_epoch()

    def _log_train_epoch(self) -> None:
        # logged at the last batch rather than at epoch end, so that callbacks' epoch-end hooks see them
        self.log("train_loss", self._loss_sum / self._seen, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train_acc", self._correct / self._seen, on_step=False, on_epoch=True, sync_dist=True)
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
        return self.batch_size * self.trainer.world_size

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.optim
        lr = effective_lr(optim, self.global_batch_size())
        groups = parameter_groups(self.model, optim["weight_decay"])
        if optim.get("optimizer", "sgd") == "adam":
            optimizer = torch.optim.Adam(groups, lr=lr)
        else:
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=optim["momentum"], nesterov=optim["nesterov"])
        total = int(self.trainer.estimated_stepping_batches)
        # known once the line above set up the data; not set up (infinite) when max_steps alone bounds training
        batches = self.trainer.num_training_batches
        per_epoch = max(1, int(batches) if math.isfinite(batches) else total)
        warmup = optim.get("warmup_steps", -1)
        warmup = warmup if warmup >= 0 else round(optim["warmup_epochs"] * per_epoch)
        scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, optim))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning knows norm and value only: agc is done here, with trainer.gradient_clip_val as lambda
        if self.agc_clip:
            head = {id(p) for p in classifier(self.model).parameters()}
            adaptive_clip_grad_([p for p in self.model.parameters() if id(p) not in head], self.agc_clip)
        elif gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
