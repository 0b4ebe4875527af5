"""Sweep files: a base experiment, a grid, an optional zip, seeds and an executor block.

A sweep file is YAML::

    name: demo                       # also the MLflow experiment unless `experiment` is given
    base: ../experiments/digits.yaml # optional; relative paths are relative to the sweep file
    overrides:                       # optional; dotted keys applied to every run
      trainer.max_epochs: 3
    grid:                            # cartesian product over dotted keys
      model.norm: [bn, gn:groups=8]
      data.batch_size: [2, 8, 32]
    zip:                             # optional; lists of equal length varied together
      data.batch_size: [32, 256]
      optim.lr: [0.1, 0.8]
    seeds: [0, 1]                    # optional; one more grid axis over `seed`
    executor: {kind: slurm, partition: gpu, runs_per_job: 4, ...}

Every expanded run goes through ``trainer.config.load_config`` here, before anything is
submitted; the first invalid run raises ``SweepError`` naming the run's grid values and the key.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import normlayers
import trainer.config
import trainer.data.files
from cluster.sweep_schema import TOP_LEVEL_KEYS, ExecutorSettings, SweepError, SweepFile, read_sweep_file
from trainer.config import UNCHECKED_KEYS, ConfigError, check_config, load_config, norm_spec_text, run_key, run_key_of
from trainer.tracking import resolve_uri


@dataclass
class SweepRun:
    """One expanded run: its position, the grid values that made it, its overrides and run key.

    ``cfg`` (the validated DictConfig) is built on first use: a 10,000-run sweep keeps only keys.
    """

    index: int
    values: dict[str, Any]
    overrides: list[str]
    key: str
    norm: str  # the spec as one string, e.g. "gn:groups=8"
    batch_size: int  # per device
    devices: int = 1  # per node
    nodes: int = 1
    base: str | None = None
    _cfg: DictConfig | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={_format_value(v)}" for k, v in self.values.items())
        return f"run {self.index} ({shown})" if shown else f"run {self.index}"

    @property
    def cfg(self) -> DictConfig:
        if self._cfg is None:
            self._cfg = load_config(self.base, self.overrides)
        return self._cfg

    def to_record(self) -> dict[str, Any]:
        return {"index": self.index, "values": self.values, "overrides": self.overrides, "key": self.key,
                "norm": self.norm, "batch_size": self.batch_size, "devices": self.devices, "nodes": self.nodes}


@dataclass
class Sweep:
    path: Path
    name: str
    experiment: str  # MLflow experiment name
    tracking_uri: str
    base: str | None
    runs: list[SweepRun]
    executor: ExecutorSettings
    folder: Path  # submitit logs, the submission record (jobs.json) and the validated plan (plan.json)
    output_root: Path | None = None  # run directories: <output_root>/<run_key> (and its lease, cluster.lease)


def _format_value(value: Any) -> str:
    """A value as a dot-list override understands it (YAML flow); strings stay bare when unambiguous."""
    if isinstance(value, str):
        return _format_text(value)
    return json.dumps(value)


@functools.lru_cache(maxsize=4096)  # a sweep formats each grid value once per run
def _format_text(value: str) -> str:
    try:
        if yaml.safe_load(value) == value:
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value)


def _as_override(key: str, value: Any) -> str:
    return f"{key}={_format_value(value)}"


def _expand(spec: SweepFile, where: str) -> list[dict[str, Any]]:
    """Grid values of every run: grid x zip x seeds, in file order (the schema has checked their types)."""
    grid, zipped = spec.grid, spec.zip
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise SweepError(f"{where}: the lists under `zip` must have equal lengths ({shown})")
    clash = sorted(set(grid) & set(zipped))
    if clash:
        raise SweepError(f"{where}: {', '.join(clash)} is both in `grid` and in `zip`; keep each key in one place")
    axes: list[list[dict[str, Any]]] = [[{key: v} for v in values] for key, values in grid.items()]
    if zipped:
        n = next(iter(lengths.values()))
        axes.append([{key: values[i] for key, values in zipped.items()} for i in range(n)])
    seeds = spec.seeds
    if seeds is not None:
        if "seed" in grid or "seed" in zipped:
            raise SweepError(f"{where}: `seed` is both in `seeds` and in grid/zip; keep it in one place")
        axes.append([{"seed": s} for s in seeds])
    runs = []
    for combo in itertools.product(*axes):
        values: dict[str, Any] = {}
        for part in combo:
            values.update(part)
        runs.append(values)
    return runs


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read, expand and validate a sweep file. Raises ``SweepError`` (one line) on any problem."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise SweepError(f"{where}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise SweepError(f"{where}: not a text file (a sweep file is UTF-8 YAML)") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise SweepError(f"{where}: not valid YAML{line}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: a sweep file is a YAML mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    spec = read_sweep_file(raw, where)  # the schema (cluster/sweep_schema.py): keys and types
    name = spec.name or path.stem
    if "/" in name:
        raise SweepError(f"{where}: `name` must be a plain string without '/'")
    executor = spec.executor

    base = spec.base
    if base is not None:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise SweepError(f"{where}: base experiment {base} not found (looked at {base_path})")
        base = str(base_path.resolve())
    common = spec.overrides
    combos = _expand(spec, where)
    if not combos:
        raise SweepError(f"{where}: the sweep expands to zero runs (an empty list in grid, zip or seeds); "
                         "give every axis at least one value")

    # Settings every run shares: where it logs and where its run dir lives, pinned to absolute paths.
    experiment = spec.experiment or name
    common_overrides = [_as_override(k, v) for k, v in common.items()]
    try:
        probe = load_config(base, common_overrides)
    except ConfigError as error:
        raise SweepError(f"{where}: base experiment and overrides: {error}") from None
    uri = resolve_uri(str(probe.tracking.uri))  # pinned for the jobs, which may start in another directory
    output_root = Path(str(probe.output.root)).resolve()
    pinned = [
        _as_override("tracking.uri", uri),
        _as_override("tracking.experiment", experiment),
        _as_override("output.root", str(output_root)),
    ]

    folder = Path(executor.log_dir).resolve() if executor.log_dir else output_root / "sweeps" / name
    fingerprint = _fingerprint(path, base, common_overrides + pinned, OmegaConf.to_yaml(probe, resolve=True))
    runs = _cached_plan(folder, fingerprint, base)
    if runs is None:
        runs = _validated_runs(base, combos, common_overrides, pinned, where)
        _write_plan(folder, fingerprint, runs)
    for run in runs:
        _check_devices(run, executor, where)
    return Sweep(path, name, experiment, uri, base, runs, executor, folder, output_root)


def _validated_runs(
    base: str | None, combos: list[dict[str, Any]], common: list[str], pinned: list[str], where: str
) -> list[SweepRun]:
    """Every run checked by the trainer's schema and rules, and its run key.

    ``load_config`` costs ~20 ms (it builds the structured config and merges each override); a
    10,000-run sweep instead sets each run's grid values on one loaded config (the schema still
    type-checks every assignment) and runs the trainer's checks on the result. The first run with
    each grid value also goes through ``load_config`` itself, so the two paths are known to agree.
    """
    template = load_config(base, common + pinned)
    # Runs that differ only in keys no rule reads (UNCHECKED_KEYS: the seed) share one checked config, of
    # which only those values change in the resolved copy; not where the config interpolates (a value could
    # then follow the seed).
    light = not _interpolates(OmegaConf.to_container(template, resolve=False))
    cells: dict[tuple[tuple[str, str], ...], tuple[dict[str, Any], SweepRun]] = {}
    typed: dict[tuple[str, int], Any] = {}  # (key, int) -> its value as the schema types it
    runs: list[SweepRun] = []
    seen: dict[str, SweepRun] = {}
    checked_values: set[tuple[str, str]] = set()
    for index, values in enumerate(combos):
        overrides = common + [_as_override(k, v) for k, v in values.items()] + pinned
        run = SweepRun(index, values, overrides, "", "", 0, base=base)
        free = {key: value for key, value in values.items() if key in UNCHECKED_KEYS}
        cell = tuple((key, _format_value(value)) for key, value in values.items() if key not in UNCHECKED_KEYS)
        known = cells.get(cell) if light and all(type(value) is int for value in free.values()) else None
        if known is not None:  # an int's text is its YAML value: no need to build it from the override either
            plain, first = known
            for key, value in free.items():
                if (key, value) not in typed:
                    OmegaConf.update(template, key, value, merge=False)  # the schema's type check
                    typed[(key, value)] = OmegaConf.select(template, key)
                plain = _replaced(plain, key, typed[(key, value)])
            run.key = run_key_of(plain)
            run.norm, run.batch_size, run.devices, run.nodes = first.norm, first.batch_size, first.devices, first.nodes
            _add(run, seen, runs, where)
            continue
        try:
            for key, value in values.items():
                OmegaConf.update(template, key, value, merge=False)
            check_config(template)
        except (ConfigError, OmegaConfBaseException):
            # The trainer's own loader words the message (and resets the template for the next run).
            try:
                template = load_config(base, overrides)
            except ConfigError as error:
                raise SweepError(f"{where}: {run.label}: {error}") from None
            raise
        fresh = {(key, _format_value(value)) for key, value in values.items()} - checked_values
        checked_values |= {(key, text) for key, text in fresh if _same_as_text(key, values[key], text)}
        fresh -= checked_values
        if fresh:
            # The job rebuilds its config from the override strings: each grid value's first run is built
            # that way here too, so the two paths are known to agree (the job also re-checks the key).
            checked_values |= fresh
            slow_key = run_key(load_config(base, overrides))
            if slow_key != run_key(template):
                raise SweepError(f"{where}: {run.label}: its overrides {overrides[len(common):-len(pinned)]} "
                                 "give another config as text than as YAML values; quote the value in the sweep file")
        plain = OmegaConf.to_container(template, resolve=True)
        run.key = run_key_of(plain)
        run.norm = norm_spec_text(template.model.norm)
        run.batch_size = int(template.data.batch_size)
        run.devices, run.nodes = int(template.trainer.devices), int(template.trainer.num_nodes)
        if light:
            cells[cell] = (plain, run)
        _add(run, seen, runs, where)
    return runs


def _same_as_text(key: str, value: Any, text: str) -> bool:
    """Whether the override ``key=text`` gives back ``value`` itself (a scalar): then the job's config, built from
    the text, is this one; a mapping or list is merged, not set, so it is built both ways instead."""
    if not isinstance(value, str | int | float | bool | None):
        return False
    try:
        parsed = OmegaConf.select(OmegaConf.from_dotlist([f"{key}={text}"]), key)
    except OmegaConfBaseException:
        return False
    return type(parsed) is type(value) and (parsed == value or parsed != parsed and value != value)


def _add(run: SweepRun, seen: dict[str, SweepRun], runs: list[SweepRun], where: str) -> None:
    if run.key in seen:
        raise SweepError(
            f"{where}: {run.label} has the same config as {seen[run.key].label} (run key {run.key}); "
            "remove the duplicate grid value"
        )
    seen[run.key] = run
    runs.append(run)


def _interpolates(node: Any) -> bool:
    """Whether an unresolved container holds a ``${...}`` anywhere."""
    if isinstance(node, dict):
        return any(_interpolates(value) for value in node.values())
    if isinstance(node, list):
        return any(_interpolates(value) for value in node)
    return isinstance(node, str) and "${" in node


def _replaced(plain: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``plain`` with ``dotted`` set to ``value`` (only the dicts on its path are copied)."""
    head, _, rest = dotted.partition(".")
    return {**plain, head: _replaced(plain[head], rest, value) if rest else value}


