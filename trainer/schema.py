"""The experiment schema: the dataclasses ``trainer.config`` turns into an OmegaConf structured config.

Every key of an experiment, its type, default and help text (``normlab train --help``); the rules that
involve several keys are :func:`trainer.config.check_config`'s. A key with a fixed set of values is an
OmegaConf ``Enum`` field (:class:`Choice`), so OmegaConf itself rejects any other value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import normlayers
from normlayers.catalog import WEIGHT_STD_KINDS
from trainer.data.files import DATASETS
from trainer.model_rules import BINARY_MODES, DEFAULT_WIDTH, PLACEMENTS
from trainer.tracking import DEFAULT_TRACKING_URI


class Choice(StrEnum):
    """The allowed values of one key. Each member's name is its value and a member is a ``str``, so a config
    holds, stores, hashes (the run key) and logs exactly the text a `str` field would, and compares equal to it."""

    @classmethod
    def _missing_(cls, value: object) -> Choice | None:
        # YAML reads `precision: 32` as an int; OmegaConf looks ints up by value, and the value is the text "32"
        if isinstance(value, int) and not isinstance(value, bool):
            return cls._value2member_map_.get(str(value))
        return None


def choices(name: str, values: Iterable[str]) -> type[Choice]:
    """A :class:`Choice` of ``values``, in their order (the order an error message lists them in)."""
    return Choice(name, {value: value for value in values}, module=__name__, qualname=name)


# each from its owner where there is one (the models, the data package, normlayers); the rest are the schema's
Arch = choices("Arch", DEFAULT_WIDTH)
NormPlacement = choices("NormPlacement", PLACEMENTS)
WeightStd = choices("WeightStd", WEIGHT_STD_KINDS)
Binary = choices("Binary", BINARY_MODES)
Dataset = choices("Dataset", DATASETS)
Optimizer = choices("Optimizer", ("sgd", "adam"))
Schedule = choices("Schedule", ("cosine", "step", "constant", "linear"))
LrScaling = choices("LrScaling", ("none", "linear"))
Precondition = choices("Precondition", ("none", "bnp"))
Accelerator = choices("Accelerator", ("auto", "cpu", "gpu", "cuda"))
Strategy = choices("Strategy", ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true",
                                "ddp_find_unused_parameters_false", "fsdp", "single_device"))
Precision = choices("Precision", ("32-true", "32", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"))
ClipAlgorithm = choices("ClipAlgorithm", ("norm", "value", "agc"))
NormStats = choices("NormStats", ("running", "precise", "batch"))


def _opt(default: Any, help_: str) -> Any:
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return field(default_factory=lambda: dataclasses.replace(value) if dataclasses.is_dataclass(value)
                     else type(value)(value), metadata={"help": help_})
    return field(default=default, metadata={"help": help_})


@dataclass
class ModelConfig:
    arch: Arch = _opt(Arch.cifar_resnet, "cifar_resnet | cifar_preact_resnet | resnet | plain_cnn | mlp | reactnet")
    depth: int = _opt(20, "cifar_*: 6n+2 (20, 32, 44, 56, 110); resnet: 18, 34, 50, 101, 152; "
                          "plain_cnn: conv layers; mlp: hidden layers; reactnet: unused (always 18)")
    width: int | None = _opt(None, "base width; null = the arch's own (cifar 16, resnet 64, plain_cnn 32, mlp 256)")
    norm: Any = _opt("bn", "normalization spec for every norm site: 'bn', 'gn:groups=8' or {name: gn, groups: 8}")
    norm_placement: NormPlacement = _opt(NormPlacement.all,
                                         "all | final (only before the classifier, Bjorck et al. 2018) | none")
    norm_init_scale: float = _opt(1.0, "initial scale (gamma) of every norm layer that has one")
    norm_order: str = _opt("auto", "auto | norm_act (weight-norm-ReLU) | act_norm (weight-ReLU-norm, before the next "
                                   "weight layer, as the IC layer needs); auto: act_norm for ic, else norm_act")
    weight_std: WeightStd = _opt(WeightStd.none, "none | ws (Qiao et al. 2019) | scaled_ws (Brock et al. 2021, "
                                                 "learnable gain; on reactnet also the NF residual scaling) on every "
                                                 "conv and linear weight but the classifier's")
    binary: Binary = _opt(Binary.none, "reactnet: none | activations | weights_and_activations (its 3x3 convs; stem, "
                               "shortcuts and classifier stay real-valued)")
    teacher: str | None = _opt(None, "distil from this run (a run key under output.root, a .ckpt path, or "
                                     "'with:KEY=VALUE ...': this run's config with those overrides) with "
                                     "ReActNet's distributional loss (null: cross-entropy)")
    init_from: str | None = _opt(None, "start from the model weights of this run (run key, .ckpt path or "
                                       "'with:KEY=VALUE ...'; the two-step binary recipe's second step)")


@dataclass
class SyntheticConfig:
    samples: int = _opt(1024, "number of synthetic images (train + val)")
    image_size: int = _opt(16, "synthetic image height and width")
    channels: int = _opt(3, "synthetic image channels")
    classes: int = _opt(10, "number of synthetic classes")


@dataclass
class DataConfig:
    name: Dataset = _opt(Dataset.digits, "digits | cifar10 | cifar100 | imagefolder | synthetic")
    path: str | None = _opt(None, "cifar10/cifar100: the directory holding the python-pickle batches; "
                                  "imagefolder: the directory with train/ and val/ folders of class folders")
    batch_size: int = _opt(64, "per-device batch size: what the norm layers see")
    val_batch_size: int = _opt(256, "per-device validation batch size")
    augment: bool = _opt(True, "random crop (and flip where it makes sense) on the device")
    crop_padding: int | None = _opt(None, "crop padding in pixels; null = dataset default (digits 1, else 4)")
    hflip: bool | None = _opt(None, "random horizontal flip; null = dataset default (digits no, else yes)")
    val_split: float = _opt(0.2, "fraction of the training set held out for validation; "
                                 "0 = validate on the dataset's test split (cifar)")
    synthetic: SyntheticConfig = _opt(SyntheticConfig(), "synthetic data shape")
    image_size: int = _opt(224, "imagefolder: training crop size (val: resize to size*256/224, center crop)")
    num_workers: int = _opt(4, "imagefolder: DataLoader worker processes decoding the JPEGs")


@dataclass
class OptimConfig:
    lr: float = _opt(0.1, "SGD learning rate (at base_batch_size when lr_scaling=linear)")
    optimizer: Optimizer = _opt(Optimizer.sgd, "sgd | adam (betas 0.9, 0.999; momentum and nesterov unused)")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "Nesterov momentum")
    weight_decay: float = _opt(5e-4, "weight decay; never applied to norm parameters or biases")
    warmup_epochs: float = _opt(1.0, "linear warm-up length in epochs")
    warmup_steps: int = _opt(-1, "linear warm-up length in optimizer steps (-1: warmup_epochs decides)")
    schedule: Schedule = _opt(Schedule.cosine, "cosine | step | constant | linear (decay to 0) (after warm-up)")
    step_milestones: list[float] = _opt([0.5, 0.75], "step schedule: fractions of training where lr drops")
    step_gamma: float = _opt(0.1, "step schedule: factor at each milestone")
    lr_scaling: LrScaling = _opt(LrScaling.none,
                                 "none | linear (lr * global_batch / base_batch_size, Goyal et al. 2017)")
    base_batch_size: int = _opt(128, "global batch size the lr is given for under lr_scaling=linear")
    precondition: Precondition = _opt(Precondition.none, "none | bnp (Batch Normalization Preconditioning, Lange et "
                                                         "al. 2022: every conv and linear layer's gradients "
                                                         "conditioned as on normalised inputs)")
    bnp_momentum: float = _opt(normlayers.catalog.BNP_DEFAULT_MOMENTUM, "bnp: weight of a step's batch in the running "
                                                                "input statistics, in [0, 1]")
    bnp_eps: float = _opt(normlayers.catalog.BNP_DEFAULT_EPS, "bnp: added to the input variance, > 0")
    bnp_skip: list[str] = _opt([], "bnp: layer types left plain (linear, conv1d, conv2d, conv3d)")


@dataclass
class TrainerConfig:
    max_epochs: int = _opt(15, "epochs to train (ignored when max_steps is set)")
    max_steps: int = _opt(-1, "optimizer steps to train; when set, the budget (and the lr schedule) is in steps and "
                              "max_epochs is ignored (-1: max_epochs decides)")
    virtual_devices: int = _opt(1, "each batch-dependent norm acts as this many unsynchronised devices, each "
                                   "normalising data.batch_size / virtual_devices samples")
    accelerator: Accelerator = _opt(Accelerator.auto, "cpu | gpu | cuda | auto")
    devices: int = _opt(1, "devices per node (DDP when devices * num_nodes > 1)")
    num_nodes: int = _opt(1, "nodes")
    strategy: Strategy = _opt(Strategy.auto, "Lightning strategy: auto | ddp | ddp_spawn ...")
    precision: Precision = _opt(Precision["32-true"], "32-true | bf16-mixed | 16-mixed")
    deterministic: bool = _opt(False, "deterministic algorithms (a resumed run then equals an uninterrupted one)")
    sync_norm: bool = _opt(False, "synchronise batch statistics of every batch-dependent norm across devices")
    channels_last: bool = _opt(False, "channels-last memory format")
    compile: bool = _opt(False, "torch.compile the model")
    check_val_every_n_epoch: int = _opt(1, "validate every N epochs")
    limit_train_batches: float | int = _opt(1.0, "fraction (float) or number (int) of training batches per epoch")
    limit_val_batches: float | int = _opt(1.0, "fraction (float) or number (int) of validation batches")
    log_every_n_steps: int = _opt(10, "how often step metrics (lr) are logged")
    gradient_clip_val: float | None = _opt(None, "clip gradients to this global norm (null: no clipping); "
                                                 "lambda under gradient_clip_algorithm=agc")
    gradient_clip_algorithm: ClipAlgorithm = _opt(ClipAlgorithm.norm, "norm | value (Lightning's) | agc (adaptive, "
                                                                      "unit-wise, Brock et al. 2021; never the "
                                                                      "classifier)")


@dataclass
class TrackingConfig:
    uri: str = _opt(DEFAULT_TRACKING_URI, "MLflow tracking URI (env MLFLOW_TRACKING_URI wins while this is default)")
    experiment: str = _opt("normlab", "MLflow experiment name")
    run_name: str | None = _opt(None, "MLflow run name (null: MLflow picks one)")
    tags: dict[str, str] = _opt({}, "extra MLflow tags")
    log_checkpoints: bool = _opt(False, "log the last checkpoint as an MLflow artifact")


@dataclass
class ProbesConfig:
    every_n_steps: int = _opt(25, "log per-layer activation mean/std and gradient norm every N steps (0: off)")
    activations: bool = _opt(True, "probe activation mean/std")
    gradients: bool = _opt(True, "probe weight-gradient norms")
    divergence_factor: float = _opt(10.0, "stop as diverged when the loss exceeds this multiple of its first "
                                          "value (0: only NaN/inf)")
    fisher_every_n_steps: int = _opt(0, "largest Fisher eigenvalue and the lr it predicts (2/lambda_max, Wei et al. "
                                        "2019) at step 0 and every N steps (0: off)")
    fisher_iterations: int = _opt(20, "power iterations per Fisher eigenvalue estimate")
    fisher_batch: int = _opt(64, "probe-batch size of the Fisher probe (the first samples of the first batch)")


@dataclass
class EvalConfig:
    norm_stats: list[NormStats] = _opt([NormStats.running], "statistics the final weights are evaluated with: "
                                                            "running (the EMA; val_acc), precise (population "
                                                            "statistics, normlayers.precise_stats), batch (each "
                                                            "batch's own); each logs val_acc/<kind>, val_loss/<kind>")
    precise_batches: int = _opt(100, "training batches (at most one epoch) the precise statistics pool")


@dataclass
class OutputConfig:
    root: str = _opt("runs", "run directories go to <root>/<run_key>")


@dataclass
class ExperimentConfig:
    seed: int = _opt(0, "random seed (model init, data order, augmentation)")
    model: ModelConfig = _opt(ModelConfig(), "")
    data: DataConfig = _opt(DataConfig(), "")
    optim: OptimConfig = _opt(OptimConfig(), "")
    trainer: TrainerConfig = _opt(TrainerConfig(), "")
    tracking: TrackingConfig = _opt(TrackingConfig(), "")
    probes: ProbesConfig = _opt(ProbesConfig(), "")
    eval: EvalConfig = _opt(EvalConfig(), "")
    output: OutputConfig = _opt(OutputConfig(), "")
