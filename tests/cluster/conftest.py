"""A real single-node Slurm cluster for the cluster tests, started once per session with
cluster/slurm/start.sh and stopped with stop.sh. Without Slurm (or root) the Slurm tests skip with
the reason, unless NORMLAB_REQUIRE_SLURM=1 (CI), where they fail instead."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "cluster" / "slurm"
# Small, so that a six-job sweep needs more than one array (one sbatch call per array).
TEST_MAX_ARRAY_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing() -> str | None:
    tools = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol") if shutil.which(t) is None]
    if tools:
        return f"Slurm not installed ({', '.join(tools)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the single-node Slurm needs root (slurmd starts jobs as their user)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a running single-node cluster; every Slurm command of the session uses it."""
    reason = _missing()
    if reason:
        if os.environ.get("NORMLAB_REQUIRE_SLURM") == "1":
            pytest.fail(f"NORMLAB_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(
        [str(SCRIPTS / "start.sh"), str(root), "--max-array-size", str(TEST_MAX_ARRAY_SIZE),
         "--ctld-port", str(_free_port()), "--d-port", str(_free_port())],
        capture_output=True, text=True, timeout=120,
    )
    if start.returncode != 0:
        pytest.fail(f"cluster/slurm/start.sh failed: {start.stderr.strip() or start.stdout.strip()}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(root / "etc" / "slurm.conf")
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        subprocess.run([str(SCRIPTS / "stop.sh"), str(root)], capture_output=True, timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


MULTINODE_SLURMD_TIMEOUT = 10  # seconds before a node that stopped answering is DOWN (Slurm's default 300)


@pytest.fixture(scope="session")
def _multinode_cluster_conf():
    """A running 2-node cluster for the session: (SLURM_CONF, node names, cluster dir)."""
    reason = _missing()
    if reason:
        if os.environ.get("NORMLAB_REQUIRE_SLURM") == "1":
            pytest.fail(f"NORMLAB_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    # Not under pytest's basetemp: concurrent pytest sessions on one machine prune each other's old
    # basetemps, and this cluster's /etc/hosts lines and daemons must be found again by stop.sh.
    root = Path(tempfile.mkdtemp(prefix="normlab-slurm2-"))
    ports = f"{_free_port()},{_free_port()}"
    start = subprocess.run(
        [str(SCRIPTS / "start.sh"), str(root), "--nodes", "2", "--ctld-port", str(_free_port()), "--d-port", ports,
         "--slurmd-timeout", str(MULTINODE_SLURMD_TIMEOUT)],
        capture_output=True, text=True, timeout=120,
    )
    if start.returncode != 0:
        pytest.fail(f"cluster/slurm/start.sh --nodes 2 failed: {start.stderr.strip() or start.stdout.strip()}")
    conf = str(root / "etc" / "slurm.conf")
    names = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], env={**os.environ, "SLURM_CONF": conf},
                           capture_output=True, text=True, check=True).stdout.split()
    try:
        yield conf, sorted(set(names)), root
    finally:
        subprocess.run([str(SCRIPTS / "stop.sh"), str(root)], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def multinode_cluster(_multinode_cluster_conf, monkeypatch):
    """The session's 2-node cluster, its SLURM_CONF set for this test: (node names, cluster dir)."""
    conf, names, root = _multinode_cluster_conf
    monkeypatch.setenv("SLURM_CONF", conf)
    return names, root


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    """Poll until predicate() is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def waiter():
    return wait_for


TINY_RUN = {
    "model.arch": "cifar_resnet",
    "model.depth": 8,
    "model.width": 4,
    "trainer.accelerator": "cpu",
    "trainer.max_epochs": 1,
    "trainer.limit_train_batches": 4,
    "trainer.limit_val_batches": 2,
    "data.batch_size": 16,
    "probes.every_n_steps": 0,
}


@pytest.fixture
def write_sweep(tmp_path):
    """write_sweep(name, grid, executor, overrides=None, **top) -> path of a sweep file of tiny digits runs."""
    import yaml

    def write(name: str, grid: dict, executor: dict, overrides: dict | None = None, **top) -> Path:
        body = {"name": name, "overrides": {**TINY_RUN, **(overrides or {})}, "grid": grid, "executor": executor, **top}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    return write
