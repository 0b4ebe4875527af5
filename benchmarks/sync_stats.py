"""Cost of synchronised statistics: 2 gloo processes on CPU.

1. Per layer, forward + backward time with statistics over both ranks (``convert_sync``) against
   local statistics, for every batch-dependent variant: the ratio synced / local.
2. The collectives one forward (and one backward) of a ResNet-20 issues once synchronised,
   counted at the torch.distributed level: one all-reduce per norm layer call is the design.

Usage: ``python benchmarks/sync_stats.py [--batch 16] [--channels 64] [--size 16] [--iters 30]``
(per-rank batch; input batch x channels x size x size).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normlayers import NormLayer, available, build_norm, convert_sync, revert_sync
from trainer.models import build_model

#: options so each variant runs its own mechanism on the benchmark batch
SPEC_OPTIONS = {"ghost": "virtual_batch=4", "ic": "drop=0.0"}


def spec(variant: str) -> str:
    options = SPEC_OPTIONS.get(variant)
    return f"{variant}:{options}" if options else variant


class CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls (the differentiable all-reduce calls it too)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self._original = dist.all_reduce

        def counted(*args, **kwargs):
            self.count += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def time_layer(layer: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    """Median seconds of forward + backward, both ranks starting each iteration together."""
    times = []
    for i in range(iters + 5):
        xi = x.clone().requires_grad_(True)
        dist.barrier()
        start = time.perf_counter()
        layer(xi).square().mean().backward()
        if i >= 5:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    rows = []
    for variant in [name for name, info in available().items() if info.batch_dependent]:
        layer = build_norm(spec(variant), args.channels)
        if layer.needs_preceding_weight:  # timed together with the conv it needs
            conv = torch.nn.Conv2d(args.channels, args.channels, 1)
            layer.bind_preceding(conv)
            layer = torch.nn.Sequential(conv, layer)
        local = time_layer(layer, x, args.iters)
        synced = time_layer(convert_sync(layer), x, args.iters)
        revert_sync(layer)
        rows.append((variant, local, synced))

    counts = {}
    for variant in ("bn", "bgn", "ghost"):
        model = build_model({"arch": "cifar_resnet", "depth": 20, "norm": spec(variant)}, 10, 3, 32)
        convert_sync(model)
        images = torch.randn(8, 3, 32, 32)
        with CountAllReduce() as forward:
            loss = model(images).logsumexp(1).mean()
        with CountAllReduce() as backward:
            loss.backward()
        layers = sum(1 for m in model.modules() if isinstance(m, NormLayer) and m.batch_dependent)
        counts[variant] = (layers, forward.count, backward.count)
    if rank == 0:
        queue.put((rows, counts))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="per-rank batch size")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(port, args, queue), nprocs=2, start_method="spawn")
    rows, counts = queue.get()

    shape = f"{args.batch}x{args.channels}x{args.size}x{args.size}"
    print(f"per-layer forward+backward, 2 gloo ranks on CPU, input {shape} per rank, median of {args.iters}")
    print(f"{'variant':12s} {'local ms':>9s} {'synced ms':>10s} {'ratio':>6s}")
    for variant, local, synced in rows:
        print(f"{variant:12s} {local * 1e3:9.3f} {synced * 1e3:10.3f} {synced / local:6.2f}")
    print("ResNet-20 (32x32 input, batch 8 per rank), synchronised: all-reduce calls per step")
    print(f"{'norm':8s} {'norm layers':>11s} {'forward':>8s} {'backward':>9s}")
    for variant, (layers, forward, backward) in counts.items():
        print(f"{variant:8s} {layers:11d} {forward:8d} {backward:9d}")


if __name__ == "__main__":
    main()
