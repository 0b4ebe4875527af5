"""Batch-size regimes: validation error against per-device batch size, one line per norm, each point the
mean over seeds at the learning rate that did best there, with its 95% t interval; the paired norm
comparisons (the report's first findings) and each norm's regime boundary, the smallest per-device
batch from which on it is not significantly worse than at its best batch."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from cluster.report import stats
from cluster.report.panel import Panel, Table, figure, fmt, lr_label
from cluster.report.records import RunRecord
from normlayers.catalog import VARIANTS

FIGURE = "batch_regimes.png"
TITLE = "Batch-size regimes"


def batch_regime_data(records: list[RunRecord]) -> tuple[dict, list[str]]:
    """Validation error per (norm, batch size) over seeds, at the best learning rate with no unstable seed.

    Returns ``{norm: [{"batch_size", "lr", "seeds", "mean_error", "std_error", "ci_half"}, ...]}`` sorted
    by batch size (``std_error`` and ``ci_half`` None with one seed) and notes on points that could not be made.
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
        # A learning rate that diverged or collapsed in any seed is not a usable setting for this point.
        stable = [(lr, runs) for lr, runs in candidates if not any(r.unstable for r in runs)]
        if not stable:
            notes.append(f"{norm} at per-device batch {batch_size}: each lr diverged in some seed: no point")
            continue
        scored = [([1.0 - r.val_acc for r in runs], lr) for lr, runs in stable]
        errors, lr = min(scored, key=lambda item: (statistics.fmean(item[0]), item[1]))
        mean = statistics.fmean(errors)
        std = statistics.stdev(errors) if len(errors) > 1 else None
        data.setdefault(norm, []).append({"batch_size": batch_size, "lr": lr, "seeds": len(errors),
                                          "mean_error": mean, "std_error": std,
                                          "ci_half": stats.t_half_width(errors)})
    return data, notes


def point_errors(records, norm: str, batch_size: int, lr: float) -> dict[int, float]:
    """``{seed: validation error}`` of the runs making one batch-regime point."""
    return {r.seed: 1.0 - r.val_acc for r in records
            if r.norm == norm and r.batch_size == batch_size and r.lr == lr and not r.unstable}


def batch_independent(norm: str) -> bool:
    """Whether a norm label names a variant whose training output never mixes samples (gn, ln, frn, none...):
    its error does not depend on the per-device batch. Labels with a preconditioner (``+bnp``, ``bnp``) or
    unknown names count as batch-dependent."""
    variant = VARIANTS.get(norm.split(":", 1)[0])
    return "+" not in norm and variant is not None and not variant.batch_dependent


def flat_norms(regimes: dict) -> dict[str, dict]:
    """Batch-independent norms run at one per-device batch: their one point stands for every batch size."""
    return {norm: points[0] for norm, points in regimes.items() if len(points) == 1 and batch_independent(norm)}


def comparisons(regimes: dict, records) -> list[stats.Comparison]:
    """Every pair of norms at every shared batch size, paired on shared seeds, resolved ones first; a
    batch-independent norm run at one batch is compared at each batch size of the other norm."""
    flat = flat_norms(regimes)
    found = []
    for norm_a, norm_b in combinations(sorted(regimes), 2):
        at_a = {p["batch_size"]: p for p in regimes[norm_a]}
        at_b = {p["batch_size"]: p for p in regimes[norm_b]}
        if norm_a in flat and norm_b not in flat:
            at_a = dict.fromkeys(at_b, flat[norm_a])
        elif norm_b in flat and norm_a not in flat:
            at_b = dict.fromkeys(at_a, flat[norm_b])
        for batch_size in sorted(set(at_a) & set(at_b)):
            pa, pb = at_a[batch_size], at_b[batch_size]
            c = stats.compare(norm_a, point_errors(records, norm_a, pa["batch_size"], pa["lr"]),
                              norm_b, point_errors(records, norm_b, pb["batch_size"], pb["lr"]), batch_size)
            if c is not None:
                found.append(c)
    found.sort(key=lambda c: (not c.resolved, c.batch_size, c.worse, c.better))
    return found


