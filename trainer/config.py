"""The experiment config: the schema (:mod:`trainer.schema`) as an OmegaConf structured config, and its rules.

``load_config(experiment_yaml, overrides)`` merges the schema defaults (the embedded default
experiment: ResNet-20 with ``bn`` on scikit-learn's digits), an optional experiment YAML and
OmegaConf dot-list overrides (``model.norm=gn:groups=8``), then checks every value. Any mistake
raises :class:`ConfigError`, whose text is one line naming the key and the problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

import normlayers
from normlayers.catalog import bnp_options
from trainer.data.files import DATA_FILES
from trainer.errors import ConfigError
from trainer.model_rules import DEFAULT_WIDTH, depth_problem, resolve_order
from trainer.schema import (  # noqa: F401  (the schema's classes are part of this module's API)
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    NormStats,
    OptimConfig,
    OutputConfig,
    ProbesConfig,
    SyntheticConfig,
    TrackingConfig,
    TrainerConfig,
)


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "config"
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0].strip()
    allowed = _enum_values(exc)
    if allowed is not None:  # an Enum field (trainer.schema.Choice): worded as the project words a bad choice
        return f"{key}: {getattr(exc, 'value', None)!r} is not one of {', '.join(allowed)}"
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


def _enum_values(exc: OmegaConfBaseException) -> list[str] | None:
    """The allowed values when ``exc`` is OmegaConf refusing a value of an Enum field (or list item), else None."""
    enum = getattr(getattr(exc, "child_node", None), "enum_type", None)
    parent = getattr(exc, "parent_node", None)
    if enum is None and isinstance(parent, ListConfig):
        enum = parent._metadata.element_type
    if isinstance(exc, ValidationError) and isinstance(enum, type) and issubclass(enum, Enum):
        return list(enum.__members__)
    return None


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


# Keys no rule of check_config reads (their type is the schema's to check): a sweep checks the rules once
# per combination of its other values and only sets these on it (cluster.sweep).
UNCHECKED_KEYS = ("seed",)


def check_config(cfg: DictConfig) -> None:
    """The cross-key rules of a merged config; raises :class:`ConfigError` (one line) on the first broken one."""
    try:  # an interpolation of an unset variable or of itself fails here, not inside the run
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{_one_line(e)}; fix or remove the ${{...}} interpolation") from None
    missing = sorted(_missing_keys(plain))
    if missing:
        raise ConfigError(f"{missing[0]}: required but not set; add {missing[0]}=... to the command line")
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
    DATA_FILES[d.name].check_files(d)  # the data module's own rule (trainer.data.files), without Lightning
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
    kinds = [str(k) for k in cfg.eval.norm_stats]  # each one of NormStats (the schema's Enum)
    if not kinds or len(set(kinds)) < len(kinds):
        raise ConfigError(f"eval.norm_stats: a list of distinct {', '.join(NormStats.__members__)}, got {kinds}")
    if cfg.eval.precise_batches < 1:
        raise ConfigError(f"eval.precise_batches: must be >= 1, got {cfg.eval.precise_batches}")
    if o.precondition == "bnp":
        try:
            bnp_options(o.bnp_momentum, o.bnp_eps, list(o.bnp_skip))
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
                from trainer.checkpoints import check_checkpoint  # reads a checkpoint: torch, only when one is named

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


# id -> (the config, a digest of its resolved values when it passed check_config): what `checked` trusts.
# A config stays mutable, so the mark holds only while its values are the ones checked; a copy or a merge
# is a new object, unmarked.
_VALIDATED: dict[int, tuple[weakref.ref, str]] = {}


def _digest(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(resolved(cfg), sort_keys=True, default=str).encode()).hexdigest()


def _mark_validated(cfg: DictConfig) -> DictConfig:
    key = id(cfg)
    _VALIDATED[key] = (weakref.ref(cfg, lambda _, key=key: _VALIDATED.pop(key, None)), _digest(cfg))
    return cfg


def checked(cfg: Any) -> DictConfig:
    """``cfg`` itself when :func:`load_config` or :func:`validated` returned it and its values are unchanged
    since (a digest, ~2 ms, instead of the rules again, ~20-70 ms); anything else through :func:`validated`."""
    if isinstance(cfg, DictConfig):
        mark = _VALIDATED.get(id(cfg))
        try:
            if mark is not None and mark[0]() is cfg and mark[1] == _digest(cfg):
                return cfg
        except OmegaConfBaseException:  # an interpolation that no longer resolves: validated() words it
            pass
    return validated(cfg)


def validated(cfg: Any) -> DictConfig:
    """A full, checked config from a DictConfig or plain mapping (e.g. from a checkpoint or a sweep)."""
    merged = _merge(OmegaConf.structured(ExperimentConfig), cfg, "config")
    check_config(merged)
    return _mark_validated(merged)


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
    return _mark_validated(cfg)


def resolved(cfg: DictConfig) -> dict:
    """Plain values: an Enum field's member as its name, the text the config was written with (the run key's)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def run_key(cfg: DictConfig) -> str:
    """12-hex stable hash of the resolved config without its ``tracking`` and ``output`` sections."""
    return run_key_of(resolved(cfg))


def run_key_of(plain: dict) -> str:
    """:func:`run_key` of a config already resolved to plain containers."""
    body = {k: v for k, v in plain.items() if k not in ("tracking", "output")}
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
