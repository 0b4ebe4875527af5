"""The experiment protocol of a run: step budgets, virtual devices, evaluation under each kind of
normalization statistics, and the outcome classes, through real runs tracked in a real MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
from mlflow.tracking import MlflowClient
from torch import nn

from trainer import load_config, run_key, train
from trainer.config import ConfigError
from trainer.module import lr_factor
from trainer.outcome import CHANCE_FACTOR
from trainer.tracking import OUTCOME_TAG

TINY = ["model.depth=8", "model.width=8", "data.batch_size=16", "data.val_batch_size=128", "trainer.accelerator=cpu",
        "probes.every_n_steps=0"]
STEPS_PER_EPOCH = 1437 // 16  # digits: 1437 training images after the 20% split


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _run(uri: str, experiment: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def _result(argv: list[str]) -> dict:
    return json.loads((Path("runs") / run_key(load_config(None, argv)) / "result.json").read_text())


class Schedule(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        self.steps = trainer.global_step
        self.lr = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]


def test_a_step_budget_is_the_whole_budget_and_the_schedule_ends_at_max_steps(uri):
    steps = STEPS_PER_EPOCH + 7  # more than the one epoch max_epochs allows, not a whole number of epochs
    argv = [*TINY, "trainer.max_epochs=1", f"trainer.max_steps={steps}", "optim.warmup_steps=5",
            "trainer.log_every_n_steps=1", f"tracking.uri={uri}", "tracking.experiment=steps"]
    schedule = Schedule()
    train(load_config(None, argv), callbacks=[schedule])
    assert schedule.steps == steps
    assert schedule.lr == pytest.approx(0.0, abs=1e-12)  # cosine at its end: the schedule's total is max_steps
    client, run = _run(uri, "steps")
    history = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(steps))
    optim = load_config(None, argv).optim
    assert history[4].value == pytest.approx(0.1 * lr_factor(4, steps, 5, optim))  # the last warm-up step: 0.1
    assert history[4].value == pytest.approx(0.1)
    assert history[-1].value == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (steps - 6) / (steps - 5))))


def test_virtual_devices_train_and_their_config_errors(uri):
    argv = [*TINY, "model.norm=bn", "trainer.virtual_devices=8", "trainer.max_steps=20", f"tracking.uri={uri}",
            "tracking.experiment=virtual"]
    result = train(load_config(None, argv))
    assert result.status == "finished" and result.metrics["val_acc"] > CHANCE_FACTOR / 10
    with pytest.raises(ConfigError, match="trainer.virtual_devices: must be a positive int dividing data.batch_size"):
        load_config(None, [*TINY, "trainer.virtual_devices=3"])


def test_evaluation_under_running_precise_and_batch_statistics_is_logged(uri):
    argv = [*TINY, "model.norm=bn", "data.batch_size=8", "trainer.virtual_devices=4", "trainer.max_steps=60",
            "eval.norm_stats=[running,precise,batch]", "eval.precise_batches=20", f"tracking.uri={uri}",
            "tracking.experiment=norm-stats"]
    train(load_config(None, argv))
    metrics = _result(argv)["metrics"]
    _, run = _run(uri, "norm-stats")
    for kind in ("running", "precise", "batch"):
        for name in (f"val_acc/{kind}", f"val_loss/{kind}"):
            assert run.data.metrics[name] == pytest.approx(metrics[name])
        assert 0.0 <= metrics[f"val_acc/{kind}"] <= 1.0 and metrics[f"val_loss/{kind}"] > 0
    assert metrics["val_acc/running"] == pytest.approx(metrics["val_acc"])
    assert metrics["val_loss/running"] == pytest.approx(metrics["val_loss"], rel=1e-5)
    # the precise and batch figures are not the running one recomputed (the EMA differs after 60 steps)
    assert len({round(metrics[f"val_loss/{k}"], 6) for k in ("running", "precise", "batch")}) == 3


class Collapse(pl.Callback):
    """After the first epoch the classifier is zeroed and frozen: every image gets the same class."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            head = [m for m in pl_module.model.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
            head.requires_grad_(False)


@pytest.mark.parametrize(("case", "options", "callbacks", "expected"), [
    ("finished", ["trainer.max_epochs=1"], [], "finished"),
    ("tiny-lr", ["optim.lr=1e-7", "trainer.max_epochs=2"], [], "not_learning"),
    ("exploding-lr", ["model.norm=none", "optim.lr=1000", "optim.warmup_epochs=0", "trainer.max_epochs=2"], [],
     "diverged"),
    ("collapse", ["trainer.max_epochs=2"], [Collapse()], "collapsed"),
])
def test_each_outcome_class_from_a_run_built_to_be_one(case, options, callbacks, expected, uri):
    argv = [*TINY, *options, f"tracking.uri={uri}", f"tracking.experiment=outcome-{case}"]
    result = train(load_config(None, argv), callbacks=callbacks)
    assert result.outcome["kind"] == expected
    recorded = _result(argv)
    assert recorded["outcome"] == result.outcome
    _, run = _run(uri, f"outcome-{case}")
    assert run.data.tags[OUTCOME_TAG] == expected
    assert run.data.tags["normlab.status"] == ("diverged" if expected == "diverged" else "finished")
    if expected == "diverged":
        assert result.outcome["step"] == result.metrics["diverged_step"] >= 1
        assert result.outcome["tripped"].startswith(("non-finite loss", "loss "))


def test_the_chance_rule_and_the_classes_at_their_boundaries():
    from trainer.outcome import at_chance, classify

    assert at_chance(0.15, 10) and not at_chance(0.1501, 10) and at_chance(0.75, 2) and not at_chance(None, 10)
    assert classify(None, None, [0.15, 0.12], 10).kind == "not_learning"
    assert classify(None, None, [0.2, 0.15], 10).kind == "collapsed"
    assert classify(None, None, [0.1, 0.2], 10).kind == "finished"
    assert classify(None, None, [], 10).kind == "finished"  # never validated
    assert classify(7, "non-finite loss (nan)", [0.9], 10) == classify(7, "non-finite loss (nan)", [], 10)
