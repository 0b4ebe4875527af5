"""DDP step time across nodes: 2 nodes x 1 task, 1 node x 2 tasks and 1 process, same global batch.

Starts its own 2-node Slurm (cluster/slurm/start.sh --nodes 2) in a temporary directory and runs the
same training step (a CIFAR ResNet with BN, SGD, random 16x16 images, gloo on CPU) as
``srun -N 2 --ntasks-per-node 1``, ``srun -N 1 --ntasks-per-node 2`` and one plain process, in
interleaved rounds. Ranks and the rendezvous address come from Lightning's SLURMEnvironment, as in a
normlab job. Each task times steps with DDP's gradient all-reduce and steps under ``no_sync()``
(the same work without it), alternately, and one all-reduce of all the gradients on its own; the
collectives' share of a step is 1 - (step without all-reduce) / (step with it) (what the step pays,
DDP overlapping part of it with backward) and (the all-reduce alone) / (step). Prints median step
times, the ratios to the 1-process step and both shares.

    .venv/bin/python benchmarks/ddp_scale.py [--global-batch 64] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"1 process": None, "1 node x 2 tasks": (1, 2), "2 nodes x 1 task": (2, 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One task: time `steps` synced and `steps` unsynced training steps, alternating; rank 0 prints JSON."""
    import torch
    import torch.distributed as dist
    from lightning_fabric.plugins.environments import SLURMEnvironment
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(REPO))
    from trainer.models import build_model

    torch.set_num_threads(1)
    env = SLURMEnvironment() if SLURMEnvironment.detect() else None
    world, rank = (env.world_size(), env.global_rank()) if env else (1, 0)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://{env.main_address}:{env.main_port}", rank=rank,
                                world_size=world)
    torch.manual_seed(0)
    model = build_model({"arch": "cifar_resnet", "depth": args.depth, "width": args.width, "norm": "bn"}, 10, 3, 16)
    ddp = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    batch = args.global_batch // world
    x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))

    def step(sync: bool) -> float:
        if world > 1:
            dist.barrier()  # every rank starts the step together: the time is the step's, not the wait
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if sync or world == 1:
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
        else:
            with ddp.no_sync():
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        return time.perf_counter() - start

    gradients = torch.zeros(sum(p.numel() for p in model.parameters()))

    def all_reduce() -> float:
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(gradients)
        return time.perf_counter() - start

    for _ in range(3):  # warm-up
        step(True)
    synced, unsynced, reduced = [], [], []
    for _ in range(args.steps):
        synced.append(step(True))
        unsynced.append(step(False))
        if world > 1:
            reduced.append(all_reduce())
    if rank == 0:
        print("RESULT " + json.dumps({"world": world, "synced": statistics.median(synced),
                                      "unsynced": statistics.median(unsynced),
                                      "all_reduce": statistics.median(reduced) if reduced else 0.0,
                                      "nodes": os.environ.get("SLURM_JOB_NODELIST", "-")}), flush=True)
    if world > 1:
        # Leave together, without tearing gloo down: a rank left in destroy_process_group kept its srun
        # step alive here (under gVisor) after the results were printed.
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)


def _measure(shape: tuple[int, int] | None, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--global-batch", str(args.global_batch),
               "--steps", str(args.steps), "--depth", str(args.depth), "--width", str(args.width)]
    if shape is not None:
        nodes, tasks = shape
        command = ["srun", "-N", str(nodes), f"--ntasks-per-node={tasks}", "--cpus-per-task=1",
                   "--job-name=ddp-scale", *command]
    # A fresh rendezvous port per launch (Lightning's default derives it from the job id).
    env = {**os.environ, "MASTER_PORT": str(_free_port())}
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"ddp_scale: {' '.join(command[:4])} did not finish within {args.timeout} s") from None
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"ddp_scale: {' '.join(command[:4])} failed: {(out.stderr or out.stdout)[-1500:]}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--timeout", type=int, default=300, help="seconds one launch may take")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        print("ddp_scale: needs Debian's slurm-wlm and munge, run as root (it starts a 2-node Slurm)")
        return 2

    cluster_dir = Path(tempfile.mkdtemp(prefix="normlab-ddp-scale-")) / "slurm"
    scripts = REPO / "cluster" / "slurm"
    subprocess.run([str(scripts / "start.sh"), str(cluster_dir), "--nodes", "2", "--ctld-port", str(_free_port()),
                    "--d-port", f"{_free_port()},{_free_port()}"], check=True, stdout=subprocess.DEVNULL)
    os.environ["SLURM_CONF"] = str(cluster_dir / "etc" / "slurm.conf")
    results: dict[str, list[dict]] = {name: [] for name in SHAPES}
    try:
        for _ in range(args.rounds):  # interleaved: load on the machine hits every shape alike
            for name, shape in SHAPES.items():
                results[name].append(_measure(shape, args))
    finally:
        subprocess.run([str(scripts / "stop.sh"), str(cluster_dir)], stdout=subprocess.DEVNULL)
        shutil.rmtree(cluster_dir.parent, ignore_errors=True)

    anchor = statistics.median(r["synced"] for r in results["1 process"])
    print(f"ddp_scale: cifar_resnet depth {args.depth} width {args.width}, BN, global batch {args.global_batch}, "
          f"gloo on CPU, 1 torch thread per task, {args.rounds} interleaved rounds x {args.steps} steps (medians)")
    print(f"{'shape':<18} {'step ms':>8} {'vs 1 process':>13} {'no-allreduce ms':>16} {'share':>6} "
          f"{'all-reduce ms':>14} {'share':>6}  nodes")
    for name in SHAPES:
        synced = statistics.median(r["synced"] for r in results[name])
        if results[name][0]["world"] == 1:
            print(f"{name:<18} {synced * 1e3:8.1f} {synced / anchor:12.2f}x {'-':>16} {'-':>6} {'-':>14} {'-':>6}  -")
            continue
        unsynced = statistics.median(r["unsynced"] for r in results[name])
        reduced = statistics.median(r["all_reduce"] for r in results[name])
        print(f"{name:<18} {synced * 1e3:8.1f} {synced / anchor:12.2f}x {unsynced * 1e3:16.1f} "
              f"{max(0.0, 1 - unsynced / synced):6.0%} {reduced * 1e3:14.1f} {reduced / synced:6.0%}  "
              f"{results[name][0]['nodes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
