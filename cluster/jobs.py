"""What one submitted job runs: several runs of a sweep in turn, in one process per task.

The job is a submitit ``Checkpointable``: on the preemption or timeout signal submitit pickles it
again and requeues it. It keeps no state of its own: each (re)start asks MLflow which of its run
keys are done, skips those, and lets the trainer resume the interrupted run from
``<run_dir>/checkpoints/last.ckpt`` into the same MLflow run. So a job that was killed without any
signal (``scontrol requeue``, node failure) comes back the same way.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

from cluster.lease import RunLease
from cluster.tracking import done_keys


@dataclass
class PackedRun:
    key: str
    label: str
    overrides: list[str]


class RunsFailed(RuntimeError):
    """Some runs of a packed job raised; the others ran. Makes the job end as failed."""


class PackedRuns(Checkpointable):
    def __init__(self, base: str | None, runs: list[PackedRun], tracking_uri: str, experiment: str, threads: int):
        self.base = base
        self.runs = runs
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.threads = threads

    def __call__(self) -> list[dict]:
        import torch

        # Lightning and the trainer load only inside the job: plan/status/cancel stay quick.
        from trainer.config import load_config, run_key
        from trainer.run import train

        torch.set_num_threads(self.threads)
        env = submitit.JobEnvironment()
        leases: dict[str, RunLease] = {}
        try:
            return self._train_all(env, leases, load_config, run_key, train)
        finally:
            for lease in leases.values():
                lease.release()

    def _train_all(self, env, leases, load_config, run_key, train) -> list[dict]:
        import torch

        todo = self._todo(env, leases, load_config)
        print(f"[normlab] job {env.job_id} rank {env.global_rank}/{env.num_tasks}: {len(todo)} of {len(self.runs)} "
              f"runs to train, torch threads {torch.get_num_threads()}", flush=True)
        results, failed = [], []
        for run in self.runs:
            if run.key not in todo:
                held = self._held_by.get(run.key)
                why = f"held by {held}, which trains it" if held else "already done in MLflow"
                print(f"[normlab] {run.label} {run.key}: {why}, skipped", flush=True)
                continue
            cfg = load_config(self.base, run.overrides)
            if run_key(cfg) != run.key:
                # The experiment file or the trainer's defaults changed since `submit`: this is not the run we planned.
                failed.append(run)
                print(f"[normlab] {run.label}: its config now has run key {run_key(cfg)}, not {run.key}; "
                      "re-run `normlab sweep submit`", flush=True)
                continue
            print(f"[normlab] {run.label} {run.key}: training", flush=True)
            try:
                result = train(cfg)
            except Exception:
                if env.num_tasks > 1:
                    raise  # the other ranks are inside the same collective: the job cannot go on
                traceback.print_exc()
                failed.append(run)
                continue
            finally:
                if run.key in leases:
                    leases.pop(run.key).release()
            print(f"[normlab] {run.label} {run.key}: {result.status}", flush=True)
            results.append({"run_key": result.run_key, "run_id": result.run_id, "status": result.status,
                            "metrics": dict(result.metrics), "run_dir": str(result.run_dir)})
        if failed:
            names = "; ".join(f"{run.label} {run.key}" for run in failed)
            raise RunsFailed(f"{len(failed)} of {len(self.runs)} runs failed: {names} (tracebacks above)")
        return results

    def _leased(self, env: submitit.JobEnvironment, leases: dict[str, RunLease], load_config) -> set[str]:
        """Keys this job now holds the lease of and MLflow does not have done (asked after leasing, so a
        holder that finished in between is seen); a key another live job holds is left to it."""
        self._held_by: dict[str, str] = {}
        for run in self.runs:
            lease = RunLease(Path(load_config(self.base, run.overrides).output.root) / run.key, str(env.job_id))
            held = lease.acquire()
            if held is None:
                leases[run.key] = lease
            else:
                self._held_by[run.key] = held
        done = done_keys(self.tracking_uri, self.experiment, list(leases))
        for key in done & set(leases):
            leases.pop(key).release()
        return set(leases)

    def _todo(self, env: submitit.JobEnvironment, leases: dict[str, RunLease], load_config) -> set[str]:
        """Keys still to run. Rank 0 alone leases and asks MLflow; the other ranks read its answer from a file."""
        self._held_by = {}
        if env.num_tasks == 1:
            return self._leased(env, leases, load_config)
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
        answer = Path(env.paths.folder) / f"{env.job_id}_todo_{attempt}.json"
        if env.global_rank == 0:
            todo = sorted(self._leased(env, leases, load_config))
            partial = answer.with_suffix(".tmp")
            partial.write_text(json.dumps(todo))
            partial.replace(answer)
            return set(todo)
        deadline = time.monotonic() + 600
        while not answer.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 never wrote {answer}; see rank 0's log")
            time.sleep(0.5)
        return set(json.loads(answer.read_text()))
