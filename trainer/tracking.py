"""The tracking contract: where runs are logged, the names normlab writes on them, and when a run is done.

Everything that reads or writes normlab's MLflow runs (the trainer, ``normlab sweep``, ``normlab
report``) takes these names and rules from here, so that a sweep's status and the report can never
disagree about the same run.

- The URI: ``tracking.uri`` of the config, except that ``$MLFLOW_TRACKING_URI`` wins while the
  config keeps the default; a relative SQLite path is pinned to an absolute one (MLflow caches
  stores by URI, and Slurm jobs start in other directories).
- The tags of a training run: ``run_key`` (its identity across resumes and resubmissions),
  ``normlab.status`` (``running`` while it trains, ``finished`` or ``diverged`` once over), the norm
  spec and the per-device batch size. The report's own run is tagged ``normlab.kind=report`` and
  has no ``run_key``.
- Done: ``normlab.status`` says finished or diverged **and** MLflow says FINISHED. MLflow alone is
  not enough (Lightning's logger ends the MLflow run before the trainer writes its status, and a
  diverged run is FINISHED too); the tag alone is not either (a resumed run is RUNNING again before
  its tag is reset). A done run key is never trained again.
- A run key belongs to the tracking store, not to one experiment: the key covers the whole training
  config, and the experiment a run is reported in is not part of it. A key done in any experiment of
  the store is done for every sweep whose grid contains it; the run stays in the experiment of the
  sweep that trained it first, and other sweeps find it there by key (:func:`experiment_ids`).

MLflow is imported inside the functions that talk to it: planning a sweep does not pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"

RUN_KEY_TAG = "run_key"
STATUS_TAG = "normlab.status"
NORM_TAG = "norm"
NORM_NAME_TAG = "norm_name"
BATCH_SIZE_TAG = "batch_size"
STATS_BATCH_SIZE_TAG = "stats_batch_size"  # the batch one (virtual) device normalises
NODES_TAG, NUM_NODES_TAG = "nodes", "num_nodes"  # where the ranks ran (trainer.distributed)
OUTCOME_TAG = "normlab.outcome"  # trainer.outcome's class; normlab.status only says whether the run is over
KIND_TAG, REPORT_KIND = "normlab.kind", "report"
# MLflow 3's experiment kind: its UI opens a "custom model development" experiment on its runs table,
# not on the GenAI overview (values as in the MLflow UI's ExperimentKind)
EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow 3.17's UI picks GenAI or model training from a global switch (or this query), not from the tag
UI_TRAINING_QUERY = "workflowType=machine_learning"


def ui_experiment_url(server: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs table, in the model-training view."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_TRAINING_QUERY}"

RUNNING, FINISHED, DIVERGED = "running", "finished", "diverged"
DONE_STATUSES = (FINISHED, DIVERGED)
MLFLOW_FINISHED = "FINISHED"

_SQLITE = "sqlite:///"
PAGE_SIZE = 5000


def resolve_uri(configured: str = DEFAULT_TRACKING_URI, absolute: bool = True) -> str:
    """The tracking URI to use: ``configured``, or ``$MLFLOW_TRACKING_URI`` while ``configured`` is the
    default; a relative SQLite path made absolute against the current directory (unless not ``absolute``:
    a command that only reads, here, keeps the path as the user sees it)."""
    env = os.environ.get(ENV_TRACKING_URI)
    uri = env if env and configured == DEFAULT_TRACKING_URI else configured
    if absolute and uri.startswith(_SQLITE) and not uri[len(_SQLITE):].startswith("/"):
        uri = _SQLITE + str(Path(uri[len(_SQLITE):]).resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite URI (``sqlite:///rel.db`` relative, ``sqlite:////abs.db`` absolute), else None."""
    return Path(uri[len(_SQLITE):]) if uri.startswith(_SQLITE) else None


def missing_sqlite(uri: str) -> bool:
    """A SQLite URI whose database does not exist: opening a client on it would create an empty one."""
    path = sqlite_path(uri)
    return path is not None and not path.exists()


def prepare_store(uri: str) -> None:
    """Create a SQLite store that does not exist yet under a lock beside it: two processes creating it at
    once race in MLflow's schema migration ("duplicate column name"); the second one finds it made."""
    path = sqlite_path(uri)
    if path is None or path.exists() and path.stat().st_size > 0:
        return
    from mlflow.tracking import MlflowClient

    from trainer.locks import file_lock

    with file_lock(path.with_name(path.name + ".lock")):
        MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the tables


PROBE_TIMEOUT_S = 5.0


def unreachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why an http(s) tracking server does not answer (one line naming the URI and what to do), else None.

    Asked before any MLflow call: MLflow's own client retries with back-off for minutes first."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answers (auth or routing is MLflow's to report)
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return (f"no MLflow server answers at {uri} ({reason}); start it (mlflow/start-server.sh), or point "
                f"tracking.uri / ${ENV_TRACKING_URI} at a running one")


def is_done_status(status: str | None, mlflow_status: str) -> bool:
    """Done from the two statuses: the ``normlab.status`` tag and MLflow's run status (see the module docstring)."""
    return status in DONE_STATUSES and mlflow_status == MLFLOW_FINISHED


def is_done(run: Any) -> bool:
    """Whether an MLflow run is over for good (finished or diverged): the one definition of done."""
    return is_done_status(run.data.tags.get(STATUS_TAG), run.info.status)


def experiment_ids(client: Any) -> list[str]:
    """Every active experiment of the store: where a run key is looked up (a key is the store's)."""
    from mlflow.entities import ViewType

    ids, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        ids += [experiment.experiment_id for experiment in page]
        token = page.token
        if not token:
            return ids


def iter_runs(client: Any, experiment_id: str | list[str], filter_string: str = "",
              newest_first: bool = False, page_size: int = PAGE_SIZE) -> Iterator[Any]:
    """The experiment's (or experiments') active runs, page by page, in start-time order (oldest first
    unless ``newest_first``)."""
    from mlflow.entities import ViewType

    order = "DESC" if newest_first else "ASC"
    ids = [experiment_id] if isinstance(experiment_id, str) else experiment_id
    token = None
    while ids:
        page = client.search_runs(ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=page_size, order_by=[f"attributes.start_time {order}"],
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def ensure_experiment(client: Any, name: str) -> str:
    """Get or create the experiment; tolerate a concurrent process creating it first.

    Only for a sweep about to start many jobs at once; a single run leaves creation to Lightning's
    ``MLFlowLogger``."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        mark_training_experiment(client, found)
        return found.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND})
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        mark_training_experiment(client, found)
        return found.experiment_id


def mark_training_experiment(client: Any, experiment: Any) -> None:
    """Tag the experiment as model training (MLflow 3's UI then opens on its runs) unless it says its kind."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
