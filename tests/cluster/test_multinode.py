"""Runs that span two nodes of a real 2-node Slurm cluster (two slurmd daemons, see conftest.py):
one DDP run over both nodes, a lost node and a preemption each resumed into the same MLflow run,
cancel reaching every node, and a job shape that disagrees with the runs refused at plan time."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster import sweep_cli
from cluster.dispatch import read_record
from cluster.sweep import load_sweep
from cluster.tracking import done_keys
from trainer.config import load_config
from trainer.run import train

pytestmark = pytest.mark.slurm

# Synthetic 8x8 images: a 2 x 4 global batch is instant; enough steps to interrupt a run mid-way.
TWO_NODES = {
    "model.norm": "bn", "data.name": "synthetic", "data.synthetic.image_size": 8, "data.synthetic.classes": 4,
    "data.augment": False, "data.val_split": 0.2, "data.batch_size": 4, "optim.warmup_epochs": 0,
    "trainer.num_nodes": 2, "trainer.devices": 1, "trainer.strategy": "ddp", "trainer.deterministic": True,
}
EXECUTOR = {"kind": "slurm", "nodes": 2, "tasks_per_node": 1, "timeout_min": 10}
# 800 training images / global batch 8 = 100 steps an epoch, limited to 40 (seconds): interrupted in
# epochs 2 and 3, epoch 4 to spare.
STEPS_PER_EPOCH = 40
LONG = {"data.synthetic.samples": 1000, "trainer.max_epochs": 4, "trainer.limit_train_batches": STEPS_PER_EPOCH,
        "trainer.limit_val_batches": 2}


def _squeue(*fields: str) -> list[list[str]]:
    out = subprocess.run(["squeue", "--noheader", "-r", "-o", "|".join(fields)], capture_output=True, text=True).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def _mlflow_runs(sweep):
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.experiment)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _logs(sweep) -> str:
    return "\n".join(Path(job.stderr).read_text()[-2000:] for job in read_record(sweep) if Path(job.stderr).is_file())


def _wait_done(sweep, key, waiter, what, timeout=240):
    def finished():
        if done_keys(sweep.tracking_uri, sweep.experiment) == {key}:
            return True
        if not _squeue("%i"):
            pytest.fail(f"the jobs ended before {what}:\n{_logs(sweep)}")
        return False

    waiter(finished, timeout, what)


def _submit(write_sweep, name, overrides):
    path = write_sweep(name, {"seed": [0]}, EXECUTOR, overrides={**TWO_NODES, **overrides})
    assert sweep_cli.main(["submit", str(path)]) == 0
    sweep = load_sweep(path)
    (run,) = sweep.runs
    (job,) = read_record(sweep)
    return path, sweep, run, job


def _reference(run, name: str, overrides: list[str]):
    """The run as one uninterrupted process, in its own output root and experiment."""
    return train(load_config(None, [*run.overrides, f"output.root={name}", f"tracking.experiment={name}",
                                    *overrides]))


def _one_process_on_the_concatenated_batch(run):
    return _reference(run, "one", ["trainer.num_nodes=1", "trainer.strategy=auto", "data.batch_size=8"])


def test_two_node_job_trains_one_run_equal_to_one_process_on_the_concatenated_batch(multinode_cluster, write_sweep,
                                                                                    waiter):
    names, _ = multinode_cluster
    first_step = {"data.synthetic.samples": 40, "trainer.max_steps": 1, "trainer.limit_train_batches": 1,
                  "trainer.limit_val_batches": 0, "trainer.sync_norm": True}
    _, sweep, run, job = _submit(write_sweep, "two-nodes", first_step)
    _wait_done(sweep, run.key, waiter, "the 2-node run finished")
    (tracked,) = _mlflow_runs(sweep)  # one MLflow run: rank 1 logged nothing of its own
    tags, params = tracked.data.tags, tracked.data.params
    assert tags["world_size"] == "2" and params["derived.world_size"] == "2"
    assert tags["nodes"] == ",".join(names) and tags["num_nodes"] == "2"  # rank 0 on the first node, 1 on the other
    log = Path(job.stdout).read_text()
    assert "rank 0/2" in log, log[-2000:]

    one = _one_process_on_the_concatenated_batch(run)
    # the first step's loss (the epoch mean of one step, averaged over the ranks) and the weights after it
    assert tracked.data.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-5)
    ddp = torch.load(Path(run.cfg.output.root) / run.key / "checkpoints" / "last.ckpt", weights_only=False)
    ref = torch.load(Path(one.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ddp["global_step"] == ref["global_step"] == 1
    assert ddp["state_dict"].keys() == ref["state_dict"].keys()
    for name, tensor in ref["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def _job_pids(job_id: str, node: str) -> list[int]:
    """The job's processes on `node` and the slurmstepd above them (what that node's crash takes down)."""
    (numeric,) = [row[0] for row in _squeue("%A", "%i") if row[1] == job_id]
    out = subprocess.run(["scontrol", "listpids", numeric, node], capture_output=True, text=True).stdout
    tasks = [int(line.split()[0]) for line in out.splitlines()[1:] if line.split()]
    steps = {int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in tasks}
    return tasks + sorted(steps)


def _epoch_logged(sweep, run, epoch: int, waiter) -> None:
    """Wait until `epoch` is over: its checkpoint written and its training metrics in MLflow (they follow
    the checkpoint), so that an interruption now falls inside the next epoch."""
    run_dir = Path(run.cfg.output.root) / run.key
    client = MlflowClient(sweep.tracking_uri)
    last_step = epoch * STEPS_PER_EPOCH - 1

    def logged():
        if not (run_dir / "mlflow_run_id").is_file() or not (run_dir / "checkpoints" / "last.ckpt").is_file():
            return False
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        return any(m.step == last_step for m in client.get_metric_history(run_id, "train_loss"))

    waiter(logged, 240, f"epoch {epoch}'s checkpoint and metrics", interval=0.2)


def _requeued(job, waiter, what: str) -> None:
    waiter(lambda: [job.job_id, "PENDING"] in _squeue("%i", "%T"), 120, what, interval=0.2)


def _release(job) -> None:
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)  # Slurm's requeue hold


def test_a_preempted_job_resumes_into_the_same_mlflow_run(multinode_cluster, write_sweep, waiter):
    names, _ = multinode_cluster
    _, sweep, run, job = _submit(write_sweep, "interrupted", LONG)
    _epoch_logged(sweep, run, 1, waiter)
    # Preemption: what Slurm sends before the time limit or on preemption; submitit's handler on rank 0
    # requeues the job.
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    _requeued(job, waiter, "submitit to requeue the preempted job")
    _release(job)
    _wait_done(sweep, run.key, waiter, "the resumed run finished")
    log = Path(job.stderr).read_text()
    assert "Caught signal SIGUSR2" in log and log.count(f"resuming run {run.key} from") == 1, log[-3000:]
    _one_run_like_the_uninterrupted_one(sweep, run, names)
    # A lost node: test_a_job_slurm_does_not_requeue_after_a_lost_node_is_sent_again_by_submit. (Slurm's own
    # requeue after a node failure is left out: when rank 0 sees the broken connection before Slurm ends the
    # step, the requeued job can leave the queue without starting again; `sweep submit` then sends it again.)


def _kill_node(root: Path, node: str, job) -> None:
    """The node crashes: its slurmd and the job's processes on it die at once, without a signal."""
    for pid in [int((root / "run" / f"slurmd-{node}.pid").read_text()), *_job_pids(job.job_id, node)]:
        os.kill(pid, 9)


