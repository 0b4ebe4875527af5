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
from typing import Any

import pytorch_lightning as pl
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

import normlayers
from trainer import tracking
from trainer.callbacks import DivergenceGuard, EpochLines, EpochSeeding, LastValidation, LayerProbe, ValidationHistory
from trainer.checkpoint_io import AtomicCheckpointIO, previous_of, resumable
from trainer.config import ConfigError, checked, flatten, run_key
from trainer.data import build_datamodule
from trainer.dataset_input import log_dataset_input
from trainer.distributed import NodeNames
from trainer.epoch_metrics import EpochMetricsInCheckpoint
from trainer.module import NormClassifier, effective_lr
from trainer.norm_eval import evaluate_norm_stats
from trainer.outcome import classify
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
    outcome: dict | None = None  # trainer.outcome.Outcome as a dict: kind, step, tripped


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
    """Lightning's start-up banners and tips off; warnings and errors stay, but for four that are expected here.

    Banners go by logger level (Lightning logs them at INFO); the model summary and progress bar are Trainer
    flags (``_build_trainer``). Of the four warnings, torch's deprecation is told apart by its category and
    the Lightning module that triggers it. The other three have no switch, no logger and no category of their
    own (``PossibleUserWarning`` also carries warnings worth seeing, such as a checkpoint from a newer
    Lightning): they are matched by their text within their category, as Lightning's own docs
    (advanced/warnings.rst) filter them.
    """
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from pytorch_lightning.utilities.warnings import PossibleUserWarning

    # torch's `LeafSpec` deprecation, raised inside Lightning's pytree helper on every step's batch
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"pytorch_lightning\.utilities\._pytree")
    # a resumed run's checkpoint directory holds its own last.ckpt (a plain UserWarning of ModelCheckpoint)
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*", category=UserWarning)
    # data.num_workers is the user's choice (imagefolder); the in-memory data needs no workers
    warnings.filterwarnings("ignore", message=".*does not have many workers.*", category=PossibleUserWarning)
    # submitit starts the job's tasks itself, so Lightning's hint to prepend `srun` does not apply
    warnings.filterwarnings("ignore", message=".*The `srun` command is available.*", category=PossibleUserWarning)


@dataclass
class _Prepared:
    """What the steps of one run share: its config, identity, data, module and own callbacks."""

    cfg: DictConfig
    key: str
    run_dir: Path
    datamodule: Any
    module: NormClassifier
    guard: DivergenceGuard
    last_validation: LastValidation
    history: ValidationHistory
    resume_from: Path | None = None  # the readable checkpoint fit resumes from (trainer.checkpoint_io.resumable)

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / CHECKPOINT

    @property
    def result_file(self) -> Path:
        return self.run_dir / "result.json"


def _recorded(cfg: DictConfig) -> RunResult | None:
    """The result of a run that is already over, or None."""
    key = run_key(cfg)
    run_dir = Path(cfg.output.root) / key
    result_file = run_dir / "result.json"
    if not result_file.is_file():
        return None
    recorded = RunResult(**json.loads(result_file.read_text()))
    print(f"normlab train: run {key} is already {recorded.status} (MLflow run {recorded.run_id}); "
          f"delete {run_dir} to train it again", file=sys.stderr)
    return recorded


def _prepare(cfg: DictConfig) -> _Prepared:
    """Seed, data and module; a norm that does not fit the model is a config error."""
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.load()
    try:
        module = NormClassifier.from_config(cfg, datamodule.num_classes, datamodule.in_channels,
                                            datamodule.image_size)
    except ValueError as e:
        raise ConfigError(f"model.norm: {str(e).splitlines()[0]}") from None
    key = run_key(cfg)
    return _Prepared(cfg, key, Path(cfg.output.root) / key, datamodule, module,
                     DivergenceGuard(cfg.probes.divergence_factor), LastValidation(), ValidationHistory())


