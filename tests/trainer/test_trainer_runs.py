"""Whole runs through `normlab train`: every norm variant, the default's accuracy, MLflow records,
resume == uninterrupted, divergence, and a 2-process DDP run logging one MLflow run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import normlayers
from trainer import load_config, run_key, train
from trainer.cli import main
from trainer.data import build_datamodule
from trainer.module import NormClassifier

TINY = ["model.depth=8", "data.batch_size=16", "data.val_batch_size=128", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory) -> str:
    """One sqlite store for the module: creating MLflow's tables costs seconds per store."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _runs(uri: str, experiment: str = "normlab"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


@pytest.mark.parametrize("norm", sorted(normlayers.available()))
def test_every_norm_variant_trains_a_few_steps(norm, shared_uri, capsys):
    argv = [*TINY, "model.width=32", "data.batch_size=32", f"model.norm={norm}", "trainer.max_epochs=1",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "probes.every_n_steps=2",
            f"tracking.uri={shared_uri}", f"tracking.experiment=variants-{norm}"]
    assert main(argv) == 0, capsys.readouterr().err
    cfg = load_config(None, argv)
    result = json.loads((Path("runs") / run_key(cfg) / "result.json").read_text())
    assert result["status"] == "finished" and result["metrics"]["diverged"] == 0.0
    assert 0.0 <= result["metrics"]["val_acc"] <= 1.0 and torch.isfinite(torch.tensor(result["metrics"]["val_loss"]))
    client, runs = _runs(shared_uri, f"variants-{norm}")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == result["run_id"]
    assert run.data.tags["norm_name"] == norm and run.data.tags["normlab.status"] == "finished"
    assert "train_loss" in run.data.metrics and "val_acc" in run.data.metrics
    assert any(k.startswith("probe/act_std/000_") for k in run.data.metrics)


def test_default_run_reaches_95_percent_and_is_tracked(capsys):
    """`normlab train` with no arguments: ResNet-20 + bn on digits, 15 epochs, val_acc >= 0.95."""
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "finished" in out
    # no terminal: one quiet line per epoch instead of a progress bar
    assert "epoch 1/15  step 22  train_loss" in out and "epoch 15/15  step 330" in out and "\r" not in out
    client, runs = _runs("sqlite:///mlflow.db")
    assert len(runs) == 1
    run = runs[0]
    cfg = load_config(None)
    key = run_key(cfg)
    assert run.data.metrics["val_acc"] >= 0.95, run.data.metrics
    assert run.data.metrics["val_acc_top5"] >= run.data.metrics["val_acc"]
    tags = run.data.tags
    assert tags["run_key"] == key and tags["norm"] == "bn" and tags["norm_name"] == "bn"
    assert (tags["batch_size"], tags["global_batch_size"], tags["world_size"]) == ("64", "64", "1")
    assert tags["normlab.status"] == "finished" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.norm"] == "bn" and params["data.batch_size"] == "64" and params["seed"] == "0"
    assert params["optim.lr"] == "0.1" and params["tracking.uri"] == "sqlite:///mlflow.db"
    assert params["derived.global_batch_size"] == "64" and float(params["derived.effective_lr"]) == 0.1
    metrics = run.data.metrics
    assert metrics["diverged"] == 0.0 and "diverged_step" not in metrics and "lr" in metrics
    for kind in ("act_mean", "act_std", "grad_norm"):  # the stem conv, 18 block convs, the classifier
        probes = sorted(k for k in metrics if k.startswith(f"probe/{kind}/"))
        assert len(probes) == 20, probes
        assert probes[0] == f"probe/{kind}/000_stem" and probes[-1] == f"probe/{kind}/019_fc"
    history = client.get_metric_history(run.info.run_id, "probe/grad_norm/000_stem")
    assert [m.step for m in history] == list(range(0, 330, 25))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    run_dir = Path("runs") / key
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "mlflow_run_id").read_text().strip() == run.info.run_id
    # the same command again: nothing retrained, the recorded result reported
    assert main([]) == 0
    assert "already finished" in capsys.readouterr().err and len(_runs("sqlite:///mlflow.db")[1]) == 1


