"""``normlab report``: the regime figures of a sweep, read back from MLflow.

The training runs of one MLflow experiment (a sweep file names its experiment and tracking URI)
are read with MLflow's search API, grouped over seeds, and turned into three panels:

1. batch-size regimes: validation error against per-device batch size (log2 axis), one line per
   norm, mean and spread over seeds, each point at the learning rate that did best there;
2. learning-rate stability: norm x learning rate heat maps (one per batch size) coloured by final
   validation accuracy, diverged cells marked, the largest stable learning rate per norm outlined;
3. depth statistics: activation std and gradient norm per layer, for runs that logged probes, at
   the end of training (solid) and at initialisation (dashed, the probes' step-0 values), one line
   per norm (``none`` for the unnormalised net), after Bjorck et al. 2018;
4. output-gradient concentration at initialisation per norm (``probe/grad_concentration`` at step
   0: the share of the logit-gradient norm on the single most-affected class, Bjorck et al. 2018);
5. beside the stability panel, the learning rate the Fisher matrix predicts at initialisation
   (``fisher/lr_max`` = 2 / lambda_max, Wei et al. 2019; with momentum 2 (1 + mu) / lambda_max) next
   to the largest stable learning rate observed, per norm and batch size.

The output directory gets one PNG per panel, ``report.md`` (tables and notes) and ``report.html``
(the same, images embedded, so it opens anywhere). The files are also logged as artifacts of a
run tagged ``normlab.kind=report`` in the same experiment; it has no ``run_key`` tag, so sweep
status and resubmission ignore it. What the runs do not allow (one seed: no spread, one learning
rate: no stability panel, no probes: no depth panel, no Fisher metrics: no Fisher panel) is said
in the notes instead. Initial values are read from the metric histories (step 0) of the runs that
need them only: the depth panel's runs and the runs that logged the concentration or Fisher probes.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import os
import re
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cluster import report_stats
from cluster.report_plots import (
    lr_label,
    plot_batch_regimes,
    plot_concentration,
    plot_depth,
    plot_fisher,
    plot_lr_stability,
)
from trainer import tracking
from trainer.outcome import at_chance

REPORT_TAG = (tracking.KIND_TAG, tracking.REPORT_KIND)
PROBE_METRIC = re.compile(r"^probe/(act_std|grad_norm)/(\d{3})_(.+)$")
FIGURE_FILES = {"batch": "batch_regimes.png", "lr": "lr_stability.png", "depth": "depth_stats.png",
                "concentration": "grad_concentration.png", "fisher": "fisher_lr.png"}
CONCENTRATION = "probe/grad_concentration"
FISHER_KEYS = ("fisher/lambda_max", "fisher/lr_max", "fisher/lr_max_momentum")


class ReportError(Exception):
    """Bad input (unknown experiment, missing file): one line for the user, exit status 2."""


@dataclass(frozen=True)
class RunRecord:
    """One training run as the report sees it: its coordinates in the grid and its outcome."""

    run_id: str
    norm: str
    batch_size: int
    lr: float
    seed: int
    val_acc: float | None
    diverged: bool  # diverged, or ended no better than CHANCE_FACTOR x chance: either way it did not train
    act_std: dict[int, float] = field(default_factory=dict)  # layer depth index -> final value
    grad_norm: dict[int, float] = field(default_factory=dict)
    layer_names: dict[int, str] = field(default_factory=dict)  # depth index -> module path
    metric_keys: frozenset[str] = frozenset()
    initial: dict[str, float] = field(default_factory=dict)  # metric key -> its value at step 0 (initialisation)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    figure: str | None  # file name of the panel's PNG in the output directory
    tables: list[Table]


# ---------------------------------------------------------------- reading runs


# A run whose final accuracy is no better than this multiple of chance did not train: at a large
# learning rate SGD can collapse to one class without the loss ever exploding (the divergence guard
# then stays quiet), and for the stability question that is as much a failure as a divergence.
# The chance rule is the trainer's (trainer.outcome, the one definition of the outcome classes).
def _at_chance(val_acc: float | None, num_classes: str | None) -> bool:
    return at_chance(val_acc, num_classes)


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
    diverged = metrics.get("diverged", 0.0) >= 0.5 or tags.get(tracking.STATUS_TAG) == tracking.DIVERGED
    diverged = diverged or _at_chance(metrics.get("val_acc"), params.get("derived.num_classes"))
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
        diverged=diverged,
        act_std=probes["act_std"],
        grad_norm=probes["grad_norm"],
        layer_names=layer_names,
        metric_keys=frozenset(metrics),
    )


def read_runs(client, experiment_id: str, keys: set[str] | None = None) -> tuple[list[RunRecord], list[str]]:
    """The experiment's finished training runs and notes on what was left out.

    Report runs are skipped; with ``keys`` (a sweep's run keys) so are runs of other grids, and the
    sweep's keys are looked up in every experiment of the store (a point another sweep trained first
    is reported here too). A run key trained more than once (a run directory deleted and trained
    again) counts once: its newest run.
    """
    records, seen_keys, unusable, unfinished, foreign = [], set(), 0, 0, 0
    ids = experiment_id if keys is None else tracking.experiment_ids(client)
    for run in tracking.iter_runs(client, ids, newest_first=True):
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
        elif not tracking.is_done(run) or (record.val_acc is None and not record.diverged):
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
    depth panel's runs (per-layer probes) and for every run that logged concentration or Fisher metrics."""
    setting = depth_setting(records)
    out = []
    for r in records:
        wanted = [k for k in (CONCENTRATION, *FISHER_KEYS) if k in r.metric_keys]
        if setting is not None and (r.batch_size, r.lr) == setting and not r.diverged:
            wanted += sorted(k for k in r.metric_keys if PROBE_METRIC.match(k))
        initial = {}
        for key in wanted:
            at_zero = [m.value for m in client.get_metric_history(r.run_id, key) if m.step == 0]
            if at_zero:
                initial[key] = at_zero[-1]
        out.append(dataclasses.replace(r, initial=initial) if initial else r)
    return out


