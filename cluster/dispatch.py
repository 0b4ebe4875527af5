"""Submitting a sweep's unfinished runs through submitit, and finding out what became of them.

MLflow says which run keys are done; ``<sweep folder>/jobs.json`` records which job holds which
run keys and where its logs are, so that ``status`` and ``cancel`` find the jobs again.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.lease import SUBMIT_LOCK, file_lock, lease_holder
from cluster.run_names import sweep_run_names
from cluster.sweep import Sweep, SweepRun
from cluster.tracking import TrackedRun, ensure_experiment, tracked_runs
from trainer.tracking import DONE_STATUSES

if TYPE_CHECKING:  # submitit loads in submit alone: plan, status and cancel do without it
    import submitit

    from cluster.jobs import PackedRuns

RECORD = "jobs.json"
RUNNING_STATES = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}
PENDING_REASONS: dict[str, str] = {}  # job id -> Slurm's reason it waits, from the latest squeue
CATEGORIES = ("finished", "diverged", "running", "queued", "failed", "cancelled", "unsubmitted")


class SubmitError(RuntimeError):
    """The cluster refused the submission; its str is one line."""


@dataclass
class JobRecord:
    job_id: str  # "123_4" for an array task, "123" for a single job, a pid for the local executor
    kind: str
    run_keys: list[str]
    stdout: str
    stderr: str
    submitted_at: float = field(default_factory=time.time)
    cancelled: bool = False  # by `normlab sweep cancel`: its runs are "cancelled", not "failed"

    @property
    def slurm_id(self) -> str:
        return self.job_id.split("_")[0]


def logs_folder(sweep: Sweep) -> Path:
    return sweep.folder / "logs"


def read_record(sweep: Sweep) -> list[JobRecord]:
    path = sweep.folder / RECORD
    if not path.is_file():
        return []
    return [JobRecord(**job) for job in json.loads(path.read_text())["jobs"]]


def _append_record(sweep: Sweep, jobs: list[JobRecord]) -> None:
    # two local submits append as their jobs start: read and write under one lock, or one loses the other's
    with file_lock(sweep.folder / (RECORD + ".lock")):
        _write_record(sweep, read_record(sweep) + jobs)


def _write_record(sweep: Sweep, records: list[JobRecord]) -> None:
    sweep.folder.mkdir(parents=True, exist_ok=True)
    partial = sweep.folder / (RECORD + ".tmp")
    partial.write_text(json.dumps({"sweep": str(sweep.path), "jobs": [vars(job) for job in records]}))
    partial.replace(sweep.folder / RECORD)


def _run(command: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise SubmitError(f"{command[0]} failed: {reason} (is Slurm up, and SLURM_CONF set for this cluster?)")
    return result


def max_array_size() -> int:
    """The cluster's MaxArraySize: array indices must stay below it."""
    config = _run(["scontrol", "show", "config"]).stdout
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.MULTILINE)
    return int(match.group(1)) if match else 1001


# --- what is where -------------------------------------------------------------------------------


def live_jobs(records: list[JobRecord]) -> dict[str, str]:
    """State of every recorded job that is still queued or running: job id -> Slurm state or RUNNING."""
    states: dict[str, str] = {}
    slurm_ids = {record.slurm_id for record in records if record.kind == "slurm"}
    if slurm_ids and shutil.which("squeue"):
        # One squeue call for everything; -r lists each array task on its own line.
        out = _run(["squeue", "--noheader", "-r", "-u", _user(), "-o", "%i|%T|%r"]).stdout
        for line in out.splitlines():
            job_id, state, reason = (line.strip().split("|") + ["", ""])[:3]
            if job_id.split("_")[0] in slurm_ids:
                states[job_id] = state
                if state == "PENDING" and reason not in ("", "None", "(null)"):
                    PENDING_REASONS[job_id] = reason
    for record in records:
        if record.kind == "local" and _pid_alive(record.job_id):
            states[record.job_id] = "RUNNING"
    return states


def _user() -> str:
    import getpass

    return getpass.getuser()


def _pid_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (ValueError, OSError):
        return False
    return True


@dataclass
class RunState:
    run: SweepRun
    category: str
    job: JobRecord | None = None
    tracked: TrackedRun | None = None