def _fingerprint(path: Path, base: str | None, overrides: list[str], resolved_common: str) -> str:
    """What a validated plan depends on: the sweep and base files, pinned settings, the trainer's rules,
    and the common config as resolved now (``${oc.env:...}`` in a sweep file changes with the environment)."""
    digest = hashlib.sha256()
    digest.update(resolved_common.encode())
    digest.update(path.read_bytes())
    if base is not None:
        digest.update(Path(base).read_bytes())
    digest.update(json.dumps(overrides).encode())
    for package in (trainer.config, trainer.data.files, normlayers):  # trainer/, trainer/data/, normlayers/
        for source in sorted(Path(package.__file__).parent.glob("*.py")):
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _cached_plan(folder: Path, fingerprint: str, base: str | None) -> list[SweepRun] | None:
    try:
        plan = json.loads((folder / "plan.json").read_text())
    except (OSError, ValueError):
        return None
    if plan.get("fingerprint") != fingerprint:
        return None
    return [SweepRun(**record, base=base) for record in plan["runs"]]


def _write_plan(folder: Path, fingerprint: str, runs: list[SweepRun]) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # only a cache; `submit` says why the folder cannot be written
    partial = folder / "plan.json.tmp"
    partial.write_text(json.dumps({"fingerprint": fingerprint, "runs": [run.to_record() for run in runs]}))
    partial.replace(folder / "plan.json")


def _check_devices(run: SweepRun, executor: ExecutorSettings, where: str) -> None:
    """One Slurm task per device: the trainer's devices and nodes must match the executor's."""
    devices, nodes = run.devices, run.nodes
    if executor.kind != "slurm":
        if devices > 1 or nodes > 1:
            raise SweepError(
                f"{where}: {run.label}: trainer.devices={devices} needs executor.kind: slurm "
                f"with tasks_per_node: {devices} (one task per device)"
            )
        return
    if devices != executor.tasks_per_node or nodes != executor.nodes:
        raise SweepError(
            f"{where}: {run.label}: trainer.devices={devices}, trainer.num_nodes={nodes} but executor has "
            f"tasks_per_node={executor.tasks_per_node}, nodes={executor.nodes}; one Slurm task per device: "
            "make them equal"
        )
