"""What the report is made of: a :class:`Panel` per question, each holding its data, figure, tables,
findings and what the runs do not allow; the report is a list of them (:mod:`cluster.report.build`).
Also the helpers the panels share: a Matplotlib figure on the Agg canvas, number formats."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Panel:
    """One section of the report. A panel the runs do not allow has no figure or tables, only notes."""

    key: str  # names the panel's data and figure file, e.g. "batch" -> batch_regimes.png
    title: str
    figure: str | None = None  # file name of the panel's PNG in the output directory
    tables: list[Table] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # sentences with their evidence, for the Findings section
    notes: list[str] = field(default_factory=list)  # what the runs do not allow
    data: Any = None  # the aggregation the figure and tables were made from
    plotted: Any = None  # what the figure drew, exactly (the tests compare it with the logged values)

    @property
    def shown(self) -> bool:
        return self.figure is not None or bool(self.tables)


def figure(width: float, height: float, ncols: int = 1):
    """A Matplotlib figure on the Agg canvas and its row of axes; imported here, so a report with no runs
    (and ``normlab report --help``) does not pay for Matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def lr_label(lr: float) -> str:
    return f"{lr:g}"


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def mean_of(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None