UNRESOLVED_TITLE = "Differences between norms not resolved at their number of seeds"


def findings(regimes: dict, records) -> tuple[list[str], list[stats.Comparison]]:
    """The Findings sentences of the resolved norm comparisons, and the unresolved comparisons, which the
    panel counts in one sentence and tabulates instead of stating each."""
    if not regimes:
        return [], []
    if max(p["seeds"] for points in regimes.values() for p in points) < 2:
        return ["One seed per setting: no confidence interval can be given, so no difference between norms "
                "is stated as a finding; run at least 2 seeds (5 to resolve small gaps)."], []
    found = comparisons(regimes, records)
    return [c.sentence() for c in found if c.resolved], [c for c in found if not c.resolved]


def unresolved_table(unresolved: list[stats.Comparison]) -> Table:
    return Table(UNRESOLVED_TITLE, ["batch", "higher error", "lower error", "difference", f"{stats.INTERVAL_NAME} ±",
                                    "seeds"],
                 [[str(c.batch_size), c.worse, c.better, fmt(c.difference),
                   "–" if c.half_width is None else fmt(c.half_width), str(c.seeds)] for c in unresolved])


@dataclass(frozen=True)
class Boundary:
    """Where a norm's regime begins: from ``batch_size`` up it is not significantly worse than at ``best``."""

    norm: str
    best: int  # the per-device batch with the lowest mean error
    batch_size: int  # the smallest batch from which on no batch is significantly worse than the best
    below: stats.Comparison | None  # the next smaller batch against the best: resolved worse (None: none tried)
    seeds: int  # the fewest shared seeds of the comparisons the boundary rests on

    def sentence(self) -> str:
        start = f"{self.norm}: not significantly worse than at its best per-device batch ({self.best})"
        evidence = f"paired 95% t interval, {self.seeds} seeds"
        if self.below is None:
            return f"{start} down to the smallest batch tried, {self.batch_size} ({evidence})."
        worse = self.below
        return (f"{start} from per-device batch {self.batch_size} up; at {worse.batch_size} it is worse by "
                f"{100 * worse.difference:.1f} ± {100 * worse.half_width:.1f} points ({evidence}): the regime "
                f"boundary lies between {worse.batch_size} and {self.batch_size}.")


def boundaries(regimes: dict, records) -> tuple[list[Boundary], list[str]]:
    """Each norm's regime boundary (norms with >= 2 batch sizes and >= 2 shared seeds), and notes on the others."""
    out, notes = [], []
    for norm, points in regimes.items():
        if len(points) < 2:
            continue  # a batch-independent norm run at one batch: nothing to bound
        best = min(points, key=lambda p: (p["mean_error"], -p["batch_size"]))
        best_errors = point_errors(records, norm, best["batch_size"], best["lr"])
        boundary, below, seeds = best["batch_size"], None, best["seeds"]
        smaller = sorted((p for p in points if p["batch_size"] < best["batch_size"]), key=lambda p: -p["batch_size"])
        for p in smaller:  # down from the best batch until one is significantly worse
            c = stats.compare(norm, point_errors(records, norm, p["batch_size"], p["lr"]),
                              f"{norm} at {best['batch_size']}", best_errors, p["batch_size"])
            if c is None or c.half_width is None:
                seeds = 1
                break
            seeds = min(seeds, c.seeds)
            if c.resolved and c.worse == norm:
                below = c
                break
            boundary = p["batch_size"]
        if seeds < 2:
            notes.append(f"{norm}: fewer than 2 shared seeds between batch sizes: no regime boundary can be given")
            continue
        out.append(Boundary(norm, best["batch_size"], boundary, below, seeds))
    return out, notes


