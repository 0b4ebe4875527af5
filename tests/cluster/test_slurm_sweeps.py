"""Sweeps through sbatch on the real single-node Slurm cluster (see conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from cluster import sweep_cli
from cluster.dispatch import read_record
from cluster.sweep import load_sweep
from cluster.tracking import done_keys

pytestmark = pytest.mark.slurm


def _mlflow_runs(sweep):
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.experiment)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000)


def _squeue() -> str:
    return subprocess.run(["squeue", "--noheader", "-r", "-o", "%i %T"], capture_output=True, text=True).stdout


def _wait_done(sweep, keys, waiter, what: str, timeout: float = 240):
    """Wait until `keys` are done in MLflow; fail at once, with the logs, if the jobs left the queue without it."""

    def finished() -> bool:
        if done_keys(sweep.tracking_uri, sweep.experiment) == set(keys):
            return True
        if not _squeue().strip() and done_keys(sweep.tracking_uri, sweep.experiment) != set(keys):
            logs = "\n".join(Path(job.stderr).read_text()[-1500:] for job in read_record(sweep))
            pytest.fail(f"the jobs ended before {what}:\n{logs}")
        return False

    waiter(finished, timeout, what)


def test_six_run_sweep_finishes_and_resubmitting_submits_nothing(slurm_cluster, write_sweep, waiter, capsys):
    path = write_sweep("six", {"model.norm": ["bn", "gn:groups=2", "frn"], "data.batch_size": [8, 16]},
                       {"kind": "slurm", "runs_per_job": 2, "cpus_per_task": 1, "timeout_min": 10})
    assert sweep_cli.main(["submit", str(path)]) == 0
    out = capsys.readouterr().out
    # Two runs per job; MaxArraySize=2 in the test cluster, so the three jobs need two arrays.
    assert "submitted 6 runs as 3 Slurm jobs in 2 array(s) (2 sbatch calls)" in out, out
    sweep = load_sweep(path)
    jobs = read_record(sweep)
    assert len(jobs) == 3 and all(Path(job.stdout).name in out for job in jobs)

    keys = {run.key for run in sweep.runs}
    _wait_done(sweep, keys, waiter, "six finished MLflow runs")
    runs = _mlflow_runs(sweep)
    assert sorted(r.data.tags["run_key"] for r in runs) == sorted(keys)
    assert {r.data.tags["normlab.status"] for r in runs} == {"finished"}
    assert {r.info.status for r in runs} == {"FINISHED"}

    assert sweep_cli.main(["submit", str(path)]) == 0
    assert "nothing to submit: 6 already done in MLflow" in capsys.readouterr().out
    assert len(read_record(sweep)) == 3
    assert sweep_cli.main(["status", str(path)]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert total.split() == ["total", "6", "0", "0", "0", "0", "0", "0"]  # all six in the `finished` column


def _one_run_training(write_sweep, waiter, name: str, norm: str, overrides: dict):
    """Submit a one-run sweep and wait for its first checkpoint: (sweep, run, job, checkpoint)."""
    path = write_sweep(name, {"model.norm": [norm]}, {"kind": "slurm", "timeout_min": 10}, overrides=overrides)
    assert sweep_cli.main(["submit", str(path)]) == 0
    sweep = load_sweep(path)
    (run,) = sweep.runs
    (job,) = read_record(sweep)
    checkpoint = Path(run.cfg.output.root) / run.key / "checkpoints" / "last.ckpt"
    waiter(checkpoint.is_file, 180, "the first epoch's checkpoint", interval=0.2)
    return sweep, run, job, checkpoint


def _requeued_and_finished(sweep, run, job, waiter):
    # Slurm holds a requeued job for a while before it is eligible: release it now.
    waiter(lambda: f"{job.job_id} PENDING" in _squeue(), 60, "the job to be pending again", interval=0.2)
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)
    _wait_done(sweep, {run.key}, waiter, "the requeued run finished")


def test_requeued_job_resumes_from_its_checkpoint_into_the_same_mlflow_run(slurm_cluster, write_sweep, waiter):
    overrides = {"trainer.max_epochs": 4, "trainer.limit_train_batches": 25, "trainer.deterministic": True}
    sweep, run, job, checkpoint = _one_run_training(write_sweep, waiter, "requeue", "bn", overrides)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)  # requeue while training
    _requeued_and_finished(sweep, run, job, waiter)

    log = Path(job.stderr).read_text()
    assert f"resuming run {run.key} from {checkpoint}" in log, log[-2000:]
    (tracked,) = _mlflow_runs(sweep)  # one MLflow run for the key, interrupted and resumed
    assert tracked.data.tags["run_key"] == run.key and tracked.info.status == "FINISHED"

    # The same config trained without interruption (another output root and experiment: same run key).
    from trainer.config import load_config
    from trainer.run import train

    reference = train(load_config(None, run.overrides + ["output.root=reference", "tracking.experiment=reference"]))
    assert reference.run_key == run.key
    for metric in ("train_loss", "val_loss", "val_acc"):
        assert tracked.data.metrics[metric] == pytest.approx(reference.metrics[metric], rel=1e-5, abs=1e-6), metric


def test_preemption_signal_requeues_through_submitit(slurm_cluster, write_sweep, waiter):
    overrides = {"trainer.max_epochs": 3, "trainer.limit_train_batches": 25}
    sweep, run, job, _ = _one_run_training(write_sweep, waiter, "preempt", "gn:groups=2", overrides)
    # What Slurm sends before a timeout or on preemption (sbatch --signal=USR2@90): submitit requeues the job.
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    _requeued_and_finished(sweep, run, job, waiter)
    log = Path(job.stderr).read_text()
    assert "Caught signal SIGUSR2" in log and "DUE TO JOB REQUEUE" in log, log[-2000:]  # submitit requeued it
    assert f"resuming run {run.key}" in log, log[-2000:]
    (tracked,) = _mlflow_runs(sweep)
    assert tracked.info.status == "FINISHED" and tracked.data.tags["normlab.status"] == "finished"


def test_two_task_job_trains_one_ddp_run(slurm_cluster, write_sweep, waiter):
    overrides = {"trainer.devices": 2, "trainer.strategy": "ddp", "trainer.sync_norm": True}
    path = write_sweep("ddp", {"model.norm": ["bn"]}, {"kind": "slurm", "tasks_per_node": 2, "timeout_min": 10},
                       overrides=overrides)
    assert sweep_cli.main(["submit", str(path)]) == 0
    sweep = load_sweep(path)
    (run,) = sweep.runs
    _wait_done(sweep, {run.key}, waiter, "the DDP run finished")
    (tracked,) = _mlflow_runs(sweep)
    assert tracked.data.tags["world_size"] == "2"
    assert tracked.data.tags["global_batch_size"] == str(2 * run.batch_size)
    assert tracked.data.params["trainer.sync_norm"] == "True"
    (job,) = read_record(sweep)
    log = Path(job.stdout).read_text()  # srun writes task 0's output here; both tasks report in the job's logs
    assert "rank 0/2" in log


def test_crashing_job_shows_as_failed_with_its_log_and_spares_the_others(slurm_cluster, write_sweep, waiter, capsys,
                                                                         tmp_path):
    # CIFAR batches that exist (the config check passes) but are not pickles: the run crashes when loading.
    broken = tmp_path / "broken-cifar" / "cifar-10-batches-py"
    broken.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (broken / name).write_bytes(b"not a pickle")
    path = write_sweep("crash", {"data.name": ["digits", "cifar10"]}, {"kind": "slurm", "timeout_min": 10},
                       overrides={"data.path": str(broken.parent)})
    assert sweep_cli.main(["submit", str(path)]) == 0
    capsys.readouterr()
    sweep = load_sweep(path)
    good, bad = sweep.runs
    waiter(lambda: not _squeue().strip(), 240, "both jobs to end")
    assert done_keys(sweep.tracking_uri, sweep.experiment) == {good.key}
    assert sweep_cli.main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    bad_job = next(job for job in read_record(sweep) if bad.key in job.run_keys)
    assert f"{bad.label} {bad.key}: job {bad_job.job_id}, log {bad_job.stderr}" in out, out
    assert "Traceback" in Path(bad_job.stderr).read_text()
    assert "failed runs (1)" in out


def test_partition_slurm_does_not_have_is_one_line_and_exit_2(slurm_cluster, write_sweep, capsys):
    path = write_sweep("nopart", {"model.norm": ["bn", "frn"]}, {"kind": "slurm", "partition": "nosuchpartition"})
    assert sweep_cli.main(["submit", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "invalid partition" in captured.err.lower(), captured.err
    assert not _squeue().strip()
    assert not (load_sweep(path).folder / "jobs.json").exists()
    assert not list(load_sweep(path).folder.rglob("*.pkl"))  # no pickled call of a job that never was
    assert json.loads((load_sweep(path).folder / "plan.json").read_text())["runs"]  # planned, not submitted


def test_status_and_cancel_of_queued_jobs(slurm_cluster, write_sweep, capsys):
    # Extra sbatch parameters pass through: these jobs may not start for an hour, so they stay queued.
    path = write_sweep("held", {"model.norm": ["bn", "frn"]},
                       {"kind": "slurm", "runs_per_job": 2, "sbatch": {"begin": "now+1hour"}})
    assert sweep_cli.main(["submit", str(path)]) == 0
    capsys.readouterr()
    assert sweep_cli.main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split() == ["total", "0", "0", "0", "2", "0", "0", "0"]  # both queued
    assert "why Slurm holds them" in out and ": BeginTime" in out  # Slurm's own reason
    assert sweep_cli.main(["cancel", str(path)]) == 0
    assert "cancelled 1 queued or running jobs" in capsys.readouterr().out
    assert not _squeue().strip()
    assert sweep_cli.main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split() == ["total", "0", "0", "0", "0", "0", "2", "0"]  # cancelled (not failed); submit sends them
    assert "failed runs" not in out


def test_a_job_no_node_can_hold_shows_slurms_reason(slurm_cluster, write_sweep, capsys):
    # More CPUs per task than the node has: Slurm accepts the job and keeps it pending with its own reason.
    cpus = os.cpu_count() * 16
    path = write_sweep("toowide", {"model.norm": ["bn"]}, {"kind": "slurm", "cpus_per_task": cpus})
    assert sweep_cli.main(["submit", str(path)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    sweep = load_sweep(path)
    (job,) = read_record(sweep)
    assert sweep_cli.main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split() == ["total", "0", "0", "0", "1", "0", "0", "0"], out  # queued ...
    reason = subprocess.run(["squeue", "--noheader", "-j", job.slurm_id, "-o", "%r"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert reason not in ("", "None"), reason
    assert f"  job {job.job_id}: {reason}" in out, out  # ... and why, in Slurm's words (PartitionConfig)
    assert re.search(rf"^{job.job_id}\s+-\s+1\s+PENDING, reason {reason}$", out, re.MULTILINE), out  # no node yet
    assert sweep_cli.main(["cancel", str(path)]) == 0
    assert not _squeue().strip()
