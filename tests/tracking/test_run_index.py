"""The SQLite store read straight from its tables (trainer.run_index) says what MLflow's client says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from cluster.tracking import ensure_experiment, tracked_by_client, tracked_runs
from trainer import tracking
from trainer.run_index import has_training_experiment, keyed_runs

REPO = Path(__file__).resolve().parents[2]


def _store(tmp_path: Path) -> str:
    """Runs of every kind the sweep commands meet, in two experiments, one of them deleted afterwards."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    own = client.create_experiment("own")
    other = client.create_experiment("other")
    gone = client.create_experiment("gone")

    def run(experiment: str, key: str | None, status: str | None, mlflow_status: str | None) -> str:
        tags = {tracking.RUN_KEY_TAG: key} if key is not None else {}
        if status is not None:
            tags[tracking.STATUS_TAG] = status
        created = client.create_run(experiment, tags=tags)
        if mlflow_status is not None:
            client.set_terminated(created.info.run_id, mlflow_status)
        return created.info.run_id

    run(own, "aaaaaaaaaaaa", "finished", "FINISHED")
    run(own, "bbbbbbbbbbbb", "running", None)  # training now
    run(own, "cccccccccccc", "running", "FAILED")  # crashed
    run(own, "cccccccccccc", "finished", "FINISHED")  # ... and trained again
    run(other, "dddddddddddd", "diverged", "FINISHED")  # a point the other sweep shares
    run(other, "aaaaaaaaaaaa", "running", "KILLED")
    run(own, "eeeeeeeeeeee", None, "FINISHED")  # Lightning ended it before the status was written
    run(own, None, None, "FINISHED")  # the report's own run
    client.delete_run(run(own, "ffffffffffff", "finished", "FINISHED"))
    run(gone, "gggggggggggg", "finished", "FINISHED")
    client.delete_experiment(gone)
    return uri


def test_direct_reading_agrees_with_mlflow(tmp_path):
    uri = _store(tmp_path)
    direct, by_client = tracked_runs(uri, "own"), tracked_by_client(uri, "own")
    assert direct == by_client
    assert set(direct) == {"aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd", "eeeeeeeeeeee"}
    assert {key for key, run in direct.items() if run.done} == {"aaaaaaaaaaaa", "cccccccccccc", "dddddddddddd"}
    keys = ["cccccccccccc", "dddddddddddd", "ffffffffffff"]
    assert tracked_runs(uri, "own", keys) == tracked_by_client(uri, "own", keys)
    assert tracked_runs(uri, "nowhere") == tracked_by_client(uri, "nowhere")


def test_direct_reading_imports_no_mlflow(tmp_path):
    uri = _store(tmp_path)
    code = ("import sys; from cluster.tracking import done_keys; "
            f"print(sorted(done_keys({uri!r}, 'own'))); print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["['aaaaaaaaaaaa', 'cccccccccccc', 'dddddddddddd']", "False"]


def test_an_experiment_made_once_is_found_without_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert not has_training_experiment(uri, "sweep")
    ensure_experiment(uri, "sweep")
    assert has_training_experiment(uri, "sweep") and not has_training_experiment(uri, "other")
    MlflowClient(uri).delete_experiment(MlflowClient(uri).get_experiment_by_name("sweep").experiment_id)
    assert not has_training_experiment(uri, "sweep")


def test_not_a_store_is_left_to_mlflow(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    assert keyed_runs(f"sqlite:///{empty}", "own") is None
    assert keyed_runs("http://127.0.0.1:1", "own") is None
