"""Metric values at step 0 (the initialisation) for many runs at once.

MLflow's ``GetMetricHistoryBulkInterval`` returns one metric of up to 100 runs restricted to a step
range: with the range [0, 0] and one result per run, each run's step-0 value. A tracking server is
asked over its REST API, several requests at a time (it serves them in parallel workers); a local
SQL store answers one query per metric key (:mod:`cluster.report.local_store`; its own bulk call asks
run by run). Any other store falls back to one ``get_metric_history`` per run and key.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

BULK_RUNS = 100  # MLflow's limit on run ids per GetMetricHistoryBulkInterval request
PARALLEL_REQUESTS = 8
_ENDPOINT = "/api/2.0/mlflow/metrics/get-history-bulk-interval"


def values_at_step_zero(client, wanted: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """``{run_id: {key: value at step 0}}`` for each ``key -> [run ids]`` in ``wanted`` (runs that did not
    log the key at step 0 are left out)."""
    from cluster.report import local_store

    store = client._tracking_client.store  # MlflowClient does not expose the bulk call; its store does
    local = local_store.sql_store(client)
    requests = list(wanted.items()) if local is not None else [
        (key, run_ids[i:i + BULK_RUNS]) for key, run_ids in wanted.items() for i in range(0, len(run_ids), BULK_RUNS)]
    if not requests:
        return {}
    if local is not None:
        answers = [local_store.values_at_step_zero(local, *request) for request in requests]
    elif hasattr(store, "get_host_creds"):  # a tracking server (RestStore)
        with ThreadPoolExecutor(PARALLEL_REQUESTS) as pool:
            answers = list(pool.map(lambda request: _from_server(store, *request), requests))
    else:
        answers = [_one_by_one(client, *request) for request in requests]
    out: dict[str, dict[str, float]] = {}
    for (key, _), answer in zip(requests, answers, strict=True):
        for run_id, value in answer:
            out.setdefault(run_id, {})[key] = value
    return out


def _from_server(store, key: str, run_ids: list[str]) -> list[tuple[str, float]]:
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    params = {"run_ids": run_ids, "metric_key": key, "start_step": 0, "end_step": 0, "max_results": 1}
    response = verify_rest_response(http_request(store.get_host_creds(), _ENDPOINT, "GET", params=params),
                                    _ENDPOINT)
    return [(m["run_id"], float(m["value"])) for m in response.json().get("metrics", [])
            if int(m.get("step", 0)) == 0]


def _one_by_one(client, key: str, run_ids: list[str]) -> list[tuple[str, float]]:
    out = []
    for run_id in run_ids:
        at_zero = [m.value for m in client.get_metric_history(run_id, key) if m.step == 0]
        if at_zero:
            out.append((run_id, at_zero[-1]))
    return out
