"""``optim.precondition=bnp`` in whole runs: one-line config errors (exit 2), the option in MLflow,
the preconditioner's statistics in the checkpoint (a resumed run equals the uninterrupted one), the
one-time warning on top of a batch-dependent norm, and `bn` refusing batch 1 where BNP trains."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from trainer import load_config, train
from trainer.cli import main
from trainer.precondition import BNPCallback

TINY = ["model.depth=8", "data.val_batch_size=128", "trainer.accelerator=cpu", "probes.every_n_steps=0"]


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.parametrize("override,expected", [
    ("optim.bnp_eps=-1e-5", "optim.bnp_eps: eps must be > 0, got -1e-05"),
    ("optim.bnp_momentum=1.5", "optim.bnp_momentum: momentum must be in [0, 1]"),
    ("optim.bnp_momentum=-0.1", "optim.bnp_momentum: momentum must be in [0, 1]"),
    ("optim.bnp_skip=[batchnorm]", "optim.bnp_skip: skip names layer types, 'batchnorm' is not one; choose from "
                                   "linear, conv1d, conv2d, conv3d"),
    ("optim.precondition=kfac", "optim.precondition: 'kfac' is not one of none, bnp"),
])
def test_bad_options_are_one_line_and_exit_2(override, expected, capsys):
    argv = [*TINY, "model.norm=none", "optim.precondition=bnp", override]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not Path("runs").exists() and not Path("mlflow.db").exists()  # nothing half-done


def test_bn_at_batch_1_refuses_where_bnp_trains(tmp_path, capsys):
    """On an MLP (features N x C) BN at batch 1 has one value per statistic and refuses; BNP trains.
    (On a ResNet's convs BN at batch 1 takes its statistics over the positions and runs.)"""
    mlp = ["model.arch=mlp", "model.depth=2", "model.width=32", "data.batch_size=1", "trainer.max_steps=5",
           "trainer.max_epochs=-1", "trainer.limit_val_batches=1", *TINY[1:], f"output.root={tmp_path}"]
    assert main([*mlp, "model.norm=bn"]) == 2
    err = capsys.readouterr().err
    assert "more than one value per statistic" in err and err.count("\n") == 1
    assert main([*mlp, "model.norm=none", "optim.precondition=bnp"]) == 0, capsys.readouterr().err


def _ckpt(run_dir: str) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=False)


def test_bnp_run_is_tracked_and_resumes_exactly(tmp_path, shared_uri, crash_at):
    overrides = [*TINY, "model.norm=none", "optim.precondition=bnp", "optim.bnp_momentum=0.05", "optim.lr=0.02",
                 "data.batch_size=64", "trainer.max_epochs=2", "trainer.deterministic=true",
                 f"tracking.uri={shared_uri}", "tracking.experiment=bnp-resume"]
    whole = train(load_config(None, [*overrides, f"output.root={tmp_path / 'whole'}"]))
    assert whole.status == "finished"
    params = MlflowClient(shared_uri).get_run(whole.run_id).data.params
    assert (params["optim.precondition"], params["optim.bnp_momentum"], params["optim.bnp_eps"]) == \
        ("bnp", "0.05", "0.1")
    cfg = load_config(None, [*overrides, f"output.root={tmp_path / 'parts'}"])
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(cfg, callbacks=[crash_at(step=30)])  # in epoch 2: last.ckpt is from the end of epoch 1
    parts_dir = whole.run_dir.replace("whole", "parts")
    saved = _ckpt(parts_dir)
    assert saved["global_step"] == 22
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("BNPCallback")]
    assert set(state["layers"]) == {"stem", *(f"blocks.{b}.conv{c}" for b in range(3) for c in (1, 2)), "fc"}
    assert all(layer["steps"] == 22 for layer in state["layers"].values())
    resumed = train(cfg)
    assert resumed.status == "finished" and resumed.metrics["val_acc"] == whole.metrics["val_acc"]
    a, b = _ckpt(whole.run_dir), _ckpt(parts_dir)
    assert a["global_step"] == b["global_step"] == 44
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    (sa,) = [v for k, v in a["callbacks"].items() if k.startswith("BNPCallback")]
    (sb,) = [v for k, v in b["callbacks"].items() if k.startswith("BNPCallback")]
    for name, layer in sa["layers"].items():
        assert torch.equal(layer["var"], sb["layers"][name]["var"]) and layer["steps"] == 44


def test_bnp_changes_the_training(tmp_path, shared_uri):
    """The same run with and without the preconditioner ends with different weights."""
    common = [*TINY, "model.norm=none", "data.batch_size=64", "trainer.max_steps=3", "trainer.max_epochs=-1",
              "trainer.limit_val_batches=1", f"tracking.uri={shared_uri}", "tracking.experiment=bnp-diff"]
    plain = train(load_config(None, [*common, f"output.root={tmp_path}"]))
    bnp = train(load_config(None, [*common, "optim.precondition=bnp", f"output.root={tmp_path}"]))
    a, b = _ckpt(plain.run_dir)["state_dict"], _ckpt(bnp.run_dir)["state_dict"]
    assert not torch.equal(a["model.blocks.1.conv1.weight"], b["model.blocks.1.conv1.weight"])


def test_bnp_on_a_batch_dependent_norm_warns_once(tmp_path, shared_uri):
    argv = [*TINY, "model.norm=bn", "optim.precondition=bnp", "data.batch_size=32", "trainer.max_steps=3",
            "trainer.max_epochs=-1", "trainer.limit_val_batches=1", f"tracking.uri={shared_uri}",
            "tracking.experiment=bnp-warn", f"output.root={tmp_path}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(load_config(None, argv))
    assert result.status == "finished"
    ours = [w for w in caught if "optim.precondition=bnp with model.norm=bn" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    plain = [*TINY, "model.norm=gn:groups=4", "optim.precondition=bnp"]
    assert BNPCallback.from_config(dict(load_config(None, plain))).warning is None
