"""``normlab sweep {plan,submit,status,cancel} FILE``: a sweep file's runs on Slurm, locally or in-process."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, defaultdict

from cluster.dispatch import CATEGORIES, PENDING_REASONS, SubmitError, cancel, read_record, run_states, submit
from cluster.slurm_jobs import slurm_jobs
from cluster.sweep import Sweep, SweepError, load_sweep
from cluster.tracking import done_keys
from trainer.tracking import unreachable
from trainer.writable import cannot_write, store_folder

# More jobs than this are summarised per array instead of listed one per line.
LIST_JOBS_UP_TO = 20


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def cmd_plan(sweep: Sweep) -> int:
    done = done_keys(sweep.tracking_uri, sweep.experiment)
    axes = list(sweep.runs[0].values)
    rows = [[str(run.index), run.key, *[str(run.values[a]) for a in axes], "yes" if run.key in done else ""]
            for run in sweep.runs]
    print(_table(["#", "run_key", *axes, "done"], rows))
    remaining = sum(1 for run in sweep.runs if run.key not in done)
    jobs = -(-remaining // sweep.executor.runs_per_job)
    print(f"\n{len(sweep.runs)} runs in sweep {sweep.name!r} (MLflow experiment {sweep.experiment!r} at "
          f"{sweep.tracking_uri}); {len(sweep.runs) - remaining} done; `submit` would send {remaining} runs "
          f"as {jobs} {sweep.executor.kind} jobs of up to {sweep.executor.runs_per_job} runs.")
    return 0


def cmd_submit(sweep: Sweep) -> int:
    result = submit(sweep)
    skipped = f"{result.skipped_done} already done in MLflow, {result.skipped_live} held by queued or running jobs"
    if not result.jobs:
        print(f"nothing to submit: {skipped}.")
        return 0
    runs = sum(len(job.run_keys) for job in result.jobs)
    kind = sweep.executor.kind
    if kind == "slurm":
        arrays = sorted({job.slurm_id for job in result.jobs}, key=int)
        print(f"submitted {runs} runs as {len(result.jobs)} Slurm jobs in {len(arrays)} array(s) "
              f"({result.sbatch_calls} sbatch calls); skipped {skipped}.")
        if len(result.jobs) <= LIST_JOBS_UP_TO:
            for job in result.jobs:
                print(f"  job {job.job_id}: {len(job.run_keys)} runs, log {job.stdout} (stderr {job.stderr})")
        else:
            for array in arrays:
                tasks = [job for job in result.jobs if job.slurm_id == array]
                print(f"  array {array}: {len(tasks)} jobs, logs {tasks[0].stdout} ... {tasks[-1].stdout}")
    else:
        failed = f" ({result.failed_jobs} failed)" if result.failed_jobs else ""
        print(f"ran {runs} runs as {len(result.jobs)} {kind} jobs{failed}; skipped {skipped}. "
              f"Logs: {sweep.folder / 'logs'}")
    print(f"`normlab sweep status {sweep.path}` shows how they are doing.")
    return 1 if result.failed_jobs else 0


def cmd_status(sweep: Sweep) -> int:
    states = run_states(sweep)
    counts: dict[tuple[str, int], Counter[str]] = defaultdict(Counter)
    for state in states:
        counts[(state.run.norm, state.run.batch_size)][state.category] += 1
    rows = [[norm, str(batch), *[str(counts[(norm, batch)][c] or "") for c in CATEGORIES]]
            for norm, batch in sorted(counts, key=lambda nb: (nb[0], nb[1]))]
    totals = Counter(state.category for state in states)
    rows.append(["total", "", *[str(totals[c]) for c in CATEGORIES]])
    print(f"sweep {sweep.name!r}: {len(states)} runs (MLflow experiment {sweep.experiment!r} at {sweep.tracking_uri})")
    print(_table(["norm", "batch", *CATEGORIES], rows))
    waiting = sorted({(state.job.job_id, PENDING_REASONS[state.job.job_id]) for state in states
                      if state.category == "queued" and state.job.job_id in PENDING_REASONS})
    if waiting:
        print("\nqueued jobs and why Slurm holds them:")
        for job_id, reason in waiting:
            print(f"  job {job_id}: {reason}")
    failed = [state for state in states if state.category == "failed"]
    if failed:
        print(f"\nfailed runs ({len(failed)}); `normlab sweep submit {sweep.path}` sends them again:")
        for state in failed:
            print(f"  {state.run.label} {state.run.key}: job {state.job.job_id}, log {state.job.stderr}")
    _print_slurm_jobs(sweep)
    return 0


def _print_slurm_jobs(sweep: Sweep) -> None:
    """Each Slurm job of the sweep with its nodes and what became of it (up to LIST_JOBS_UP_TO jobs)."""
    records = [record for record in read_record(sweep) if record.kind == "slurm"]
    if not records or len(records) > LIST_JOBS_UP_TO:
        return
    known = slurm_jobs()
    rows = []
    for record in records:
        job = known.get(record.job_id)
        rows.append([record.job_id, job.nodes if job else "-", str(len(record.run_keys)),
                     job.describe() if job else "gone (ended before Slurm's MinJobAge)"])
    print("\nSlurm jobs:")
    print(_table(["job", "nodes", "runs", "state"], rows))


def cmd_cancel(sweep: Sweep) -> int:
    n = cancel(sweep)
    print(f"cancelled {n} queued or running jobs of sweep {sweep.name!r}." if n else "no queued or running jobs.")
    return 0


COMMANDS = {"plan": cmd_plan, "submit": cmd_submit, "status": cmd_status, "cancel": cmd_cancel}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normlab sweep", description=__doc__)
    parser.add_argument("command", choices=list(COMMANDS), help="plan: runs and keys; submit: send what is not done; "
                        "status: finished/running/queued/failed per norm and batch; cancel: stop its jobs")
    parser.add_argument("file", help="sweep file, e.g. configs/sweeps/demo.yaml")
    args = parser.parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (database set-up) are noise here
    try:
        sweep = load_sweep(args.file)
        down = unreachable(sweep.tracking_uri)
        if down:
            raise SweepError(down)
        if args.command == "submit":
            store = store_folder(sweep.tracking_uri)
            for folder in (sweep.folder, store):
                why = folder is not None and cannot_write(folder)
                if why:
                    raise SweepError(f"cannot write in {folder}: {why}; choose a directory you can write")
        return COMMANDS[args.command](sweep)
    except (SweepError, SubmitError) as error:
        print(f"normlab sweep {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
