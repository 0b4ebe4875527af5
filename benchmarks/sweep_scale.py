"""Scale of sweep submission: plan, submit and status of a 10,000-run packed sweep on the local Slurm.

Starts its own single-node Slurm (cluster/slurm/start.sh) in a temporary directory, submits the
sweep held (``--hold``: nothing trains), times ``plan`` (expanding and validating every run),
``submit`` (MLflow lookup, packing, one sbatch per array chunk) and ``status``, counts the real
sbatch calls through a counting wrapper on PATH, then cancels the jobs and stops the cluster.

    .venv/bin/python benchmarks/sweep_scale.py [--runs-per-job 4] [--max-array-size 1001]

Goals: submit under 30 s, status under 5 s; printed as ratios (below 1.0 meets the goal).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import dispatch, sweep_cli  # noqa: E402
from cluster.sweep import load_sweep  # noqa: E402

SUBMIT_GOAL_S, STATUS_GOAL_S = 30.0, 5.0
NORMS = ["bn", "gn:groups=2", "gn:groups=4", "bgn:groups=4", "frn", "ln", "in", "brn", "ghost:virtual_batch=4", "none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counting_sbatch(bin_dir: Path, counter: Path) -> None:
    """An `sbatch` first on PATH that notes each call and runs the real one."""
    real = shutil.which("sbatch")
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/sh\necho call >> "{counter}"\nexec "{real}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-per-job", type=int, default=4)
    parser.add_argument("--max-array-size", type=int, default=1001)
    args = parser.parse_args()
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        print("sweep_scale: needs Debian's slurm-wlm and munge, run as root (it starts a single-node Slurm)")
        return 2

    work = Path(tempfile.mkdtemp(prefix="normlab-sweep-scale-"))
    cluster_dir = work / "slurm"
    scripts = REPO / "cluster" / "slurm"
    subprocess.run([str(scripts / "start.sh"), str(cluster_dir), "--max-array-size", str(args.max_array_size),
                    "--ctld-port", str(_free_port()), "--d-port", str(_free_port())], check=True,
                   stdout=subprocess.DEVNULL)
    os.environ["SLURM_CONF"] = str(cluster_dir / "etc" / "slurm.conf")
    bin_dir, counter = work / "bin", work / "sbatch_calls"
    bin_dir.mkdir()
    _counting_sbatch(bin_dir, counter)
    os.environ["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    os.chdir(work)
    try:
        sweep_file = work / "scale.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "name": "scale",
            "overrides": {"model.arch": "cifar_resnet", "model.depth": 8, "trainer.accelerator": "cpu"},
            "grid": {"model.norm": NORMS, "data.batch_size": [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]},
            "seeds": list(range(100)),
            "executor": {"kind": "slurm", "runs_per_job": args.runs_per_job, "sbatch": {"hold": True}},
        }, sort_keys=False))
        quiet = contextlib.redirect_stdout(io.StringIO())

        t0 = time.perf_counter()
        with quiet:
            assert sweep_cli.main(["plan", str(sweep_file)]) == 0
        plan_s = time.perf_counter() - t0
        n_runs = len(load_sweep(sweep_file).runs)

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as submit_out:
            assert sweep_cli.main(["submit", str(sweep_file)]) == 0
        submit_s = time.perf_counter() - t0
        sbatch_calls = len(counter.read_text().splitlines()) if counter.exists() else 0

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as status_out:
            assert sweep_cli.main(["status", str(sweep_file)]) == 0
        status_s = time.perf_counter() - t0
        queued = next(line for line in status_out.getvalue().splitlines() if line.startswith("total")).split()[4]

        jobs = len(dispatch.read_record(load_sweep(sweep_file)))
        print(f"sweep_scale: {n_runs} runs packed {args.runs_per_job} per job = {jobs} Slurm jobs, "
              f"MaxArraySize {args.max_array_size}")
        print(f"  plan   {plan_s:7.2f} s  (expand + validate every run)")
        print(f"  submit {submit_s:7.2f} s  {sbatch_calls} sbatch calls  "
              f"ratio to the 30 s goal {submit_s / SUBMIT_GOAL_S:.2f}")
        print(f"  status {status_s:7.2f} s  ({queued} runs queued)  "
              f"ratio to the 5 s goal {status_s / STATUS_GOAL_S:.2f}")
        print("  " + submit_out.getvalue().splitlines()[0])
        with quiet:
            sweep_cli.main(["cancel", str(sweep_file)])
    finally:
        subprocess.run([str(scripts / "stop.sh"), str(cluster_dir)], stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
