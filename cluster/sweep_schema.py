"""The sweep file's schema: dataclasses OmegaConf checks a sweep file against, as the experiment schema
(:mod:`trainer.schema`) checks an experiment.

OmegaConf rejects unknown keys and values of the wrong type; :func:`read_sweep_file` rewords its errors
as one line naming the key. The rules across keys (zip lengths, a key in two places) and the ranges are
:mod:`cluster.sweep`'s and :meth:`ExecutorSettings.check`'s. Grid, zip and override values are typed
``Any``: they are dotted keys of the experiment, checked by the trainer's own schema run by run. Nothing
is resolved here: ``${...}`` in a value is the experiment's interpolation, resolved in each run's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from trainer.schema import choices

ExecutorKind = choices("ExecutorKind", ("slurm", "local", "debug"))


class SweepError(ValueError):
    """A sweep file that cannot run; its str is one line saying what is wrong and what to do."""


@dataclass
class ExecutorSettings:
    """The `executor` block. Keys not listed here are rejected."""

    kind: ExecutorKind = ExecutorKind.local
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    mem_gb: float | int | None = None  # an int stays one: submitit gets "16GB", not "16.0GB"
    timeout_min: int = 60
    array_parallelism: int = 2
    runs_per_job: int = 1
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra sbatch parameters, e.g. {account: lab}
    setup: list[str] = field(default_factory=list)  # shell lines run in the job before python starts
    max_requeues: int = 3
    log_dir: str | None = None  # default: <output.root>/sweeps/<name>

    def check(self, where: str) -> None:
        """The ranges and the rule across keys (the schema has checked names and types)."""
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min", "array_parallelism", "runs_per_job"):
            if getattr(self, name) < 1:
                raise SweepError(f"{where}: executor.{name}={getattr(self, name)!r}; {_RANGE[name]}")
        for name in ("gpus_per_node", "max_requeues"):
            if getattr(self, name) < 0:
                raise SweepError(f"{where}: executor.{name}={getattr(self, name)!r}; {_RANGE[name]}")
        if not all(isinstance(line, str) for line in self.setup):  # OmegaConf lets a mapping into list[str]
            raise SweepError(f"{where}: executor.setup must be a list of shell lines")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise SweepError(f"{where}: executor.mem_gb={self.mem_gb!r}; {_RANGE['mem_gb']}")
        if self.kind != "slurm" and (self.nodes > 1 or self.tasks_per_node > 1):
            raise SweepError(
                f"{where}: executor.kind={self.kind} runs one process per job; multi-device runs "
                "(nodes or tasks_per_node > 1) need kind: slurm"
            )


@dataclass
class SweepFile:
    """A sweep file (see :mod:`cluster.sweep`); a missing key is its default."""

    name: str | None = None
    experiment: str | None = None
    base: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zip: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] | None = None
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)


TOP_LEVEL_KEYS = tuple(f.name for f in fields(SweepFile))
EXECUTOR_KEYS = tuple(f.name for f in fields(ExecutorSettings))
_RANGE = {name: "it must be a positive integer" for name in
          ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min", "array_parallelism", "runs_per_job")}
_RANGE.update(gpus_per_node="it must be an integer >= 0", max_requeues="it must be an integer >= 0",
              mem_gb="it must be a positive number of GB")


def read_sweep_file(raw: dict[str, Any], where: str) -> SweepFile:
    """``raw`` (the file's YAML mapping) checked against :class:`SweepFile`; SweepError (one line) if it does
    not fit. Values come back as the YAML gave them (nothing resolved, no type turned into another)."""
    raw = {key: value for key, value in raw.items() if value is not None}  # `overrides:` left empty = none
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepFile), OmegaConf.create(raw))
        # plain containers, then the dataclasses: OmegaConf's own instantiation would resolve ${...}
        plain = OmegaConf.to_container(merged, resolve=False)
    except (OmegaConfBaseException, TypeError) as error:  # TypeError: a list where the schema has a mapping
        key = _misshapen(raw) or str(getattr(error, "full_key", "") or "")
        raise SweepError(f"{where}: {_reworded(key, error, raw)}") from None
    sweep = SweepFile(**{**plain, "executor": ExecutorSettings(**plain["executor"])})
    sweep.executor.check(where)
    return sweep


def _misshapen(raw: dict[str, Any]) -> str | None:
    """The key whose value is not the kind of container the schema has (OmegaConf's error names none)."""
    mappings = [(key, raw[key]) for key in ("overrides", "grid", "zip", "executor") if key in raw]
    block = raw.get("executor")
    if isinstance(block, dict):
        mappings += [(f"executor.{key}", block[key]) for key in ("sbatch",) if key in block]
        if "setup" in block and not isinstance(block["setup"], list):
            return "executor.setup"
    return next((key for key, value in mappings if not isinstance(value, dict)), None)


def _reworded(key: str, error: Exception, raw: dict[str, Any]) -> str:
    """OmegaConf's error on ``key`` as the sweep file's own words: what is wrong, what to write instead."""
    top, _, rest = key.partition(".")
    top = top.split("[")[0]
    if isinstance(error, ConfigKeyError) and top not in TOP_LEVEL_KEYS:
        unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
        return f"unknown top-level key(s) {', '.join(unknown or [top])}; valid: {', '.join(TOP_LEVEL_KEYS)}"
    if top == "executor":
        block = raw.get("executor")
        if not isinstance(block, dict):
            return f"`executor` must be a mapping of settings, got {type(block).__name__}"
        name = rest.split("[")[0]
        if name not in EXECUTOR_KEYS:
            unknown = sorted(set(block) - set(EXECUTOR_KEYS))
            return f"unknown executor key(s) {', '.join(unknown or [name])}; valid keys: {', '.join(EXECUTOR_KEYS)}"
        value = block.get(name)
        if name == "kind":
            return f"executor.kind={value!r}; choose one of {', '.join(ExecutorKind.__members__)}"
        if name == "sbatch":
            return "executor.sbatch must be a mapping of extra sbatch parameters"
        if name == "setup":
            return "executor.setup must be a list of shell lines"
        return f"executor.{name}={value!r}; {_RANGE.get(name, 'it must be a string')}"
    if top == "name":
        return "`name` must be a plain string without '/'"
    if top in ("experiment", "base"):
        return f"`{top}` must be a string, got {raw.get(top)!r}"
    if top == "overrides":
        return "`overrides` must map dotted keys to values, e.g. trainer.max_epochs: 3"
    if top in ("grid", "zip"):
        section = raw.get(top)
        if isinstance(section, dict):
            for axis, values in section.items():
                if not isinstance(values, list):
                    return f"{top}.{axis} must be a list of values, got {values!r}"
        return f"`{top}` must map dotted keys to lists of values, e.g. model.norm: [bn, gn]"
    if top == "seeds":
        return f"`seeds` must be a list of integers, got {raw.get('seeds')!r}"
    return f"{key or 'sweep file'}: {str(getattr(error, 'msg', None) or error).splitlines()[0]}"
