"""One tracked, resumable training run: ``train(cfg) -> RunResult``.

The run directory is ``<output.root>/<run_key>``; it holds ``config.yaml`` (resolved),
``checkpoints/last.ckpt`` (written at every epoch end), ``mlflow_run_id`` and, once the run is
over, ``result.json``. Calling ``train`` again with the same config resumes from ``last.ckpt``
into the same MLflow run, or returns the recorded result when the run is already over (delete
the run directory to train it again). Under DDP only global rank 0 touches MLflow and the run
directory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from trainer import tracking
from trainer.callbacks import DivergenceGuard, EpochLines, EpochSeeding, LastValidation, LayerProbe
from trainer.checkpoint_io import AtomicCheckpointIO, previous_of, resumable
from trainer.config import ConfigError, flatten, norm_spec_text, run_key, validated
from trainer.data import build_datamodule
from trainer.epoch_metrics import EpochMetricsInCheckpoint
from trainer.module import NormClassifier, effective_lr
from trainer.step_once_logger import StepOnceMLFlowLogger
from trainer.writable import cannot_write, store_folder

CHECKPOINT = "last.ckpt"


@dataclass
class RunResult:
    run_id: str | None  # None on ranks other than 0
    run_key: str
    status: str  # "finished" | "diverged"
    metrics: dict[str, float]
    run_dir: str


def _previous_run_id(run_dir: Path, client: MlflowClient) -> str | None:
    path = run_dir / "mlflow_run_id"
    if not path.is_file():
        return None
    run_id = path.read_text().strip()
    try:
        client.get_run(run_id)
    except Exception:
        print(f"normlab train: MLflow run {run_id} of {run_dir} is gone; starting a new MLflow run", file=sys.stderr)
        return None
    return run_id


def _preflight(module: NormClassifier, batch: torch.Tensor) -> None:
    """One training-mode forward of a per-device batch on a copy, so that a norm that cannot handle
    this batch or shape fails here, as a config error, before anything is logged."""
    probe = copy.deepcopy(module.model).train()
    try:
        with torch.no_grad():
            probe(batch)
    except ValueError as e:
        raise ConfigError(f"model.norm: {str(e).splitlines()[0]}") from None


def quiet_lightning() -> None:
    """Lightning's start-up banners and tips off; warnings and errors stay."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The `srun` command is available.*")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")


def _open_tracking(trainer: pl.Trainer, cfg: DictConfig, uri: str, client: MlflowClient, run_dir: Path, tags: dict,
                   key: str, ckpt: Path | None, global_batch: int, num_classes: int) -> MLFlowLogger:
    """The run's MLflow logger; on global rank 0 also the run directory and the MLflow run (new or resumed)."""
    world = trainer.world_size
    previous = None
    if trainer.is_global_zero:
        previous = _previous_run_id(run_dir, client)
        # The first request: fails before anything is written. MLFlowLogger creates the experiment if need be.
        client.get_experiment_by_name(cfg.tracking.experiment)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # every rank gets the logger; its methods act on global rank 0 only
    logger = StepOnceMLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=uri,
                                  run_name=cfg.tracking.run_name, tags=tags, run_id=previous,
                                  log_model=cfg.tracking.log_checkpoints)
    if trainer.is_global_zero:
        run_id = logger.run_id  # creates the MLflow run (with its tags) unless resuming
        if previous is None:
            (run_dir / "mlflow_run_id").write_text(run_id + "\n")
            params = {**flatten(cfg), "derived.global_batch_size": global_batch,
                      "derived.effective_lr": effective_lr(cfg.optim, global_batch), "derived.world_size": world,
                      "derived.num_classes": num_classes}
            logger.log_hyperparams(params)
            client.log_artifact(run_id, str(run_dir / "config.yaml"))
        else:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, tracking.STATUS_TAG, tracking.RUNNING)
            start = f"from {ckpt}" if ckpt is not None else "from the start (it had no checkpoint yet)"
            print(f"normlab train: resuming run {key} {start} into MLflow run {run_id}", file=sys.stderr)

    return logger


def _restart_tracking(run_dir: Path, uri: str) -> None:
    """A run that starts again from step 0 (its checkpoints were unreadable) gets a new MLflow run, so no
    step is logged twice; the old one is ended as KILLED."""
    path = run_dir / "mlflow_run_id"
    if path.is_file():
        old = path.read_text().strip()
        with contextlib.suppress(Exception):
            MlflowClient(uri).set_terminated(old, status="KILLED")
        path.unlink()


