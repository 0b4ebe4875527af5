"""Training step time: NormClassifier under the Lightning Trainer vs a plain PyTorch loop, and
``trainer.compile=true`` vs eager.

Lightning vs plain (the default): both train the same network (same initial weights) on the same
device-resident batches (the data module's own iterator, same seed), with the same SGD, parameter
groups and lr schedule. The plain loop does what a hand-written loop would: forward,
cross-entropy, backward, step, schedule, and accumulates loss and accuracy on the device. The
Lightning side is configured as ``normlab train`` configures it (divergence guard, epoch seeding,
layer probes, epoch metrics via ``self.log``, ``lr`` every ``trainer.log_every_n_steps`` steps to a
logger that keeps them in memory) but without MLflow, checkpoints or validation, which are not loop
overhead. The two alternate epoch by epoch inside one fit (A B A B: a callback runs one plain epoch
before every Lightning epoch), so that machine load hits both alike; a Lightning epoch is timed from
the end of one plain epoch to the start of the next, so it includes Lightning's own work between
epochs. The first pair is warm-up. Printed: the minimum and the median of the per-pair ratios
Lightning / plain. Goal (issue 18): median <= 1.05.

``--compile``: the same network eager and compiled as ``trainer.compile=true`` compiles it
(``nn.Module.compile()``, inductor), each with its own SGD; the train step (forward, cross-entropy,
backward, SGD step over a block of training batches) and the eval step (eval mode, inference mode,
the whole validation set, as Lightning validates) are timed in pairs, eager then compiled (A B A B)
after a warm-up that compiles every graph. Printed: min and median of the per-pair ratios
compiled / eager, for train and eval.

    .venv/bin/python benchmarks/train_step.py                      # digits, ResNet-20, CPU
    .venv/bin/python benchmarks/train_step.py --compile
    .venv/bin/python benchmarks/train_step.py --accelerator gpu data.name=synthetic data.synthetic.image_size=32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger

from trainer import NormClassifier, load_config
from trainer.callbacks import DivergenceGuard, EpochSeeding, LayerProbe
from trainer.data import build_datamodule
from trainer.module import effective_lr, lr_factor, parameter_groups
from trainer.run import quiet_lightning

LIGHTNING_GOAL = 1.05


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# Seconds as the benchmark counts them: process CPU time on the CPU (the machine's other work then
# costs this process little; with one torch thread it is the work done), wall time on a GPU.
clock = time.perf_counter


def use_clock(name: str) -> None:
    global clock
    clock = time.process_time if name == "cpu" else time.perf_counter


def paired_summary(name: str, anchor: list[float], other: list[float], unit: str) -> str:
    ratios = [o / a for a, o in zip(anchor, other, strict=True)]
    return (f"{name}: {statistics.median(anchor) * 1000:8.2f} vs {statistics.median(other) * 1000:8.2f} ms/{unit} "
            f"(medians)  ratio min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  ({len(ratios)} pairs)")


class MemoryLogger(Logger):
    """A logger that keeps the last value of every metric: logging's Lightning-side cost, no MLflow."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}
        self.calls = 0

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls += 1
        self.metrics.update(metrics)


class PlainLoop:
    """The hand-written loop over its own copy of the network, optimiser and schedule."""

    def __init__(self, cfg, template: NormClassifier, datamodule, epochs: int, device: torch.device):
        self.device = device
        self.model = copy.deepcopy(template.model).to(device).train()
        optim = cfg.optim
        self.opt = torch.optim.SGD(parameter_groups(self.model, optim.weight_decay),
                                   lr=effective_lr(optim, cfg.data.batch_size), momentum=optim.momentum,
                                   nesterov=optim.nesterov)
        self._epoch = 0
        self.batches = datamodule.train_batches(lambda: self._epoch)
        total, warmup = epochs * len(self.batches), round(optim.warmup_epochs * len(self.batches))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, total, warmup, optim))

    def epoch(self, e: int) -> float:
        """Trains epoch ``e``; its seconds."""
        self._epoch = e
        synchronize(self.device)
        start = clock()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for x, y in self.batches:
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
        float(loss_sum), int(correct)  # what a loop reports at the end of its epoch
        synchronize(self.device)
        return clock() - start


class Interleaved(Callback):
    """One plain epoch before every Lightning epoch; the time of each Lightning epoch is from the end
    of one plain epoch to the start of the next (or the end of training)."""

    def __init__(self, plain: PlainLoop) -> None:
        self.plain = plain
        self.plain_times: list[float] = []
        self.lightning_times: list[float] = []
        self._start: float | None = None

    def _lightning_epoch_over(self) -> None:
        if self._start is not None:
            synchronize(self.plain.device)
            self.lightning_times.append(clock() - self._start)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._lightning_epoch_over()
        self.plain_times.append(self.plain.epoch(trainer.current_epoch))
        synchronize(self.plain.device)
        self._start = clock()

    def on_train_end(self, trainer, pl_module) -> None:
        self._lightning_epoch_over()


