"""The trainer logs its data as an MLflow dataset input (the Dataset column of the runs table), read back
from a real `mlflow server`: name, a digest of the data the run saw, its source, the context `train`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import sklearn.datasets
from mlflow.tracking import MlflowClient

from trainer import train
from trainer.data import build_datamodule


def dataset_input(client, run_id):
    (only,) = client.get_run(run_id).inputs.dataset_inputs
    return only.dataset, {tag.key: tag.value for tag in only.tags}


def digest_of(cfg) -> str:
    """The data the run trains and validates on, hashed here from the data module's own tensors."""
    datamodule = build_datamodule(cfg)
    datamodule.load()
    sha = hashlib.sha256()
    for split in (datamodule.train_set, datamodule.val_set):
        sha.update(split.images.numpy().tobytes())
        sha.update(split.labels.numpy().tobytes())
    return sha.hexdigest()[:10]


def test_digits_and_synthetic_runs_log_their_dataset(mlflow_server, tiny_config):
    client = MlflowClient(mlflow_server.url)
    digits = tiny_config("dataset-input", "data.name=digits", "trainer.max_epochs=1", "probes.every_n_steps=0",
                         f"tracking.uri={mlflow_server.url}")
    run = train(digits)
    dataset, tags = dataset_input(client, run.run_id)
    assert (dataset.name, tags["mlflow.data.context"]) == ("digits", "train")
    assert dataset.digest == digest_of(digits)
    bundled = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    assert dataset.source_type == "local" and json.loads(dataset.source)["uri"].endswith(str(bundled))

    # the same digits with another validation split are other data: another digest
    other = tiny_config("dataset-input", "data.name=digits", "data.val_split=0.5", "trainer.max_epochs=1",
                        "probes.every_n_steps=0", f"tracking.uri={mlflow_server.url}")
    assert dataset_input(client, train(other).run_id)[0].digest not in (dataset.digest, "")

    synthetic = tiny_config("dataset-input", "trainer.max_epochs=1", "probes.every_n_steps=0",
                            f"tracking.uri={mlflow_server.url}")
    dataset, _ = dataset_input(client, train(synthetic).run_id)
    assert (dataset.name, dataset.source_type, dataset.digest) == ("synthetic", "code", digest_of(synthetic))
    assert json.loads(dataset.source)["tags"]["shape"] == "96x3x8x8"