def slurm_plugins() -> list:
    """Inside a Slurm job only submitit requeues: Lightning's SLURM environment is kept (ranks, ports)
    but its own auto-requeue, which would also catch the signal and requeue a second time, is off."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def train(cfg: DictConfig | dict, callbacks: list[Callback] | None = None) -> RunResult:
    """Train (or resume, or look up) the run ``cfg`` describes; ``callbacks`` are added to the Trainer.

    Raises :class:`~trainer.config.ConfigError` for a config that cannot run (unusable data, a norm
    that does not fit the model or batch) before creating any MLflow run or file.
    """
    cfg = validated(cfg)
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: {cfg.trainer.accelerator} but this machine has no GPU that torch "
                          "can use; set trainer.accelerator=cpu (or auto)")
    down = tracking.unreachable(tracking.resolve_uri(cfg.tracking.uri))
    if down:
        raise ConfigError(f"tracking.uri: {down}")
    store = store_folder(tracking.resolve_uri(cfg.tracking.uri))
    for name, folder in (("output.root", Path(cfg.output.root)), ("tracking.uri", store)):
        why = folder is not None and cannot_write(folder)
        if why:
            raise ConfigError(f"{name}: cannot write in {folder}: {why}; choose a directory you can write")
    key = run_key(cfg)
    run_dir = Path(cfg.output.root) / key
    result_file = run_dir / "result.json"
    if result_file.is_file():
        recorded = RunResult(**json.loads(result_file.read_text()))
        print(f"normlab train: run {key} is already {recorded.status} (MLflow run {recorded.run_id}); "
              f"delete {run_dir} to train it again", file=sys.stderr)
        return recorded

    interactive = sys.stderr.isatty()  # where Lightning draws its progress bar
    if not interactive:
        quiet_lightning()
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.load()
    try:
        module = NormClassifier(cfg, datamodule.num_classes, datamodule.in_channels, datamodule.image_size)
    except ValueError as e:
        raise ConfigError(f"model.norm: {str(e).splitlines()[0]}") from None

    guard = DivergenceGuard(cfg.probes.divergence_factor)
    last_validation = LastValidation()
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename=Path(CHECKPOINT).stem, save_top_k=1,
                                 every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    all_callbacks: list[Callback] = [checkpoint, guard, last_validation, EpochSeeding(cfg.seed),
                                     LayerProbe(cfg.probes.every_n_steps, cfg.probes.activations,
                                                cfg.probes.gradients)]
    all_callbacks.append(EpochMetricsInCheckpoint())
    if not interactive:
        all_callbacks.append(EpochLines())
    all_callbacks += callbacks or []
    plugins = [*slurm_plugins(), AtomicCheckpointIO()]
    if cfg.trainer.sync_norm:
        from trainer.norm_sync import NormSyncPlugin

        plugins.append(NormSyncPlugin())

    t = cfg.trainer
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, deterministic=t.deterministic, max_epochs=t.max_epochs, max_steps=t.max_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch, limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, num_sanity_val_steps=0, logger=False, callbacks=all_callbacks,
        plugins=plugins or None, enable_progress_bar=interactive, enable_model_summary=interactive,
        default_root_dir=str(run_dir),
    )
    world = trainer.world_size
    datamodule.check_batch_size(world)
    first = next(iter(datamodule.train_batches(lambda: 0, rank=0, world_size=world)))[0]
    _preflight(module, first)
    if t.compile:
        module.model.compile()

    global_batch = cfg.data.batch_size * world
    ckpt = run_dir / "checkpoints" / CHECKPOINT
    had_checkpoint = ckpt.is_file() or previous_of(ckpt).is_file()
    resume_from = resumable(ckpt)
    if had_checkpoint and resume_from is None and trainer.is_global_zero:
        _restart_tracking(run_dir, tracking.resolve_uri(cfg.tracking.uri))
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.prepare_store(uri)
    client = MlflowClient(uri)  # opening it creates a sqlite store: only once the config is known to run
    spec = norm_spec_text(cfg.model.norm)
    tags = {**cfg.tracking.tags, tracking.RUN_KEY_TAG: key, tracking.NORM_TAG: spec,
            tracking.NORM_NAME_TAG: spec.partition(":")[0], tracking.BATCH_SIZE_TAG: str(cfg.data.batch_size),
            "global_batch_size": str(global_batch), "world_size": str(world), tracking.STATUS_TAG: tracking.RUNNING}
    try:
        logger = _open_tracking(trainer, cfg, uri, client, run_dir, tags, key, resume_from, global_batch,
                                datamodule.num_classes)
    except MlflowException as e:
        raise ConfigError(f"tracking.uri: MLflow at {uri} failed: {str(e).splitlines()[0][:300]}") from None
    trainer.logger = logger

    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)

    status = tracking.DIVERGED if guard.diverged else tracking.FINISHED
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if not guard.diverged and t.limit_val_batches != 0 and last_validation.step != trainer.global_step:
        # training stopped away from a validation (max_steps inside an epoch): the final weights still get one
        (final,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in final.items()})
    metrics["diverged"] = float(guard.diverged)
    if guard.diverged:
        metrics["diverged_step"] = float(guard.diverged_step)
    result = RunResult(run_id=None, run_key=key, status=status, metrics=metrics, run_dir=str(run_dir))
    if trainer.is_global_zero:
        result.run_id = logger.run_id
        client.set_tag(result.run_id, tracking.STATUS_TAG, status)
        result_file.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def describe(result: RunResult) -> str:
    """One line for the terminal."""
    shown = "  ".join(f"{k} {result.metrics[k]:.4f}" for k in ("val_loss", "val_acc") if k in result.metrics)
    return f"run {result.run_key} {result.status}  {shown}  MLflow run {result.run_id}  dir {result.run_dir}"



