"""The training runs as the report sees them: one typed :class:`RunRecord` per finished run, read from
MLflow with one search (its final metrics, params and tags), and the step-0 values of the few metrics
some panels need read in bulk afterwards (:mod:`cluster.report.history`)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from cluster.report import history, local_store
from trainer import tracking
from trainer.outcome import OUTCOMES, at_chance

REPORT_TAG = (tracking.KIND_TAG, tracking.REPORT_KIND)
PROBE_METRIC = re.compile(r"^probe/(act_std|grad_norm)/(\d{3})_(.+)$")
CONCENTRATION = "probe/grad_concentration"
FISHER_KEYS = ("fisher/lambda_max", "fisher/lr_max", "fisher/lr_max_momentum")
NORM_STATS = ("running", "precise", "batch")  # trainer.norm_eval's kinds: val_acc/<kind>
# the outcome classes that make a learning rate unstable; not_learning is stable, it only did not learn
UNSTABLE = ("diverged", "collapsed")
# runs per search page from a server: a page of 5,000 normlab runs (90 params, 250 metrics each) outlasts
# the server worker's request timeout on a loaded machine (the connection is dropped)
SERVER_PAGE_SIZE = 1000
# every param the report reads (record_from_run, norm_label, outcome_of): a local store is asked for these only
PARAMS_READ = ("model.norm", "data.batch_size", "optim.lr", "seed", "derived.num_classes", "trainer.sync_norm",
               "model.norm_init_scale", "model.norm_placement", "optim.precondition")


@dataclass(frozen=True)
class RunRecord:
    """One training run as the report sees it: its coordinates in the grid and its outcome."""

    run_id: str
    norm: str
    batch_size: int
    lr: float
    seed: int
    val_acc: float | None
    outcome: str = "finished"  # one of trainer.outcome.OUTCOMES
    act_std: dict[int, float] = field(default_factory=dict)  # layer depth index -> final value
    grad_norm: dict[int, float] = field(default_factory=dict)
    layer_names: dict[int, str] = field(default_factory=dict)  # depth index -> module path
    metric_keys: frozenset[str] = frozenset()
    initial: dict[str, float] = field(default_factory=dict)  # metric key -> its value at step 0 (initialisation)
    by_stats: dict[str, float] = field(default_factory=dict)  # val_acc under running / precise / batch statistics

    @property
    def unstable(self) -> bool:
        """Diverged or collapsed: the learning rate was too large for this run."""
        return self.outcome in UNSTABLE


def outcome_of(tags: dict, metrics: dict, params: dict) -> str:
    """The run's outcome class: the trainer's ``normlab.outcome`` tag; runs logged before it existed are
    diverged (``diverged`` metric or status) or, ending at chance, collapsed (no history to tell a collapse
    from never learning), else finished."""
    tagged = tags.get(tracking.OUTCOME_TAG)
    if tagged in OUTCOMES:
        return tagged
    if metrics.get("diverged", 0.0) >= 0.5 or tags.get(tracking.STATUS_TAG) == tracking.DIVERGED:
        return "diverged"
    if at_chance(metrics.get("val_acc"), params.get("derived.num_classes")):
        return "collapsed"
    return "finished"


def norm_label(norm: str, params: dict[str, str]) -> str:
    """What a line of the report stands for: the norm spec, plus what else changes how it normalises
    (synchronised statistics, an initial scale other than 1, placement other than every site), so
    syncbn is not merged into bn, nor `final` into `all`; runs with ``optim.precondition=bnp`` are
    ``bnp`` (no norm) or ``<norm>+bnp``, not ``none``."""
    extras = []
    if params.get("trainer.sync_norm", "False").lower() == "true":
        extras.append("sync")
    normalises = _norm_name(norm) != "none"
    init_scale = params.get("model.norm_init_scale", "1.0")
    if float(init_scale) != 1.0 and normalises:
        extras.append(f"init scale={init_scale}")
    placement = params.get("model.norm_placement", "all")
    if placement != "all" and normalises:
        extras.append(f"placement={placement}")
    if params.get("optim.precondition", "none") == "bnp":  # BNP: no norm layer, preconditioned gradients
        norm = "bnp" if norm == "none" or placement == "none" else f"{norm}+bnp"
    return f"{norm} ({', '.join(extras)})" if extras else norm


def _norm_name(norm: str) -> str:
    """The variant a logged spec names (its text when this normlab no longer knows it)."""
    from normlayers import NormSpec  # lazily: `normlab report --help` need not import torch

    try:
        return NormSpec.parse(norm).name
    except ValueError:
        return norm


def record_from_run(run) -> RunRecord | None:
    """A report record from an MLflow run, or None when the run lacks a grid coordinate."""
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    try:
        norm = tags.get(tracking.NORM_TAG) or params["model.norm"]
        # the per-device batch the norms' statistics see: with virtual devices, a slice of data.batch_size
        batch_size = int(tags.get(tracking.STATS_BATCH_SIZE_TAG) or tags.get(tracking.BATCH_SIZE_TAG)
                         or params["data.batch_size"])
        lr = float(params["optim.lr"])
        seed = int(params["seed"])
    except (KeyError, ValueError):
        return None
    probes: dict[str, dict[int, float]] = {"act_std": {}, "grad_norm": {}}
    layer_names = {}
    for key, value in metrics.items():
        match = PROBE_METRIC.match(key)
        if match:
            probes[match.group(1)][int(match.group(2))] = value
            layer_names[int(match.group(2))] = match.group(3)
    return RunRecord(
        run_id=run.info.run_id,
        norm=norm_label(norm, params),
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        val_acc=metrics.get("val_acc"),
        outcome=outcome_of(tags, metrics, params),
        act_std=probes["act_std"],
        grad_norm=probes["grad_norm"],
        layer_names=layer_names,
        metric_keys=frozenset(metrics),
        by_stats={kind: metrics[f"val_acc/{kind}"] for kind in NORM_STATS if f"val_acc/{kind}" in metrics},
    )


def read_runs(client, experiment_id: str, keys: set[str] | None = None) -> tuple[list[RunRecord], list[str]]:
    """The experiment's finished training runs and notes on what was left out.

    Report runs are skipped; with ``keys`` (a sweep's run keys) so are runs of other grids, and the
    sweep's keys are looked up in every experiment of the store (a point another sweep trained first
    is reported here too). A run key trained more than once (a run directory deleted and trained
    again) counts once: its newest run.
    """
    records, seen_keys, unusable, unfinished, foreign = [], set(), 0, 0, 0
    ids = [experiment_id] if keys is None else tracking.experiment_ids(client)
    store = local_store.sql_store(client)
    runs = (local_store.search_runs(store, ids, PARAMS_READ) if store is not None
            else tracking.iter_runs(client, ids, newest_first=True, page_size=SERVER_PAGE_SIZE))
    for run in runs:
        tags = run.data.tags
        if tags.get(REPORT_TAG[0]) == REPORT_TAG[1]:
            continue
        key = tags.get(tracking.RUN_KEY_TAG)
        if keys is not None and key not in keys:
            foreign += run.info.experiment_id == experiment_id
            continue
        record = record_from_run(run)
        if record is None:
            unusable += 1
        elif not tracking.is_done(run) or (record.val_acc is None and record.outcome != "diverged"):
            unfinished += 1  # its metrics are intermediate values, not final ones
        elif key is None:
            records.append(record)
        elif key not in seen_keys:
            seen_keys.add(key)
            records.append(record)
    notes = []
    if unusable:
        notes.append(f"{unusable} run(s) lack a norm, batch size, optim.lr or seed (not training runs): left out")
    if unfinished:
        notes.append(f"{unfinished} run(s) not finished (running, failed or killed): left out")
    if foreign:
        notes.append(f"{foreign} run(s) of the experiment are not in this sweep's grid: left out")
    if keys is not None and len(seen_keys) < len(keys):
        notes.append(f"{len(keys) - len(seen_keys)} of the sweep's {len(keys)} runs have no finished MLflow run yet")
    return with_initial_values(client, records), notes


def with_initial_values(client, records: list[RunRecord]) -> list[RunRecord]:
    """The records with ``initial`` filled from the metric histories (value at step 0), for the
    depth panel's runs (per-layer probes) and for every run that logged concentration or Fisher metrics;
    read in bulk, one request per metric key and 100 runs."""
    from cluster.report.depth import depth_setting

    setting = depth_setting(records)
    wanted: dict[str, list[str]] = {}
    for r in records:
        keys = [k for k in (CONCENTRATION, *FISHER_KEYS) if k in r.metric_keys]
        if setting is not None and (r.batch_size, r.lr) == setting and not r.unstable:
            keys += sorted(k for k in r.metric_keys if PROBE_METRIC.match(k))
        for key in keys:
            wanted.setdefault(key, []).append(r.run_id)
    at_zero = history.values_at_step_zero(client, wanted)
    return [dataclasses.replace(r, initial=at_zero[r.run_id]) if at_zero.get(r.run_id) else r for r in records]