def _build_trainer(run: _Prepared, callbacks: list[Callback], interactive: bool) -> pl.Trainer:
    """The Lightning Trainer of the run: its checkpoint (``last.ckpt`` at every epoch end), callbacks and plugins."""
    cfg, t = run.cfg, run.cfg.trainer
    # One file, last.ckpt, rewritten at every epoch end; fit's ckpt_path="last" finds it. (save_last=True would
    # write every checkpoint twice here: this Lightning saves "last" only beside a top-k checkpoint.)
    checkpoint = ModelCheckpoint(dirpath=run.checkpoint.parent, filename=run.checkpoint.stem, save_top_k=1,
                                 every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    all_callbacks: list[Callback] = [checkpoint, run.guard, run.last_validation, run.history,
                                     EpochSeeding(cfg.seed),
                                     LayerProbe(cfg.probes.every_n_steps, cfg.probes.activations,
                                                cfg.probes.gradients)]
    if not interactive:
        all_callbacks.append(EpochLines())
    all_callbacks += [NodeNames(), EpochMetricsInCheckpoint()]
    all_callbacks += callbacks
    plugins = [*slurm_plugins(), AtomicCheckpointIO()]
    if t.sync_norm:
        from trainer.norm_sync import NormSyncPlugin

        plugins.append(NormSyncPlugin())
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, deterministic=t.deterministic, max_steps=t.max_steps,
        max_epochs=-1 if t.max_steps > 0 else t.max_epochs,  # a step budget is the whole budget
        check_val_every_n_epoch=t.check_val_every_n_epoch, limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, num_sanity_val_steps=0, logger=False, callbacks=all_callbacks,
        # agc is the module's own (configure_gradient_clipping); Lightning knows norm and value only
        gradient_clip_algorithm=None if t.gradient_clip_algorithm == "agc" else t.gradient_clip_algorithm,
        plugins=plugins or None, enable_progress_bar=interactive, enable_model_summary=interactive,
        default_root_dir=str(run.run_dir),
    )


def _check_fits(run: _Prepared, trainer: pl.Trainer) -> None:
    """The batch size against the world size, and one forward of a real batch (see :func:`_preflight`)."""
    world = trainer.world_size
    run.datamodule.check_batch_size(world)
    first = next(iter(run.datamodule.train_batches(lambda: 0, rank=0, world_size=world)))[0]
    _preflight(run.module, first)
    if run.cfg.trainer.compile:
        run.module.model.compile()


def _open_tracking(run: _Prepared, trainer: pl.Trainer) -> tuple[MLFlowLogger, MlflowClient]:
    """The run's MLflow logger; on global rank 0 also the run directory and the MLflow run (new or resumed)."""
    cfg, run_dir = run.cfg, run.run_dir
    uri = tracking.resolve_uri(cfg.tracking.uri)
    world = trainer.world_size
    global_batch = cfg.data.batch_size * world
    spec = normlayers.NormSpec.parse(cfg.model.norm)  # the config holds its canonical text
    tags = {**cfg.tracking.tags, tracking.RUN_KEY_TAG: run.key, tracking.NORM_TAG: str(spec),
            tracking.NORM_NAME_TAG: spec.name, tracking.BATCH_SIZE_TAG: str(cfg.data.batch_size),
            "global_batch_size": str(global_batch), "world_size": str(world),
            # what one (virtual) device normalises
            tracking.STATS_BATCH_SIZE_TAG: str(cfg.data.batch_size // cfg.trainer.virtual_devices),
            tracking.STATUS_TAG: tracking.RUNNING}
    try:
        tracking.prepare_store(uri)
        client = MlflowClient(uri)  # opening it creates a sqlite store: only once the config is known to run
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
            tracking.mark_training_experiment(client, client.get_experiment(logger.experiment_id))
            if previous is None:
                (run_dir / "mlflow_run_id").write_text(run_id + "\n")
                params = {**flatten(cfg), "derived.global_batch_size": global_batch,
                          "derived.effective_lr": effective_lr(cfg.optim, global_batch), "derived.world_size": world,
                          "derived.num_classes": run.datamodule.num_classes}
                logger.log_hyperparams(params)
                client.log_artifact(run_id, str(run_dir / "config.yaml"))
                log_dataset_input(client, run_id, cfg.data, run.datamodule)  # the runs table's Dataset column
            else:
                client.update_run(run_id, status="RUNNING")
                client.set_tag(run_id, tracking.STATUS_TAG, tracking.RUNNING)
                start = f"from {run.resume_from}" if run.resume_from else "from the start (it had no checkpoint yet)"
                print(f"normlab train: resuming run {run.key} {start} into MLflow run {run_id}", file=sys.stderr)
    except MlflowException as e:
        raise ConfigError(f"tracking.uri: MLflow at {uri} failed: {str(e).splitlines()[0][:300]}") from None
    return logger, client


def _find_resume(run: _Prepared, trainer: pl.Trainer) -> None:
    """The checkpoint to resume from: ``last.ckpt``, or the previous good one when it is damaged; a run whose
    checkpoints are all unreadable starts again, in a new MLflow run."""
    had_checkpoint = run.checkpoint.is_file() or previous_of(run.checkpoint).is_file()
    run.resume_from = resumable(run.checkpoint)
    if had_checkpoint and run.resume_from is None and trainer.is_global_zero:
        _restart_tracking(run.run_dir, tracking.resolve_uri(run.cfg.tracking.uri))


def _restart_tracking(run_dir: Path, uri: str) -> None:
    """A run that starts again from step 0 (its checkpoints were unreadable) gets a new MLflow run, so no
    step is logged twice; the old one is ended as KILLED."""
    path = run_dir / "mlflow_run_id"
    if path.is_file():
        old = path.read_text().strip()
        with contextlib.suppress(Exception):
            MlflowClient(uri).set_terminated(old, status="KILLED")
        path.unlink()


def _fit(run: _Prepared, trainer: pl.Trainer) -> None:
    """Lightning's fit, resumed from the run's readable checkpoint when it has one."""
    trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=str(run.resume_from) if run.resume_from else None)


