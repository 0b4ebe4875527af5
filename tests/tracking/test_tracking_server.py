"""Training runs log to a real `mlflow server` (started through mlflow/start-server.sh) over HTTP:
params, metrics and artifacts; eight concurrent runs lose no point; a server that goes away in the
middle of a run loses no training, and the run resumes into the same MLflow run once it is back."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pytorch_lightning.callbacks import Callback

from trainer import run_key, train

START_SCRIPT = Path(__file__).resolve().parents[2] / "mlflow" / "start-server.sh"


def test_a_training_run_logs_params_metrics_and_artifacts_over_http(mlflow_server, tiny_config, tmp_path,
                                                                    monkeypatch):
    # The trainer's own default (tracking.uri left alone) plus MLFLOW_TRACKING_URI: what a cluster job does.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    cfg = tiny_config("http-train", "trainer.max_epochs=2", "tracking.log_checkpoints=true")
    result = train(cfg)
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(result.run_id)
    assert run.info.experiment_id == client.get_experiment_by_name("http-train").experiment_id
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert (params["model.norm"], params["data.batch_size"], params["optim.lr"], params["seed"]) == ("bn", "16",
                                                                                                     "0.1", "0")
    assert (tags["run_key"], tags["norm"], tags["normlab.status"]) == (run_key(cfg), "bn", "finished")
    assert metrics["val_acc"] == pytest.approx(result.metrics["val_acc"])
    assert [m.step for m in client.get_metric_history(result.run_id, "val_acc")] == [3, 7]
    probe_steps = sorted(m.step for m in client.get_metric_history(result.run_id, "probe/grad_norm/000_features.0"))
    assert probe_steps == [0, 2, 4, 6]  # probes.every_n_steps=2 over 8 steps

    # Artifacts go through the server into its artifact store, and come back byte for byte.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    local = Path(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path / "dl")))
    assert local.read_bytes() == (Path(result.run_dir) / "config.yaml").read_bytes()
    store = mlflow_server.data_dir / "artifacts"
    assert any(result.run_id in str(p) for p in store.rglob("config.yaml"))
    assert any(result.run_id in str(p) for p in store.rglob("*.ckpt"))  # tracking.log_checkpoints=true


def test_eight_concurrent_runs_each_logging_500_points_lose_none(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment("concurrent")
    start = threading.Barrier(8)

    def job(index: int) -> str:
        own = MlflowClient(mlflow_server.url)
        run_id = own.create_run(experiment_id, run_name=f"job-{index}").info.run_id
        start.wait(timeout=60)  # all eight write at the same time
        now = int(time.time() * 1000)
        for first in range(0, 500, 50):
            own.log_batch(run_id, metrics=[Metric("loss", index * 1000.0 + step, now + step, step)
                                           for step in range(first, first + 50)])
        own.set_terminated(run_id)
        return run_id

    with ThreadPoolExecutor(8) as pool:
        run_ids = list(pool.map(job, range(8)))
    for index, run_id in enumerate(run_ids):
        history = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(s, index * 1000.0 + s) for s in range(500)]
        assert client.get_run(run_id).info.status == "FINISHED"


class StopServerAtSecondEpoch(Callback):
    """Stops the tracking server once the first epoch's checkpoint is on disk, as an outage would."""

    def __init__(self, server, run_dir: Path):
        self.server, self.run_dir = server, run_dir
        self.seen: dict[str, int] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != 1 or self.seen:
            return
        run_id = (self.run_dir / "mlflow_run_id").read_text().strip()
        client = MlflowClient(self.server.url)
        self.seen = {"val_acc": len(client.get_metric_history(run_id, "val_acc")),
                     "probe": len(client.get_metric_history(run_id, "probe/act_std/000_features.0"))}
        self.server.stop()


def test_server_stopped_mid_run_loses_no_training_and_the_run_resumes(mlflow_server, tiny_config, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast instead of MLflow's minutes of retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = tiny_config("outage", f"tracking.uri={mlflow_server.url}")
    run_dir = tmp_path / "runs" / run_key(cfg)
    outage = StopServerAtSecondEpoch(mlflow_server, run_dir)
    try:
        with pytest.raises(MlflowException):
            train(cfg, callbacks=[outage])
    finally:
        mlflow_server.start()
    assert outage.seen == {"val_acc": 1, "probe": 2}  # epoch 0 had reached the server

    # The checkpoint written before the outage is whole: it loads, at the end of epoch 0.
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 4) and checkpoint["state_dict"]
    first_run_id = (run_dir / "mlflow_run_id").read_text().strip()

    result = train(cfg)  # the same call again, server back: resumes
    assert result.run_id == first_run_id and result.status == "finished"
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(first_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["normlab.status"] == "finished"
    # One validation point per epoch and every probe step once: training went on from epoch 1 (not from
    # scratch, which would repeat steps) and the points after the outage reached the server.
    assert [m.step for m in client.get_metric_history(first_run_id, "val_acc")] == [3, 7, 11]
    probe_steps = sorted(m.step for m in client.get_metric_history(first_run_id, "probe/act_std/000_features.0"))
    assert probe_steps == [0, 2, 4, 6, 8, 10]
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--backend-store-uri", "mysql://db/mlflow"], {}, "must be sqlite:///PATH or postgresql://"),
        (["--port", "70000"], {}, "--port must be 1-65535"),
        (["--auth"], {"MLFLOW_AUTH_ADMIN_PASSWORD": ""}, "needs MLFLOW_AUTH_ADMIN_PASSWORD"),
        (["--bogus"], {}, "unknown option '--bogus'"),
    ],
)
def test_start_script_rejects_bad_options_with_one_line(tmp_path, args, env, message):
    done = subprocess.run([str(START_SCRIPT), "--data-dir", str(tmp_path / "data"), *args], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=30)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "data" / "mlflow.db").exists()


def test_the_mlflow_directory_is_not_a_package():
    # An mlflow/__init__.py at the repository root would shadow the MLflow library for every import.
    assert not (START_SCRIPT.parent / "__init__.py").exists()
    import mlflow

    assert Path(mlflow.__file__).parent != START_SCRIPT.parent
