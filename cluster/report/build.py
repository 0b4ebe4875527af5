"""The report as a list of panels, in reading order. A study adds its panel's module and one entry here;
nothing is placed by title (the Fisher panel follows the stability panel it is read against because it
comes after it in :data:`PANELS`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cluster.report import batch, depth, fisher, inconsistency, stability
from cluster.report.panel import Panel
from cluster.report.records import RunRecord

# each makes its panel from the records, writing its figure into the output directory
PANELS: tuple[Callable[[list[RunRecord], Path], Panel], ...] = (
    batch.panel,
    stability.panel,
    fisher.panel,
    inconsistency.panel,
    depth.panel,
    depth.concentration_panel,
)


def build_panels(records: list[RunRecord], out: Path) -> tuple[list[Panel], list[str]]:
    """Every panel the runs allow (each says what they do not), and notes on the runs as a whole."""
    if not records:
        return [], ["no finished training runs: nothing to plot"]
    notes = []
    if max(Counter((r.norm, r.batch_size, r.lr) for r in records).values()) == 1:
        notes.append("one seed per setting: no spread over seeds is shown")
    return [make(records, out) for make in PANELS], notes
