"""A run logs no metric twice at one step, resumed or not.

A run resumes from its last checkpoint, so the steps between that checkpoint and the kill are
trained again and their metrics would be logged a second time into the same MLflow run. The logger
of a resumed run reads which steps each metric already has, once, and drops those points (the
values are the same: a resumed run equals the uninterrupted one). Lightning's own ``epoch`` metric,
which it logs with every call, is kept once per step the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only


class StepOnceMLFlowLogger(MLFlowLogger):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._logged: dict[str, set[int]] | None = None

    def _known_steps(self) -> dict[str, set[int]]:
        if self._logged is None:
            client, run_id = self.experiment, self.run_id
            names = client.get_run(run_id).data.metrics
            self._logged = {name: {m.step for m in client.get_metric_history(run_id, name)} for name in names}
        return self._logged

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        known = self._known_steps()
        at = step or 0
        fresh = {name: value for name, value in metrics.items() if at not in known.get(name, ())}
        for name in fresh:
            known.setdefault(name, set()).add(at)
        if fresh:
            super().log_metrics(fresh, step)
