"""The final weights evaluated under each kind of normalization statistics (``eval.norm_stats``).

Wu & Johnson ("Rethinking 'Batch' in BatchNorm", 2021) separate BN's train/test inconsistency
from what the weights learned by evaluating one set of weights three ways:

- ``running``: the layers' running statistics (the EMA), what ``val_acc`` always is;
- ``precise``: population statistics of the final weights, :func:`normlayers.precise_stats` over at
  most ``eval.precise_batches`` training batches (one epoch at most, as the run's loader yields them);
- ``batch``: every norm layer normalises with the statistics of the batch it is given, as in training:
  validation images in batches of ``data.batch_size``, cut over the virtual devices, so each
  statistic sees the training per-device batch. The last, short batch is filled with the samples just
  before it, which are not scored twice.

Each kind logs ``val_acc/<kind>`` and ``val_loss/<kind>`` (``running`` repeats ``val_acc``/``val_loss``).
Evaluation runs on a copy of the model, so the run's own weights and buffers are untouched. Under
DDP each rank scores its validation shard and the sums are reduced.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlayers import NormLayer, precise_stats


def _scored(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, int]], device) -> tuple[float, float, float]:
    """(summed loss, correct, samples) of the last ``new`` samples of each ``(x, y, new)``."""
    loss = correct = seen = 0.0
    with torch.no_grad():
        for x, y, new in batches:
            logits = model(x.to(device))[-new:]
            target = y.to(device)[-new:]
            loss += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += float((logits.argmax(1) == target).sum())
            seen += new
    return loss, correct, seen


def _whole(batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor, int]]:
    for x, y in batches:
        yield x, y, len(y)


def rebatched(batches: Iterable[tuple[Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor, int]]:
    """The samples of ``batches`` again in batches of ``size``; a short last one is filled from before it."""
    xs, ys, previous = [], [], None
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        while sum(len(v) for v in ys) >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            previous = (x_all[:size], y_all[:size])
            yield previous[0], previous[1], size
            xs, ys = [x_all[size:]], [y_all[size:]]
    left = sum(len(v) for v in ys)
    if left:
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        if previous is not None:
            x_all, y_all = torch.cat([previous[0], x_all])[-size:], torch.cat([previous[1], y_all])[-size:]
        yield x_all, y_all, left


def evaluate_norm_stats(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                        cfg) -> dict[str, float]:
    """``{"val_acc/<kind>": ..., "val_loss/<kind>": ...}`` for every kind in ``cfg.eval.norm_stats``."""
    out: dict[str, float] = {}
    device = module.device
    for kind in cfg.eval.norm_stats:
        model = copy.deepcopy(module.model).eval()
        val = datamodule.val_dataloader()
        if kind == "precise":
            train = datamodule.train_dataloader()
            count = min(cfg.eval.precise_batches, len(train))
            precise_stats(model, (x.to(device) for x, _ in itertools.islice(train, count)))
            batches = _whole(val)
        elif kind == "batch":
            for layer in model.modules():
                if isinstance(layer, NormLayer) and layer.batch_dependent:
                    layer.train()
            batches = rebatched(val, cfg.data.batch_size)
        else:
            batches = _whole(val)
        sums = torch.tensor(_scored(model, batches, device), dtype=torch.float64, device=device)
        loss, correct, seen = trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        out[f"val_acc/{kind}"], out[f"val_loss/{kind}"] = correct / seen, loss / seen
    return out
