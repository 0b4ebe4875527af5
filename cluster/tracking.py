"""What MLflow knows about a sweep's runs: MLflow is the source of truth for which run keys are done.

The names and the rule of done are the tracking contract's (:mod:`trainer.tracking`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from trainer import tracking
from trainer.run_index import KeyedRun, has_training_experiment, keyed_runs


@dataclass
class TrackedRun:
    run_id: str
    key: str
    status: str  # normlab.status tag: running | finished | diverged (or "" if never set)
    mlflow_status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    done: bool  # trainer.tracking.is_done

    @classmethod
    def of_keyed(cls, run: KeyedRun) -> TrackedRun:
        return cls(run.run_id, run.key, run.status, run.mlflow_status,
                   tracking.is_done_status(run.status, run.mlflow_status))

    @classmethod
    def of(cls, run) -> TrackedRun:
        tags = run.data.tags
        return cls(run.info.run_id, tags[tracking.RUN_KEY_TAG], tags.get(tracking.STATUS_TAG, ""), run.info.status,
                   tracking.is_done(run))


def tracked_runs(tracking_uri: str, experiment: str, keys: list[str] | None = None) -> dict[str, TrackedRun]:
    """The newest MLflow run per run key, a done run preferred over others, then one in `experiment`.

    A run key is the store's (see :mod:`trainer.tracking`): runs are looked up in every experiment,
    so a point two sweeps share is found done in the experiment of the sweep that trained it.
    With `keys`, only those keys are asked for (one query per key: cheap for the few runs of a job);
    without, the store is read page by page (one pass for plan/submit/status). A SQLite store is read
    straight from its tables (:mod:`trainer.run_index`: no MLflow import), any other through MLflow's client.
    """
    if tracking.missing_sqlite(tracking_uri):
        return {}  # nothing ever logged there; do not create an empty database just to look
    direct = keyed_runs(tracking_uri, experiment, keys)
    if direct is not None:  # a SQLite store, read without importing MLflow
        own, runs = direct
        return _newest((TrackedRun.of_keyed(run), run.experiment_id == own) for run in runs)
    return tracked_by_client(tracking_uri, experiment, keys)


def tracked_by_client(tracking_uri: str, experiment: str, keys: list[str] | None = None) -> dict[str, TrackedRun]:
    """:func:`tracked_runs` through MLflow's client, for any store."""
    # imported here: mlflow takes seconds to import, and a sweep never tracked does not need it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    own = found.experiment_id if found is not None else None
    ids = tracking.experiment_ids(client)
    filters = [f"tags.{tracking.RUN_KEY_TAG} = '{key}'" for key in keys] if keys is not None else [""]
    return _newest((TrackedRun.of(run), run.info.experiment_id == own)
                   for filter_string in filters for run in tracking.iter_runs(client, ids, filter_string)
                   if run.data.tags.get(tracking.RUN_KEY_TAG))


def _newest(runs: Iterable[tuple[TrackedRun, bool]]) -> dict[str, TrackedRun]:
    """Per key, of runs oldest first: the newest done one, else the newest; one in the own experiment preferred."""
    result: dict[str, TrackedRun] = {}
    rank: dict[str, tuple[bool, bool]] = {}
    for tracked, in_own in runs:
        better = (tracked.done, in_own)
        if tracked.key not in result or better >= rank[tracked.key]:
            result[tracked.key], rank[tracked.key] = tracked, better
    return result


def done_keys(tracking_uri: str, experiment: str, keys: list[str] | None = None) -> set[str]:
    """Run keys that finished or diverged (MLflow status FINISHED) in any experiment: never run again."""
    return {key for key, run in tracked_runs(tracking_uri, experiment, keys).items() if run.done}


def ensure_experiment(tracking_uri: str, experiment: str) -> None:
    """Create the tracking database (SQLite) and the experiment once, before jobs start logging to it."""
    if has_training_experiment(tracking_uri, experiment):
        return  # made by an earlier submit: no need to load MLflow
    from mlflow.tracking import MlflowClient

    tracking.prepare_store(tracking_uri)
    tracking.ensure_experiment(MlflowClient(tracking_uri=tracking_uri), experiment)
