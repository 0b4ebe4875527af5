"""The local executor (what `normlab demo` uses): throttled to array_parallelism, torch threads from cpus_per_task."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from cluster import demo
from cluster.dispatch import read_record
from cluster.sweep import load_sweep


def test_demo_command_runs_a_sweep_locally_one_job_at_a_time(write_sweep, capsys):
    path = write_sweep("local", {"model.norm": ["bn", "gn:groups=2"]},
                       {"kind": "local", "runs_per_job": 1, "array_parallelism": 1, "cpus_per_task": 2})
    assert demo.main(["--sweep", str(path), "--out", "report"]) == 0
    out = capsys.readouterr().out
    sweep = load_sweep(path)
    assert f"mlflow ui --backend-store-uri {sweep.tracking_uri}" in out
    assert "ran 2 runs as 2 local jobs" in out
    assert Path("report", "report.md").is_file()  # the regime report (cluster.report) ends the demo

    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name("local")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "run_key" in r.data.tags]  # not the report
    runs.sort(key=lambda r: r.info.start_time)
    assert {r.data.tags["run_key"] for r in runs} == {run.key for run in sweep.runs}
    assert all(r.data.tags["normlab.status"] == "finished" for r in runs)
    # array_parallelism=1: the second job started only after the first one's run had ended.
    assert runs[0].info.end_time <= runs[1].info.start_time
    for job in read_record(sweep):
        assert "torch threads 2" in Path(job.stdout).read_text()
    # Running it again trains nothing.
    assert demo.main(["--sweep", str(path), "--out", "report"]) == 0
    assert "nothing to submit: 2 already done in MLflow" in capsys.readouterr().out
