"""Time per training epoch: NormClassifier under the Lightning Trainer vs a plain PyTorch loop.

Both train the same network (same initial weights) on the same device-resident batches (the data
module's own iterator, same seed and epochs), with the same SGD, parameter groups and lr schedule.
The plain loop does what a hand-written loop would: forward, cross-entropy, backward, step,
schedule, and accumulates loss and accuracy on the device. The Lightning side is configured as
``normlab train`` configures it (divergence guard, epoch seeding, metrics via ``self.log`` and
torchmetrics) but without MLflow, checkpoints or validation, which are not loop overhead.
Rounds alternate the two so that machine load hits both alike. The first epoch of every fit is
warm-up and left out; the ratio is taken on each side's fastest epoch (the one least disturbed by
other work on a shared machine, as timeit does), and the median-based ratio is printed beside it.
Goal: ratio <= 1.10.

    .venv/bin/python benchmarks/train_step.py                      # digits, ResNet-20, CPU
    .venv/bin/python benchmarks/train_step.py --accelerator gpu data.name=synthetic data.synthetic.image_size=32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from trainer import NormClassifier, load_config
from trainer.callbacks import DivergenceGuard, EpochSeeding
from trainer.data import build_datamodule
from trainer.module import effective_lr, lr_factor, parameter_groups
from trainer.run import quiet_lightning


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, pl_module):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)


def lightning_epochs(cfg, template: NormClassifier, datamodule, epochs: int, accelerator: str) -> list[float]:
    module = copy.deepcopy(template)
    timer = EpochTimer()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, precision=cfg.trainer.precision,
                         callbacks=[timer, DivergenceGuard(cfg.probes.divergence_factor), EpochSeeding(cfg.seed)])
    trainer.fit(module, datamodule=datamodule)
    return timer.times[1:]


def plain_epochs(cfg, template: NormClassifier, datamodule, epochs: int, device: torch.device) -> list[float]:
    model = copy.deepcopy(template.model).to(device).train()
    optim = cfg.optim
    opt = torch.optim.SGD(parameter_groups(model, optim.weight_decay), lr=effective_lr(optim, cfg.data.batch_size),
                          momentum=optim.momentum, nesterov=optim.nesterov)
    epoch = {"e": 0}
    batches = datamodule.train_batches(lambda: epoch["e"])
    total, warmup = epochs * len(batches), round(optim.warmup_epochs * len(batches))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, optim))
    times = []
    for e in range(epochs):
        epoch["e"] = e
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for x, y in batches:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
        float(loss_sum), int(correct)  # what a loop reports at the end of its epoch
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of plain and Lightning")
    parser.add_argument("--accelerator", default="cpu", help="cpu | gpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.batch_size=128")
    args = parser.parse_args()
    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, ["data.val_split=0.2", *args.overrides])
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.load()
    template = NormClassifier.from_config(cfg, datamodule.num_classes, datamodule.in_channels, datamodule.image_size)
    plain_dm = build_datamodule(cfg)  # the plain loop's copy of the same data, moved to its device once
    plain_dm.load()
    plain_dm.train_set, plain_dm.mean, plain_dm.std = (plain_dm.train_set.to(device), plain_dm.mean.to(device),
                                                       plain_dm.std.to(device))
    plain, light = [], []
    for _ in range(args.rounds):
        plain += plain_epochs(cfg, template, plain_dm, args.epochs, device)
        light += lightning_epochs(cfg, template, datamodule, args.epochs, args.accelerator)
    steps = len(datamodule.train_batches(lambda: 0))
    print(f"model {cfg.model.arch}-{cfg.model.depth} norm {cfg.model.norm}  data {cfg.data.name} "
          f"batch {cfg.data.batch_size}  {steps} steps/epoch  device {device}  threads {torch.get_num_threads()}")
    for name, times in (("plain PyTorch loop", plain), ("Lightning Trainer", light)):
        best, med = min(times), statistics.median(times)
        print(f"{name:20s} {best * 1000:8.1f} ms/epoch fastest, {med * 1000:8.1f} median "
              f"({best / steps * 1000:.2f} ms/step, {len(times)} epochs)")
    print(f"ratio Lightning / plain = {min(light) / min(plain):.3f}  (median-based "
          f"{statistics.median(light) / statistics.median(plain):.3f}; goal <= 1.10)")


if __name__ == "__main__":
    main()
