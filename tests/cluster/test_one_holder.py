"""A run is held by at most one job: concurrent and overlapping submits (local executor and Slurm)
train every run exactly once with no metric step logged twice; a crashed holder's lease is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster.dispatch import read_record, run_states, submit
from cluster.lease import LEASE_FILE, STALE_S, RunLease
from cluster.sweep import load_sweep
from cluster.tracking import done_keys


def _trained_once(sweep) -> None:
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.experiment)
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "run_key" in r.data.tags]
    assert sorted(r.data.tags["run_key"] for r in runs) == sorted(run.key for run in sweep.runs)
    for run in runs:
        for name in ("train_loss", "val_acc"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert steps and len(steps) == len(set(steps)), (name, steps)


def test_two_local_submits_at_once_train_each_run_once(write_sweep):
    path = write_sweep("twice-local", {"model.norm": ["bn", "gn:groups=2"]},
                       {"kind": "local", "runs_per_job": 2, "array_parallelism": 1})
    load_sweep(path)  # the plan is validated and cached once, not by both submits at once
    normlab = Path(sys.executable).with_name("normlab")
    submits = [subprocess.Popen([str(normlab), "sweep", "submit", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in submits]
    assert [p.returncode for p in submits] == [0, 0], outputs
    sweep = load_sweep(path)
    assert done_keys(sweep.tracking_uri, sweep.experiment) == {run.key for run in sweep.runs}
    _trained_once(sweep)
    logs = "".join(Path(job.stdout).read_text() for job in read_record(sweep))
    assert logs.count(": training") == 2, logs


def test_a_crashed_holders_lease_is_taken_over(tmp_path):
    lease_path = tmp_path / LEASE_FILE
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease_path.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "job": "7"}))
        assert RunLease(tmp_path, "8").acquire() == f"job 7 (pid {holder.pid} on {socket.gethostname()})"
    finally:
        holder.kill()
        holder.wait()
    lease = RunLease(tmp_path, "8")
    assert lease.acquire() is None  # its process is gone
    assert json.loads(lease_path.read_text())["job"] == "8"
    other_process = subprocess.run([sys.executable, "-c", "import sys; from cluster.lease import RunLease; "
                                    "print(RunLease(sys.argv[1], '9').acquire())", str(tmp_path)],
                                   capture_output=True, text=True, timeout=60)
    assert other_process.stdout.strip() == f"job 8 (pid {os.getpid()} on {socket.gethostname()})"
    lease.release()
    assert not lease_path.exists()
    # A holder on another host: alive while its heartbeat is fresh, taken over once it is stale.
    lease_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": "10"}))
    assert RunLease(tmp_path, "11").acquire() == "job 10 (pid 1 on elsewhere)"
    old = time.time() - STALE_S - 1
    os.utime(lease_path, (old, old))
    other = RunLease(tmp_path, "11")
    assert other.acquire() is None
    other.release()


@pytest.mark.slurm
def test_concurrent_and_overlapping_slurm_submits_queue_each_run_once(slurm_cluster, write_sweep, waiter):
    path = write_sweep("twice-slurm", {"model.norm": ["bn", "gn:groups=2"]},
                       {"kind": "slurm", "runs_per_job": 1, "cpus_per_task": 1, "timeout_min": 10})
    sweep = load_sweep(path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(submit(load_sweep(path)))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(result.jobs) for result in results) == [0, 2]
    assert submit(load_sweep(path)).jobs == []  # overlapping: the first submit's jobs are still queued or running
    assert len(read_record(sweep)) == 2
    keys = {run.key for run in sweep.runs}
    waiter(lambda: done_keys(sweep.tracking_uri, sweep.experiment) == keys, 300, "both runs finished")
    _trained_once(sweep)


def _shared_point_trained_once(first, second) -> str:
    """The one key both sweeps hold: one MLflow run of it in the store, no metric step twice, and both
    sweeps' status says every run finished."""
    (shared,) = {run.key for run in first.runs} & {run.key for run in second.runs}
    client = MlflowClient(first.tracking_uri)
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if r.data.tags.get("run_key") == shared]
    assert len(runs) == 1, [r.info.experiment_id for r in runs]
    for name in ("train_loss", "val_acc"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, name)]
        assert steps and len(steps) == len(set(steps)), (name, steps)
    for sweep in (first, second):
        out = subprocess.run([str(Path(sys.executable).with_name("normlab")), "sweep", "status", str(sweep.path)],
                             capture_output=True, text=True, timeout=120).stdout
        total = next(line.split() for line in out.splitlines() if line.startswith("total"))
        assert total[1:] == ["2", "0", "0", "0", "0", "0", "0"], out
    logs = "".join(Path(job.stdout).read_text() for sweep in (first, second) for job in read_record(sweep))
    assert logs.count(f"{shared}: training") == 1, logs
    return shared


