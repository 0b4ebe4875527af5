"""A tracking server that does not answer: one line naming the URI within 10 s, for `normlab train`,
`normlab sweep plan/status/submit` and `normlab report` (a closed loopback port), and nothing created."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.tracking import unreachable

TINY_RUN = {"model.arch": "cifar_resnet", "model.depth": 8, "model.width": 4, "trainer.accelerator": "cpu",
            "trainer.max_epochs": 1, "trainer.limit_train_batches": 2, "probes.every_n_steps": 0}


@pytest.fixture
def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _one_line_within_10_s(argv: list[str], env_uri: str) -> str:
    normlab = Path(sys.executable).with_name("normlab")
    started = time.monotonic()
    done = subprocess.run([str(normlab), *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": env_uri})
    elapsed = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert f"no MLflow server answers at {env_uri}" in lines[0] and "mlflow/start-server.sh" in lines[0]
    # MLflow's own retries took ~250 s; every command asks the server before it loads torch, Lightning or
    # MLflow, so the one line comes at once, process start-up included
    assert elapsed < 10, elapsed
    return lines[0]


def test_the_probe_answers_within_10_s(closed_port_uri):
    started = time.monotonic()
    assert "connection refused" in unreachable(closed_port_uri).lower()
    # a server that accepts the connection and never answers is cut off by the probe's timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert "timed out" in unreachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=2)
    assert time.monotonic() - started < 10


def test_train_and_sweep_commands_fail_fast_on_an_unreachable_server(closed_port_uri, tmp_path):
    _one_line_within_10_s(["train", "model.depth=8", "trainer.max_epochs=1"], closed_port_uri)
    import yaml

    sweep = tmp_path / "down.yaml"
    sweep.write_text(yaml.safe_dump({"name": "down", "overrides": TINY_RUN, "grid": {"model.norm": ["bn"]},
                                     "executor": {"kind": "local"}}))
    for command in ("plan", "status", "submit"):
        _one_line_within_10_s(["sweep", command, str(sweep)], closed_port_uri)
    _one_line_within_10_s(["report", str(sweep)], closed_port_uri)
    assert not Path("runs").exists() or not any(Path("runs").glob("*/mlflow_run_id"))
