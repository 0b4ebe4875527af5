"""Learning-rate stability: per per-device batch, the norm x learning rate grid of final accuracy, each
run's outcome class marked in its cell (finished, diverged, collapsed, not learning: each its own mark
and legend entry), and per norm the largest stable learning rate with what bounds it: only diverged and
collapsed runs count as unstable; rates at which no seed ever learned are said, not hidden."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from cluster.report.panel import Panel, Table, figure, fmt, lr_label
from cluster.report.records import RunRecord
from trainer.outcome import OUTCOMES

FIGURE = "lr_stability.png"
TITLE = "Learning-rate stability"
# outcome class -> (Matplotlib marker, colour, legend text)
MARKS = {
    "finished": ("o", "white", "finished"),
    "diverged": ("X", "red", "diverged (loss blew up)"),
    "collapsed": ("v", "orange", "collapsed (learned, ended at chance)"),
    "not_learning": ("s", "silver", "not learning (never above chance)"),
}
assert tuple(MARKS) == OUTCOMES  # one mark per outcome class of the trainer


def lr_stability_data(records: list[RunRecord]) -> dict:
    """Per batch size, the norm x learning rate grid of final accuracy and outcomes.

    Returns ``{"lrs", "norms", "batch_sizes": {bs: {"cells": {(norm, lr): cell}, "largest_stable_lr":
    {norm: lr | None}, "limits": {norm: limit}}}}`` with ``cell = {"runs", "outcomes" (class -> count),
    "diverged", "unstable", "mean_acc"}`` (``mean_acc`` over the seeds that were not unstable, None if all
    were) and ``limit = {"lr", "seeds", "next_lr", "failed", "runs_there", "never_learned"}``: the next
    larger lr tried (None: none, so the largest stable lr is only a lower bound), how many of its runs
    diverged or collapsed, and the smallest lrs at which no seed learned.
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
            accs = [r.val_acc for r in runs if not r.unstable and r.val_acc is not None]
            outcomes = Counter(r.outcome for r in runs)
            cells[key] = {"runs": len(runs), "outcomes": dict(outcomes), "diverged": outcomes["diverged"],
                          "unstable": sum(r.unstable for r in runs),
                          "mean_acc": statistics.fmean(accs) if accs else None}
        largest, limits = {}, {}
        for norm in norms:
            tried = sorted(lr for (n, lr) in cells if n == norm)
            stable = [lr for lr in tried if cells[(norm, lr)]["unstable"] == 0]
            largest[norm] = max(stable) if stable else None
            limits[norm] = _limit(norm, tried, largest[norm], cells)
        per_batch[batch_size] = {"cells": cells, "largest_stable_lr": largest, "limits": limits}
    return {"lrs": lrs, "norms": norms, "batch_sizes": per_batch}


def _limit(norm: str, tried: list[float], largest: float | None, cells: dict) -> dict:
    above = [lr for lr in tried if largest is None or lr > largest]
    next_lr = above[0] if above else None
    never = []
    for lr in tried:  # from the smallest rate up, while no seed learned
        cell = cells[(norm, lr)]
        if cell["outcomes"].get("not_learning", 0) != cell["runs"]:
            break
        never.append(lr)
    return {"lr": largest, "seeds": cells[(norm, largest)]["runs"] if largest is not None else 0,
            "next_lr": next_lr, "failed": cells[(norm, next_lr)]["unstable"] if next_lr is not None else 0,
            "runs_there": cells[(norm, next_lr)]["runs"] if next_lr is not None else 0, "never_learned": never}


def limit_sentence(norm: str, batch_size: int, limit: dict) -> str:
    where = f"{norm} at per-device batch {batch_size}"
    never = ""
    if limit["never_learned"]:
        rates = ", ".join(lr_label(lr) for lr in limit["never_learned"])
        never = f"; at lr {rates} no seed ever learned (stable, but not learning)"
    if limit["lr"] is None:
        return f"{where}: no stable learning rate: every rate tried diverged or collapsed in some seed{never}."
    stable = f"{where}: largest stable lr {lr_label(limit['lr'])} ({limit['seeds']} seeds, none diverged or collapsed)"
    if limit["next_lr"] is None:
        return f"{stable}; no larger rate was tried, so it is a lower bound of the limit{never}."
    return (f"{stable}; the limit lies below {lr_label(limit['next_lr'])}, where {limit['failed']} of "
            f"{limit['runs_there']} seeds diverged or collapsed{never}.")


