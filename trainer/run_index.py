"""Which run keys a SQLite tracking store holds, read straight from its tables: no MLflow import.

``normlab sweep plan``/``status``/``submit`` only need, per training run, its run key, its
``normlab.status`` tag, MLflow's status and its experiment. Importing MLflow's client (and its
SQLAlchemy store) for that costs seconds of CPU per command; the three tables it
would read (``runs``, ``tags``, ``experiments``) are read here with :mod:`sqlite3`, read-only, in one query.
What is read means what :func:`trainer.tracking.is_done` and :func:`trainer.tracking.iter_runs`
mean (active runs of active experiments, oldest first); a test compares the two readings on one store.
Other stores (an MLflow server, ``file://``) are read through MLflow's client (``None`` here).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from trainer.tracking import EXPERIMENT_KIND_TAG, RUN_KEY_TAG, STATUS_TAG, sqlite_path

# SQLite's default limit on bound parameters is 999 in older builds: ask for keys in chunks below it
_KEYS_PER_QUERY = 900


@dataclass(frozen=True)
class KeyedRun:
    """One training run as the sweep commands see it."""

    run_id: str
    experiment_id: str
    key: str  # the run_key tag
    status: str  # the normlab.status tag, "" if never set
    mlflow_status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED


def keyed_runs(uri: str, experiment: str, keys: list[str] | None = None) -> tuple[str | None, list[KeyedRun]] | None:
    """(id of ``experiment`` or None, every active run with a run key, oldest first), or None when ``uri``
    is not a SQLite store that exists (the caller asks MLflow instead)."""
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return None
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
    try:
        own = connection.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                                 (experiment,)).fetchone()
        query = (
            "SELECT r.run_uuid, r.experiment_id, k.value, COALESCE(s.value, ''), r.status FROM runs r "
            "JOIN experiments e ON e.experiment_id = r.experiment_id AND e.lifecycle_stage = 'active' "
            "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = ? "
            "LEFT JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = ? "
            "WHERE r.lifecycle_stage = 'active' AND k.value != ''"
        )
        order = " ORDER BY r.start_time ASC, r.run_uuid ASC"
        rows: list[tuple] = []
        if keys is None:
            rows = connection.execute(query + order, (RUN_KEY_TAG, STATUS_TAG)).fetchall()
        else:
            for start in range(0, len(keys), _KEYS_PER_QUERY):
                chunk = keys[start : start + _KEYS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                rows += connection.execute(query + f" AND k.value IN ({marks})" + order,
                                           (RUN_KEY_TAG, STATUS_TAG, *chunk)).fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return None  # an empty file, not yet made a store: MLflow's client says what it is
        raise
    finally:
        connection.close()
    runs = [KeyedRun(run_id, str(experiment_id), key, status, mlflow_status)
            for run_id, experiment_id, key, status, mlflow_status in rows]
    return (str(own[0]) if own else None), runs


def has_training_experiment(uri: str, experiment: str) -> bool:
    """Whether a SQLite store at ``uri`` already holds ``experiment``, active and tagged as model training
    (what :func:`trainer.tracking.ensure_experiment` makes): then a submit need not load MLflow to make it."""
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return False
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
    try:
        found = connection.execute(
            "SELECT 1 FROM experiments e JOIN experiment_tags t ON t.experiment_id = e.experiment_id "
            "WHERE e.name = ? AND e.lifecycle_stage = 'active' AND t.key = ?",
            (experiment, EXPERIMENT_KIND_TAG)).fetchone()
    except sqlite3.OperationalError:
        return False  # not (yet) a store: MLflow makes it
    finally:
        connection.close()
    return found is not None
