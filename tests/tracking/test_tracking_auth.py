"""`mlflow/start-server.sh --auth`: MLflow's basic-auth app refuses requests without valid credentials,
and a training run with MLFLOW_TRACKING_USERNAME/PASSWORD logs."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request

import pytest
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from trainer import train

ADMIN_PASSWORD = "admin-pw-for-the-test-0"
USER, USER_PASSWORD = "researcher", "researcher-pw-for-the-test-0"


def status_of(url: str, credentials: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_basic_auth_refuses_anonymous_requests_and_an_authenticated_run_logs(start_mlflow_server, tiny_config,
                                                                             monkeypatch):
    server = start_mlflow_server("auth-server", auth=True, workers=1,
                                 env={"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD})
    assert (server.data_dir / "basic_auth.db").is_file()  # the auth app's own store, in the data dir
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert status_of(search) == 401
    assert status_of(search, ("admin", "wrong-password")) == 401
    assert status_of(search, ("admin", ADMIN_PASSWORD)) == 200
    with pytest.raises(MlflowException):
        MlflowClient(server.url).search_experiments()

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    get_app_client("basic-auth", tracking_uri=server.url).create_user(USER, USER_PASSWORD)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER_PASSWORD)
    result = train(tiny_config("with-auth", "trainer.max_epochs=1", f"tracking.uri={server.url}"))
    run = MlflowClient(server.url).get_run(result.run_id)
    assert run.data.metrics["val_acc"] == pytest.approx(result.metrics["val_acc"])
    assert run.data.params["model.norm"] == "bn" and run.info.user_id == USER

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    assert status_of(f"{server.url}/api/2.0/mlflow/runs/get?run_id={result.run_id}") == 401