def _one_run_like_the_uninterrupted_one(sweep, run, names) -> None:
    (tracked,) = _mlflow_runs(sweep)  # one MLflow run, interrupted and resumed
    assert tracked.info.status == "FINISHED" and tracked.data.tags["normlab.status"] == "finished"
    assert tracked.data.tags["nodes"] == ",".join(names)
    whole = _reference(run, "whole", ["trainer.num_nodes=1", "trainer.strategy=auto", "data.batch_size=8"])
    ckpt = torch.load(Path(run.cfg.output.root) / run.key / "checkpoints" / "last.ckpt", weights_only=False)
    reference = torch.load(Path(whole.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == reference["global_step"] == 4 * STEPS_PER_EPOCH
    client = MlflowClient(sweep.tracking_uri)
    metrics = client.get_run(whole.run_id).data.metrics
    assert set(tracked.data.metrics) == set(metrics)
    for key in metrics:  # every step logged once, as in the uninterrupted run
        steps = sorted(m.step for m in client.get_metric_history(tracked.info.run_id, key))
        assert steps == sorted(m.step for m in client.get_metric_history(whole.run_id, key)), key


def test_a_job_slurm_does_not_requeue_after_a_lost_node_is_sent_again_by_submit(multinode_cluster, write_sweep,
                                                                                waiter, capsys):
    names, root = multinode_cluster
    path = write_sweep("not-requeued", {"seed": [0]}, {**EXECUTOR, "sbatch": {"no-requeue": True}},
                       overrides={**TWO_NODES, **LONG})
    assert sweep_cli.main(["submit", str(path)]) == 0
    sweep = load_sweep(path)
    (run,), (job,) = sweep.runs, read_record(sweep)
    _epoch_logged(sweep, run, 1, waiter)
    _kill_node(root, names[1], job)
    waiter(lambda: not _squeue("%i"), 120, "Slurm to end the job that lost a node", interval=0.5)
    capsys.readouterr()
    assert sweep_cli.main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(job.job_id))
    assert "NODE_FAIL" in line and "sweep submit" in line, out
    assert f"{run.label} {run.key}: job {job.job_id}" in out  # listed under the failed runs
    subprocess.run(["slurmd", "-f", os.environ["SLURM_CONF"], "-N", names[1]], check=True)
    assert sweep_cli.main(["submit", str(path)]) == 0  # MLflow says the run is not done: it goes again
    assert "submitted 1 runs" in capsys.readouterr().out
    again = read_record(sweep)[-1]
    assert again.job_id != job.job_id
    _wait_done(sweep, run.key, waiter, "the run sent again finished")
    log = Path(again.stderr).read_text()
    assert f"resuming run {run.key} from" in log, log[-3000:]
    _one_run_like_the_uninterrupted_one(sweep, run, names)


def _processes_of(slurm_id: str) -> list[int]:
    """Processes on this machine (both nodes) that belong to the job."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_ARRAY_JOB_ID={slurm_id}".encode() in environ or f"SLURM_JOB_ID={slurm_id}".encode() in environ:
            found.append(int(proc.name))
    return found


def test_cancel_stops_the_job_on_every_node(multinode_cluster, write_sweep, waiter, capsys):
    names, _ = multinode_cluster
    path, sweep, run, job = _submit(write_sweep, "cancel-2", {**LONG, "trainer.max_epochs": 100})
    capsys.readouterr()

    hostlist = subprocess.run(["scontrol", "show", "hostlist", ",".join(names)], capture_output=True, text=True,
                              check=True).stdout.strip()

    def on_both_nodes():
        assert sweep_cli.main(["status", str(path)]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(job.job_id)]
        return rows and rows[0][-1] == "RUNNING" and all(_job_pids(job.job_id, node) for node in names) and rows[0]

    (_, nodes, _, _) = waiter(on_both_nodes, 120, "the job's tasks on both nodes")
    assert nodes == hostlist  # `sweep status` shows the job's nodes
    assert sweep_cli.main(["cancel", str(path)]) == 0
    assert "cancelled 1 queued or running jobs" in capsys.readouterr().out
    waiter(lambda: not _processes_of(job.slurm_id), 60, "every process of the job, on both nodes, to end")
    assert not _squeue("%i")


def test_num_nodes_other_than_the_executors_is_one_line_exit_2_nothing_submitted(multinode_cluster, write_sweep,
                                                                                 capsys):
    path = write_sweep("mismatch", {"seed": [0]}, EXECUTOR, overrides={**TWO_NODES, "trainer.num_nodes": 1})
    assert sweep_cli.main(["submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainer.num_nodes=1" in err and "nodes=2" in err, err
    assert not _squeue("%i")
    assert not (Path("runs") / "sweeps" / "mismatch" / "jobs.json").exists()
