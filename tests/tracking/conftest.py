"""A real `mlflow server`, started through mlflow/start-server.sh on a free loopback port, shared by
the tracking tests; plus an experiment of runs with known values and its regime report."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_SCRIPT = REPO / "mlflow" / "start-server.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """One `mlflow server` process group; stop() and start() again keep its port and stores."""

    def __init__(self, data_dir: Path, *, auth: bool = False, workers: int = 2, env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth, self.workers = auth, workers
        self.env = {**os.environ, **(env or {})}
        self.log = data_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(START_SCRIPT), "--data-dir", str(self.data_dir), "--port", str(self.port),
               "--workers", str(self.workers)]
        if self.auth:
            cmd.append("--auth")
        with open(self.log, "ab") as log:
            # Own session, so stop() can end the server and the workers it forks, and nothing else.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # Workers may outlive the parent by a moment; the port must be free before a restart.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_mlflow_server(tmp_path):
    """Start a server of the test's own (e.g. with --auth); it is stopped after the test."""
    servers = []

    def start(name: str, **options) -> MlflowServer:
        server = MlflowServer(tmp_path / name, **options)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(name="tiny_config")
def _tiny_config(tmp_path):
    """A training config of a few seconds: a 2-layer CNN on 96 synthetic 8x8 images, 4 steps per epoch."""
    from trainer import load_config

    def make(experiment: str, *overrides: str):
        return load_config(None, [
            "data.name=synthetic", "data.synthetic.samples=96", "data.synthetic.image_size=8",
            "data.synthetic.classes=4", "data.batch_size=16", "model.arch=plain_cnn", "model.depth=2",
            "model.width=8", "trainer.accelerator=cpu", "trainer.max_epochs=3", "probes.every_n_steps=2",
            f"tracking.experiment={experiment}", f"output.root={tmp_path / 'runs'}", *overrides])

    return make


# ---------------------------------------------------------------- runs with known values

NORMS = ["bn", "gn:groups=2"]
BATCH_SIZES = [2, 8, 32]
LRS = [0.1, 0.4]
DIVERGED = None  # marks a diverged seed in KNOWN_ACC
# Final val_acc per (norm, batch size, lr) for seeds 0 and 1.
KNOWN_ACC = {
    ("bn", 2, 0.1): (0.60, 0.64), ("bn", 2, 0.4): (0.70, DIVERGED),
    ("bn", 8, 0.1): (0.80, 0.84), ("bn", 8, 0.4): (0.86, 0.88),
    ("bn", 32, 0.1): (0.90, 0.90), ("bn", 32, 0.4): (0.85, 0.87),
    ("gn:groups=2", 2, 0.1): (0.82, 0.80), ("gn:groups=2", 2, 0.4): (0.78, 0.76),
    ("gn:groups=2", 8, 0.1): (0.83, 0.81), ("gn:groups=2", 8, 0.4): (0.84, 0.86),
    ("gn:groups=2", 32, 0.1): (0.84, 0.82), ("gn:groups=2", 32, 0.4): (DIVERGED, DIVERGED),
}
# Final per-layer probes (layer index -> value) per seed, logged at batch 8, lr 0.1 for both norms.
KNOWN_PROBES = {
    "bn": {"act_std": ([1.0, 0.9, 0.8], [1.2, 1.1, 1.0]), "grad_norm": ([0.5, 0.25, 0.125], [0.7, 0.35, 0.175])},
    "gn:groups=2": {"act_std": ([2.0, 2.0, 2.0], [2.2, 2.2, 2.2]), "grad_norm": ([1.0, 1.0, 1.0], [3.0, 3.0, 3.0])},
}
LAYER_PATHS = ["features.0.norm", "features.1.norm", "head.norm"]


def log_known_run(client, experiment_id: str, norm: str, batch_size: int, lr: float, seed: int,
                  val_acc: float | None, *, probes: dict | None = None, finished: bool = True,
                  key: str | None = None, extra_params: dict[str, str] | None = None) -> str:
    """A run carrying the trainer's MLflow names, with the given final values (and ``extra_params``)."""
    from mlflow.entities import Metric, Param

    diverged = finished and val_acc is None
    status = "running" if not finished else ("diverged" if diverged else "finished")
    run_key = key or hashlib.sha1(f"{norm}|{batch_size}|{lr}|{seed}".encode()).hexdigest()[:12]
    tags = {"run_key": run_key, "norm": norm,
            "norm_name": norm.split(":")[0], "batch_size": str(batch_size), "normlab.status": status}
    run = client.create_run(experiment_id, tags=tags, run_name=f"{norm}-b{batch_size}-lr{lr}-s{seed}")
    now = int(time.time() * 1000)
    # An early value at step 0 and the final one at step 10: the report must read the final one.
    metrics = [Metric("val_acc", 0.05, now, 0)]
    if finished:
        final_acc = 0.1 if diverged else val_acc  # a diverged run's last val_acc is noise the report must ignore
        metrics += [Metric("val_acc", final_acc, now, 10), Metric("diverged", float(diverged), now, 10)]
    for stat, per_layer in (probes or {}).items():
        for index, (path, value) in enumerate(zip(LAYER_PATHS, per_layer, strict=True)):
            key = f"probe/{stat}/{index:03d}_{path}"
            metrics += [Metric(key, 99.0, now, 0), Metric(key, value, now, 10)]
    params = [Param("model.norm", norm), Param("data.batch_size", str(batch_size)), Param("optim.lr", str(lr)),
              Param("seed", str(seed))] + [Param(k, v) for k, v in (extra_params or {}).items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    if finished:
        client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(name="log_known_run")
def _log_known_run():
    """log_known_run for tests that make their own small experiments."""
    return log_known_run


@pytest.fixture(scope="session")
def known_experiment(mlflow_server):
    """The experiment 'regimes-known' on the shared server: the KNOWN_ACC grid, probes, one unfinished run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment("regimes-known")
    run_ids = {}
    for (norm, batch_size, lr), accs in KNOWN_ACC.items():
        for seed, acc in enumerate(accs):
            probes = None
            if (batch_size, lr) == (8, 0.1):
                probes = {stat: values[seed] for stat, values in KNOWN_PROBES[norm].items()}
            run_ids[(norm, batch_size, lr, seed)] = log_known_run(client, experiment_id, norm, batch_size, lr, seed,
                                                                  acc, probes=probes)
    log_known_run(client, experiment_id, "bn", 2, 0.1, 7, None, finished=False)
    return {"name": "regimes-known", "id": experiment_id, "run_ids": run_ids, "layer_paths": LAYER_PATHS}


@pytest.fixture(scope="session")
def known_report(mlflow_server, known_experiment, tmp_path_factory):
    """`normlab report regimes-known` against the shared server: its output dir, stdout and exit code."""
    import contextlib
    import io

    from cluster.report import main

    out = tmp_path_factory.mktemp("report") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([known_experiment["name"], "--tracking-uri", mlflow_server.url, "--out", str(out)])
    return {"out": out, "stdout": stdout.getvalue(), "code": code}
