"""The Fisher-predicted maximal learning rate (Wei et al. 2019) beside the largest stable one observed:
``fisher/lr_max`` = 2 / lambda_max of the Fisher matrix at initialisation (with momentum mu,
2 (1 + mu) / lambda_max), per norm and per-device batch. Placed right after the stability panel it is
read against (the report's panel order, :data:`cluster.report.build.PANELS`)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from cluster.report.panel import Panel, Table, figure, fmt, lr_label, mean_of
from cluster.report.records import RunRecord
from cluster.report.stability import lr_stability_data

FIGURE = "fisher_lr.png"
TITLE = "Fisher-predicted maximal learning rate"


def fisher_data(records: list[RunRecord]) -> dict:
    """Per (norm, batch size): the Fisher probe at initialisation (means over runs) and the largest stable
    lr observed. ``{(norm, batch): {"runs", "lambda_max", "lr_max", "lr_max_momentum", "largest_stable_lr",
    "any_diverged"}}``; ``largest_stable_lr`` is None when every lr was unstable, and only a lower bound of
    the true limit when no lr was (``any_diverged`` False: no run diverged or collapsed)."""
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
            "lr_max": mean_of([r.initial.get("fisher/lr_max") for r in runs]),
            "lr_max_momentum": mean_of([r.initial.get("fisher/lr_max_momentum") for r in runs]),
            "largest_stable_lr": stability[batch_size]["largest_stable_lr"].get(norm),
            "any_diverged": any(r.unstable for r in same),
        }
    return data


def plot(data: dict, path: Path) -> dict:
    """Predicted lr_max (GD, heavy-ball) and the largest stable lr observed per (norm, batch), log scale;
    returns ``{(norm, batch): {"lr_max", "lr_max_momentum", "largest_stable_lr"}}``."""
    fig, (ax,) = figure(max(5.0, 1.1 * len(data)), 4)
    drawn = {}
    labels = []
    for x, ((norm, batch_size), point) in enumerate(data.items()):
        labels.append(f"{norm}\nbatch {batch_size}")
        drawn[(norm, batch_size)] = {k: point[k] for k in ("lr_max", "lr_max_momentum", "largest_stable_lr")}
        for key, marker, color, label in (("lr_max", "v", "tab:blue", "2 / lambda_max (GD)"),
                                          ("lr_max_momentum", "^", "tab:cyan", "2 (1 + mu) / lambda_max"),
                                          ("largest_stable_lr", "s", "black", "largest stable lr observed")):
            if point[key] is not None:
                ax.scatter([x], [point[key]], marker=marker, color=color, s=60, label=label if x == 0 else None)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.suptitle("Largest lr: Fisher prediction at init vs observed")
    fig.savefig(path, dpi=110)
    return drawn


def panel(records: list[RunRecord], out: Path) -> Panel:
    data = fisher_data(records)
    if not data:
        return Panel("fisher", TITLE, notes=["no run logged fisher/lambda_max at step 0 "
                                             "(probes.fisher_every_n_steps > 0): no Fisher learning-rate panel"])
    rows = []
    for (norm, batch_size), point in data.items():
        stable = point["largest_stable_lr"]
        observed = "none" if stable is None else ("" if point["any_diverged"] else ">= ") + lr_label(stable)
        rows.append([norm, str(batch_size), str(point["runs"]), fmt(point["lambda_max"]), fmt(point["lr_max"]),
                     fmt(point["lr_max_momentum"]), observed])
    notes = []
    if any(not p["any_diverged"] for p in data.values()):
        notes.append("where no learning rate diverged, the largest stable lr observed is only a lower bound (>=)")
    return Panel("fisher", TITLE, figure=FIGURE, data=data, plotted=plot(data, out / FIGURE), notes=notes, tables=[
        Table("Fisher lambda_max at initialisation and the learning rates", [
            "norm", "batch", "runs", "lambda_max", "lr_max (2/lambda)", "lr_max momentum", "largest stable lr"],
            rows)])