def plot(data: dict, path: Path) -> dict:
    """Validation error vs per-device batch size; returns the plotted series ``{norm: (x, y, std)}``."""
    fig, (ax,) = figure(7, 4.5)
    plotted = {}
    flat = flat_norms(data)
    span = sorted({p["batch_size"] for points in data.values() for p in points})
    for norm, points in data.items():
        if norm in flat and len(span) > 1:  # batch-independent: one run stands for every per-device batch
            points = [{**flat[norm], "batch_size": b} for b in (span[0], span[-1])]
        x = [p["batch_size"] for p in points]
        y = [p["mean_error"] for p in points]
        (line,) = ax.plot(x, y, marker="" if norm in flat else "o", linestyle="--" if norm in flat else "-",
                          label=f"{norm} (batch-independent)" if norm in flat else norm)
        band = [(p["batch_size"], p["mean_error"], p["ci_half"]) for p in points if p["ci_half"] is not None]
        if band:
            bx, by, bh = zip(*band, strict=True)
            ax.fill_between(bx, [a - b for a, b in zip(by, bh, strict=True)],
                            [a + b for a, b in zip(by, bh, strict=True)], color=line.get_color(), alpha=0.2)
        plotted[norm] = (x, y, [p["std_error"] for p in points])
    ax.set_xscale("log", base=2)
    ticks = sorted({p["batch_size"] for points in data.values() for p in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("per-device batch size")
    ax.set_ylabel("validation error (1 - val_acc)")
    ax.set_title(f"Batch-size regimes (mean, {stats.INTERVAL_NAME} over seeds, best stable lr per point)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="norm")
    fig.savefig(path, dpi=110)
    return plotted


def panel(records: list[RunRecord], out: Path) -> Panel:
    regimes, notes = batch_regime_data(records)
    batch_sizes = sorted({r.batch_size for r in records})
    if len(batch_sizes) == 1:
        notes.append(f"one per-device batch size ({batch_sizes[0]}): the batch-regime panel has one point per norm")
    result = Panel("batch", TITLE, notes=notes, data=regimes)
    if not regimes:
        return result
    flat = flat_norms(regimes)
    if flat and len(batch_sizes) > 1:
        notes.append(f"{', '.join(sorted(flat))}: no statistic mixes samples, so the error does not depend on the "
                     f"per-device batch; each ran at one batch size, is drawn as a dashed flat line and is compared "
                     f"with the other norms at every per-device batch")
    result.plotted = plot(regimes, out / FIGURE)
    result.figure = FIGURE
    rows = [[norm, str(p["batch_size"]), lr_label(p["lr"]), str(p["seeds"]), fmt(p["mean_error"]),
             fmt(p["std_error"]), fmt(p["ci_half"])] for norm, points in regimes.items() for p in points]
    result.tables.append(Table("Validation error by per-device batch size",
                               ["norm", "batch", "lr", "seeds", "val error mean", "val error std",
                                f"{stats.INTERVAL_NAME} ±"], rows))
    result.findings, unresolved = findings(regimes, records)
    if max(p["seeds"] for points in regimes.values() for p in points) >= 2:
        found, boundary_notes = boundaries(regimes, records)
        result.notes += boundary_notes
        result.findings += [b.sentence() for b in found]
        if found:
            title = "Regime boundary (smallest per-device batch not significantly worse than the best)"
            result.tables.append(Table(title, [
                "norm", "best batch", "boundary batch", "next smaller batch", "worse there by", "seeds"],
                [[b.norm, str(b.best), str(b.batch_size), "–" if b.below is None else str(b.below.batch_size),
                  "–" if b.below is None else f"{fmt(b.below.difference)} ± {fmt(b.below.half_width)}", str(b.seeds)]
                 for b in found]))
    if unresolved:
        result.findings.append(f"{len(unresolved)} other difference(s) between norms are not resolved at their "
                               f"number of seeds (table '{UNRESOLVED_TITLE}').")
        result.tables.append(unresolved_table(unresolved))
    return result
