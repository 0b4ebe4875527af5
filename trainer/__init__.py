"""trainer: one training run of a model with a pluggable normalization layer.

``load_config(experiment_yaml, overrides)`` builds a checked experiment config, ``train(cfg)`` runs
it (tracked in MLflow, resumable), ``run_key(cfg)`` names it, and ``NormClassifier`` is the
LightningModule, usable on its own. ``normlab train`` is :func:`trainer.cli.main`.
"""

from trainer.config import ConfigError, load_config, run_key
from trainer.module import NormClassifier
from trainer.run import RunResult, train

__all__ = ["ConfigError", "NormClassifier", "RunResult", "load_config", "run_key", "train"]
