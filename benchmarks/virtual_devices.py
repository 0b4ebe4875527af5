"""What k virtual devices cost: forward+backward of a weight layer + norm block, as a ratio to k = 1.

Two blocks: a conv + norm block on (32, 16, 8, 8) (a small conv net's layer) and a linear + norm
block on (32, 128) (the demo's MLP layer), each with bn, brn, bgn (4 groups) and, as the per-slice
reference, cbn (state across steps: it always runs one forward per slice). For each k in 4 and 16
the variant runs on the folded path (its default, :mod:`normlayers.virtual`) and, for comparison,
on the per-slice path (the same layer with its ``device_fold`` cleared). Noise on a shared machine is
handled by interleaving: every timed call of a configuration is paired with one of the same block
at k = 1 (A B A B ...), so both see the same load; the table gives the ratio of the minima and the
median of the paired ratios. Times are this process's CPU time (``time.process_time``), which other
processes on a loaded machine do not inflate. One thread, training mode, one timed call = ``--calls``
forward and backward passes.

    .venv/bin/python benchmarks/virtual_devices.py [--repeats 15] [--calls 20] [--only bn,bgn]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import normlayers

SPECS = {"bn": "bn", "brn": "brn:warmup_steps=0,r_max_steps=0,d_max_steps=0", "bgn": "bgn:groups=4",
         "cbn": "cbn:burnin=0"}
BLOCKS = {"conv (32,16,8,8)": (32, 16, (8, 8)), "linear (32,128)": (32, 128, ())}


def block(spec: str, channels: int, spatial: tuple[int, ...]) -> nn.Module:
    weight = nn.Conv2d(channels, channels, 3, padding=1, bias=False) if spatial else nn.Linear(channels, channels,
                                                                                               bias=False)
    norm = normlayers.build_norm(spec, channels)
    norm.bind_preceding(weight)
    return nn.Sequential(weight, norm).train()


def per_slice(model: nn.Module) -> nn.Module:
    """The same block with its norm on the per-slice path (an instance attribute hides the class's fold)."""
    for layer in model.modules():
        if isinstance(layer, normlayers.NormLayer):
            layer.device_fold = None
    return model


def timed(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        model(x).sum().backward()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed pairs per configuration")
    parser.add_argument("--calls", type=int, default=20, help="forward+backward passes per timed call")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all of " + ",".join(SPECS) + ")")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n for n in args.only.split(",") if n] or list(SPECS)
    print(f"torch {torch.__version__}, 1 thread, CPU time, {args.repeats} interleaved pairs of {args.calls} "
          "forward+backward")
    print(f"{'block':18s} {'norm':5s} {'k':>3s} {'path':9s} {'k=1 ms':>7s} {'ratio of minima':>16s} "
          f"{'median ratio':>13s}")
    for block_name, (batch, channels, spatial) in BLOCKS.items():
        x = torch.randn(batch, channels, *spatial)
        for name in names:
            torch.manual_seed(0)
            anchor = block(SPECS[name], channels, spatial)
            for k in (4, 16):
                paths = {"folded": normlayers.set_virtual_devices(copy.deepcopy(anchor), k)}
                if normlayers.virtual.folds(normlayers.norm_class(name)):
                    paths["per-slice"] = per_slice(normlayers.set_virtual_devices(copy.deepcopy(anchor), k))
                else:
                    paths = {"per-slice": paths["folded"]}
                for path, model in paths.items():
                    timed(anchor, x, 2), timed(model, x, 2)  # warm-up
                    pairs = [(timed(anchor, x, args.calls), timed(model, x, args.calls)) for _ in range(args.repeats)]
                    base = [a for a, _ in pairs]
                    ratio_of_minima = min(b for _, b in pairs) / min(base)
                    median_ratio = statistics.median(b / a for a, b in pairs)
                    print(f"{block_name:18s} {name:5s} {k:3d} {path:9s} {min(base) / args.calls * 1e3:7.3f} "
                          f"{ratio_of_minima:16.2f} {median_ratio:13.2f}", flush=True)


if __name__ == "__main__":
    main()
