"""The experiment schema: dataclasses turned into an OmegaConf structured config.

``load_config(experiment_yaml, overrides)`` merges the schema defaults (the embedded default
experiment: ResNet-20 with ``bn`` on scikit-learn's digits), an optional experiment YAML and
OmegaConf dot-list overrides (``model.norm=gn:groups=8``), then checks every value. Any mistake
raises :class:`ConfigError`, whose text is one line naming the key and the problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import normlayers
from normlayers.weight_std import KINDS as WEIGHT_STD_KINDS
from trainer.checkpoints import check_checkpoint
from trainer.models import DEFAULT_WIDTH, depth_problem
from trainer.models.norms import PLACEMENTS, resolve_order
from trainer.models.reactnet import BINARY_MODES
from trainer.tracking import DEFAULT_TRACKING_URI


class ConfigError(ValueError):
    """A configuration (or data path) mistake; ``str()`` is one line naming the key and the problem."""


def _opt(default: Any, help_: str) -> Any:
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return field(default_factory=lambda: dataclasses.replace(value) if dataclasses.is_dataclass(value)
                     else type(value)(value), metadata={"help": help_})
    return field(default=default, metadata={"help": help_})


@dataclass
class ModelConfig:
    arch: str = _opt("cifar_resnet", "cifar_resnet | cifar_preact_resnet | resnet | plain_cnn | mlp | reactnet")
    depth: int = _opt(20, "cifar_*: 6n+2 (20, 32, 44, 56, 110); resnet: 18, 34, 50, 101, 152; "
                          "plain_cnn: conv layers; mlp: hidden layers; reactnet: unused (always 18)")
    width: int | None = _opt(None, "base width; null = the arch's own (cifar 16, resnet 64, plain_cnn 32, mlp 256)")
    norm: Any = _opt("bn", "normalization spec for every norm site: 'bn', 'gn:groups=8' or {name: gn, groups: 8}")
    norm_placement: str = _opt("all", "all | final (only before the classifier, Bjorck et al. 2018) | none")
    norm_init_scale: float = _opt(1.0, "initial scale (gamma) of every norm layer that has one")
    norm_order: str = _opt("auto", "auto | norm_act (weight-norm-ReLU) | act_norm (weight-ReLU-norm, before the next "
                                   "weight layer, as the IC layer needs); auto: act_norm for ic, else norm_act")
    weight_std: str = _opt("none", "none | ws (Qiao et al. 2019) | scaled_ws (Brock et al. 2021, learnable gain; "
                                   "on reactnet also the NF residual scaling) on every conv and linear weight but "
                                   "the classifier's")
    binary: str = _opt("none", "reactnet: none | activations | weights_and_activations (its 3x3 convs; stem, "
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
    name: str = _opt("digits", "digits | cifar10 | cifar100 | imagefolder | synthetic")
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
    optimizer: str = _opt("sgd", "sgd | adam (betas 0.9, 0.999; momentum and nesterov unused)")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "Nesterov momentum")
    weight_decay: float = _opt(5e-4, "weight decay; never applied to norm parameters or biases")
    warmup_epochs: float = _opt(1.0, "linear warm-up length in epochs")
    warmup_steps: int = _opt(-1, "linear warm-up length in optimizer steps (-1: warmup_epochs decides)")
    schedule: str = _opt("cosine", "cosine | step | constant | linear (decay to 0) (after warm-up)")
    step_milestones: list[float] = _opt([0.5, 0.75], "step schedule: fractions of training where lr drops")
    step_gamma: float = _opt(0.1, "step schedule: factor at each milestone")
    lr_scaling: str = _opt("none", "none | linear (lr * global_batch / base_batch_size, Goyal et al. 2017)")
    base_batch_size: int = _opt(128, "global batch size the lr is given for under lr_scaling=linear")
    precondition: str = _opt("none", "none | bnp (Batch Normalization Preconditioning, Lange et al. 2022: every conv "
                                     "and linear layer's gradients conditioned as on normalised inputs)")
    bnp_momentum: float = _opt(normlayers.bnp.DEFAULT_MOMENTUM, "bnp: weight of a step's batch in the running "
                                                                "input statistics, in [0, 1]")
    bnp_eps: float = _opt(normlayers.bnp.DEFAULT_EPS, "bnp: added to the input variance, > 0")
    bnp_skip: list[str] = _opt([], "bnp: layer types left plain (linear, conv1d, conv2d, conv3d)")


@dataclass
class TrainerConfig:
    max_epochs: int = _opt(15, "epochs to train (ignored when max_steps is set)")
    max_steps: int = _opt(-1, "optimizer steps to train; when set, the budget (and the lr schedule) is in steps and "
                              "max_epochs is ignored (-1: max_epochs decides)")
    virtual_devices: int = _opt(1, "each batch-dependent norm acts as this many unsynchronised devices, each "
                                   "normalising data.batch_size / virtual_devices samples")
    accelerator: str = _opt("auto", "cpu | gpu | cuda | auto")
    devices: int = _opt(1, "devices per node (DDP when devices * num_nodes > 1)")
    num_nodes: int = _opt(1, "nodes")
    strategy: str = _opt("auto", "Lightning strategy: auto | ddp | ddp_spawn ...")
    precision: str = _opt("32-true", "32-true | bf16-mixed | 16-mixed")
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
    gradient_clip_algorithm: str = _opt("norm", "norm | value (Lightning's) | agc (adaptive, unit-wise, Brock et al. "
                                                "2021; never the classifier)")


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
    norm_stats: list[str] = _opt(["running"], "statistics the final weights are evaluated with: running (the EMA; "
                                              "val_acc), precise (population statistics, normlayers.precise_stats), "
                                              "batch (each batch's own); each logs val_acc/<kind>, val_loss/<kind>")
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


NORM_STATS = ("running", "precise", "batch")
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train", "test"]),
}
CHOICES = {
    "model.arch": tuple(DEFAULT_WIDTH),
    "model.norm_placement": PLACEMENTS,
    "data.name": DATASETS,
    "optim.schedule": ("cosine", "step", "constant", "linear"),
    "optim.optimizer": ("sgd", "adam"),
    "model.weight_std": WEIGHT_STD_KINDS,
    "model.binary": BINARY_MODES,
    "trainer.gradient_clip_algorithm": ("norm", "value", "agc"),
    "optim.lr_scaling": ("none", "linear"),
    "optim.precondition": ("none", "bnp"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),
    "trainer.strategy": ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true",
                         "ddp_find_unused_parameters_false", "fsdp", "single_device"),
    "trainer.precision": ("32-true", "32", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"),
}


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "config"
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0].strip()
    if msg.startswith("Key ") and " not in " in msg:
        parent = key.rpartition(".")[0]
        node = OmegaConf.structured(ExperimentConfig)
        valid = OmegaConf.select(node, parent) if parent else node
        names = ", ".join(valid.keys()) if isinstance(valid, DictConfig) else ""
        return f"{key}: unknown key" + (f"; valid keys{' under ' + parent if parent else ''}: {names}" if names else "")
    msg = msg.replace("could not be converted to Integer", "is not an int").replace(
        "could not be converted to Float", "is not a float").replace(
        "is not a valid bool", "is not a bool (true/false)")
    return f"{key}: {msg}"


def cifar_dir(name: str, path: str) -> Path:
    """The directory holding the batches: ``path`` itself or its standard subdirectory."""
    sub, _ = CIFAR_FILES[name]
    p = Path(path).expanduser()
    return p / sub if (p / sub).is_dir() else p


def check_imagefolder(d: DictConfig) -> None:
    """The cheap part of checking an image folder (no listing of its files: a sweep checks every run)."""
    if d.image_size < 8 or d.num_workers < 0:
        raise ConfigError(f"data.image_size must be >= 8 and data.num_workers >= 0, got {d.image_size}, "
                          f"{d.num_workers}")
    if not d.path:
        raise ConfigError("data.path: imagefolder needs the directory holding train/ and val/, each with one "
                          "folder of images per class (the ImageNet layout); set data.path=...")
    root = Path(d.path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.path: {d.path} does not exist (expected train/ and val/ folders of class folders)")
    missing = [sub for sub in ("train", "val") if not (root / sub).is_dir()]
    if missing:
        raise ConfigError(f"data.path: {d.path} has no {' or '.join(s + '/' for s in missing)}; expected train/ and "
                          f"val/, each with one folder of images per class")


def width_of(model: DictConfig) -> int:
    return model.width if model.width is not None else DEFAULT_WIDTH[model.arch]


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is OmegaConf's ``???``: on the plain container, because
    ``OmegaConf.missing_keys`` walks typed nodes and costs most of a sweep's per-run validation."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _missing_keys(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in _missing_keys(value, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


def check_config(cfg: DictConfig) -> None:
    """The cross-key rules of a merged config; raises :class:`ConfigError` (one line) on the first broken one."""
    try:  # an interpolation of an unset variable or of itself fails here, not inside the run
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{_one_line(e)}; fix or remove the ${{...}} interpolation") from None
    missing = sorted(_missing_keys(plain))
    if missing:
        raise ConfigError(f"{missing[0]}: required but not set; add {missing[0]}=... to the command line")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    problem = depth_problem(m.arch, m.depth)
    if problem:
        raise ConfigError(f"model.depth: {m.arch} {problem}")
    if m.width is not None and m.width < 1:
        raise ConfigError(f"model.width: must be positive, got {m.width}")
    try:
        spec = normlayers.NormSpec.parse(OmegaConf.to_container(m.norm) if isinstance(m.norm, DictConfig) else m.norm)
        spec.check(width_of(m))
    except ValueError as e:
        raise ConfigError(f"model.norm: {e}") from None
    try:
        resolve_order(spec, m.norm_order)
    except ValueError as e:
        raise ConfigError(f"model.norm_order: {e}") from None
    m.norm = str(spec)  # stored (and hashed into the run key, and logged) as its canonical text
    positive = {"data.batch_size": d.batch_size, "data.val_batch_size": d.val_batch_size,
                "optim.base_batch_size": o.base_batch_size, "trainer.devices": t.devices,
                "trainer.num_nodes": t.num_nodes, "trainer.check_val_every_n_epoch": t.check_val_every_n_epoch}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be a positive int, got {value}")
    if not 0.0 <= d.val_split < 1.0:
        raise ConfigError(f"data.val_split: must be in [0, 1), got {d.val_split}")
    if d.crop_padding is not None and d.crop_padding < 0:
        raise ConfigError(f"data.crop_padding: must be >= 0, got {d.crop_padding}")
    if d.name == "digits" and d.val_split == 0:
        raise ConfigError("data.val_split: digits has no separate test split; use a fraction in (0, 1)")
    if d.name == "synthetic" and d.val_split == 0:
        raise ConfigError("data.val_split: synthetic data has no separate test split; use a fraction in (0, 1)")
    if d.name == "imagefolder":
        check_imagefolder(d)
    if d.name in CIFAR_FILES:
        sub, files = CIFAR_FILES[d.name]
        if not d.path:
            raise ConfigError(f"data.path: {d.name} needs the directory of its python-pickle batches ({sub}); "
                              f"download the python version from https://www.cs.toronto.edu/~kriz/cifar.html")
        if not Path(d.path).expanduser().is_dir():
            raise ConfigError(f"data.path: {d.path} does not exist (expected the {d.name} python batches, {sub}/)")
        where = cifar_dir(d.name, d.path)
        missing = [f for f in files if not (where / f).is_file()]
        if missing:
            raise ConfigError(f"data.path: {where} has no {', '.join(missing)}; expected the {d.name} python "
                              f"version ({sub}/ with {', '.join(files)})")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {o.lr}")
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"optim.momentum: must be in [0, 1), got {o.momentum}")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov: Nesterov needs optim.momentum > 0")
    if o.weight_decay < 0 or o.warmup_epochs < 0:
        raise ConfigError("optim.weight_decay and optim.warmup_epochs must be >= 0")
    if any(not 0.0 < f < 1.0 for f in o.step_milestones):
        raise ConfigError(f"optim.step_milestones: fractions of training in (0, 1), got {list(o.step_milestones)}")
    if t.virtual_devices < 1 or d.batch_size % t.virtual_devices:
        raise ConfigError(f"trainer.virtual_devices: must be a positive int dividing data.batch_size={d.batch_size}, "
                          f"got {t.virtual_devices}")
    if t.virtual_devices > 1 and t.sync_norm:
        raise ConfigError("trainer.virtual_devices: virtual devices and trainer.sync_norm do not combine; set one")
    kinds = list(cfg.eval.norm_stats)
    if not kinds or any(k not in NORM_STATS for k in kinds) or len(set(kinds)) < len(kinds):
        raise ConfigError(f"eval.norm_stats: a list of distinct {', '.join(NORM_STATS)}, got {kinds}")
    if cfg.eval.precise_batches < 1:
        raise ConfigError(f"eval.precise_batches: must be >= 1, got {cfg.eval.precise_batches}")
    if o.precondition == "bnp":
        try:
            normlayers.bnp.check_options(o.bnp_momentum, o.bnp_eps, list(o.bnp_skip))
        except ValueError as e:
            msg = str(e).removeprefix("bnp: ")
            raise ConfigError(f"optim.bnp_{msg.split()[0]}: {msg}") from None
        if o.bnp_momentum == 1 and d.batch_size == 1:
            raise ConfigError("optim.bnp_momentum: 1 takes each batch's statistics alone, and data.batch_size=1 "
                              "gives one value per input feature of the linear layers; use a momentum < 1")
    if t.max_epochs < 1 and t.max_steps < 1:
        raise ConfigError("trainer.max_epochs: give max_epochs >= 1 or max_steps >= 1")
    check_binary_recipe(cfg)
    if cfg.probes.every_n_steps < 0 or cfg.probes.divergence_factor < 0:
        raise ConfigError("probes.every_n_steps and probes.divergence_factor must be >= 0")
    if cfg.probes.fisher_every_n_steps < 0 or cfg.probes.fisher_iterations < 1 or cfg.probes.fisher_batch < 1:
        raise ConfigError("probes.fisher_every_n_steps must be >= 0, probes.fisher_iterations and "
                          "probes.fisher_batch >= 1")


def check_binary_recipe(cfg: DictConfig) -> None:
    """Binary nets, adaptive clipping and the checkpoints a run starts from or distils from."""
    m, t = cfg.model, cfg.trainer
    if m.binary != "none" and m.arch != "reactnet":
        raise ConfigError(f"model.binary: only model.arch=reactnet has binary layers, got arch {m.arch}")
    if t.gradient_clip_algorithm == "agc" and not (t.gradient_clip_val or 0) > 0:
        raise ConfigError("trainer.gradient_clip_val: agc needs lambda > 0 (e.g. 0.04), got "
                          f"{t.gradient_clip_val}")
    for key in ("teacher", "init_from"):
        try:
            spec = m[key]
            if spec is not None:
                check_checkpoint(spec, cfg, key)
        except OmegaConfBaseException as e:
            raise ConfigError(_one_line(e)) from None
        except ValueError as e:
            raise ConfigError(f"model.{key}: {e}") from None


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{_one_line(e)} (in {where})") from None


def validated(cfg: Any) -> DictConfig:
    """A full, checked config from a DictConfig or plain mapping (e.g. from a checkpoint or a sweep)."""
    merged = _merge(OmegaConf.structured(ExperimentConfig), cfg, "config")
    check_config(merged)
    return merged


def load_config(experiment_yaml: str | None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults, then the experiment YAML (if any), then ``key=value`` overrides; checked.

    Raises :class:`ConfigError` (one line: key and problem) on an unknown key, a wrong type, a
    bad norm spec, an invalid choice or a missing data path.
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    if experiment_yaml is not None:
        path = Path(experiment_yaml)
        if not path.is_file():
            raise ConfigError(f"{experiment_yaml}: experiment file not found")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml's own errors span lines; keep the first
            raise ConfigError(f"{experiment_yaml}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{experiment_yaml}: must be a mapping of config keys")
        cfg = _merge(cfg, loaded, experiment_yaml)
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{item}: overrides are key=value, e.g. model.norm=gn:groups=8")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}: {_one_line(e)}") from None
        cfg = _merge(cfg, dot, "overrides")
    check_config(cfg)
    return cfg


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def run_key(cfg: DictConfig) -> str:
    """12-hex stable hash of the resolved config without its ``tracking`` and ``output`` sections."""
    body = {k: v for k, v in resolved(cfg).items() if k not in ("tracking", "output")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"model.norm": ..., "data.batch_size": ...}`` (MLflow params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and not (prefix == "model.norm"):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = norm_spec_text(node) if prefix == "model.norm" else node

    walk("", resolved(cfg))
    return out


def norm_spec_text(spec: Any) -> str:
    """A spec as its canonical text (:class:`normlayers.NormSpec`): ``name:key=value,...``."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec)
    return str(normlayers.NormSpec.parse(spec))


def help_text() -> str:
    """Every key with its default and meaning (``normlab train --help``)."""
    lines: list[str] = []

    def walk(prefix: str, cls: type) -> None:
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                walk(f"{key}.", type(default))
                continue
            text = json.dumps(default) if not isinstance(default, str) else default
            lines.append(f"  {key + '=' + text:42s} {f.metadata.get('help', '')}")

    walk("", ExperimentConfig)
    return "\n".join(lines)
