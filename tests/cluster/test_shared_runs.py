"""A run key is the store's, not one sweep's: two sweeps whose grids share a point train it once and
both see it finished (sweep status, the job log, the report) — a real SQLite MLflow store, in-process jobs."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from mlflow.tracking import MlflowClient

from cluster import report, sweep_cli
from cluster.dispatch import read_record, run_states, submit
from cluster.sweep import load_sweep


def test_two_sweeps_sharing_a_point_train_it_once_and_both_report_it(write_sweep):
    debug = {"kind": "debug", "runs_per_job": 2}
    first = load_sweep(write_sweep("sweep-a", {"model.norm": ["bn", "gn:groups=2"]}, debug))
    second = load_sweep(write_sweep("sweep-b", {"model.norm": ["bn", "ln"]}, debug))
    shared = {run.key for run in first.runs} & {run.key for run in second.runs}
    assert len(shared) == 1 and first.experiment != second.experiment

    assert submit(first, echo=lambda _: None).failed_jobs == 0
    # Before sweep B runs, its shared point is already finished (found in sweep A's experiment).
    assert {s.run.key: s.category for s in run_states(second)}[next(iter(shared))] == "finished"
    result = submit(second, echo=lambda _: None)
    assert result.failed_jobs == 0 and result.skipped_done == 1
    assert [job.run_keys for job in result.jobs] == [[run.key for run in second.runs if run.key not in shared]]

    client = MlflowClient(first.tracking_uri)
    trained = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
               if r.data.tags.get("run_key") in shared]
    assert len(trained) == 1  # trained once, in the experiment of the sweep that ran it first
    assert all(category == "finished" for category in (s.category for s in run_states(second)))
    for job in read_record(second):
        assert "delete" not in Path(job.stdout).read_text() + Path(job.stderr).read_text()

    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert sweep_cli.main(["status", str(second.path)]) == 0
    total = next(line.split() for line in out.getvalue().splitlines() if line.startswith("total"))
    assert total[1:] == ["2", "0", "0", "0", "0", "0", "0"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert report.main([str(second.path), "--no-log", "--out", "report-b"]) == 0
    text = Path("report-b", "report.md").read_text()
    assert "2 training run(s)" in text and "no finished MLflow run" not in text
