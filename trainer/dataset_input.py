"""The run's data as an MLflow dataset input: what fills the Dataset column of the MLflow UI's runs table.

One :class:`mlflow.data.meta_dataset.MetaDataset` per run, logged with the context ``train``:

- name: ``data.name`` (``digits``, ``cifar10``, ``cifar100``, ``imagefolder``, ``synthetic``);
- digest: the first 10 hex digits of a SHA-256 over what the run trains and validates on, so two runs
  share a digest exactly when they saw the same data: the image and label tensors of the in-memory
  sets (after the validation split), the sample paths and labels of an image folder;
- source: where the data comes from: the CIFAR batch directory or image folder (``data.path``),
  scikit-learn's bundled digits file, or for synthetic images the code that draws them.

MLflow's store looks the dataset up and then inserts it, so runs of one sweep that start together in a
fresh experiment race for the insert and all but one hit its unique constraint; the losers try again,
and then find the dataset the winner wrote.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

DIGEST_LENGTH = 10
CONTEXT = "train"
ATTEMPTS = 5
# how the stores word a lost insert race: SQLite, PostgreSQL ("violates unique constraint"), MySQL
_DUPLICATE_INSERT = ("unique constraint", "duplicate entry")


def data_digest(datamodule: Any) -> str:
    """SHA-256 (first ``DIGEST_LENGTH`` hex digits) of the training and validation data the module holds."""
    sha = hashlib.sha256()
    for split in (datamodule.train_set, datamodule.val_set):
        if split is None:
            continue
        samples = getattr(split, "samples", None)
        if samples is not None:  # an image folder: its files and labels, not the decoded images
            for path, label in samples:
                sha.update(f"{path}\t{label}\n".encode())
        else:
            for tensor in (split.images, split.labels):
                sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:DIGEST_LENGTH]


def dataset_source(data_cfg: Any):
    """The MLflow dataset source of ``cfg.data``."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if data_cfg.name == "synthetic":
        s = data_cfg.synthetic
        return CodeDatasetSource({"mlflow.source.name": "trainer.data.SyntheticDataModule",
                                  "shape": f"{s.samples}x{s.channels}x{s.image_size}x{s.image_size}",
                                  "classes": str(s.classes)})
    if data_cfg.name == "digits":
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    else:
        from trainer.data.files import cifar_dir

        path = cifar_dir(data_cfg.name, data_cfg.path) if data_cfg.name.startswith("cifar") else Path(data_cfg.path)
    return resolve_dataset_source(str(Path(path).expanduser().resolve()))


def log_dataset_input(client: Any, run_id: str, data_cfg: Any, datamodule: Any) -> None:
    """Log the run's dataset input (name, digest, source) with the context ``train``."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = MetaDataset(dataset_source(data_cfg), name=data_cfg.name, digest=data_digest(datamodule))
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, CONTEXT)])]
    for attempt in range(1, ATTEMPTS + 1):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as e:
            if attempt == ATTEMPTS or not any(words in str(e).lower() for words in _DUPLICATE_INSERT):
                raise
