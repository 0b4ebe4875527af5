"""Speed of the ``normlab sweep`` commands, each a fresh process as a user runs it: the demo's status, and
plan, submit and status of a 10,000-run packed sweep on the local Slurm.

Starts its own single-node Slurm (cluster/slurm/start.sh) in a temporary directory. The demo's status is
asked of a store holding 30 of its 45 runs finished. The 10,000-run sweep is planned cold (no cached plan),
submitted cold (its cached plan removed first, a new tracking store) and held (``--hold``: nothing trains),
its sbatch calls counted through a counting wrapper on PATH; then cancelled and submitted again cold, on
the store that now exists ("resubmit"); then its jobs are cancelled and the cluster stopped.
Each command's wall time and CPU time (user + sys of the process) are printed, with the ratio of wall
time to the goal (below 1.0 meets it). On a loaded machine the CPU time is the steadier figure.

    .venv/bin/python benchmarks/sweep_scale.py [--runs-per-job 4] [--max-array-size 1001] [--code DIR]

``--code DIR`` times another checkout of normlab (e.g. the previous commit, for a before/after).
Goals: demo status 1 s, plan 10 s, submit and resubmit 15 s, 10,000-run status 5 s.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
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

GOALS_S = {"demo status": 1.0, "plan": 10.0, "submit": 15.0, "resubmit": 15.0, "status": 5.0}
NORMS = ["bn", "gn:groups=2", "gn:groups=4", "bgn:groups=4", "frn", "ln", "in", "brn", "ghost:virtual_batch=4", "none"]
DEMO_FINISHED = 30  # of the demo's 45 runs


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


class Timer:
    """Runs ``normlab`` commands of one checkout as fresh processes; wall and CPU seconds of each."""

    def __init__(self, code: Path, work: Path):
        self.code, self.work = code, work
        self.env = {**os.environ, "PYTHONPATH": str(code)}

    def python(self, *args: str) -> str:
        return subprocess.run([sys.executable, *args], cwd=self.work, env=self.env, capture_output=True,
                              text=True, check=True).stdout

    def normlab(self, *args: str) -> tuple[float, float, str]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = self.python("-m", "cluster.cli", *args)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, cpu, out


def _report(name: str, wall: float, cpu: float, note: str = "") -> None:
    goal = GOALS_S[name]
    print(f"  {name:12s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  wall/goal({goal:g} s) {wall / goal:5.2f}  {note}")


def _demo_store(timer: Timer, sweep_file: Path) -> None:
    """A tracking store in which DEMO_FINISHED of the demo's runs are finished (made with MLflow's client)."""
    timer.python("-c", f"""
from mlflow.tracking import MlflowClient
from cluster.sweep import load_sweep
sweep = load_sweep({str(sweep_file)!r})
client = MlflowClient(sweep.tracking_uri)
experiment = client.create_experiment(sweep.experiment)
for run in sweep.runs[:{DEMO_FINISHED}]:
    created = client.create_run(experiment, tags={{"run_key": run.key, "normlab.status": "finished"}})
    client.set_terminated(created.info.run_id, "FINISHED")
""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-per-job", type=int, default=4)
    parser.add_argument("--max-array-size", type=int, default=1001)
    parser.add_argument("--code", type=Path, default=REPO, help="the normlab checkout to time (default: this one)")
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
    load = os.getloadavg()[0]
    try:
        demo = work / "demo"
        demo.mkdir()
        demo_timer = Timer(args.code.resolve(), demo)
        demo_file = args.code.resolve() / "configs" / "sweeps" / "demo.yaml"
        _demo_store(demo_timer, demo_file)
        demo_times = [demo_timer.normlab("sweep", "status", str(demo_file))[:2] for _ in range(3)]

        timer = Timer(args.code.resolve(), work)
        sweep_file = work / "scale.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "name": "scale",
            "overrides": {"model.arch": "cifar_resnet", "model.depth": 8, "trainer.accelerator": "cpu"},
            "grid": {"model.norm": NORMS, "data.batch_size": [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]},
            "seeds": list(range(100)),
            "executor": {"kind": "slurm", "runs_per_job": args.runs_per_job, "sbatch": {"hold": True}},
        }, sort_keys=False))
        plan_wall, plan_cpu, plan_out = timer.normlab("sweep", "plan", str(sweep_file))
        n_runs = int(re.search(r"^(\d+) runs in sweep", plan_out, re.MULTILINE).group(1))
        for cached in (work / "runs" / "sweeps" / "scale").glob("plan.json"):
            cached.unlink()  # a cold submit validates the sweep again
        submit_wall, submit_cpu, submit_out = timer.normlab("sweep", "submit", str(sweep_file))
        sbatch_calls = len(counter.read_text().splitlines()) if counter.exists() else 0
        status_wall, status_cpu, status_out = timer.normlab("sweep", "status", str(sweep_file))
        queued = next(line for line in status_out.splitlines() if line.startswith("total")).split()[4]

        print(f"sweep_scale: {n_runs} runs packed {args.runs_per_job} per job, MaxArraySize {args.max_array_size}; "
              f"code {args.code}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
        for wall, cpu in demo_times:
            _report("demo status", wall, cpu, f"({DEMO_FINISHED} of 45 runs finished)")
        _report("plan", plan_wall, plan_cpu, "(cold: expand + validate every run)")
        _report("submit", submit_wall, submit_cpu, f"(cold, {sbatch_calls} sbatch calls)")
        _report("status", status_wall, status_cpu, f"({queued} runs queued)")
        timer.normlab("sweep", "cancel", str(sweep_file))
        for cached in (work / "runs" / "sweeps" / "scale").glob("plan.json"):
            cached.unlink()
        resubmit_wall, resubmit_cpu, _ = timer.normlab("sweep", "submit", str(sweep_file))
        _report("resubmit", resubmit_wall, resubmit_cpu, "(cold plan, the store and experiment exist: all cancelled)")
        print("  " + submit_out.splitlines()[0])
        timer.normlab("sweep", "cancel", str(sweep_file))
    finally:
        subprocess.run([str(scripts / "stop.sh"), str(cluster_dir)], stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