# ---------------------------------------------------------------- grouping


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def batch_regime_data(records: list[RunRecord]) -> tuple[dict, list[str]]:
    """Validation error per (norm, batch size) over seeds, at the best learning rate with no diverged seed.

    Returns ``{norm: [{"batch_size", "lr", "seeds", "mean_error", "std_error"}, ...]}`` sorted by
    batch size (``std_error`` None with one seed) and notes on points that could not be made.
    """
    cells: dict[tuple[str, int, float], list[RunRecord]] = defaultdict(list)
    for r in records:
        cells[(r.norm, r.batch_size, r.lr)].append(r)
    by_point: dict[tuple[str, int], list[tuple[float, list[RunRecord]]]] = defaultdict(list)
    for (norm, batch_size, lr), runs in cells.items():
        by_point[(norm, batch_size)].append((lr, runs))
    data: dict[str, list[dict]] = {}
    notes = []
    for (norm, batch_size), candidates in sorted(by_point.items()):
        # A learning rate that diverged in any seed is not a usable setting for this point.
        stable = [(lr, runs) for lr, runs in candidates if not any(r.diverged for r in runs)]
        if not stable:
            notes.append(f"{norm} at per-device batch {batch_size}: each lr diverged in some seed: no point")
            continue
        scored = [(_mean_std([1.0 - r.val_acc for r in runs]), lr, runs) for lr, runs in stable]
        (mean, std), lr, runs = min(scored, key=lambda item: (item[0][0], item[1]))
        point = {"batch_size": batch_size, "lr": lr, "seeds": len(runs), "mean_error": mean, "std_error": std}
        data.setdefault(norm, []).append(point)
    return data, notes


