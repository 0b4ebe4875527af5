"""The synchronisation cases, shared by the gloo ranks (sync_worker.py) and the single-process reference.

One case: a variant, a split of a global batch of 8 over two ranks, and a few SGD steps of a small
conv -> norm model. Each run records, per step, the output, the input gradient and the parameter
gradients of its slice, then the buffers and an eval-mode output. Loss = sum(y * w) with a fixed
random w, so the ranks' losses add up to the single process's loss.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from normlayers import available, build_norm

IN_CHANNELS, CHANNELS, SIZE, STEPS, LR = 3, 8, 4, 3, 0.1

#: ranks' batch sizes, and an offset added to the conv's bias: the norm's input then has a mean far
#: above its spread (about 100 vs 0.6), where float32 sums of squares would lose the variance. The
#: shifted bias is frozen: its gradient through a mean-subtracting layer is zero up to rounding noise
#: at the scale of the offset, which no tolerance on the gradient itself could judge.
SCENARIOS = {"even": ((4, 4), 0.0), "uneven": ((3, 5), 0.0), "offset": ((3, 5), 100.0)}

#: options that make each variant's own mechanism active within STEPS steps of a batch of 8
#: (and dropout off: its masks are per-process random draws, not statistics)
SPEC_OPTIONS = {
    "brn": "warmup_steps=0,r_max_steps=0,d_max_steps=0,r_max=1.5,d_max=0.5",
    "cbn": "burnin=0",
    "ghost": "virtual_batch=2",
    "ic": "drop=0.0",
}


def batch_dependent_variants() -> list[str]:
    return [name for name, info in available().items() if info.batch_dependent]


def spec(variant: str) -> str:
    options = SPEC_OPTIONS.get(variant)
    return f"{variant}:{options}" if options else variant


def build(variant: str, scenario: str) -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(IN_CHANNELS, CHANNELS, 3, padding=1)
    offset = SCENARIOS[scenario][1]
    if offset:
        with torch.no_grad():
            conv.bias += offset
        conv.bias.requires_grad_(False)
    norm = build_norm(spec(variant), CHANNELS)
    norm.bind_preceding(conv)
    return nn.Sequential(conv, norm)


def data(scenario: str) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    sizes, _ = SCENARIOS[scenario]
    generator = torch.Generator().manual_seed(1)
    n = sum(sizes)
    xs = [torch.randn(n, IN_CHANNELS, SIZE, SIZE, generator=generator) for _ in range(STEPS)]
    ws = [torch.randn(n, CHANNELS, SIZE, SIZE, generator=generator) for _ in range(STEPS)]
    return xs, ws, torch.randn(n, IN_CHANNELS, SIZE, SIZE, generator=generator)


def rank_slice(scenario: str, rank: int) -> slice:
    sizes, _ = SCENARIOS[scenario]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def run(variant: str, scenario: str, rows: slice, prepare=None, sum_grads=None, first_forward=nullcontext,
        device: str = "cpu", first_step=nullcontext) -> dict:
    """Train ``STEPS`` steps on ``rows`` of the scenario's batch. ``prepare`` turns the model into
    its synchronised form, ``sum_grads`` sums parameter gradients over the ranks in place (both None
    for a single process); the first forward runs inside ``first_forward()``, and the first forward
    and backward together inside ``first_step()``. Results are on the CPU."""
    model = build(variant, scenario).to(device)
    if prepare is not None:
        model = prepare(model)
    xs, ws, x_eval = (t.to(device) if torch.is_tensor(t) else [u.to(device) for u in t] for t in data(scenario))
    record: dict = {"steps": []}
    for step in range(STEPS):
        x = xs[step][rows].clone().requires_grad_(True)
        with first_step() if step == 0 else nullcontext():
            with first_forward() if step == 0 else nullcontext():
                y = model(x)
            (y * ws[step][rows]).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        record["steps"].append({"output": y.detach().cpu(), "input_grad": x.grad.cpu(),
                                "param_grads": {n: g.cpu() for n, g in grads.items()}})
        if sum_grads is not None:
            sum_grads([p.grad for p in model.parameters() if p.grad is not None])
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
                    p.grad = None
    record["buffers"] = {name: b.cpu().clone() for name, b in model.named_buffers()}
    model.eval()
    with torch.no_grad():
        record["eval_output"] = model(x_eval[rows]).cpu()
    return record
