"""What MLflow knows about a sweep's runs: MLflow is the source of truth for which run keys are done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DONE_STATUSES = ("finished", "diverged")


@dataclass
class TrackedRun:
    run_id: str
    key: str
    status: str  # normlab.status tag: running | finished | diverged (or "" if never set)
    mlflow_status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED

    @property
    def done(self) -> bool:
        return self.status in DONE_STATUSES and self.mlflow_status == "FINISHED"


def tracked_runs(tracking_uri: str, experiment: str, keys: list[str] | None = None) -> dict[str, TrackedRun]:
    """The newest MLflow run per run key in `experiment`, a done run preferred over others.

    With `keys`, only those keys are asked for (one query per key: cheap for the few runs of a job);
    without, the whole experiment is read page by page (one pass for plan/submit/status).
    """
    if _missing_sqlite(tracking_uri):
        return {}  # nothing ever logged there; do not create an empty database just to look
    # imported here: mlflow takes seconds to import, and a sweep never tracked does not need it
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    filters = [f"tags.run_key = '{key}'" for key in keys] if keys is not None else [""]
    result: dict[str, TrackedRun] = {}
    for filter_string in filters:
        token = None
        while True:
            page = client.search_runs(
                [found.experiment_id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=5000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            for run in page:
                key = run.data.tags.get("run_key")
                if not key:
                    continue
                tracked = TrackedRun(run.info.run_id, key, run.data.tags.get("normlab.status", ""), run.info.status)
                if key not in result or not result[key].done:
                    result[key] = tracked
            token = page.token
            if not token:
                break
    return result


def _missing_sqlite(uri: str) -> bool:
    prefix = "sqlite:///"
    return uri.startswith(prefix) and not Path(uri[len(prefix) :]).exists()


def done_keys(tracking_uri: str, experiment: str, keys: list[str] | None = None) -> set[str]:
    """Run keys that finished or diverged (MLflow status FINISHED): these are never run again."""
    return {key for key, run in tracked_runs(tracking_uri, experiment, keys).items() if run.done}


def ensure_experiment(tracking_uri: str, experiment: str) -> None:
    """Create the tracking database (SQLite) and the experiment once, before jobs start logging to it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment)
