"""``normlab demo`` (what ``make demo`` runs): the demo sweep on this machine, its report, and how to browse it.

Runs ``configs/sweeps/demo.yaml`` in the current directory (digits, CPU, local executor; MLflow in
``./mlflow.db``, run directories in ``./runs``): BN's small-batch regime under the GN paper's
protocol, a fixed global batch of 64 with the per-device (statistics) batch 32 -> 2 set by virtual
devices, an MLP on the 64 pixels (so each bn statistic is over the per-device batch alone), one
budget of 500 steps for every run, bn, bgn, brn at every per-device batch and the
batch-independent gn, frn and none once, 3 seeds, each run also evaluated with precise and batch
statistics.
Runs already finished are skipped, so running it again only writes the report again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cluster import report, sweep_cli
from cluster.sweep import SweepError, load_sweep

DEMO_SWEEP = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normlab demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=str(DEMO_SWEEP), help="sweep file to run (default: the demo sweep)")
    parser.add_argument("--out", default="reports/demo", help="where the report goes (default: reports/demo)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        sweep = load_sweep(args.sweep)
    except SweepError as error:
        print(f"normlab demo: {error}", file=sys.stderr)
        return 2
    print(f"normlab demo: {len(sweep.runs)} runs of {args.sweep} on this machine, "
          f"{sweep.executor.array_parallelism} jobs at a time", flush=True)
    submitted = sweep_cli.main(["submit", args.sweep])
    if submitted == 2:
        return submitted
    code = report.main([args.sweep, "--out", args.out])
    code = code or submitted  # failed runs (their logs were named above) make the demo fail too
    minutes = (time.monotonic() - started) / 60
    print(f"\nnormlab demo: done in {minutes:.1f} min. Browse the runs in the MLflow UI:\n"
          f"  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {sweep.tracking_uri} --port 5000\n"
          f"  then open {_runs_page(sweep)} (experiment {sweep.experiment!r}).")
    return code

def _runs_page(sweep) -> str:
    """The experiment's runs table in the UI's model-training view (MLflow 3 opens on GenAI otherwise)."""
    from mlflow.tracking import MlflowClient

    from trainer.tracking import ui_experiment_url

    experiment = MlflowClient(sweep.tracking_uri).get_experiment_by_name(sweep.experiment)
    return ui_experiment_url("http://127.0.0.1:5000", experiment.experiment_id) if experiment else "http://127.0.0.1:5000"


if __name__ == "__main__":
    sys.exit(main())
