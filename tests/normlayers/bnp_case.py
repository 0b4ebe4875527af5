"""The case the BNP process-group test trains, in one process on whole batches or per rank on slices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlayers import BNPreconditioner

SPLIT = 3  # rank 0 takes the first 3 samples of each global batch of 8, rank 1 the other 5
GLOBAL = 8


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(GLOBAL, 2, 5, 5, generator=g, dtype=torch.float64) * (1 + i) + i,
             torch.randint(0, 3, (GLOBAL,), generator=g)) for i in range(4)]


def rank_slices(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, GLOBAL)
    return [(x[part], y[part]) for x, y in batches()]


def train(data, group=None, sum_grads=None) -> dict:
    """Three SGD steps with BNP; the loss is each sample's share of the global batch's mean, so the
    gradients summed over ranks are those of the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(75, 3)).double()
    bnp = BNPreconditioner(model, momentum=0.4, process_group=group)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad()
        (F.cross_entropy(model(x), y, reduction="sum") / GLOBAL).backward()
        if sum_grads is not None:
            sum_grads(model)
        bnp.step()
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()],
            "stats": {name: [t.clone() for t in bnp.statistics(name)] for name in bnp.layers}}
