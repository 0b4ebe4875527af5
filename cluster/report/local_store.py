"""Runs and step-0 values read straight from a local SQLite store, for thousands of runs.

MLflow's ``search_runs`` builds an entity for every param, tag and latest metric of every run (a run of
normlab logs about 90 params and 250 metric keys): at 10,000 runs that alone takes minutes. On a local
store the report asks MLflow's own tables (its SQLAlchemy models, through the store's session) for
columns only: the runs of the experiments, their tags, their latest metrics, and only the params the
report reads; and for the step-0 values, one query per metric key for hundreds of runs. Only active
runs, newest first, as the search would return them. Any other store goes through the public search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

CHUNK = 500  # run ids per IN (...) clause, well below SQLite's variable limit


@dataclass
class _Info:
    run_id: str
    experiment_id: str
    status: str
    start_time: int


@dataclass
class _Data:
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LocalRun:
    """The parts of an MLflow run the report reads (``info`` and ``data``, as on :class:`mlflow.entities.Run`)."""

    info: _Info
    data: _Data = field(default_factory=_Data)


def sql_store(client) -> Any | None:
    """The client's store when it is a local SQL store, else None."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = client._tracking_client.store
    return store if isinstance(store, SqlAlchemyStore) else None


def search_runs(store, experiment_ids: list[str], param_keys: tuple[str, ...]) -> list[LocalRun]:
    """The active runs of the experiments, newest first, with their tags, latest metrics and ``param_keys``."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag

    ids = [int(i) for i in experiment_ids]
    with store.ManagedSessionMaker() as session:
        rows = (session.query(SqlRun.run_uuid, SqlRun.experiment_id, SqlRun.status, SqlRun.start_time)
                .filter(SqlRun.experiment_id.in_(ids), SqlRun.lifecycle_stage == "active")
                .order_by(SqlRun.start_time.desc(), SqlRun.run_uuid).all())
        runs = {run_id: LocalRun(_Info(run_id, str(experiment), status, start))
                for run_id, experiment, status, start in rows}

        def of_runs(*columns):
            return (session.query(*columns).join(SqlRun, SqlRun.run_uuid == columns[0])
                    .filter(SqlRun.experiment_id.in_(ids), SqlRun.lifecycle_stage == "active"))

        for run_id, key, value in of_runs(SqlTag.run_uuid, SqlTag.key, SqlTag.value):
            runs[run_id].data.tags[key] = value
        for run_id, key, value in of_runs(SqlParam.run_uuid, SqlParam.key, SqlParam.value).filter(
                SqlParam.key.in_(param_keys)):
            runs[run_id].data.params[key] = value
        for run_id, key, value, is_nan in of_runs(SqlLatestMetric.run_uuid, SqlLatestMetric.key,
                                                  SqlLatestMetric.value, SqlLatestMetric.is_nan):
            runs[run_id].data.metrics[key] = math.nan if is_nan else value
    return list(runs.values())


def values_at_step_zero(store, key: str, run_ids: list[str]) -> list[tuple[str, float]]:
    """``(run id, value)`` of ``key`` at step 0 (the last one logged there) for the runs that have one."""
    from mlflow.store.tracking.dbmodels.models import SqlMetric

    out: dict[str, float] = {}
    with store.ManagedSessionMaker() as session:
        for i in range(0, len(run_ids), CHUNK):
            rows = (session.query(SqlMetric.run_uuid, SqlMetric.value, SqlMetric.is_nan)
                    .filter(SqlMetric.key == key, SqlMetric.step == 0, SqlMetric.run_uuid.in_(run_ids[i:i + CHUNK]))
                    .order_by(SqlMetric.timestamp).all())
            for run_id, value, is_nan in rows:
                out[run_id] = math.nan if is_nan else value
    return list(out.items())
