"""Train/test inconsistency of batch statistics: the final weights' validation error by per-device batch
when the norm layers use their running (EMA) statistics, precise (population) statistics recomputed
over training batches, or each validation batch's own (``val_acc/<kind>`` from ``eval.norm_stats``),
per norm, at the batch-regime point's learning rate. The gaps are compared on the same runs (each run
is evaluated all three ways), so the intervals are paired over seeds."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from cluster.report import stats
from cluster.report.batch import batch_regime_data
from cluster.report.panel import Panel, Table, figure, fmt, lr_label
from cluster.report.records import NORM_STATS, RunRecord

FIGURE = "norm_stats.png"
TITLE = "Train/test inconsistency: running, precise and batch statistics"


def inconsistency_data(records: list[RunRecord]) -> dict:
    """``{norm: [{"batch_size", "lr", "errors": {kind: {seed: error}}, "mean": {kind: mean}, "ci_half":
    {kind: half width or None}}]}`` for the norms whose runs were evaluated beyond running statistics."""
    regimes, _ = batch_regime_data(records)
    evaluated = defaultdict(list)
    for r in records:
        if set(r.by_stats) - {"running"} and not r.unstable:
            evaluated[(r.norm, r.batch_size, r.lr)].append(r)
    data: dict[str, list[dict]] = {}
    for norm, points in regimes.items():
        for p in points:
            runs = evaluated.get((norm, p["batch_size"], p["lr"]))
            if not runs:
                continue
            errors = {kind: {r.seed: 1.0 - r.by_stats[kind] for r in runs if kind in r.by_stats} for kind in NORM_STATS}
            errors = {kind: by_seed for kind, by_seed in errors.items() if by_seed}
            data.setdefault(norm, []).append({
                "batch_size": p["batch_size"], "lr": p["lr"], "errors": errors,
                "mean": {kind: statistics.fmean(e.values()) for kind, e in errors.items()},
                "ci_half": {kind: stats.t_half_width(list(e.values())) for kind, e in errors.items()}})
    return data


def findings(data: dict) -> list[str]:
    """Running against precise and against batch statistics at each point, paired over the runs' seeds:
    the resolved differences, and how many were not resolved."""
    resolved, unresolved = [], 0
    for norm, points in data.items():
        for p in points:
            running = p["errors"].get("running")
            for kind in ("precise", "batch"):
                other = p["errors"].get(kind)
                if running is None or other is None:
                    continue
                c = stats.compare(f"{norm} with running statistics", running, f"{norm} with {kind} statistics",
                                  other, p["batch_size"])
                if c is not None and c.resolved:
                    resolved.append(c.sentence())
                elif c is not None:
                    unresolved += 1
    if unresolved:
        resolved.append(f"{unresolved} other running-vs-precise/batch statistics difference(s) are not resolved "
                        "at their number of seeds (see the table).")
    return resolved


def plot(data: dict, path: Path) -> dict:
    """One plot per norm: error against per-device batch, one line per kind of statistics with its 95% t
    band; returns ``{norm: {kind: (x, y)}}`` as drawn."""
    norms = list(data)
    fig, axes = figure(3.6 * len(norms), 3.4, len(norms))
    drawn = {}
    for ax, norm in zip(axes, norms, strict=True):
        drawn[norm] = {}
        for kind in NORM_STATS:
            points = [(p["batch_size"], p["mean"][kind], p["ci_half"][kind]) for p in data[norm] if kind in p["mean"]]
            if not points:
                continue
            x, y, half = zip(*points, strict=True)
            (line,) = ax.plot(x, y, marker="o", label=kind)
            band = [(a, b, h) for a, b, h in points if h is not None]
            if band:
                bx, by, bh = zip(*band, strict=True)
                ax.fill_between(bx, [a - h for a, h in zip(by, bh, strict=True)],
                                [a + h for a, h in zip(by, bh, strict=True)], color=line.get_color(), alpha=0.2)
            drawn[norm][kind] = (list(x), list(y))
        ax.set_xscale("log", base=2)
        ticks = sorted({p["batch_size"] for p in data[norm]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("per-device batch size")
        ax.set_title(norm)
        ax.grid(True, alpha=0.3)
        ax.legend(title="statistics", fontsize=8)
    axes[0].set_ylabel("validation error")
    fig.suptitle(f"Validation error under running, precise and batch statistics (mean, {stats.INTERVAL_NAME})")
    fig.savefig(path, dpi=110)
    return drawn


def panel(records: list[RunRecord], out: Path) -> Panel:
    data = inconsistency_data(records)
    if not data:
        return Panel("norm_stats", TITLE, notes=[
            "no run was evaluated with precise or batch statistics (eval.norm_stats): no train/test "
            "inconsistency panel"])
    rows = []
    for norm, points in data.items():
        for p in points:
            seeds = max(len(e) for e in p["errors"].values())
            cells = [f"{fmt(p['mean'][k])} ± {fmt(p['ci_half'][k])}" if k in p["mean"] else "–" for k in NORM_STATS]
            rows.append([norm, str(p["batch_size"]), lr_label(p["lr"]), str(seeds), *cells])
    return Panel("norm_stats", TITLE, figure=FIGURE, data=data, plotted=plot(data, out / FIGURE),
                 findings=findings(data), tables=[
                     Table(f"Validation error by statistics (mean ± {stats.INTERVAL_NAME})",
                           ["norm", "batch", "lr", "seeds", *(f"{k} statistics" for k in NORM_STATS)], rows)])
