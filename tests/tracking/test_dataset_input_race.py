"""Runs of a sweep that start at the same moment in a fresh experiment log the same dataset input; MLflow's
store checks for the dataset and then inserts it, so all but one of them can hit its unique constraint.
Every run must still get its dataset input (the demo's first two runs failed this way)."""

from __future__ import annotations

import multiprocessing

import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from trainer.data.memory import Split
from trainer.dataset_input import data_digest, log_dataset_input

PROCESSES = 4
EXPERIMENTS = 6


class _Data:
    train_set = Split(torch.zeros(8, 1, 2, 2), torch.arange(8))
    val_set = None


def _log_at_once(uri: str, run_id: str, barrier, failures) -> None:
    client = MlflowClient(uri)
    data_cfg = OmegaConf.create({"name": "synthetic",
                                 "synthetic": {"samples": 8, "channels": 1, "image_size": 2, "classes": 8}})
    client.get_run(run_id)  # the store is open before the race starts
    barrier.wait()
    try:
        log_dataset_input(client, run_id, data_cfg, _Data())
    except Exception as e:  # reported to the test, which names it
        failures.put(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def test_simultaneous_runs_all_log_the_shared_dataset(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    ctx = multiprocessing.get_context("fork")
    failures = ctx.Queue()
    for e in range(EXPERIMENTS):
        experiment = client.create_experiment(f"race-{e}")
        runs = [client.create_run(experiment).info.run_id for _ in range(PROCESSES)]
        barrier = ctx.Barrier(PROCESSES)
        procs = [ctx.Process(target=_log_at_once, args=(uri, run, barrier, failures)) for run in runs]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * PROCESSES
        reported = []
        while not failures.empty():
            reported.append(failures.get())
        assert not reported, f"experiment {e}: {reported}"
        digests = set()
        for run in runs:
            (only,) = client.get_run(run).inputs.dataset_inputs
            digests.add(only.dataset.digest)
        assert digests == {data_digest(_Data())}