def lr_stability_data(records: list[RunRecord]) -> dict:
    """Per batch size, the norm x learning rate grid of final accuracy and divergence.

    Returns ``{"lrs": [...], "norms": [...], "batch_sizes": {bs: {"cells": {(norm, lr): cell},
    "largest_stable_lr": {norm: lr | None}}}}`` with ``cell = {"runs", "diverged", "mean_acc"}``;
    ``mean_acc`` averages the seeds that did not diverge (None if all did).
    """
    lrs = sorted({r.lr for r in records})
    norms = sorted({r.norm for r in records})
    grouped: dict[int, dict[tuple[str, float], list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        grouped[r.batch_size][(r.norm, r.lr)].append(r)
    per_batch = {}
    for batch_size in sorted(grouped):
        cells = {}
        for key, runs in grouped[batch_size].items():
            accs = [r.val_acc for r in runs if not r.diverged and r.val_acc is not None]
            cells[key] = {
                "runs": len(runs),
                "diverged": sum(r.diverged for r in runs),
                "mean_acc": statistics.fmean(accs) if accs else None,
            }
        largest = {}
        for norm in norms:
            stable = [lr for (n, lr), cell in cells.items() if n == norm and cell["diverged"] == 0]
            largest[norm] = max(stable) if stable else None
        per_batch[batch_size] = {"cells": cells, "largest_stable_lr": largest}
    return {"lrs": lrs, "norms": norms, "batch_sizes": per_batch}


def depth_data(records: list[RunRecord]) -> dict | None:
    """Per-layer activation std and gradient norm per norm, averaged over seeds, at one setting.

    The setting is :func:`depth_setting`'s, one (batch size, learning rate) for every line, so the
    lines compare norms and nothing else.
    Returns None when no run that finished logged probes.
    """
    setting = depth_setting(records)
    if setting is None:
        return None
    batch_size, lr = setting
    probed = [r for r in records if (r.act_std or r.grad_norm) and not r.diverged]
    norms_at = defaultdict(set)
    for r in probed:
        norms_at[(r.batch_size, r.lr)].add(r.norm)
    lines = {}
    for norm in sorted(norms_at[(batch_size, lr)]):
        runs = [r for r in probed if (r.norm, r.batch_size, r.lr) == (norm, batch_size, lr)]
        layers = sorted({i for r in runs for i in (*r.act_std, *r.grad_norm)})
        names = {i: name for r in runs for i, name in r.layer_names.items()}
        lines[norm] = {
            "layers": layers,
            "names": [names[i] for i in layers],
            "act_std": [_mean_of([r.act_std.get(i) for r in runs]) for i in layers],
            "grad_norm": [_mean_of([r.grad_norm.get(i) for r in runs]) for i in layers],
            "act_std_init": [_mean_of([_initial_probe(r, "act_std", i) for r in runs]) for i in layers],
            "grad_norm_init": [_mean_of([_initial_probe(r, "grad_norm", i) for r in runs]) for i in layers],
            "runs": len(runs),
        }
    return {"batch_size": batch_size, "lr": lr, "norms": lines}


def depth_setting(records: list[RunRecord]) -> tuple[int, float] | None:
    """The (batch size, lr) of the depth panel: where the most norms have finished probe runs; ties go
    to the setting whose probe runs reached the best mean val_acc (in an lr sweep: where the nets
    trained, not where they barely moved or failed), then the smallest batch and lr. None without probe runs."""
    norms_at, accs = defaultdict(set), defaultdict(list)
    for r in records:
        if (r.act_std or r.grad_norm) and not r.diverged:
            norms_at[(r.batch_size, r.lr)].add(r.norm)
            if r.val_acc is not None:
                accs[(r.batch_size, r.lr)].append(r.val_acc)
    if not norms_at:
        return None
    return min(norms_at, key=lambda key: (-len(norms_at[key]), -statistics.fmean(accs[key] or [0.0]), key))


def _initial_probe(record: RunRecord, stat: str, layer: int) -> float | None:
    name = record.layer_names.get(layer)
    return None if name is None else record.initial.get(f"probe/{stat}/{layer:03d}_{name}")


def concentration_data(records: list[RunRecord]) -> dict:
    """Output-gradient concentration at initialisation per norm over all its runs:
    ``{norm: {"runs", "mean", "min", "max"}}`` (norms without step-0 values left out)."""
    values: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if CONCENTRATION in r.initial:
            values[r.norm].append(r.initial[CONCENTRATION])
    return {norm: {"runs": len(v), "mean": statistics.fmean(v), "min": min(v), "max": max(v)}
            for norm, v in sorted(values.items())}


def fisher_data(records: list[RunRecord]) -> dict:
    """Per (norm, batch size): the Fisher probe at initialisation (means over runs) and the largest stable
    lr observed. ``{(norm, batch): {"runs", "lambda_max", "lr_max", "lr_max_momentum", "largest_stable_lr",
    "any_diverged"}}``; ``largest_stable_lr`` is None when every lr diverged, and only a lower bound of the
    true limit when no lr diverged (``any_diverged`` False)."""
    stability = lr_stability_data(records)["batch_sizes"]
    grouped: dict[tuple[str, int], list[RunRecord]] = defaultdict(list)
    for r in records:
        if "fisher/lambda_max" in r.initial:
            grouped[(r.norm, r.batch_size)].append(r)
    data = {}
    for (norm, batch_size), runs in sorted(grouped.items()):
        same = [r for r in records if (r.norm, r.batch_size) == (norm, batch_size)]
        data[(norm, batch_size)] = {
            "runs": len(runs),
            "lambda_max": statistics.fmean(r.initial["fisher/lambda_max"] for r in runs),
            "lr_max": _mean_of([r.initial.get("fisher/lr_max") for r in runs]),
            "lr_max_momentum": _mean_of([r.initial.get("fisher/lr_max_momentum") for r in runs]),
            "largest_stable_lr": stability[batch_size]["largest_stable_lr"].get(norm),
            "any_diverged": any(r.diverged for r in same),
        }
    return data


def _mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None



# ---------------------------------------------------------------- the report


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def build_report(records: list[RunRecord], out: Path) -> tuple[list[Section], list[str], dict]:
    """Make every panel the runs allow; returns the sections, notes on what is missing, and the
    plotted data of each panel (``"batch"``, ``"lr"``, ``"depth"``; absent when not made)."""
    notes: list[str] = []
    sections: list[Section] = []
    plotted: dict = {}
    if not records:
        return sections, ["no finished training runs: nothing to plot"], plotted

    seeds = Counter((r.norm, r.batch_size, r.lr) for r in records)
    if max(seeds.values()) == 1:
        notes.append("one seed per setting: no spread over seeds is shown")
    batch_sizes = sorted({r.batch_size for r in records})
    lrs = sorted({r.lr for r in records})

    regimes, regime_notes = batch_regime_data(records)
    notes += regime_notes
    if len(batch_sizes) == 1:
        notes.append(f"one per-device batch size ({batch_sizes[0]}): the batch-regime panel has one point per norm")
    report_stats.add_intervals(regimes, records)
    if regimes:
        plotted["batch"] = plot_batch_regimes(regimes, out / FIGURE_FILES["batch"])
        rows = [[norm, str(p["batch_size"]), lr_label(p["lr"]), str(p["seeds"]), _fmt(p["mean_error"]),
                 _fmt(p["std_error"]), _fmt(p["ci_half"])] for norm, points in regimes.items() for p in points]
        table = Table("Validation error by per-device batch size",
                      ["norm", "batch", "lr", "seeds", "val error mean", "val error std",
                       f"{report_stats.INTERVAL_NAME} ±"], rows)
        sections.append(Section("Batch-size regimes", FIGURE_FILES["batch"], [table]))

    if len(lrs) < 2:
        notes.append(f"one learning rate ({lr_label(lrs[0])}): no learning-rate stability panel")
    else:
        stability = lr_stability_data(records)
        plotted["lr"] = plot_lr_stability(stability, out / FIGURE_FILES["lr"])
        cells, largest = [], []
        for batch_size, grid in stability["batch_sizes"].items():
            for (norm, lr), cell in sorted(grid["cells"].items()):
                cells.append([norm, str(batch_size), lr_label(lr), str(cell["runs"]), str(cell["diverged"]),
                              _fmt(cell["mean_acc"])])
            for norm, lr in grid["largest_stable_lr"].items():
                largest.append([norm, str(batch_size), "none" if lr is None else lr_label(lr)])
        largest.sort(key=lambda row: row[0])  # per norm, batch sizes ascending (sort is stable)
        sections.append(Section("Learning-rate stability", FIGURE_FILES["lr"], [
            Table("Largest stable learning rate", ["norm", "batch", "largest stable lr"], largest),
            Table("Final accuracy by learning rate", ["norm", "batch", "lr", "runs", "diverged", "val acc mean"],
                  cells),
        ]))

    depth = depth_data(records)
    if depth is None:
        notes.append("no finished run logged probe metrics (probe/act_std/..., probe/grad_norm/...): no depth panel")
    else:
        plotted["depth"] = plot_depth(depth, out / FIGURE_FILES["depth"])
        rows = [[norm, str(layer), name, _fmt(a), _fmt(g), _fmt(a0), _fmt(g0)]
                for norm, line in depth["norms"].items()
                for layer, name, a, g, a0, g0 in zip(line["layers"], line["names"], line["act_std"], line["grad_norm"],
                                                     line["act_std_init"], line["grad_norm_init"], strict=True)]
        title = f"Depth statistics (per-device batch {depth['batch_size']}, lr {lr_label(depth['lr'])})"
        sections.append(Section(title, FIGURE_FILES["depth"], [
            Table("Per-layer statistics, mean over seeds",
                  ["norm", "layer", "module", "act std", "grad norm", "act std (init)", "grad norm (init)"], rows)]))
    return sections, notes, plotted


def study_sections(records: list[RunRecord], out: Path) -> tuple[list[Section], list[str], dict]:
    """The concentration and Fisher panels (the gradient and Fisher probes); same return shape as :func:`build_report`
    (plotted keys ``"concentration"``, ``"fisher"``). Kept apart so that experiments without these
    probes report exactly as before, with a note on what is missing."""
    sections: list[Section] = []
    notes: list[str] = []
    plotted: dict = {}
    if not records:
        return sections, notes, plotted
    concentration = concentration_data(records)
    if not concentration:
        notes.append(f"no run logged {CONCENTRATION} at step 0 (probes.every_n_steps > 0): "
                     "no output-gradient concentration panel")
    else:
        plotted["concentration"] = plot_concentration(concentration, out / FIGURE_FILES["concentration"])
        rows = [[norm, str(c["runs"]), _fmt(c["mean"]), _fmt(c["min"]), _fmt(c["max"])]
                for norm, c in concentration.items()]
        sections.append(Section("Output-gradient concentration at initialisation", FIGURE_FILES["concentration"], [
            Table("Concentration on one class at step 0", ["norm", "runs", "mean", "min", "max"], rows)]))
    fisher = fisher_data(records)
    if not fisher:
        notes.append("no run logged fisher/lambda_max at step 0 (probes.fisher_every_n_steps > 0): "
                     "no Fisher learning-rate panel")
        return sections, notes, plotted
    plotted["fisher"] = plot_fisher(fisher, out / FIGURE_FILES["fisher"])
    rows = []
    for (norm, batch_size), point in fisher.items():
        stable = point["largest_stable_lr"]
        observed = "none" if stable is None else ("" if point["any_diverged"] else ">= ") + lr_label(stable)
        rows.append([norm, str(batch_size), str(point["runs"]), _fmt(point["lambda_max"]), _fmt(point["lr_max"]),
                     _fmt(point["lr_max_momentum"]), observed])
    if any(not p["any_diverged"] for p in fisher.values()):
        notes.append("where no learning rate diverged, the largest stable lr observed is only a lower bound (>=)")
    sections.append(Section("Fisher-predicted maximal learning rate", FIGURE_FILES["fisher"], [
        Table("Fisher lambda_max at initialisation and the learning rates", [
            "norm", "batch", "runs", "lambda_max", "lr_max (2/lambda)", "lr_max momentum", "largest stable lr"],
            rows)]))
    return sections, notes, plotted


def render_markdown(heading: str, summary: str, sections: list[Section], notes: list[str],
                    findings: list[str] | None = None) -> str:
    lines = [f"# {heading}", "", summary, ""]
    if findings:
        lines += ["## Findings", ""] + [f"- {finding}" for finding in findings] + [""]
    if notes:
        lines += ["## What the runs do not allow", ""] + [f"- {note}" for note in notes] + [""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.figure:
            lines += [f"![{section.title}]({section.figure})", ""]
        for table in section.tables:
            lines += [f"**{table.title}**", "", "| " + " | ".join(table.header) + " |",
                      "|" + "---|" * len(table.header)]
            lines += ["| " + " | ".join(row) + " |" for row in table.rows]
            lines.append("")
    return "\n".join(lines)


def render_html(heading: str, summary: str, sections: list[Section], notes: list[str], out: Path,
                findings: list[str] | None = None) -> str:
    esc = html.escape
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(heading)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>{esc(heading)}</h1>", f"<p>{esc(summary)}</p>",
    ]
    if findings:
        parts += ["<h2>Findings</h2><ul>"] + [f"<li>{esc(f)}</li>" for f in findings] + ["</ul>"]
    if notes:
        parts += ["<h2>What the runs do not allow</h2><ul>"] + [f"<li>{esc(n)}</li>" for n in notes] + ["</ul>"]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        if section.figure:
            encoded = base64.b64encode((out / section.figure).read_bytes()).decode("ascii")
            parts.append(f'<img alt="{esc(section.title)}" src="data:image/png;base64,{encoded}">')
        for table in section.tables:
            parts.append(f"<table><caption>{esc(table.title)}</caption><tr>")
            parts += [f"<th>{esc(h)}</th>" for h in table.header]
            parts.append("</tr>")
            for row in table.rows:
                parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- command line


def _resolve_target(target: str, tracking_uri: str | None) -> tuple[str, str, set[str] | None]:
    """(experiment name, tracking URI, the sweep's run keys or None) from a sweep file or an experiment name."""
    path = Path(target)
    if path.is_file():
        from cluster.sweep import load_sweep  # lazily: only a sweep file needs the sweep machinery

        try:
            sweep = load_sweep(path)
        except ValueError as err:  # SweepError and the trainer's ConfigError: one line naming file and key
            raise ReportError(str(err).splitlines()[0]) from None
        # The sweep's URI already honours $MLFLOW_TRACKING_URI the way its runs did.
        return sweep.experiment, tracking_uri or sweep.tracking_uri, {run.key for run in sweep.runs}
    if path.suffix in (".yaml", ".yml") or os.sep in target:
        raise ReportError(f"no such sweep file: {target} (give a sweep YAML file or an MLflow experiment name)")
    return target, tracking_uri or tracking.resolve_uri(absolute=False), None


def _check_local_store(uri: str) -> None:
    """A SQLite URI must name an existing database: MLflow would otherwise create an empty one."""
    if tracking.missing_sqlite(uri):
        raise ReportError(f"no MLflow database at {tracking.sqlite_path(uri)} (tracking URI {uri}); "
                          f"pass --tracking-uri or set {tracking.ENV_TRACKING_URI}")


def log_report_run(client, experiment_id: str, files: list[Path], source: str) -> str:
    """A FINISHED run tagged ``normlab.kind=report`` (and no run_key) holding the report files."""
    run = client.create_run(experiment_id, run_name="regime-report",
                            tags={REPORT_TAG[0]: REPORT_TAG[1], "normlab.report_source": source})
    run_id = run.info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="report")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="normlab report",
        description="Regime figures (batch size, learning-rate stability, depth) of a sweep or MLflow experiment.")
    parser.add_argument("target", metavar="SWEEP_FILE_OR_EXPERIMENT",
                        help="a sweep YAML file (its experiment and tracking URI are used) or an experiment name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's, else "
                        f"${tracking.ENV_TRACKING_URI}, else {tracking.DEFAULT_TRACKING_URI})")
    parser.add_argument("--out", type=Path, help="output directory (default: reports/<experiment>)")
    parser.add_argument("--no-log", action="store_true", help="write the files only; log no report run to MLflow")
    args = parser.parse_args(argv)

    try:
        experiment_name, uri, sweep_keys = _resolve_target(args.target, args.tracking_uri)
        _check_local_store(uri)
        down = tracking.unreachable(uri)
        if down:
            raise ReportError(down)
        from mlflow.exceptions import MlflowException  # after the probe: seconds to import
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        try:
            experiment = client.get_experiment_by_name(experiment_name)
        except MlflowException as err:
            raise ReportError(f"cannot read experiments from {uri}: {err.message.splitlines()[0]}") from None
        if experiment is None:
            hint = "; has the sweep run yet?" if sweep_keys is not None else ""
            raise ReportError(f"no MLflow experiment named {experiment_name!r} at {uri}{hint}")
    except ReportError as err:
        print(f"normlab report: {err}", file=sys.stderr)
        return 2

    out = args.out or Path("reports") / re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"{out} is not writable")
    except OSError as err:
        print(f"normlab report: cannot write the report to {out}: {err.strerror or err}; pass --out DIR",
              file=sys.stderr)
        return 2
    try:
        records, notes = read_runs(client, experiment.experiment_id, sweep_keys)
    except MlflowException as err:
        print(f"normlab report: reading runs from {uri} failed: {err.message.splitlines()[0]}", file=sys.stderr)
        return 1
    sections, panel_notes, _ = build_report(records, out)
    studies, study_notes, _ = study_sections(records, out)
    notes += panel_notes + study_notes
    # the Fisher panel goes right after the stability panel it is read against
    after = next((i + 1 for i, s in enumerate(sections) if s.title == "Learning-rate stability"), len(sections))
    fisher = [s for s in studies if s.figure == FIGURE_FILES["fisher"]]
    sections = sections[:after] + fisher + sections[after:] + [s for s in studies if s not in fisher]
    n_seeds = len({r.seed for r in records})
    heading = f"normlab report: {experiment_name}"
    summary = (f"{len(records)} training run(s), {n_seeds} seed(s), from experiment {experiment_name!r} "
               f"at {uri}.")
    files = [out / s.figure for s in sections if s.figure]
    findings = report_stats.findings(batch_regime_data(records)[0], records)
    (out / "report.md").write_text(render_markdown(heading, summary, sections, notes, findings) + "\n")
    (out / "report.html").write_text(render_html(heading, summary, sections, notes, out, findings))
    files += [out / "report.md", out / "report.html"]

    for note in notes:
        print(f"note: {note}")
    print(f"report written to {out}/ ({', '.join(p.name for p in files)})")
    if not args.no_log:
        try:
            run_id = log_report_run(client, experiment.experiment_id, files, args.target)
        except MlflowException as err:
            print(f"normlab report: logging the report run to {uri} failed: {err.message.splitlines()[0]}",
                  file=sys.stderr)
            return 1
        print(f"logged as run {run_id} (tag {REPORT_TAG[0]}={REPORT_TAG[1]}) in experiment {experiment_name!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
