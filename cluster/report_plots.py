"""The regime report's figures: one function per panel, each drawing the data an aggregation of
:mod:`cluster.report` returns into a PNG and returning what it plotted (the tests compare that with the
logged values). Matplotlib is imported inside :func:`_figure`: a report with no runs does not pay for it.
"""

from __future__ import annotations

import math
from pathlib import Path

from cluster import report_stats

# ---------------------------------------------------------------- figures (matplotlib, Agg canvas)


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def lr_label(lr: float) -> str:
    return f"{lr:g}"


def plot_batch_regimes(data: dict, path: Path) -> dict:
    """Validation error vs per-device batch size; returns the plotted series ``{norm: (x, y, std)}``."""
    fig, (ax,) = _figure(7, 4.5)
    plotted = {}
    for norm, points in data.items():
        x = [p["batch_size"] for p in points]
        y = [p["mean_error"] for p in points]
        std = [p["std_error"] for p in points]
        (line,) = ax.plot(x, y, marker="o", label=norm)
        band = [p.get("ci_half") for p in points]  # the 95% t interval over seeds
        spread = [(xi, yi, si) for xi, yi, si in zip(x, y, band, strict=True) if si is not None]
        if spread:
            sx, sy, ss = zip(*spread, strict=True)
            ax.fill_between(sx, [a - b for a, b in zip(sy, ss, strict=True)],
                            [a + b for a, b in zip(sy, ss, strict=True)], color=line.get_color(), alpha=0.2)
        plotted[norm] = (x, y, std)
    ax.set_xscale("log", base=2)
    ticks = sorted({p["batch_size"] for points in data.values() for p in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("per-device batch size")
    ax.set_ylabel("validation error (1 - val_acc)")
    ax.set_title(f"Batch-size regimes (mean, {report_stats.INTERVAL_NAME} over seeds, best stable lr per point)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="norm")
    fig.savefig(path, dpi=110)
    return plotted


def plot_lr_stability(data: dict, path: Path) -> dict:
    """One heat map per batch size; returns ``{bs: {"acc": rows of floats/None, "marked": [(norm, lr)],
    "largest_stable_lr": {norm: lr}}}`` exactly as drawn."""
    norms, lrs, per_batch = data["norms"], data["lrs"], data["batch_sizes"]
    fig, axes = _figure(max(4.0, 1.0 + 0.9 * len(lrs)) * len(per_batch), 1.2 + 0.6 * len(norms), len(per_batch))
    drawn = {}
    image = None
    for ax, (batch_size, grid) in zip(axes, per_batch.items(), strict=True):
        acc = [[_cell_acc(grid["cells"].get((norm, lr))) for lr in lrs] for norm in norms]
        image = ax.imshow([[math.nan if v is None else v for v in row] for row in acc],
                          vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        marked = []
        for i, norm in enumerate(norms):
            for j, lr in enumerate(lrs):
                cell = grid["cells"].get((norm, lr))
                if cell is None:
                    continue
                if cell["diverged"]:
                    marked.append((norm, lr))
                    ax.text(j, i, f"× {cell['diverged']}/{cell['runs']}", ha="center", va="center",
                            color="red", fontweight="bold")
                elif cell["mean_acc"] is not None:
                    ax.text(j, i, f"{cell['mean_acc']:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if cell["mean_acc"] > 0.6 else "white")  # readable on viridis
            best = grid["largest_stable_lr"][norm]
            if best is not None:
                ax.add_patch(_outline(lrs.index(best), i))
        ax.set_xticks(range(len(lrs)), [lr_label(lr) for lr in lrs])
        ax.set_yticks(range(len(norms)), norms)
        ax.set_xlabel("learning rate")
        ax.set_title(f"per-device batch {batch_size}")
        drawn[batch_size] = {"acc": acc, "marked": marked, "largest_stable_lr": dict(grid["largest_stable_lr"])}
    fig.colorbar(image, ax=list(axes), label="final val_acc")
    fig.suptitle("Learning-rate stability\n× k/n: k of n seeds diverged or ended at chance\n"
                 "black box: largest stable lr")
    fig.savefig(path, dpi=110)
    return drawn


def _cell_acc(cell: dict | None) -> float | None:
    return None if cell is None else cell["mean_acc"]


def _outline(col: int, row: int):
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=3)


def plot_depth(data: dict, path: Path) -> dict:
    """Activation std and gradient norm per layer, one line per norm at the end (solid) and, where the
    probes have step-0 values, at initialisation (dashed); returns ``{norm: {stat: (x, y)}}`` with
    ``stat`` in act_std, grad_norm, act_std_init, grad_norm_init."""
    fig, (ax_act, ax_grad) = _figure(10, 4, 2)
    drawn = {}
    for norm, line in data["norms"].items():
        drawn[norm] = {}
        for ax, stat in ((ax_act, "act_std"), (ax_grad, "grad_norm")):
            color = None
            for key, style, label in ((stat, "-", norm), (f"{stat}_init", "--", f"{norm} (init)")):
                values = line.get(key, [None] * len(line["layers"]))
                points = [(i, v) for i, v in zip(line["layers"], values, strict=True) if v is not None]
                if points:
                    x, y = zip(*points, strict=True)
                    (drawn_line,) = ax.plot(x, y, style, marker="o", label=label, color=color)
                    color = drawn_line.get_color()  # the init line in its norm's colour
                    drawn[norm][key] = (list(x), list(y))
    layers = sorted({i for line in data["norms"].values() for i in line["layers"]})
    for ax, label in ((ax_act, "activation std"), (ax_grad, "gradient norm")):
        if len(layers) <= 24:  # deeper nets (ResNet-110: 111 layers) keep matplotlib's own integer ticks
            ax.set_xticks(layers)
        ax.set_xlabel("layer (depth index)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(title="norm")
    grad_values = [y for stats in drawn.values() for key in ("grad_norm", "grad_norm_init")
                   for y in stats.get(key, ((), ()))[1]]
    if grad_values and min(grad_values) > 0:  # gradient norms span decades across depth
        ax_grad.set_yscale("log")
    act_values = [y for stats in drawn.values() for key in ("act_std", "act_std_init")
                  for y in stats.get(key, ((), ()))[1]]
    if act_values and min(act_values) > 0 and max(act_values) > 50 * min(act_values):  # unnormalised nets blow up
        ax_act.set_yscale("log")
    fig.suptitle(f"Depth statistics at per-device batch {data['batch_size']}, lr {lr_label(data['lr'])}")
    fig.savefig(path, dpi=110)
    return drawn


def plot_concentration(data: dict, path: Path) -> dict:
    """Bars of the mean concentration at initialisation per norm (min-max whiskers); returns ``{norm: mean}``."""
    fig, (ax,) = _figure(max(4.0, 1.2 * len(data)), 3.5)
    norms = list(data)
    means = [data[n]["mean"] for n in norms]
    low = [data[n]["mean"] - data[n]["min"] for n in norms]
    high = [data[n]["max"] - data[n]["mean"] for n in norms]
    ax.bar(range(len(norms)), means, yerr=[low, high], capsize=4)
    ax.set_xticks(range(len(norms)), norms)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of the logit-gradient norm\non the most-affected class")
    fig.suptitle("Output-gradient concentration at initialisation\n(bars: mean, whiskers: min-max)")
    fig.savefig(path, dpi=110)
    return dict(zip(norms, means, strict=True))


def plot_fisher(data: dict, path: Path) -> dict:
    """Predicted lr_max (GD, heavy-ball) and the largest stable lr observed per (norm, batch), log scale;
    returns ``{(norm, batch): {"lr_max", "lr_max_momentum", "largest_stable_lr"}}``."""
    fig, (ax,) = _figure(max(5.0, 1.1 * len(data)), 4)
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