def test_resume_equals_uninterrupted(tmp_path, shared_uri, crash_at):
    # 4 epochs of 22 steps; dropout (ic) exercises the re-seeded global generator, augmentation is on
    overrides = [*TINY, "model.norm=ic", "trainer.max_epochs=4", "trainer.deterministic=true",
                 "probes.every_n_steps=5", f"tracking.uri={shared_uri}", "tracking.experiment=resume",
                 "data.batch_size=64"]
    whole = train(load_config(None, [*overrides, f"output.root={tmp_path / 'whole'}"]))
    cfg = load_config(None, [*overrides, f"output.root={tmp_path / 'parts'}"])
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(cfg, callbacks=[crash_at(step=50)])  # mid-epoch 3: last.ckpt is from the end of epoch 2
    run_dir = Path(whole.run_dir.replace("whole", "parts"))
    first_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(shared_uri)
    assert client.get_run(first_id).info.status == "FAILED"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 44
    resumed = train(cfg)
    assert resumed.run_id == first_id and resumed.run_key == whole.run_key and resumed.status == "finished"
    assert client.get_run(first_id).info.status == "FINISHED"
    for key in ("val_loss", "val_acc", "train_loss", "train_acc"):
        assert resumed.metrics[key] == whole.metrics[key], key
    a = torch.load(Path(whole.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 88
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    runs = [r for r in _runs(shared_uri, "resume")[1] if r.data.tags["run_key"] == whole.run_key]
    assert len(runs) == 2  # the uninterrupted one and the resumed one, not a third
    history = client.get_metric_history(first_id, "val_acc")
    assert sorted(m.step for m in history) == sorted(m.step for m in client.get_metric_history(whole.run_id, "val_acc"))
    # nothing logged twice: the probes and lr of steps 45-50, redone after the resume, are not logged again
    for key in client.get_run(whole.run_id).data.metrics:
        steps = [m.step for m in client.get_metric_history(first_id, key)]
        assert sorted(steps) == sorted(m.step for m in client.get_metric_history(whole.run_id, key)), key


@pytest.mark.parametrize("stop, validations, final_step", [
    (["trainer.max_steps=5", "trainer.max_epochs=-1"], [5], 5),  # inside epoch 1: the final weights are validated
    # at epoch ends, no extra validation (Lightning logs fit's validation at the index of the step before)
    (["trainer.max_epochs=2", "trainer.limit_train_batches=3"], [2, 5], 6),
])
def test_the_final_weights_are_validated_once(stop, validations, final_step, tmp_path, shared_uri):
    argv = [*TINY, *stop, "probes.every_n_steps=0", f"tracking.uri={shared_uri}",
            f"tracking.experiment=final-{final_step}", f"output.root={tmp_path}"]
    assert main(argv) == 0
    cfg = load_config(None, argv)
    result = json.loads((tmp_path / run_key(cfg) / "result.json").read_text())
    history = MlflowClient(shared_uri).get_metric_history(result["run_id"], "val_acc")
    assert [m.step for m in history] == validations
    # the last value is the accuracy of the checkpointed final weights on the validation split
    datamodule = build_datamodule(cfg)
    datamodule.load()
    datamodule.setup("validate")
    module = NormClassifier.from_config(cfg, datamodule.num_classes, datamodule.in_channels, datamodule.image_size)
    checkpoint = torch.load(tmp_path / run_key(cfg) / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == final_step
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    with torch.no_grad():
        pairs = [(module(x).argmax(1), y) for x, y in datamodule.val_dataloader()]
    correct = sum(int((p == y).sum()) for p, y in pairs)
    total = sum(len(y) for _, y in pairs)
    assert history[-1].value == pytest.approx(correct / total) == result["metrics"]["val_acc"]


EXECUTION = [*TINY, "trainer.max_steps=6", "trainer.max_epochs=-1", "probes.every_n_steps=3",
             "probes.fisher_every_n_steps=3", "trainer.deterministic=true"]


@pytest.fixture(scope="module")
def plain_execution(tmp_path_factory, shared_uri):
    return train(load_config(None, [*EXECUTION, f"tracking.uri={shared_uri}", "tracking.experiment=execution",
                                    f"output.root={tmp_path_factory.mktemp('plain')}"]))


@pytest.mark.parametrize("option, rel", [
    ("trainer.channels_last=true", 1e-3),  # other convolution kernels, other float sums
    ("trainer.compile=true", 1e-3),  # inductor's fused kernels reorder float sums
    ("trainer.precision=bf16-mixed", 3e-2),  # 8 mantissa bits in the convolutions; statistics stay float32
])
def test_channels_last_compile_and_bf16_train_the_same_model(option, rel, plain_execution, tmp_path, shared_uri):
    result = train(load_config(None, [*EXECUTION, option, f"tracking.uri={shared_uri}",
                                      "tracking.experiment=execution", f"output.root={tmp_path}"]))
    assert result.status == "finished"
    client = MlflowClient(shared_uri)
    ours, plain = (client.get_run(r.run_id).data.metrics for r in (result, plain_execution))
    for key in ("train_loss", "val_loss", "fisher/lambda_max", "probe/grad_concentration"):
        assert ours[key] == pytest.approx(plain[key], rel=rel), key
    state = torch.load(Path(result.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    running = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
    assert running and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in running.values())


def test_huge_lr_without_norm_is_logged_diverged(shared_uri, capsys):
    argv = [*TINY, "model.norm=none", "optim.lr=1000", "optim.warmup_epochs=0", "trainer.max_epochs=3",
            f"tracking.uri={shared_uri}", "tracking.experiment=diverge", "tracking.log_checkpoints=true"]
    assert main(argv) == 0  # a diverged run is a result
    result = json.loads((Path("runs") / run_key(load_config(None, argv)) / "result.json").read_text())
    assert result["status"] == "diverged" and result["metrics"]["diverged"] == 1.0
    client, runs = _runs(shared_uri, "diverge")
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["normlab.status"] == "diverged"
    assert run.data.metrics["diverged"] == 1.0
    step = run.data.metrics["diverged_step"]
    assert 1 <= step < 3 * (1437 // 16) and step == result["metrics"]["diverged_step"]
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "last")]
    assert "last/last.ckpt" in logged  # tracking.log_checkpoints


def test_ddp_two_processes_log_one_mlflow_run(tmp_path):
    normlab = shutil.which("normlab", path=str(Path(sys.executable).parent))
    assert normlab, "the normlab console script is installed with the package"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ddp.db'}"}
    # sync_norm: the lazily imported trainer.norm_sync plugin synchronises bn over the two processes
    argv = [normlab, "train", *TINY, "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=1",
            "trainer.limit_train_batches=4", "optim.lr_scaling=linear", "probes.every_n_steps=2",
            "trainer.sync_norm=true"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = _runs(env["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1, [r.data.tags for r in runs]
    tags, params = runs[0].data.tags, runs[0].data.params
    assert tags["world_size"] == "2" and tags["batch_size"] == "16" and tags["global_batch_size"] == "32"
    assert float(params["derived.effective_lr"]) == pytest.approx(0.1 * 32 / 128)
    assert params["trainer.sync_norm"] == "True" and params["derived.world_size"] == "2"
    assert runs[0].info.status == "FINISHED" and tags["normlab.status"] == "finished"
    assert "val_acc" in runs[0].data.metrics


def test_progress_bar_on_a_terminal(tmp_path):
    """On a terminal Lightning's progress bar is shown (and the per-epoch lines are not)."""
    import fcntl
    import pty
    import struct
    import termios

    normlab = shutil.which("normlab", path=str(Path(sys.executable).parent))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm draws nothing at width 0
    argv = [normlab, "train", *TINY, "trainer.max_steps=3", f"tracking.uri=sqlite:///{tmp_path / 'tty.db'}"]
    proc = subprocess.Popen(argv, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=200) == 0
    shown = b"".join(chunks).decode(errors="replace")
    # a step budget is the whole budget: the bar counts the 3 steps (not the epoch's 1437 // 16 batches)
    assert "Epoch 0" in shown and "3/3 [" in shown and "it/s" in shown, shown[-2000:]
    assert "epoch 1/" not in shown