def plot(data: dict, path: Path) -> dict:
    """One heat map per batch size; returns ``{bs: {"acc": rows of floats/None, "marked": [(norm, lr)],
    "marks": {outcome: [(norm, lr, count)]}, "largest_stable_lr": {norm: lr}, "legend": [(label, marker)]}}``
    exactly as drawn (the legend, one for the figure, lists every outcome class)."""
    norms, lrs, per_batch = data["norms"], data["lrs"], data["batch_sizes"]
    fig, axes = figure(max(4.0, 1.0 + 0.9 * len(lrs)) * len(per_batch), 1.6 + 0.6 * len(norms), len(per_batch))
    drawn: dict = {}
    image = None
    for ax, (batch_size, grid) in zip(axes, per_batch.items(), strict=True):
        acc = [[None if (cell := grid["cells"].get((norm, lr))) is None else cell["mean_acc"] for lr in lrs]
               for norm in norms]
        image = ax.imshow([[math.nan if v is None else v for v in row] for row in acc],
                          vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        marked, marks = [], {outcome: [] for outcome in MARKS}
        for i, norm in enumerate(norms):
            for j, lr in enumerate(lrs):
                cell = grid["cells"].get((norm, lr))
                if cell is None:
                    continue
                if cell["unstable"]:
                    marked.append((norm, lr))
                if cell["mean_acc"] is not None:
                    ax.text(j, i - 0.2, f"{cell['mean_acc']:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if cell["mean_acc"] > 0.6 else "white")  # readable on viridis
                present = [o for o in MARKS if cell["outcomes"].get(o)]
                for k, outcome in enumerate(present):  # one mark per class in the cell, with its count
                    x = j + (k - (len(present) - 1) / 2) * 0.3
                    marker, colour, _ = MARKS[outcome]
                    ax.scatter([x - 0.05], [i + 0.22], marker=marker, s=40, c=colour, edgecolors="black",
                               linewidths=0.6)
                    ax.text(x + 0.05, i + 0.22, str(cell["outcomes"][outcome]), fontsize=7, va="center",
                            ha="left", color="black")
                    marks[outcome].append((norm, lr, cell["outcomes"][outcome]))
            best = grid["largest_stable_lr"][norm]
            if best is not None:
                ax.add_patch(_outline(lrs.index(best), i))
        ax.set_xticks(range(len(lrs)), [lr_label(lr) for lr in lrs])
        ax.set_yticks(range(len(norms)), norms)
        ax.set_xlim(-0.5, len(lrs) - 0.5)
        ax.set_ylim(len(norms) - 0.5, -0.5)
        ax.set_xlabel("learning rate")
        ax.set_title(f"per-device batch {batch_size}")
        drawn[batch_size] = {"acc": acc, "marked": marked, "marks": marks,
                             "largest_stable_lr": dict(grid["largest_stable_lr"])}
    fig.colorbar(image, ax=list(axes), label="final val_acc (stable seeds)")
    handles = [axes[0].scatter([], [], marker=m, s=40, c=c, edgecolors="black", linewidths=0.6, label=label)
               for m, c, label in MARKS.values()]
    legend = fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
                        title="outcome of each seed (mark, number of seeds)")
    entries = [(text.get_text(), marker)
               for text, (marker, _, _) in zip(legend.get_texts(), MARKS.values(), strict=True)]
    for batch_drawn in drawn.values():
        batch_drawn["legend"] = entries  # the figure's one legend, seen from each of its maps
    fig.suptitle("Learning-rate stability; black box: largest stable lr (no seed diverged or collapsed)")
    fig.savefig(path, dpi=110)
    return drawn


def _outline(col: int, row: int):
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=3)


def panel(records: list[RunRecord], out: Path) -> Panel:
    lrs = sorted({r.lr for r in records})
    if len(lrs) < 2:
        return Panel("lr", TITLE, notes=[f"one learning rate ({lr_label(lrs[0])}): no learning-rate stability panel"])
    data = lr_stability_data(records)
    result = Panel("lr", TITLE, figure=FIGURE, data=data, plotted=plot(data, out / FIGURE))
    cells, largest = [], []
    for batch_size, grid in data["batch_sizes"].items():
        for (norm, lr), cell in sorted(grid["cells"].items()):
            counts = cell["outcomes"]
            cells.append([norm, str(batch_size), lr_label(lr), str(cell["runs"]), str(counts.get("diverged", 0)),
                          str(counts.get("collapsed", 0)), str(counts.get("not_learning", 0)), fmt(cell["mean_acc"])])
        for norm, limit in grid["limits"].items():
            largest.append([norm, str(batch_size), "none" if limit["lr"] is None else lr_label(limit["lr"]),
                            str(limit["seeds"]), "–" if limit["next_lr"] is None else lr_label(limit["next_lr"]),
                            "–" if limit["next_lr"] is None else f"{limit['failed']}/{limit['runs_there']}",
                            ", ".join(lr_label(lr) for lr in limit["never_learned"]) or "–"])
            result.findings.append(limit_sentence(norm, batch_size, limit))
    largest.sort(key=lambda row: row[0])  # per norm, batch sizes ascending (sort is stable)
    result.tables = [
        Table("Largest stable learning rate", ["norm", "batch", "largest stable lr", "seeds", "next lr tried",
                                                "unstable there", "never learned at"], largest),
        Table("Final accuracy by learning rate", ["norm", "batch", "lr", "runs", "diverged", "collapsed",
                                                  "not learning", "val acc mean"], cells),
    ]
    return result
