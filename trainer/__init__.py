"""trainer: one training run of a model with a pluggable normalization layer.

``load_config(experiment_yaml, overrides)`` builds a checked experiment config, ``train(cfg)`` runs
it (tracked in MLflow, resumable), ``run_key(cfg)`` names it, and ``NormClassifier`` is the
LightningModule, usable on its own. ``normlab train`` is :func:`trainer.cli.main`.

Names load on first use (PEP 562), so ``import trainer.config`` alone (sweep planning, status)
does not pay for importing Lightning.
"""

from __future__ import annotations

from trainer.lazy_exports import lazy_exports

_EXPORTS = {
    "ConfigError": "trainer.config",
    "load_config": "trainer.config",
    "run_key": "trainer.config",
    "NormClassifier": "trainer.module",
    "RunResult": "trainer.run",
    "train": "trainer.run",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
