"""Scale of ``normlab report``: 1,000 and 10,000 synthetic runs in a local SQLite store.

Each synthetic run carries what a demo-like training run logs: the flattened config as params, the
trainer's tags (run key, norm, batch sizes, status, outcome), per-epoch train/val curves, the lr,
per-layer probes (act mean/std, grad norm of 9 norm layers) and the gradient concentration every 50
steps from step 0, the final evaluations under running/precise/batch statistics. The grid is norms x
per-device batch x lr x seeds; large learning rates diverge or collapse, as in a real lr sweep.

The first run is logged through ``MlflowClient.log_batch`` (so its rows are MLflow's own); the others
are copies of its rows with their own values, inserted in one SQLite transaction (``log_batch`` commits
per run: 10,000 runs would take half an hour). The store is kept under ``--workdir`` and reused.
Then ``normlab report EXPERIMENT --no-log`` runs in a subprocess from ``--code`` (default: this
checkout; point it at an export of another commit to time that), timed as wall and CPU seconds; with
``--server`` against an ``mlflow server`` (mlflow/start-server.sh, on a free loopback port) serving
the same store, so the CPU figure is the report's alone and the wall one includes the server's work.

    .venv/bin/python benchmarks/report_scale.py [--runs 1000 10000] [--code DIR] [--workdir DIR] [--server]

Goal: at most 30 s at 10,000 runs (printed as a ratio; below 1.0 meets it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 30.0
NORMS = ["bn", "gn:groups=4", "ln", "frn", "none"]
BATCH_SIZES = [2, 4, 8, 16, 32]
LRS = [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
LAYERS = [f"{i:03d}_stage{i // 3}.block{i % 3}.norm" for i in range(9)]
STEPS = list(range(0, 351, 50))
EPOCH_STEPS = [44 * (e + 1) for e in range(8)]


def cell_outcome(norm: str, batch: int, lr: float, seed: int, rng: random.Random) -> tuple[str, float]:
    """(outcome, final val_acc): bn suffers at small per-device batches, every norm fails at large lrs."""
    base = 0.95 - (0.25 / batch if norm == "bn" else 0.02) - (0.1 if norm == "none" else 0.0)
    if lr >= 1.6 and (norm == "none" or rng.random() < 0.5):
        return "diverged", 0.1
    if lr >= 0.8 and rng.random() < 0.2:
        return "collapsed", 0.1
    if lr <= 0.025 and norm == "none":
        return "not_learning", 0.12
    return "finished", min(0.99, base - abs(lr - 0.2) / 10 + rng.gauss(0, 0.01))


def run_rows(run_id: str, index: int, experiment_id: int, params: dict, rng: random.Random):
    """The rows of one run: (runs row, metrics, latest metrics, params, tags)."""
    n_cells = len(NORMS) * len(BATCH_SIZES) * len(LRS)
    norm = NORMS[index % len(NORMS)]
    batch = BATCH_SIZES[(index // len(NORMS)) % len(BATCH_SIZES)]
    lr = LRS[(index // (len(NORMS) * len(BATCH_SIZES))) % len(LRS)]
    seed = index // n_cells
    outcome, acc = cell_outcome(norm, batch, lr, seed, rng)
    now = 1_700_000_000_000 + index
    history: list[tuple[str, float, int]] = []
    for step in STEPS:
        history += [(f"probe/{stat}/{layer}", rng.uniform(0.1, 2.0), step)
                    for stat in ("act_mean", "act_std", "grad_norm") for layer in LAYERS]
        history.append(("probe/grad_concentration", rng.uniform(0.1, 0.5), step))
        history.append(("lr", lr, step))
    for epoch, step in enumerate(EPOCH_STEPS):
        progress = (epoch + 1) / len(EPOCH_STEPS)
        history += [("train_loss", 2.3 * (1 - progress) + 0.1, step), ("train_acc", acc * progress, step),
                    ("val_loss", 2.3 * (1 - progress) + 0.2, step), ("val_acc", acc * progress, step),
                    ("epoch", float(epoch), step)]
    final = EPOCH_STEPS[-1]
    history.append(("diverged", float(outcome == "diverged"), final))  # the last epoch's val_acc is the final one
    if outcome != "diverged":
        for kind, shift in (("running", 0.0), ("precise", 0.01), ("batch", -0.05 / batch)):
            history += [(f"val_acc/{kind}", acc + shift, final), (f"val_loss/{kind}", 0.3 - shift, final)]
    metrics = [(key, value, now, run_id, step, 0) for key, value, step in history]
    latest = {}
    for key, value, step in history:
        latest[key] = (key, value, now, step, 0, run_id)
    values = {**params, "model.norm": norm, "data.batch_size": str(batch), "optim.lr": str(lr), "seed": str(seed),
              "derived.num_classes": "10"}
    key = hashlib.sha1(f"{norm}|{batch}|{lr}|{seed}".encode()).hexdigest()[:12]
    tags = {"run_key": key, "norm": norm, "norm_name": norm.split(":")[0], "batch_size": str(batch),
            "stats_batch_size": str(batch), "normlab.status": "diverged" if outcome == "diverged" else "finished",
            "normlab.outcome": outcome, "mlflow.runName": f"{norm} b{batch} lr{lr:g} s{seed}"}
    run = (run_id, tags["mlflow.runName"], "UNKNOWN", "", "", "bench", "FINISHED", now, now + 1, "", "active",
           f"file:///tmp/artifacts/{run_id}", experiment_id)
    return run, metrics, list(latest.values()), [(k, str(v), run_id) for k, v in values.items()], \
        [(k, v, run_id) for k, v in tags.items()]


def build_store(path: Path, n_runs: int) -> str:
    """A store holding experiment ``report-scale`` with ``n_runs`` runs (reused when it already does)."""
    uri = f"sqlite:///{path}"
    if path.exists():
        return uri
    try:
        return _write_store(path, uri, n_runs)
    except BaseException:
        path.unlink(missing_ok=True)  # never reuse a half-written store
        raise


def _write_store(path: Path, uri: str, n_runs: int) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from trainer.config import flatten, load_config  # the real config's keys, as the trainer logs them

    params = {k: str(v) for k, v in flatten(load_config(None, [])).items()}
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("report-scale")
    rng = random.Random(0)
    first = client.create_run(experiment_id).info.run_id
    run, metrics, latest, prms, tags = run_rows(first, 0, int(experiment_id), params, rng)
    client.log_batch(first, metrics=[Metric(k, v, t, s) for k, v, t, _, s, _ in metrics[:1000]],
                     params=[Param(k, v) for k, v, _ in prms[:100]], tags=[RunTag(k, v) for k, v, _ in tags])
    client.set_terminated(first)
    started = time.perf_counter()
    db = sqlite3.connect(path)
    with db:  # one transaction; the template run's rows are MLflow's, the copies follow their columns
        db.execute("DELETE FROM metrics WHERE run_uuid = ?", (first,))
        db.execute("DELETE FROM latest_metrics WHERE run_uuid = ?", (first,))
        db.execute("DELETE FROM params WHERE run_uuid = ?", (first,))
        db.execute("DELETE FROM tags WHERE run_uuid = ? AND key NOT LIKE 'mlflow.%'", (first,))
        for index in range(n_runs):
            run_id = first if index == 0 else uuid.uuid4().hex
            run, metrics, latest, prms, tags = run_rows(run_id, index, int(experiment_id), params, rng)
            if index:
                db.execute("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id,"
                           " status, start_time, end_time, source_version, lifecycle_stage, artifact_uri,"
                           " experiment_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", run)
            db.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan)"
                           " VALUES (?,?,?,?,?,?)", metrics)
            db.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)"
                           " VALUES (?,?,?,?,?,?)", latest)
            db.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?,?,?)", prms)
            db.executemany("INSERT OR REPLACE INTO tags (key, value, run_uuid) VALUES (?,?,?)", tags)
    db.close()
    count = len(client.search_runs([experiment_id], max_results=n_runs + 1))
    assert count == n_runs, f"store holds {count} runs, expected {n_runs}"
    print(f"  wrote {n_runs} runs in {time.perf_counter() - started:.1f} s")
    return uri


def time_report(code: Path, uri: str, out: Path) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, its last output line) of `normlab report report-scale --no-log`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "report", "report-scale", "--tracking-uri", uri,
                           "--no-log", "--out", str(out)], cwd=code, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(code)})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"normlab report failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout.strip().splitlines()[-1]


def start_server(store: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    """An `mlflow server` on a free loopback port serving ``store``; (its process, its URL) once healthy."""
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(REPO / "mlflow" / "start-server.sh"), "--data-dir", str(workdir / "server"),
                             "--backend-store-uri", f"sqlite:///{store}", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("mlflow server did not become healthy in 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose `normlab report` is timed")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/normlab-report-scale"))
    parser.add_argument("--server", action="store_true", help="report through an mlflow server on the store")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"normlab report from {args.code}")
    for n_runs in args.runs:
        print(f"{n_runs} runs:")
        uri = build_store(args.workdir / f"runs{n_runs}.db", n_runs)
        server = None
        if args.server:
            server, uri = start_server(args.workdir / f"runs{n_runs}.db", args.workdir)
        try:
            wall, cpu, last = time_report(args.code.resolve(), uri, args.workdir / f"out{n_runs}")
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
        print(f"  report: {wall:.1f} s wall, {cpu:.1f} s CPU ({last}); goal ratio (wall / {GOAL_S:.0f} s) "
              f"{wall / GOAL_S:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
