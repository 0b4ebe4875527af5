"""The layer probe (activation mean/std, weight-gradient norm, output-gradient concentration) against the
same quantities computed directly, layer by layer, on a copy of the initial model and the first batch."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer import NormClassifier, load_config
from trainer.callbacks import LayerProbe
from trainer.probes import logit_gradient_concentration


def logged(path) -> dict[int, dict[str, float]]:
    """metrics.csv of a CSVLogger as {step: {metric: value}}."""
    out: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}
            out.setdefault(int(row["step"]), {}).update(values)
    return out


def concentration_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """max_c sum_i g_ic^2 / sum_ic g_ic^2 with g_i = softmax(z_i) - onehot(y_i), written out."""
    columns = [0.0] * logits.shape[1]
    for z, y in zip(logits.tolist(), targets.tolist(), strict=True):
        exp = [math.exp(v - max(z)) for v in z]
        for c, e in enumerate(exp):
            g = e / sum(exp) - (1.0 if c == y else 0.0)
            columns[c] += g * g
    return max(columns) / sum(columns)


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_probe_at_initialisation_equals_a_direct_computation(norm, tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.arch=mlp", "model.depth=3", "model.width=16", f"model.norm={norm}",
                             "optim.warmup_epochs=0", "trainer.accelerator=cpu"])
    module = NormClassifier.from_config(cfg, num_classes=10, in_channels=1, image_size=8)
    initial = copy.deepcopy(module.model).train()
    x, y = torch.randn(64, 1, 8, 8) * 3.0, torch.randint(0, 10, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=CSVLogger(tmp_path, name="probe"),
                         callbacks=[LayerProbe(every_n_steps=2)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=loader)
    metrics = logged(trainer.logger.log_dir + "/metrics.csv")
    assert {s for s, m in metrics.items() if "probe/grad_concentration" in m} == {0, 2}  # init, then training

    # the direct computation: the first batch through the initial model, one layer after another
    x0, y0 = x[:16], y[:16]
    outputs, h = [], x0
    for index, layer in enumerate(initial.features):
        h = layer(h)
        if isinstance(layer, nn.Linear):
            outputs.append((f"features.{index}", layer, h))
    logits = initial.fc(initial.final_norm(h))
    outputs.append(("fc", initial.fc, logits))
    F.cross_entropy(logits, y0).backward()

    at_init = metrics[0]
    names = [f"{i:03d}_{path}" for i, (path, _, _) in enumerate(outputs)]
    assert {k.partition("/")[2].partition("/")[2] for k in at_init if k.startswith("probe/act_std/")} == set(names)
    for name, (_, layer, out) in zip(names, outputs, strict=True):
        values = out.detach().reshape(-1).tolist()
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        grad_norm = math.sqrt(sum(g * g for g in layer.weight.grad.reshape(-1).tolist()))
        assert at_init[f"probe/act_mean/{name}"] == pytest.approx(mean, rel=1e-4, abs=1e-6)
        assert at_init[f"probe/act_std/{name}"] == pytest.approx(std, rel=1e-4)
        assert at_init[f"probe/grad_norm/{name}"] == pytest.approx(grad_norm, rel=1e-4)
    expected = concentration_by_hand(logits.detach(), y0)
    assert at_init["probe/grad_concentration"] == pytest.approx(expected, rel=1e-5)
    assert metrics[2]["probe/act_std/000_features.1"] != at_init["probe/act_std/000_features.1"]  # weights moved


def test_concentration_runs_from_spread_to_one_class():
    targets = torch.arange(10).repeat(5)
    uniform = torch.zeros(50, 10)
    assert float(logit_gradient_concentration(uniform, targets)) == pytest.approx(0.1)
    collapsed = torch.zeros(50, 10)
    collapsed[:, 3] = 30.0  # every input confidently in class 3
    assert float(logit_gradient_concentration(collapsed, targets)) == pytest.approx(0.5, abs=1e-3)
    random = torch.randn(50, 10)
    assert float(logit_gradient_concentration(random, targets)) == pytest.approx(concentration_by_hand(random, targets))