def _check_can_run(cfg: DictConfig) -> None:
    """What the machine must allow before anything is created: the accelerator, the tracking server,
    writable output and store directories."""
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: {cfg.trainer.accelerator} but this machine has no GPU that torch "
                          "can use; set trainer.accelerator=cpu (or auto)")
    uri = tracking.resolve_uri(cfg.tracking.uri)
    down = tracking.unreachable(uri)
    if down:
        raise ConfigError(f"tracking.uri: {down}")
    store = store_folder(uri)
    for name, folder in (("output.root", Path(cfg.output.root)), ("tracking.uri", store)):
        why = folder is not None and cannot_write(folder)
        if why:
            raise ConfigError(f"{name}: cannot write in {folder}: {why}; choose a directory you can write")


def _finish(run: _Prepared, trainer: pl.Trainer, logger: MLFlowLogger, client: MlflowClient) -> RunResult:
    """Final metrics (one more validation if training stopped away from one), the status tag, ``result.json``."""
    guard = run.guard
    status = tracking.DIVERGED if guard.diverged else tracking.FINISHED
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    validated_last = run.last_validation.step == trainer.global_step
    if not guard.diverged and run.cfg.trainer.limit_val_batches != 0 and not validated_last:
        # training stopped away from a validation (max_steps inside an epoch): the final weights still get one
        (final,) = trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in final.items()})
    if not guard.diverged and run.cfg.trainer.limit_val_batches != 0 and list(run.cfg.eval.norm_stats) != ["running"]:
        by_stats = evaluate_norm_stats(trainer, run.module, run.datamodule, run.cfg)
        logger.log_metrics(by_stats, step=trainer.global_step)
        metrics.update(by_stats)
    metrics["diverged"] = float(guard.diverged)
    if guard.diverged:
        metrics["diverged_step"] = float(guard.diverged_step)
    outcome = classify(guard.diverged_step, guard.tripped, run.history.accuracies, run.datamodule.num_classes)
    result = RunResult(run_id=None, run_key=run.key, status=status, metrics=metrics, run_dir=str(run.run_dir),
                       outcome=asdict(outcome))
    if trainer.is_global_zero:
        result.run_id = logger.run_id
        client.set_tag(result.run_id, tracking.STATUS_TAG, status)
        client.set_tag(result.run_id, tracking.OUTCOME_TAG, outcome.kind)
        run.result_file.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


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
    cfg = checked(cfg)  # a config load_config (or validated) returned, unchanged since, is not checked again
    _check_can_run(cfg)
    recorded = _recorded(cfg)
    if recorded is not None:
        return recorded
    interactive = sys.stderr.isatty()  # where Lightning draws its progress bar
    if not interactive:
        quiet_lightning()
    run = _prepare(cfg)
    trainer = _build_trainer(run, callbacks or [], interactive)
    _check_fits(run, trainer)
    _find_resume(run, trainer)
    logger, client = _open_tracking(run, trainer)
    trainer.logger = logger
    _fit(run, trainer)
    return _finish(run, trainer, logger, client)


def describe(result: RunResult) -> str:
    """One line for the terminal."""
    shown = "  ".join(f"{k} {result.metrics[k]:.4f}" for k in ("val_loss", "val_acc") if k in result.metrics)
    return f"run {result.run_key} {result.status}  {shown}  MLflow run {result.run_id}  dir {result.run_dir}"



