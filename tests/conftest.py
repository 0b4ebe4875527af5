"""Shared test settings: small thread counts (CI has 2 cores) and a quiet MLflow default."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("PL_DISABLE_FORK", "1")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Each test runs in its own directory, so default paths (mlflow.db, runs/) never collide."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield



@pytest.fixture
def crash_at():
    """``crash_at(step)``: a Lightning callback that dies at that optimizer step, as a preempted job would."""
    from pytorch_lightning.callbacks import Callback

    class CrashAt(Callback):
        def __init__(self, step: int):
            self.step = step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step:
                raise RuntimeError("simulated preemption")

    return CrashAt
