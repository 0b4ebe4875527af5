"""One gloo rank of the synchronisation tests: ``sync_worker.py RANK WORLD PORT OUT_DIR DEVICE CASE...``.

Each CASE is ``variant/scenario`` (see sync_cases.py). For case i the rank writes
``OUT_DIR/<i>.rank<RANK>.pt`` (its record plus the number of collectives in its first forward) or,
when the case raises, ``OUT_DIR/<i>.rank<RANK>.error`` with the message, and exits at once (its peer
then fails on the closed connection, so nothing waits for a timeout).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sync_cases  # noqa: E402

from normlayers import convert_sync  # noqa: E402

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "all_to_all", "all_to_all_single",
    "reduce", "gather", "scatter", "barrier",
)


class CountCollectives:
    """Counts the torch.distributed collectives called inside the block (by name, from either module)."""

    def __init__(self):
        self.count = 0
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self):
        for module in (dist, c10d):
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is None:
                    continue
                self._saved.append((module, name, original))
                setattr(module, name, self._counted(original))
        return self

    def _counted(self, original):
        def call(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return call

    def __exit__(self, *exc):
        for module, name, original in self._saved:
            setattr(module, name, original)


class CountHostReads:
    """Counts the reads of a tensor's value by the host inside the block (``item``, ``tolist``,
    ``bool``/``int``/``float`` of a tensor): on a GPU each one waits for the device."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        self.count = 0
        self._saved: list[tuple[str, object]] = []

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            self._saved.append((name, original))
            setattr(torch.Tensor, name, self._counted(original))
        return self

    def _counted(self, original):
        def call(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return call

    def __exit__(self, *exc):
        for name, original in self._saved:
            setattr(torch.Tensor, name, original)


def sum_over_ranks(grads: list[torch.Tensor]) -> None:
    for grad in grads:
        dist.all_reduce(grad)


def main(rank: int, world: int, port: int, out_dir: Path, device: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    for index, case in enumerate(cases):
        variant, scenario = case.split("/")
        counter, host_reads = CountCollectives(), CountHostReads()
        try:
            record = sync_cases.run(
                variant, scenario, sync_cases.rank_slice(scenario, rank),
                prepare=convert_sync, sum_grads=sum_over_ranks, first_forward=lambda: counter,  # noqa: B023
                device=device, first_step=lambda: host_reads,  # noqa: B023
            )
        except Exception as error:  # the test reports it; the pair cannot go on after a failed collective
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            (out_dir / f"{index:03d}.rank{rank}.error").write_text(message)
            sys.stdout.flush()
            os._exit(1)
        record["collectives_first_forward"] = counter.count
        record["host_reads_first_step"] = host_reads.count
        torch.save(record, out_dir / f"{index:03d}.rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5], sys.argv[6:])
