"""Depth and initialisation studies (Bjorck et al. 2018): activation std and gradient norm per layer at
the end of training and at initialisation (the probes' step-0 values), one line per norm at one setting;
and the output-gradient concentration at initialisation per norm (``probe/grad_concentration`` at step
0: the share of the logit-gradient norm on the single most-affected class)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from cluster.report.panel import Panel, Table, figure, fmt, lr_label, mean_of
from cluster.report.records import CONCENTRATION, RunRecord

FIGURE, CONCENTRATION_FIGURE = "depth_stats.png", "grad_concentration.png"
CONCENTRATION_TITLE = "Output-gradient concentration at initialisation"


def depth_setting(records: list[RunRecord]) -> tuple[int, float] | None:
    """The (batch size, lr) of the depth panel: where the most norms have finished probe runs; ties go
    to the setting whose probe runs reached the best mean val_acc (in an lr sweep: where the nets
    trained, not where they barely moved or failed), then the smallest batch and lr. None without probe runs."""
    norms_at, accs = defaultdict(set), defaultdict(list)
    for r in records:
        if (r.act_std or r.grad_norm) and not r.unstable:
            norms_at[(r.batch_size, r.lr)].add(r.norm)
            if r.val_acc is not None:
                accs[(r.batch_size, r.lr)].append(r.val_acc)
    if not norms_at:
        return None
    return min(norms_at, key=lambda key: (-len(norms_at[key]), -statistics.fmean(accs[key] or [0.0]), key))


def depth_data(records: list[RunRecord]) -> dict | None:
    """Per-layer activation std and gradient norm per norm, averaged over seeds, at :func:`depth_setting`'s
    one (batch size, learning rate), so the lines compare norms and nothing else. None without probe runs."""
    setting = depth_setting(records)
    if setting is None:
        return None
    batch_size, lr = setting
    probed = [r for r in records if (r.act_std or r.grad_norm) and not r.unstable
              and (r.batch_size, r.lr) == setting]
    lines = {}
    for norm in sorted({r.norm for r in probed}):
        runs = [r for r in probed if r.norm == norm]
        layers = sorted({i for r in runs for i in (*r.act_std, *r.grad_norm)})
        names = {i: name for r in runs for i, name in r.layer_names.items()}
        lines[norm] = {
            "layers": layers,
            "names": [names[i] for i in layers],
            "act_std": [mean_of([r.act_std.get(i) for r in runs]) for i in layers],
            "grad_norm": [mean_of([r.grad_norm.get(i) for r in runs]) for i in layers],
            "act_std_init": [mean_of([_initial_probe(r, "act_std", i) for r in runs]) for i in layers],
            "grad_norm_init": [mean_of([_initial_probe(r, "grad_norm", i) for r in runs]) for i in layers],
            "runs": len(runs),
        }
    return {"batch_size": batch_size, "lr": lr, "norms": lines}


def _initial_probe(record: RunRecord, stat: str, layer: int) -> float | None:
    name = record.layer_names.get(layer)
    return None if name is None else record.initial.get(f"probe/{stat}/{layer:03d}_{name}")


def plot_depth(data: dict, path: Path) -> dict:
    """Activation std and gradient norm per layer, one line per norm at the end (solid) and, where the
    probes have step-0 values, at initialisation (dashed); returns ``{norm: {stat: (x, y)}}`` with
    ``stat`` in act_std, grad_norm, act_std_init, grad_norm_init."""
    fig, (ax_act, ax_grad) = figure(10, 4, 2)
    drawn = {}
    for norm, line in data["norms"].items():
        drawn[norm] = {}
        for ax, stat in ((ax_act, "act_std"), (ax_grad, "grad_norm")):
            color = None
            for key, style, label in ((stat, "-", norm), (f"{stat}_init", "--", f"{norm} (init)")):
                points = [(i, v) for i, v in zip(line["layers"], line[key], strict=True) if v is not None]
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
    for ax, stat, spread in ((ax_grad, "grad_norm", 0.0), (ax_act, "act_std", 50.0)):
        values = [y for stats in drawn.values() for key in (stat, f"{stat}_init") for y in stats.get(key, ((), ()))[1]]
        # gradient norms span decades across depth; activations only in unnormalised nets that blow up
        if values and min(values) > 0 and max(values) > spread * min(values):
            ax.set_yscale("log")
    fig.suptitle(f"Depth statistics at per-device batch {data['batch_size']}, lr {lr_label(data['lr'])}")
    fig.savefig(path, dpi=110)
    return drawn


def panel(records: list[RunRecord], out: Path) -> Panel:
    data = depth_data(records)
    if data is None:
        return Panel("depth", "Depth statistics", notes=[
            "no finished run logged probe metrics (probe/act_std/..., probe/grad_norm/...): no depth panel"])
    rows = [[norm, str(layer), name, fmt(a), fmt(g), fmt(a0), fmt(g0)]
            for norm, line in data["norms"].items()
            for layer, name, a, g, a0, g0 in zip(line["layers"], line["names"], line["act_std"], line["grad_norm"],
                                                 line["act_std_init"], line["grad_norm_init"], strict=True)]
    title = f"Depth statistics (per-device batch {data['batch_size']}, lr {lr_label(data['lr'])})"
    return Panel("depth", title, figure=FIGURE, data=data, plotted=plot_depth(data, out / FIGURE), tables=[
        Table("Per-layer statistics, mean over seeds",
              ["norm", "layer", "module", "act std", "grad norm", "act std (init)", "grad norm (init)"], rows)])


def concentration_data(records: list[RunRecord]) -> dict:
    """Output-gradient concentration at initialisation per norm over all its runs:
    ``{norm: {"runs", "mean", "min", "max"}}`` (norms without step-0 values left out)."""
    values: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if CONCENTRATION in r.initial:
            values[r.norm].append(r.initial[CONCENTRATION])
    return {norm: {"runs": len(v), "mean": statistics.fmean(v), "min": min(v), "max": max(v)}
            for norm, v in sorted(values.items())}


def plot_concentration(data: dict, path: Path) -> dict:
    """Bars of the mean concentration at initialisation per norm (min-max whiskers); returns ``{norm: mean}``."""
    fig, (ax,) = figure(max(4.0, 1.2 * len(data)), 3.5)
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


def concentration_panel(records: list[RunRecord], out: Path) -> Panel:
    data = concentration_data(records)
    if not data:
        return Panel("concentration", CONCENTRATION_TITLE, notes=[
            f"no run logged {CONCENTRATION} at step 0 (probes.every_n_steps > 0): "
            "no output-gradient concentration panel"])
    rows = [[norm, str(c["runs"]), fmt(c["mean"]), fmt(c["min"]), fmt(c["max"])] for norm, c in data.items()]
    return Panel("concentration", CONCENTRATION_TITLE, figure=CONCENTRATION_FIGURE, data=data,
                 plotted=plot_concentration(data, out / CONCENTRATION_FIGURE),
                 tables=[Table("Concentration on one class at step 0", ["norm", "runs", "mean", "min", "max"], rows)])
