"""A normlab training run that records its first step: ``sync_train.py OUT_DIR OVERRIDE...``.

Runs ``trainer.train(load_config(None, overrides))`` (with ``trainer.devices=2`` Lightning's DDP
strategy starts the second rank) and writes ``OUT_DIR/rank<R>.pt``: the first step's
loss on this rank, the parameter gradients after backward (averaged over ranks by DDP) and the
model's buffers after the step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from trainer import load_config, train


class FirstStep(pl.Callback):
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.grads: dict[str, torch.Tensor] = {}

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == 0:
            params = pl_module.model.named_parameters()
            self.grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and batch_idx == 0:
            torch.save(
                {
                    "loss": outputs["loss"].detach(),
                    "batch_size": len(batch[1]),
                    "grads": self.grads,
                    "buffers": {n: b.detach().clone() for n, b in pl_module.model.named_buffers()},
                    "world_size": trainer.world_size,
                },
                self.out_dir / f"rank{trainer.global_rank}.pt",
            )


def record_first_step(out_dir: Path, overrides: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    train(load_config(None, overrides), callbacks=[FirstStep(out_dir)])


if __name__ == "__main__":
    torch.set_num_threads(1)
    record_first_step(Path(sys.argv[1]), sys.argv[2:])