def test_two_sweeps_sharing_a_point_submitted_at_once_train_it_once(write_sweep):
    local = {"kind": "local", "runs_per_job": 1, "array_parallelism": 2}
    paths = [write_sweep("shared-a", {"model.norm": ["bn", "gn:groups=2"]}, local),
             write_sweep("shared-b", {"model.norm": ["bn", "ln"]}, local)]
    for path in paths:
        load_sweep(path)  # each plan validated and cached before the race
    normlab = Path(sys.executable).with_name("normlab")
    submits = [subprocess.Popen([str(normlab), "sweep", "submit", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for path in paths]
    outputs = [p.communicate(timeout=600)[0] for p in submits]
    assert [p.returncode for p in submits] == [0, 0], outputs
    shared = _shared_point_trained_once(*(load_sweep(path) for path in paths))
    logs = "".join(Path(job.stdout).read_text() for path in paths for job in read_record(load_sweep(path)))
    assert f"{shared}: held by job" in logs or f"{shared}: already done in MLflow, skipped" in logs, logs


@pytest.mark.slurm
def test_two_sweeps_sharing_a_point_on_slurm_train_it_once(slurm_cluster, write_sweep, waiter):
    on_slurm = {"kind": "slurm", "runs_per_job": 1, "cpus_per_task": 1, "timeout_min": 10}
    paths = [write_sweep("slurm-shared-a", {"model.norm": ["bn", "gn:groups=2"]}, on_slurm),
             write_sweep("slurm-shared-b", {"model.norm": ["bn", "ln"]}, on_slurm)]
    for path in paths:
        load_sweep(path)
    normlab = Path(sys.executable).with_name("normlab")
    submits = [subprocess.Popen([str(normlab), "sweep", "submit", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for path in paths]
    outputs = [p.communicate(timeout=300)[0] for p in submits]
    assert [p.returncode for p in submits] == [0, 0], outputs
    sweeps = [load_sweep(path) for path in paths]
    assert sorted(len(read_record(sweep)) for sweep in sweeps) == [2, 2]  # each queued its own two runs
    keys = {run.key for sweep in sweeps for run in sweep.runs}
    waiter(lambda: done_keys(sweeps[0].tracking_uri, sweeps[0].experiment, list(keys)) == keys, 400,
           "the three runs finished")
    waiter(lambda: not subprocess.run(["squeue", "--noheader"], capture_output=True, text=True).stdout.strip(), 120,
           "the jobs to leave the queue")
    _shared_point_trained_once(*sweeps)


def test_a_run_another_sweeps_job_holds_is_queued_not_failed(write_sweep, capsys):
    sweep = load_sweep(write_sweep("held-elsewhere", {"model.norm": ["bn"]}, {"kind": "debug"}))
    (run,) = sweep.runs
    run_dir = sweep.output_root / run.key
    run_dir.mkdir(parents=True)
    # a job of another sweep sharing the point: a live process holding the run's lease
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cluster.lease import RunLease; "
                               "print(RunLease(sys.argv[1], '77').acquire(), flush=True); time.sleep(600)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "None"  # it took the lease
        assert submit(sweep, echo=lambda _: None).failed_jobs == 0
        assert f"{run.key}: held by job 77 (pid {holder.pid}" in capsys.readouterr().out  # the debug job's print
        assert [s.category for s in run_states(sweep)] == ["queued"]  # its job skipped it: not failed
    finally:
        holder.kill()
        holder.wait()
    assert [s.category for s in run_states(sweep)] == ["failed"]  # the holder died without training it
