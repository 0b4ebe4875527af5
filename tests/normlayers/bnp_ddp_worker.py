"""One gloo rank of the BNP process-group test: ``bnp_ddp_worker.py RANK WORLD PORT OUT``.

Trains the shared case (``bnp_case.train``) on this rank's slice of every global batch, twice: with
the statistics averaged over the world and with local statistics, and saves what it ended with.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bnp_case  # noqa: E402


def main(rank: int, world: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))

    def sum_grads(model):
        for p in model.parameters():
            dist.all_reduce(p.grad)

    synced = bnp_case.train(bnp_case.rank_slices(rank), dist.group.WORLD, sum_grads)
    local = bnp_case.train(bnp_case.rank_slices(rank), None, sum_grads)
    torch.save({"synced": synced, "local": local}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