def run_states(sweep: Sweep) -> list[RunState]:
    """Each run of the sweep: finished / diverged / running / queued / failed / unsubmitted."""
    tracked = tracked_runs(sweep.tracking_uri, sweep.experiment)
    records = read_record(sweep)
    latest: dict[str, JobRecord] = {}
    for record in records:  # in submission order: the last job that held a key is the one that counts
        for key in record.run_keys:
            latest[key] = record
    live = live_jobs(records)
    states = []
    for run in sweep.runs:
        mlflow_run = tracked.get(run.key)
        job = latest.get(run.key)
        if mlflow_run is not None and mlflow_run.done:
            category = mlflow_run.status
        elif job is None:
            category = "unsubmitted"
        elif job.job_id in live:
            state = live[job.job_id]
            started = mlflow_run is not None and mlflow_run.mlflow_status == "RUNNING"
            # A running job trains its runs in turn: the others wait inside it.
            category = "running" if state in RUNNING_STATES and started else "queued"
        elif sweep.output_root is not None and lease_holder(sweep.output_root / run.key):
            # its job skipped it: a job of another sweep sharing this point holds it and trains it
            started = mlflow_run is not None and mlflow_run.mlflow_status == "RUNNING"
            category = "running" if started else "queued"
        else:
            category = "cancelled" if job.cancelled else "failed"
        states.append(RunState(run, category, job, mlflow_run))
    return states


# --- submit --------------------------------------------------------------------------------------


@dataclass
class Submission:
    jobs: list[JobRecord]
    skipped_done: int
    skipped_live: int
    sbatch_calls: int = 0
    failed_jobs: int = 0  # local and debug executors, which wait for their jobs


def submit(sweep: Sweep, echo: Callable[[str], None] = print) -> Submission:
    """Submit every run that is neither done in MLflow nor held by a live job, packed and chunked.

    One submit of a sweep at a time decides and records its jobs (see :mod:`cluster.lease`); a local
    or debug submit lets the next one in once its jobs are recorded as they start."""
    if sweep.executor.kind == "slurm":
        with file_lock(sweep.folder / SUBMIT_LOCK):
            return _submit(sweep, echo)
    with file_lock(sweep.folder / SUBMIT_LOCK):
        states = run_states(sweep)
    return _submit(sweep, echo, states)


def _submit(sweep: Sweep, echo: Callable[[str], None], states: list[RunState] | None = None) -> Submission:
    states = states if states is not None else run_states(sweep)
    done = [s for s in states if s.category in DONE_STATUSES]
    live = [s for s in states if s.category in ("running", "queued")]
    todo = [s.run for s in states if s.category in ("failed", "cancelled", "unsubmitted")]
    submission = Submission([], len(done), len(live))
    if not todo:
        return submission
    # The jobs would otherwise race to create the tracking database and the experiment.
    ensure_experiment(sweep.tracking_uri, sweep.experiment)
    from cluster.jobs import PackedRun, PackedRuns

    settings = sweep.executor
    names = sweep_run_names(sweep.runs)  # over the whole sweep, so names stay unique across submissions
    packs = [todo[i : i + settings.runs_per_job] for i in range(0, len(todo), settings.runs_per_job)]
    functions = [
        PackedRuns(
            sweep.base,
            # a name as a JSON string, which YAML reads back as that string: no YAML parse of 10,000 names to check it
            [PackedRun(run.key, run.label, run.overrides + [f"tracking.run_name={json.dumps(names[run.key])}"])
             for run in pack],
            sweep.tracking_uri,
            sweep.experiment,
            threads=settings.cpus_per_task,
        )
        for pack in packs
    ]
    if settings.kind == "slurm":
        _submit_slurm(sweep, functions, submission)
    elif settings.kind == "local":
        _run_local(sweep, functions, submission, echo)
    else:
        _run_debug(sweep, functions, submission, echo)
    return submission


def _record(job: Any, kind: str, function: PackedRuns) -> JobRecord:
    from submitit.core.utils import JobPaths

    paths = JobPaths(job.paths.folder, job_id=job.job_id, task_id=0)
    return JobRecord(str(job.job_id), kind, [run.key for run in function.runs], str(paths.stdout), str(paths.stderr))


def slurm_executor(sweep: Sweep) -> submitit.SlurmExecutor:
    import submitit

    settings = sweep.executor
    if not shutil.which("srun"):
        raise SubmitError(
            "Slurm is not available here (no srun on PATH); start the single-node cluster with "
            "cluster/slurm/start.sh DIR, or use executor.kind: local"
        )
    executor = submitit.SlurmExecutor(folder=logs_folder(sweep), max_num_timeout=settings.max_requeues)
    params: dict[str, Any] = {
        "job_name": f"normlab-{sweep.name}",
        "nodes": settings.nodes,
        "ntasks_per_node": settings.tasks_per_node,
        "cpus_per_task": settings.cpus_per_task,
        "time": settings.timeout_min,
        "array_parallelism": settings.array_parallelism,
        "setup": list(settings.setup),
        "additional_parameters": dict(settings.sbatch),
    }
    if settings.partition:
        params["partition"] = settings.partition
    if settings.gpus_per_node:
        params["gpus_per_node"] = settings.gpus_per_node
    if settings.mem_gb is not None:
        params["mem"] = f"{settings.mem_gb}GB" if settings.mem_gb == int(settings.mem_gb) else (
            f"{int(settings.mem_gb * 1024)}MB")
    executor.update_parameters(**params)
    return executor


