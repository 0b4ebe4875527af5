"""Cost of Batch Normalization Preconditioning: a ResNet-20 training step with BNP vs the same step
without it (``model.norm=none``, the anchor) and with BN (``model.norm=bn``).

One step is forward, cross-entropy, backward, (BNP's ``step()``), SGD with momentum. The three
variants run on the same batch, interleaved in rounds (none, bnp, bn, none, bnp, bn, ...) so that load
on a shared machine hits them alike; each round times ``--steps`` steps. Printed: time per step of
each, and the ratios bnp/none and bn/none on each variant's fastest round (min, as timeit does) and
on the median round.

    .venv/bin/python benchmarks/bnp.py                          # CPU, digits-sized 8x8 input, batch 64
    .venv/bin/python benchmarks/bnp.py --image-size 32 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from normlayers import BNPreconditioner
from trainer.config import load_config
from trainer.models import build_model


def make_step(norm: str, precondition: bool, args, x: torch.Tensor, y: torch.Tensor):
    cfg = load_config(None, [f"model.norm={norm}", "model.arch=cifar_resnet", "model.depth=20"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, x.shape[1], x.shape[2]).to(x.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    bnp = BNPreconditioner(model) if precondition else None

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if bnp is not None:
            bnp.step()
        opt.step()

    return step


def timed(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    variants = {"none": make_step("none", False, args, x, y), "bnp": make_step("none", True, args, x, y),
                "bn": make_step("bn", False, args, x, y)}
    for step in variants.values():  # warm-up
        timed(step, 3, device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            times[name].append(timed(step, args.steps, device))
    print(f"ResNet-20 training step, batch {args.batch}, {args.channels}x{args.image_size}x{args.image_size}, "
          f"{device}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    for name, values in times.items():
        print(f"  {name:5s} min {min(values) * 1e3:8.2f} ms  median {statistics.median(values) * 1e3:8.2f} ms")
    for name in ("bnp", "bn"):
        print(f"  {name}/none  min {min(times[name]) / min(times['none']):.2f}x  "
              f"median {statistics.median(times[name]) / statistics.median(times['none']):.2f}x")


if __name__ == "__main__":
    main()
