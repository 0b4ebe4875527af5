"""MLflow run names read from the sweep cell, e.g. ``bn b2 lr0.1 s0``, unique within a sweep.

The runs table of the MLflow UI shows run names first; MLflow's random ones ("overjoyed-slug-911")
say nothing, and every run of a packed job would get the same one. The name is display only: the
``tracking`` section is outside the run key, so naming a run never changes which run it is.
"""

from __future__ import annotations

from typing import Any

# the grid keys that already have a short form in the name
_SHORT = {"optim.lr": "lr", "seed": "s"}
_SHOWN_ELSEWHERE = ("model.norm", "data.batch_size")  # from the run's own norm and per-device batch


def cell_run_name(norm: str, batch_size: int, values: dict[str, Any]) -> str:
    """``<norm> b<per-device batch>`` then the cell's learning rate, seed and any other grid value."""
    parts = [norm, f"b{batch_size}"]
    for key in ("optim.lr", "seed"):
        if key in values:
            parts.append(f"{_SHORT[key]}{values[key]}")
    for key, value in values.items():
        if key not in _SHORT and key not in _SHOWN_ELSEWHERE:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(parts)


def sweep_run_names(runs) -> dict[str, str]:
    """``{run key: name}`` for a sweep's runs; two cells that would read alike get ``#<index>``."""
    names = {run.key: cell_run_name(run.norm, run.batch_size, run.values) for run in runs}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {run.key: names[run.key] if counts[names[run.key]] == 1 else f"{names[run.key]} #{run.index}"
            for run in runs}
