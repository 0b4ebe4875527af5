"""Forward+backward time of every normalization variant, as a ratio to torch.nn.BatchNorm2d.

Every registered variant (sn, rms, dbn, iternorm and frozen included) runs in training mode on a
(32, 64, 32, 32) float32 tensor; one timed call is a
forward and a backward (input and parameter gradients). Layers are timed in rounds, each round
timing torch's BatchNorm2d and then every variant once, after a warm-up; the ratio is the median
over rounds of (variant time / BatchNorm2d time in the same round), which keeps the ratio honest
on a shared, noisy machine. Variants that read their preceding conv's weight (cbn, kn) are timed
in a conv stack against the same stack with BatchNorm2d. CPU always, CUDA too when present.
Goal: every variant within 3x of BatchNorm2d on CPU in eager mode.

    .venv/bin/python benchmarks/norm_layers.py [--repeats 15] [--threads 1] [--shape 32 64 32 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import normlayers

GOAL = 3.0
# Specs that exercise the variant's distinctive path at batch 32 (defaults would reduce ghost to
# BN, and keep brn in its plain-BN warm-up).
SPECS = {
    "ghost": "ghost:virtual_batch=8",
    "brn": "brn:warmup_steps=0,r_max_steps=0,d_max_steps=0",
    "cbn": "cbn:burnin=0",
}


class ConvNormStack(torch.nn.Sequential):
    """conv -> norm -> ReLU -> conv -> norm: how variants that read their preceding conv's weight
    (cbn, kn) are timed, against the same stack with torch's BatchNorm2d."""

    def __init__(self, channels: int, spec: str | None):
        def norm(conv: torch.nn.Conv2d) -> torch.nn.Module:
            if spec is None:
                return torch.nn.BatchNorm2d(channels)
            layer = normlayers.build_norm(spec, channels)
            layer.bind_preceding(conv)
            return layer

        conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        super().__init__(conv1, norm(conv1), torch.nn.ReLU(), conv2, norm(conv2))
        normlayers.link_kalman_layers(self)


def _step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    layer.zero_grad(set_to_none=True)
    layer(x).backward(grad)


def _timed(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    _step(layer, x, grad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(
    shape: list[int], device: torch.device, repeats: int, warmup: int, with_conv: bool = False
) -> list[tuple[str, str, float, float]]:
    """(name, spec, median ms, median ratio to the anchor) per variant. The anchor is BatchNorm2d, or
    with ``with_conv`` the conv stack with BatchNorm2d, for the variants that need their conv."""
    channels = shape[1]
    layers: dict[str, tuple[str, torch.nn.Module]] = {}
    for name in normlayers.available():
        if normlayers.norm_class(name).needs_preceding_weight != with_conv:
            continue
        spec = SPECS.get(name, name)
        layer = ConvNormStack(channels, spec) if with_conv else normlayers.build_norm(spec, channels)
        layers[name] = (spec, layer.to(device).train())
    reference = (ConvNormStack(channels, None) if with_conv else torch.nn.BatchNorm2d(channels)).to(device).train()
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)

    for _ in range(warmup):
        _step(reference, x, grad)
        for _, layer in layers.values():
            _step(layer, x, grad)
    times: dict[str, list[float]] = {name: [] for name in layers}
    ratios: dict[str, list[float]] = {name: [] for name in layers}
    reference_times = []
    for _ in range(repeats):
        base = _timed(reference, x, grad, device)
        reference_times.append(base)
        for name, (_, layer) in layers.items():
            t = _timed(layer, x, grad, device)
            times[name].append(t)
            ratios[name].append(t / base)
    anchor = "conv stack + BatchNorm2d" if with_conv else "torch.nn.BatchNorm2d"
    rows = [("anchor", anchor, statistics.median(reference_times) * 1e3, 1.0)]
    for name, (spec, _) in layers.items():
        rows.append((name, spec, statistics.median(times[name]) * 1e3, statistics.median(ratios[name])))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 32, 32], metavar=("N", "C", "H", "W"))
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for with_conv in (False, True):
            rows = measure(args.shape, device, args.repeats, args.warmup, with_conv)
            threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
            what = "conv -> norm -> ReLU -> conv -> norm" if with_conv else "the layer alone"
            print(f"\n{device.type.upper()} forward+backward of {what}, input {tuple(args.shape)} float32{threads}, "
                  f"median of {args.repeats}")
            print(f"{'variant':12s} {'spec':48s} {'ms':>9s} {'x anchor':>8s}")
            for name, spec, ms, ratio in rows:
                flag = "" if ratio <= GOAL or device.type != "cpu" else f"  over the {GOAL:g}x goal"
                print(f"{name:12s} {spec:48s} {ms:9.2f} {ratio:8.2f}{flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