def _submit_slurm(sweep: Sweep, functions: list[PackedRuns], submission: Submission) -> None:
    from submitit.core.utils import FailedJobError

    executor = slurm_executor(sweep)
    chunk = max(1, max_array_size())  # indices 0..chunk-1 stay below MaxArraySize
    submitted: list[JobRecord] = []
    before = set(logs_folder(sweep).rglob("*.pkl"))
    try:
        for start in range(0, len(functions), chunk):
            group = functions[start : start + chunk]
            # submitit prints sbatch's stderr itself on failure; it is turned into one line below instead.
            with contextlib.redirect_stderr(io.StringIO()):
                with executor.batch():
                    jobs = [executor.submit(function) for function in group]
            submission.sbatch_calls += 1
            submitted += [_record(job, "slurm", function) for job, function in zip(jobs, group, strict=True)]
    except FailedJobError as error:
        if submitted:  # nothing half-done: take back the arrays that did go in
            _run(["scancel", *sorted({record.slurm_id for record in submitted})], check=False)
        for pickle in set(logs_folder(sweep).rglob("*.pkl")) - before:  # the refused jobs' pickled calls
            pickle.unlink(missing_ok=True)
        raise SubmitError(f"sbatch refused the job: {_sbatch_reason(str(error))}") from None
    _append_record(sweep, submitted)
    submission.jobs = submitted


def _sbatch_reason(stderr: str) -> str:
    reasons = [line.split("error:", 1)[1].strip() for line in stderr.splitlines() if "error:" in line]
    return "; ".join(reasons) if reasons else (stderr.strip().splitlines() or ["no reason given"])[-1]


def _run_local(sweep: Sweep, functions: list[PackedRuns], submission: Submission, echo: Callable[[str], None]) -> None:
    """Run the jobs on this machine, at most array_parallelism at once (LocalExecutor alone starts all)."""
    import submitit

    settings = sweep.executor
    executor = submitit.LocalExecutor(folder=logs_folder(sweep), max_num_timeout=settings.max_requeues)
    executor.update_parameters(timeout_min=settings.timeout_min, setup=list(settings.setup))
    waiting = list(functions)
    running: list[tuple[Any, PackedRuns, JobRecord]] = []
    total = len(functions)
    finished = 0
    try:
        while waiting or running:
            while waiting and len(running) < settings.array_parallelism:
                function = waiting.pop(0)
                job = executor.submit(function)
                record = _record(job, "local", function)
                _append_record(sweep, [record])
                submission.jobs.append(record)
                running.append((job, function, record))
            time.sleep(0.5)
            for entry in [entry for entry in running if entry[0].done()]:
                running.remove(entry)
                finished += 1
                job, function, record = entry
                ok = job.state == "FINISHED" and not _job_error(job)
                submission.failed_jobs += not ok
                outcome = "ok" if ok else f"FAILED, see {record.stderr}"
                echo(f"job {finished}/{total} ({len(function.runs)} runs): {outcome}")
    except KeyboardInterrupt:
        for job, _, _ in running:
            job.cancel()
        raise


def _job_error(job: Any) -> bool:
    try:
        job.result()
    except Exception:
        return True
    return False


def _run_debug(sweep: Sweep, functions: list[PackedRuns], submission: Submission, echo: Callable[[str], None]) -> None:
    """Run every job in this process, one after the other (for pdb and quick checks)."""
    import submitit

    executor = submitit.DebugExecutor(folder=logs_folder(sweep))
    for n, function in enumerate(functions, 1):
        job = executor.submit(function)
        record = _record(job, "debug", function)
        try:
            job.result()
            outcome = "ok"
        except Exception as error:
            submission.failed_jobs += 1
            outcome = f"FAILED: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        _append_record(sweep, [record])
        submission.jobs.append(record)
        echo(f"job {n}/{len(functions)} ({len(function.runs)} runs): {outcome}")


# --- cancel --------------------------------------------------------------------------------------


def cancel(sweep: Sweep) -> int:
    """Cancel every live job of the sweep; returns how many were cancelled."""
    records = read_record(sweep)
    live = live_jobs(records)
    slurm_ids = sorted({record.slurm_id for record in records if record.kind == "slurm" and record.job_id in live})
    if slurm_ids:
        _run(["scancel", *slurm_ids])
    local = [record for record in records if record.kind == "local" and record.job_id in live]
    for record in local:  # what submitit's LocalJob.cancel sends
        with contextlib.suppress(OSError):
            os.kill(int(record.job_id), signal.SIGINT)
    with file_lock(sweep.folder / (RECORD + ".lock")):
        records = read_record(sweep)
        for record in records:
            record.cancelled = record.cancelled or record.job_id in live
        _write_record(sweep, records)
    return sum(1 for record in records if record.job_id in live)

