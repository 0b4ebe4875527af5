"""One definition of done: `normlab sweep status` and `normlab report` agree on every run, also where
MLflow's run status and normlab's status tag disagree (a real SQLite MLflow store)."""

from __future__ import annotations

import contextlib
import io

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from cluster import report, sweep_cli
from cluster.dispatch import run_states
from cluster.sweep import load_sweep

# (normlab.status tag, how the MLflow run ends) per seed; None leaves the MLflow run RUNNING.
CASES = {
    0: ("finished", "FINISHED"),   # done
    1: ("diverged", "FINISHED"),   # done
    2: ("running", "FINISHED"),    # MLflow FINISHED, the tag says otherwise: the trainer never wrote its result
    3: ("finished", None),         # the reverse: a resumed run, RUNNING again before its tag is reset
    4: ("finished", "KILLED"),     # the reverse again: killed after the tag was written
}


def _log(client: MlflowClient, experiment_id: str, run, tag: str, end: str | None) -> None:
    tags = {"run_key": run.key, "norm": run.norm, "batch_size": str(run.batch_size), "normlab.status": tag}
    mlflow_run = client.create_run(experiment_id, tags=tags)
    params = [Param("model.norm", run.norm), Param("data.batch_size", str(run.batch_size)),
              Param("optim.lr", str(run.cfg.optim.lr)), Param("seed", str(run.values["seed"]))]
    metrics = [Metric("val_acc", 0.9, 0, 10), Metric("diverged", float(tag == "diverged"), 0, 10)]
    client.log_batch(mlflow_run.info.run_id, metrics=metrics, params=params)
    if end is not None:
        client.set_terminated(mlflow_run.info.run_id, status=end)


def test_sweep_status_and_report_agree_on_done(write_sweep):
    sweep = load_sweep(write_sweep("done-contract", {}, {"kind": "local"}, seeds=sorted(CASES)))
    client = MlflowClient(sweep.tracking_uri)
    experiment_id = client.create_experiment(sweep.experiment)
    by_seed = {run.values["seed"]: run for run in sweep.runs}
    for seed, (tag, end) in CASES.items():
        _log(client, experiment_id, by_seed[seed], tag, end)

    categories = {state.run.values["seed"]: state.category for state in run_states(sweep)}
    status_done = {seed for seed, category in categories.items() if category in ("finished", "diverged")}
    records, notes = report.read_runs(client, experiment_id, {run.key for run in sweep.runs})
    report_done = {record.seed for record in records}

    assert status_done == report_done == {0, 1}
    assert categories == {0: "finished", 1: "diverged", 2: "unsubmitted", 3: "unsubmitted", 4: "unsubmitted"}
    assert "3 run(s) not finished (running, failed or killed): left out" in notes

    # The commands themselves print the same split.
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert sweep_cli.main(["status", str(sweep.path)]) == 0
    total = next(line.split() for line in out.getvalue().splitlines() if line.startswith("total"))
    assert total[1:] == ["1", "1", "0", "0", "0", "0", "3"]  # finished diverged running queued failed cancelled unsub.
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert report.main([str(sweep.path), "--no-log", "--out", "report"]) == 0
    assert "2 training run(s)" in (sweep.path.parent / "report" / "report.md").read_text()
