"""``normlab report``: the regime report of a sweep, read back from MLflow, as a list of panels.

The training runs of one MLflow experiment (a sweep file names its experiment, tracking URI and run
keys) are read with one search into typed records (:mod:`~cluster.report.records`; the step-0 values a
few panels need in bulk, :mod:`~cluster.report.history`), and each panel family makes its
:class:`~cluster.report.panel.Panel` from them, in the order of :data:`~cluster.report.build.PANELS`:

1. batch-size regimes (:mod:`~cluster.report.batch`): error against per-device batch, 95% t intervals,
   paired norm comparisons and each norm's regime boundary;
2. learning-rate stability (:mod:`~cluster.report.stability`): outcome classes marked per cell, the
   largest stable learning rate and what bounds it;
3. the Fisher-predicted maximal learning rate beside it (:mod:`~cluster.report.fisher`, Wei et al. 2019);
4. train/test inconsistency (:mod:`~cluster.report.inconsistency`): error under running, precise and
   batch statistics;
5. depth statistics and 6. output-gradient concentration at initialisation (:mod:`~cluster.report.depth`,
   Bjorck et al. 2018).

Each panel holds its data, figure, tables, findings and what the runs do not allow; ``report.md`` and
``report.html`` (:mod:`~cluster.report.render`) open with every panel's findings. The files are logged
as artifacts of a run tagged ``normlab.kind=report`` (no ``run_key``: sweep status ignores it); the
command line is :mod:`~cluster.report.cli`.
"""

from cluster.report.build import PANELS, build_panels
from cluster.report.cli import ReportError, main
from cluster.report.depth import depth_setting
from cluster.report.panel import Panel, Table
from cluster.report.records import RunRecord, norm_label, read_runs

__all__ = ["PANELS", "Panel", "ReportError", "RunRecord", "Table", "build_panels", "depth_setting", "main",
           "norm_label", "read_runs"]
