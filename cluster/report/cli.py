"""The ``normlab report`` command: where the runs are (a sweep file or an experiment name), reading them,
writing the panels' files and logging them as the artifacts of a report run."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from cluster.report.build import build_panels
from cluster.report.records import REPORT_TAG, read_runs
from cluster.report.render import render_html, render_markdown
from trainer import tracking


class ReportError(Exception):
    """Bad input (unknown experiment, missing file): one line for the user, exit status 2."""


def _resolve_target(target: str, tracking_uri: str | None) -> tuple[str, str, set[str] | None]:
    """(experiment name, tracking URI, the sweep's run keys or None) from a sweep file or an experiment name."""
    path = Path(target)
    if path.is_file():
        from cluster.sweep import load_sweep  # lazily: only a sweep file needs the sweep machinery

        try:
            sweep = load_sweep(path)
        except ValueError as err:  # SweepError and the trainer's ConfigError: one line naming file and key
            raise ReportError(str(err).splitlines()[0]) from None
        # The sweep's URI already honours $MLFLOW_TRACKING_URI the way its runs did.
        return sweep.experiment, tracking_uri or sweep.tracking_uri, {run.key for run in sweep.runs}
    if path.suffix in (".yaml", ".yml") or os.sep in target:
        raise ReportError(f"no such sweep file: {target} (give a sweep YAML file or an MLflow experiment name)")
    return target, tracking_uri or tracking.resolve_uri(absolute=False), None


def _check_local_store(uri: str) -> None:
    """A SQLite URI must name an existing database: MLflow would otherwise create an empty one."""
    if tracking.missing_sqlite(uri):
        raise ReportError(f"no MLflow database at {tracking.sqlite_path(uri)} (tracking URI {uri}); "
                          f"pass --tracking-uri or set {tracking.ENV_TRACKING_URI}")


def log_report_run(client, experiment_id: str, files: list[Path], source: str) -> str:
    """A FINISHED run tagged ``normlab.kind=report`` (and no run_key) holding the report files: the MLflow
    UI shows its PNGs under Artifacts -> report/."""
    run = client.create_run(experiment_id, run_name="regime-report",
                            tags={REPORT_TAG[0]: REPORT_TAG[1], "normlab.report_source": source})
    run_id = run.info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="report")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="normlab report",
        description="The regime report of a sweep or MLflow experiment: findings with their 95% t intervals, then "
                    "the panels the runs allow (batch regimes, learning-rate stability, Fisher lr, running/precise/"
                    "batch statistics, depth, gradient concentration).")
    parser.add_argument("target", metavar="SWEEP_FILE_OR_EXPERIMENT",
                        help="a sweep YAML file (its experiment and tracking URI are used) or an experiment name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's, else "
                        f"${tracking.ENV_TRACKING_URI}, else {tracking.DEFAULT_TRACKING_URI})")
    parser.add_argument("--out", type=Path, help="output directory (default: reports/<experiment>)")
    parser.add_argument("--no-log", action="store_true", help="write the files only; log no report run to MLflow")
    args = parser.parse_args(argv)

    try:
        experiment_name, uri, sweep_keys = _resolve_target(args.target, args.tracking_uri)
        _check_local_store(uri)
        down = tracking.unreachable(uri)
        if down:
            raise ReportError(down)
        from mlflow.exceptions import MlflowException  # after the probe: seconds to import
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        try:
            experiment = client.get_experiment_by_name(experiment_name)
        except MlflowException as err:
            raise ReportError(f"cannot read experiments from {uri}: {err.message.splitlines()[0]}") from None
        if experiment is None:
            hint = "; has the sweep run yet?" if sweep_keys is not None else ""
            raise ReportError(f"no MLflow experiment named {experiment_name!r} at {uri}{hint}")
    except ReportError as err:
        print(f"normlab report: {err}", file=sys.stderr)
        return 2

    out = args.out or Path("reports") / re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"{out} is not writable")
    except OSError as err:
        print(f"normlab report: cannot write the report to {out}: {err.strerror or err}; pass --out DIR",
              file=sys.stderr)
        return 2
    try:
        records, notes = read_runs(client, experiment.experiment_id, sweep_keys)
    except MlflowException as err:
        print(f"normlab report: reading runs from {uri} failed: {err.message.splitlines()[0]}", file=sys.stderr)
        return 1
    panels, run_notes = build_panels(records, out)
    notes += run_notes
    n_seeds = len({r.seed for r in records})
    heading = f"normlab report: {experiment_name}"
    summary = (f"{len(records)} training run(s), {n_seeds} seed(s), from experiment {experiment_name!r} "
               f"at {uri}.")
    files = [out / p.figure for p in panels if p.figure]
    (out / "report.md").write_text(render_markdown(heading, summary, panels, notes) + "\n")
    (out / "report.html").write_text(render_html(heading, summary, panels, notes, out))
    files += [out / "report.md", out / "report.html"]

    for note in notes + [note for p in panels for note in p.notes]:
        print(f"note: {note}")
    print(f"report written to {out}/ ({', '.join(p.name for p in files)})")
    if not args.no_log:
        try:
            run_id = log_report_run(client, experiment.experiment_id, files, args.target)
        except MlflowException as err:
            print(f"normlab report: logging the report run to {uri} failed: {err.message.splitlines()[0]}",
                  file=sys.stderr)
            return 1
        print(f"logged as run {run_id} (tag {REPORT_TAG[0]}={REPORT_TAG[1]}) in experiment {experiment_name!r}")
    return 0
