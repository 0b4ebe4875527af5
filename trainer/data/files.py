"""What each data module needs on disk, checked without reading it: the rules config validation runs.

Each class here is the base of one data module (:mod:`trainer.data.memory`, :mod:`trainer.data.imagefolder`),
which so owns its ``check_files`` classmethod; config validation calls the same classmethod through
:data:`DATA_FILES` without importing Lightning or torch (``normlab sweep plan`` checks every run).
The checks are cheap (no listing of an image folder's files): a sweep runs them for every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train", "test"]),
}


def cifar_dir(name: str, path: str) -> Path:
    """The directory holding the batches: ``path`` itself or its standard subdirectory."""
    sub, _ = CIFAR_FILES[name]
    p = Path(path).expanduser()
    return p / sub if (p / sub).is_dir() else p


class DataFiles:
    """A data module that reads no files (digits is bundled with scikit-learn, synthetic is drawn)."""

    @classmethod
    def check_files(cls, data: Any) -> None:
        """Raise :class:`ConfigError` (one line) when ``data`` (the config's ``data`` section) cannot be read."""


class CifarFiles(DataFiles):
    """CIFAR-10/100, the python version: the pickled batches under ``data.path`` (or its standard subdirectory)."""

    @classmethod
    def check_files(cls, data: Any) -> None:
        sub, files = CIFAR_FILES[data.name]
        if not data.path:
            raise ConfigError(f"data.path: {data.name} needs the directory of its python-pickle batches ({sub}); "
                              f"download the python version from https://www.cs.toronto.edu/~kriz/cifar.html")
        if not Path(data.path).expanduser().is_dir():
            raise ConfigError(f"data.path: {data.path} does not exist (expected the {data.name} python batches, "
                              f"{sub}/)")
        where = cifar_dir(data.name, data.path)
        missing = [f for f in files if not (where / f).is_file()]
        if missing:
            raise ConfigError(f"data.path: {where} has no {', '.join(missing)}; expected the {data.name} python "
                              f"version ({sub}/ with {', '.join(files)})")


class ImageFolderFiles(DataFiles):
    """An ImageNet-style folder: ``train/`` and ``val/`` under ``data.path``, each with one folder per class."""

    @classmethod
    def check_files(cls, data: Any) -> None:
        if data.image_size < 8 or data.num_workers < 0:
            raise ConfigError(f"data.image_size must be >= 8 and data.num_workers >= 0, got {data.image_size}, "
                              f"{data.num_workers}")
        if not data.path:
            raise ConfigError("data.path: imagefolder needs the directory holding train/ and val/, each with one "
                              "folder of images per class (the ImageNet layout); set data.path=...")
        root = Path(data.path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.path: {data.path} does not exist (expected train/ and val/ folders of class "
                              f"folders)")
        missing = [sub for sub in ("train", "val") if not (root / sub).is_dir()]
        if missing:
            raise ConfigError(f"data.path: {data.path} has no {' or '.join(s + '/' for s in missing)}; expected "
                              f"train/ and val/, each with one folder of images per class")


# data.name -> the file rules of its data module (trainer.data.build_datamodule maps the same names to modules)
DATA_FILES: dict[str, type[DataFiles]] = {"digits": DataFiles, "cifar10": CifarFiles, "cifar100": CifarFiles,
                                          "imagefolder": ImageFolderFiles, "synthetic": DataFiles}
DATASETS = tuple(DATA_FILES)