def lightning_vs_plain(cfg, template: NormClassifier, datamodule, plain_dm, pairs: int, accelerator: str,
                       device: torch.device) -> None:
    epochs = pairs + 1  # the first pair is warm-up
    interleaved = Interleaved(PlainLoop(cfg, template, plain_dm, epochs, device))
    logger = MemoryLogger()
    callbacks = [interleaved, DivergenceGuard(cfg.probes.divergence_factor), EpochSeeding(cfg.seed),
                 LayerProbe(cfg.probes.every_n_steps, cfg.probes.activations, cfg.probes.gradients)]
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=epochs, logger=logger,
                         log_every_n_steps=cfg.trainer.log_every_n_steps, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, precision=cfg.trainer.precision, callbacks=callbacks)
    trainer.fit(copy.deepcopy(template), datamodule=datamodule)
    steps = len(plain_dm.train_batches(lambda: 0))
    print(f"{steps} steps/epoch; {logger.calls} logger calls, {len(logger.metrics)} metrics (probes every "
          f"{cfg.probes.every_n_steps} steps, lr every {cfg.trainer.log_every_n_steps})")
    print(paired_summary("Lightning / plain loop", interleaved.plain_times[1:], interleaved.lightning_times[1:],
                         "epoch") + f"  goal median <= {LIGHTNING_GOAL}")


class Stepper:
    """One network (eager or compiled) with its own SGD: a timed block of train steps, a timed eval pass."""

    def __init__(self, cfg, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        optim = cfg.optim
        self.opt = torch.optim.SGD(parameter_groups(model, optim.weight_decay), lr=0.01, momentum=optim.momentum)

    def _timed(self, fn: Callable[[], None]) -> float:
        synchronize(self.device)
        start = clock()
        fn()
        synchronize(self.device)
        return clock() - start

    def train(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        def run() -> None:
            self.model.train()
            for x, y in batches:
                loss = F.cross_entropy(self.model(x), y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()

        return self._timed(run) / len(batches)

    def eval(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        def run() -> None:
            self.model.eval()
            with torch.inference_mode():
                for x, y in batches:
                    F.cross_entropy(self.model(x), y)

        return self._timed(run) / len(batches)


def compiled_vs_eager(cfg, template: NormClassifier, datamodule, pairs: int, block: int,
                      device: torch.device) -> None:
    train = list(datamodule.train_batches(lambda: 0))[:block]
    val = list(datamodule.val_dataloader())
    eager_model = copy.deepcopy(template.model).to(device)
    compiled_model = copy.deepcopy(template.model).to(device)
    compiled_model.compile()  # what trainer.compile=true does (trainer.run._check_fits)
    eager, compiled = Stepper(cfg, eager_model, device), Stepper(cfg, compiled_model, device)
    start = time.perf_counter()
    for side in (eager, compiled):  # warm-up: compiles the train and eval graphs of every batch shape
        for _ in range(2):
            side.train(train)
            side.eval(val)
    print(f"warm-up (compiling) {time.perf_counter() - start:.1f} s; train block {len(train)} batches of "
          f"{len(train[0][1])}, eval {len(val)} batches ({', '.join(str(len(y)) for _, y in val)})")
    times: dict[str, list[float]] = {"eager train": [], "compiled train": [], "eager eval": [], "compiled eval": []}
    for _ in range(pairs):
        times["eager train"].append(eager.train(train))
        times["compiled train"].append(compiled.train(train))
        times["eager eval"].append(eager.eval(val))
        times["compiled eval"].append(compiled.eval(val))
    print(paired_summary("train step compiled / eager", times["eager train"], times["compiled train"], "step"))
    print(paired_summary("eval step  compiled / eager", times["eager eval"], times["compiled eval"], "batch"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="compiled vs eager instead of Lightning vs plain")
    parser.add_argument("--pairs", type=int, default=20, help="timed pairs (Lightning vs plain: epochs of each)")
    parser.add_argument("--block", type=int, default=8, help="--compile: training batches per timed train block")
    parser.add_argument("--accelerator", default="cpu", help="cpu | gpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="cpu: process CPU time; wall; auto: cpu on the CPU with one thread, else wall")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.batch_size=128")
    args = parser.parse_args()
    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, ["data.val_split=0.2", *args.overrides])
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
    clock_name = args.clock
    if clock_name == "auto":
        clock_name = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    use_clock(clock_name)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.load()
    template = NormClassifier.from_config(cfg, datamodule.num_classes, datamodule.in_channels, datamodule.image_size)
    plain_dm = build_datamodule(cfg)  # the plain side's copy of the same data, moved to its device once
    plain_dm.load()
    plain_dm.train_set, plain_dm.val_set = plain_dm.train_set.to(device), plain_dm.val_set.to(device)
    plain_dm.mean, plain_dm.std = plain_dm.mean.to(device), plain_dm.std.to(device)
    print(f"model {cfg.model.arch}-{cfg.model.depth} norm {cfg.model.norm}  data {cfg.data.name} "
          f"batch {cfg.data.batch_size}  device {device}  threads {torch.get_num_threads()}  clock {clock_name}  "
          f"torch {torch.__version__}")
    if args.compile:
        compiled_vs_eager(cfg, template, plain_dm, args.pairs, args.block, device)
    else:
        lightning_vs_plain(cfg, template, datamodule, plain_dm, args.pairs, args.accelerator, device)


if __name__ == "__main__":
    main()
