"""Forward+backward time of every normalization variant, as a ratio to torch.nn.BatchNorm2d, eager and compiled.

Every registered variant runs in training mode on a (32, 64, 32, 32) float32 tensor; one timed call
is a forward and a backward (input and parameter gradients). Noise on a shared machine is handled by
interleaving: each variant is timed in pairs, the anchor (torch's BatchNorm2d) and then the variant
(A B A B ...), so both see the same load; the table gives the minimum and the median over pairs of
the time, and two ratios: the ratio of the minima (the least disturbed call of each) and the median
of the paired ratios. Pairs are added (beyond ``--repeats``) until the median ratio's 95% interval
(distribution-free, from the order statistics) is within +-``--precision`` of it or ``--budget``
seconds are spent; the table prints the interval reached, so a figure's precision is on its row.
By default torch runs one thread and the clock is that thread's CPU time
(``--clock cpu``): with one intra-op thread the forward and the CPU backward both run on the calling
thread, so time spent waiting for a core under other processes' load (this machine runs several
agents on 2 cores) is not counted, where wall time under load was off by 2-4x between runs; shared
caches and memory bandwidth still move the ratios of memory-heavy variants with the load (``uptime``
is printed with each table). ``--clock wall`` times wall clock.
Variants that read their preceding conv's weight (cbn, kn) are timed in a conv
stack against the same stack with BatchNorm2d. ``--compile`` adds the same table for
``torch.compile(fullgraph=True)`` (inductor) of each, against compiled BatchNorm2d; a variant that
cannot compile as one graph is compiled with graph breaks and marked. CPU always, CUDA too when present.
Goals (issue 18): eager <= 2x (first bar) and <= 1.5x; compiled <= 1.25x.

    .venv/bin/python benchmarks/norm_layers.py [--repeats 30] [--compile] [--only bn,ic] [--threads 1]
                                               [--clock cpu|wall] [--precision 0.03] [--budget 8]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

import normlayers

EAGER_GOAL, EAGER_FIRST_BAR, COMPILED_GOAL = 1.5, 2.0, 1.25
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


def cpu_clock():
    """The CPU time of the calling thread when torch runs one thread (all of a CPU forward and
    backward then runs on it), else of the process."""
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


class Timed:
    """One layer (eager or compiled) and its timed forward+backward."""

    def __init__(self, module: torch.nn.Module, call, x: torch.Tensor, grad: torch.Tensor, clock=time.perf_counter):
        self.module, self.call, self.x, self.grad, self.clock = module, call, x, grad, clock

    def step(self) -> float:
        device = self.x.device
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = self.clock()
        self.call(self.x).backward(self.grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return self.clock() - start


def build(name: str | None, channels: int, with_conv: bool, device: torch.device) -> torch.nn.Module:
    """The variant ``name`` (None: torch's BatchNorm2d), alone or in the conv stack, in training mode."""
    spec = None if name is None else SPECS.get(name, name)
    if with_conv:
        return ConvNormStack(channels, spec).to(device).train()
    layer = torch.nn.BatchNorm2d(channels) if spec is None else normlayers.build_norm(spec, channels)
    return layer.to(device).train()


def prepare(module: torch.nn.Module, compiled: bool) -> tuple[object, str]:
    """The callable to time and a note: fullgraph compile, else compile with graph breaks (marked)."""
    if not compiled:
        return module, ""
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True), ""


def median_interval(values: list[float]) -> tuple[float, float]:
    """Distribution-free 95% interval of the median: the order statistics n/2 -+ 0.98 sqrt(n)."""
    ordered = sorted(values)
    n = len(ordered)
    spread = 0.98 * math.sqrt(n)
    return ordered[max(0, math.floor(n / 2 - spread))], ordered[min(n - 1, math.ceil(n / 2 + spread))]


def relative_half_width(ratios: list[float]) -> float:
    low, high = median_interval(ratios)
    return (high - low) / (2 * statistics.median(ratios))


def pair_times(anchor: Timed, variant: Timed, repeats: int, warmup: int, budget: float,
               precision: float = 0.0) -> tuple[list[float], list[float]]:
    """At least ``repeats`` pairs, then more until the median ratio's 95% interval is within
    +-``precision`` of it, or ``budget`` seconds of timed calls are spent (max 20x repeats)."""
    for _ in range(warmup):
        anchor.step()
        variant.step()
    anchor_times, variant_times = [], []

    def more() -> bool:
        if len(anchor_times) < repeats:
            return True
        if sum(anchor_times) + sum(variant_times) >= budget or len(anchor_times) >= 20 * repeats:
            return False
        ratios = [v / a for v, a in zip(variant_times, anchor_times, strict=True)]
        return relative_half_width(ratios) > precision

    while more():
        # A B A B: both see the same moment's load; which one goes first alternates
        if len(anchor_times) % 2:
            variant_times.append(variant.step())
            anchor_times.append(anchor.step())
        else:
            anchor_times.append(anchor.step())
            variant_times.append(variant.step())
    return anchor_times, variant_times


