"""Data modules (one LightningDataModule per dataset) and the file rules config validation runs.

``build_datamodule(cfg)`` picks the module for ``cfg.data.name``. The in-memory modules (digits, CIFAR,
synthetic) are in :mod:`trainer.data.memory`, the image folder in :mod:`trainer.data.imagefolder`, what
each needs on disk in :mod:`trainer.data.files` (light: ``trainer.config`` imports it). Names load on
first use (PEP 562), so importing the file rules does not import Lightning.
"""

from __future__ import annotations

from trainer.lazy_exports import lazy_exports

_EXPORTS = {
    "build_datamodule": "trainer.data.memory",
    "derive_seed": "trainer.data.memory",
    "DeviceBatches": "trainer.data.memory",
    "Split": "trainer.data.memory",
    "random_crop_flip": "trainer.data.memory",
    "InMemoryDataModule": "trainer.data.memory",
    "DigitsDataModule": "trainer.data.memory",
    "CifarDataModule": "trainer.data.memory",
    "SyntheticDataModule": "trainer.data.memory",
    "ImageFolderDataModule": "trainer.data.imagefolder",
    "DATA_FILES": "trainer.data.files",
    "DATASETS": "trainer.data.files",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
