"""A damaged last.ckpt never makes a run crash-loop: truncated, garbage or empty, the run says so in
one line and resumes from the previous good checkpoint (or starts again, saying so); a kill during
the save with $TMPDIR on another filesystem leaves last.ckpt whole. Real runs, real SQLite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from trainer import load_config, train

TINY = ["model.arch=cifar_resnet", "model.depth=8", "model.width=4", "data.batch_size=16",
        "trainer.accelerator=cpu", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
        "probes.every_n_steps=0", "trainer.max_epochs=3"]


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 3], "garbage": os.urandom(4096), "empty": b""}[how])


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(how, tmp_path, crash_at, capfd):
    cfg = load_config(None, [*TINY, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(cfg, callbacks=[crash_at(step=10)])  # in epoch 3: checkpoints of epochs 1 (.prev) and 2 (last)
    ckpt = next(Path(cfg.output.root).iterdir()) / "checkpoints"
    last = ckpt / "last.ckpt"
    assert torch.load(ckpt / "last.ckpt.prev", weights_only=False)["global_step"] == 4
    _damage(last, how)
    capfd.readouterr()

    result = train(cfg)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "unreadable" in line]
    assert len(lines) == 1 and f"checkpoint {last} is unreadable" in lines[0]
    assert f"resuming from {ckpt / 'last.ckpt.prev'}" in lines[0] and "Traceback" not in err
    assert result.status == "finished"
    assert torch.load(last, weights_only=False)["global_step"] == 12
    run = MlflowClient(cfg.tracking.uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["normlab.status"] == "finished"


def test_no_readable_checkpoint_starts_again_into_a_new_mlflow_run(tmp_path, crash_at, capfd):
    cfg = load_config(None, [*TINY, "trainer.max_epochs=2", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(cfg, callbacks=[crash_at(step=6)])  # one checkpoint only (epoch 1)
    run_dir = next(Path(cfg.output.root).iterdir())
    first_id = (run_dir / "mlflow_run_id").read_text().strip()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    capfd.readouterr()
    result = train(cfg)
    err = capfd.readouterr().err
    assert "is unreadable (it is empty); starting the run again from the beginning" in err
    assert "Traceback" not in err and result.status == "finished" and result.run_id != first_id
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(first_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_acc")] == [3, 7]


KILL_DURING_SAVE = r'''
import os, signal, sys, threading, time
from pathlib import Path
import torch
from pytorch_lightning.callbacks import Callback
from trainer import load_config, train

cfg = load_config(None, sys.argv[1:])
folder = Path(cfg.output.root)

class BigCheckpointKilledMidWrite(Callback):
    """From epoch 2 on the checkpoint carries 24 MB more, and the process is killed while a file in the
    checkpoint folder is being written (a node failure or OOM kill during the save)."""
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.current_epoch < 1:
            return
        checkpoint["ballast"] = torch.ones(6 * 2**20)
        def kill_mid_write():
            known = {}
            while True:
                for path in folder.rglob("*ckpt*"):
                    size = path.stat().st_size if path.exists() else 0
                    if 0 < size < 20 * 2**20 and size != known.setdefault(path, size):
                        os.kill(os.getpid(), signal.SIGKILL)
                    known[path] = size
        threading.Thread(target=kill_mid_write, daemon=True).start()

train(cfg, callbacks=[BigCheckpointKilledMidWrite()])
'''


def test_a_kill_during_the_save_with_tmpdir_elsewhere_leaves_a_whole_checkpoint(tmp_path):
    other_fs = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    tmpdir = Path(os.environ.get("NORMLAB_TEST_OTHER_TMPDIR", other_fs)) / f"normlab-tmp-{os.getpid()}"
    tmpdir.mkdir()
    args = [*TINY, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"output.root={tmp_path / 'runs'}"]
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    try:
        killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], env=env, capture_output=True,
                                text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert list(tmpdir.iterdir()) == []  # nothing written under $TMPDIR
        resumed = subprocess.run([sys.executable, "-m", "trainer.cli", *args], env=env, capture_output=True,
                                 text=True, timeout=300)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr and "resuming run" in resumed.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".partial")]


def test_killed_right_after_a_checkpoint_the_resumed_run_has_every_epochs_train_metrics(tmp_path):
    from pytorch_lightning.callbacks import Checkpoint

    class DieAfterTheCheckpoint(Checkpoint):  # a Checkpoint: Lightning calls it after the ModelCheckpoint
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("killed right after the checkpoint")

    cfg = load_config(None, [*TINY, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(RuntimeError, match="right after the checkpoint"):
        train(cfg, callbacks=[DieAfterTheCheckpoint()])
    result = train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    for name in ("train_loss", "train_acc", "val_acc"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == [3, 7, 11], name


def test_a_run_killed_before_its_first_checkpoint_says_it_starts_from_the_beginning(tmp_path, crash_at, capfd):
    cfg = load_config(None, [*TINY, "trainer.max_epochs=1", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(cfg, callbacks=[crash_at(step=1)])
    capfd.readouterr()
    assert train(cfg).status == "finished"
    err = capfd.readouterr().err
    assert "from the start (it had no checkpoint yet)" in err and "last.ckpt" not in err
