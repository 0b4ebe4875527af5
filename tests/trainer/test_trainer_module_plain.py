"""NormClassifier from plain Lightning code: a model of one's own, optimiser settings, no normlab config."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlayers import build_norm
from trainer import NormClassifier


def _blobs(n: int, seed: int) -> TensorDataset:
    """Two classes of 4x4 one-channel images, told apart by the sign of their mean."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.5 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return TensorDataset(x, y)


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), build_norm("gn:groups=2", 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def test_trains_with_plain_lightning_and_no_config():
    pl.seed_everything(0, verbose=False)
    module = NormClassifier(_model, num_classes=2, optim={"lr": 0.1, "schedule": "constant", "warmup_epochs": 0})
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(_blobs(256, 0), batch_size=32, shuffle=True),
                val_dataloaders=DataLoader(_blobs(128, 1), batch_size=64))
    (result,) = trainer.validate(module, DataLoader(_blobs(128, 1), batch_size=64), verbose=False)
    assert result["val_acc"] >= 0.95
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    # weight decay on the conv and linear weights only, never on the norm's parameters or biases
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 4]


def test_takes_a_built_model_and_refuses_unknown_settings():
    model = _model()
    assert NormClassifier(model, num_classes=2).model is model
    with pytest.raises(ValueError, match=r"optim: unknown setting\(s\) learning_rate; valid: lr, "):
        NormClassifier(model, num_classes=2, optim={"learning_rate": 0.1})


class _SaveMidEpoch(pl.Callback):
    """Saves a checkpoint after the 3rd batch of the first epoch, as a preempted job's handler would."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == 2:
            trainer.save_checkpoint(self.path)


def test_resumes_from_a_checkpoint_saved_inside_an_epoch(tmp_path):
    """Lightning skips on_train_epoch_start when it restarts inside an epoch; the epoch's sums must exist."""
    data = dict(train_dataloaders=DataLoader(_blobs(256, 0), batch_size=32),
                val_dataloaders=DataLoader(_blobs(128, 1), batch_size=64))
    flags = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, num_sanity_val_steps=0)
    optim = {"lr": 0.1, "schedule": "constant", "warmup_epochs": 0}
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=1, callbacks=[_SaveMidEpoch(tmp_path / "mid.ckpt")], **flags).fit(
        NormClassifier(_model, num_classes=2, optim=optim), **data)
    resumed = pl.Trainer(max_epochs=2, **flags)
    resumed.fit(NormClassifier(_model, num_classes=2, optim=optim), ckpt_path=tmp_path / "mid.ckpt", **data)
    assert resumed.global_step == 16  # 5 steps left of the first epoch, then 8 of the second
    assert 0 <= float(resumed.callback_metrics["train_acc"]) <= 1