def measure(names: list[str], shape: list[int], device: torch.device, repeats: int, warmup: int,
            compiled: bool, budget: float = 0.0, clock=time.perf_counter, precision: float = 0.0):
    """One row per variant, yielded as soon as it is measured (compiling every variant takes minutes)."""
    channels = shape[1]
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    anchors: dict[bool, Timed] = {}
    for name in names:
        with_conv = normlayers.norm_class(name).needs_preceding_weight
        if with_conv not in anchors:
            module = build(None, channels, with_conv, device)
            anchors[with_conv] = Timed(module, prepare(module, compiled)[0], x, grad, clock)
        module = build(name, channels, with_conv, device)
        note = ""
        try:
            call, note = prepare(module, compiled)
            variant = Timed(module, call, x, grad, clock)
            variant.step()
        except Exception as error:  # noqa: BLE001  (reported in the table: the variant does not compile as one graph)
            if not compiled:
                raise
            torch._dynamo.reset()
            module = build(name, channels, with_conv, device)
            variant = Timed(module, torch.compile(module), x, grad, clock)
            note = f"graph breaks ({type(error).__name__})"
        try:
            anchor_times, variant_times = pair_times(anchors[with_conv], variant, repeats, warmup, budget, precision)
        except Exception as error:  # noqa: BLE001  (e.g. a recompile on every step: reported, not timed)
            if not compiled:
                raise
            print(f"{name:12s} not timed: {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
            continue
        yield {
            "name": name,
            "anchor": "conv stack + BatchNorm2d" if with_conv else "BatchNorm2d",
            "min_ms": min(variant_times) * 1e3,
            "median_ms": statistics.median(variant_times) * 1e3,
            "anchor_min_ms": min(anchor_times) * 1e3,
            "ratio_of_min": min(variant_times) / min(anchor_times),
            "median_ratio": statistics.median(ratios := [v / a for v, a in zip(variant_times, anchor_times,
                                                                                 strict=True)]),
            "interval": relative_half_width(ratios),
            "pairs": len(variant_times),
            "note": note,
        }


def flag(ratio: float, compiled: bool, device: torch.device) -> str:
    if device.type != "cpu":
        return ""
    if compiled:
        return "" if ratio <= COMPILED_GOAL else f"over {COMPILED_GOAL:g}x"
    if ratio <= EAGER_GOAL:
        return ""
    return f"over {EAGER_GOAL:g}x" if ratio <= EAGER_FIRST_BAR else f"over {EAGER_FIRST_BAR:g}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 32, 32], metavar=("N", "C", "H", "W"))
    parser.add_argument("--repeats", type=int, default=30, help="timed anchor/variant pairs per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed pairs first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="CPU time (default; immune to other processes' load) or wall time, on CPU")
    parser.add_argument("--precision", type=float, default=0.03,
                        help="pairs are added until the median ratio's 95%% interval is within +- this fraction")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="seconds of timed calls per variant at most, whatever the precision reached")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True)")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: every one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(normlayers.available())
    unknown = sorted(set(names) - set(normlayers.available()))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; available: {', '.join(normlayers.available())}")
    torch.manual_seed(0)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for compiled in (False, True) if args.compile else (False,):
            threads = (f", {torch.get_num_threads()} threads, {args.clock} time"
                       if device.type == "cpu" else "")
            mode = "torch.compile(fullgraph=True)" if compiled else "eager"
            print(f"\nload average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
            print(f"{device.type.upper()} {mode} forward+backward, input {tuple(args.shape)} float32{threads}, "
                  f">= {args.repeats} interleaved pairs, more until x(med) is known to +-{args.precision:.0%} "
                  f"(95%, at most {args.budget:g} s); anchor: the same mode's "
                  f"BatchNorm2d; x(med), the median of per-pair ratios, is the figure the goals are read on")
            print(f"{'variant':12s} {'min ms':>8s} {'med ms':>8s} {'anchor':>8s} {'x(min)':>7s} {'x(med)':>7s} "
                  f"{'pairs':>5s} {'+-95%':>6s}  note", flush=True)
            clock = cpu_clock() if device.type == "cpu" and args.clock == "cpu" else time.perf_counter
            for r in measure(names, args.shape, device, args.repeats, args.warmup, compiled, args.budget, clock,
                             args.precision):
                note = " ".join(filter(None, [flag(r["median_ratio"], compiled, device), r["note"],
                                              "(conv stack)" if r["anchor"] != "BatchNorm2d" else ""]))
                print(f"{r['name']:12s} {r['min_ms']:8.2f} {r['median_ms']:8.2f} {r['anchor_min_ms']:8.2f} "
                      f"{r['ratio_of_min']:7.2f} {r['median_ratio']:7.2f} {r['pairs']:5d} {r['interval']:6.1%}  {note}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
