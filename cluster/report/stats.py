"""Uncertainty for the report's panels: 95% Student-t intervals over seeds and paired norm comparisons.

A point of the batch-regime panel is the mean validation error over seeds; with n >= 2 seeds its
95% interval is mean +- t(0.975, n-1) * s / sqrt(n). Two norms at one per-device batch size are
compared on the seeds both ran (paired: the seed fixes data order and initialisation), so the
interval is the t interval of the per-seed differences. A difference is *resolved* when that
interval excludes zero; otherwise the report says it is not resolved at that number of seeds.
An interval of zero width is not evidence: it means every seed's difference was the same, which on a
validation set of a few hundred images is what a one-image difference per seed looks like (the
error's resolution, not a spread of zero), so such a difference is not resolved either.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95
INTERVAL_NAME = "95% t interval"
# below this half-width (errors are fractions in [0, 1]) an interval counts as zero-width: identical
# per-seed differences of metrics logged in float32 leave rounding of about 1e-7, not a spread
ZERO_WIDTH = 1e-6

# Two-sided 95% quantiles t(0.975, df) of Student's t distribution (standard tables).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile(df: int) -> float:
    """t(0.975, df); between tabled degrees of freedom the next smaller one (a wider, safe interval)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    if df > 120:
        return statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
    return _T975[max(d for d in _T975 if d <= df)]


def t_half_width(values: list[float]) -> float | None:
    """Half-width of the 95% t interval of the mean of ``values``; None with fewer than 2 values."""
    if len(values) < 2:
        return None
    return t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class Comparison:
    """Error of ``worse`` minus error of ``better`` at one batch size over the seeds both ran."""

    worse: str
    better: str
    batch_size: int
    difference: float  # mean of the per-seed error differences, >= 0
    half_width: float | None  # of the 95% t interval; None with one shared seed
    seeds: int

    @property
    def resolved(self) -> bool:
        # a zero-width interval (identical per-seed differences) estimates no spread: see the module docstring
        return self.half_width is not None and self.half_width > ZERO_WIDTH and self.difference > self.half_width

    def sentence(self) -> str:
        points = 100 * self.difference
        where = f"at per-device batch {self.batch_size}"
        if self.half_width is None:
            return (f"{self.worse} vs {self.better} {where}: one shared seed, no interval can be given "
                    f"(difference {points:.1f} points).")
        evidence = f"{points:.1f} ± {100 * self.half_width:.1f} points ({INTERVAL_NAME}, {self.seeds} seeds)"
        if self.resolved:
            return f"{self.worse} is worse than {self.better} {where} by {evidence}."
        return (f"{self.worse} vs {self.better} {where}: the difference {evidence} "
                f"is not resolved at {self.seeds} seeds.")


def compare(norm_a: str, errors_a: dict[int, float], norm_b: str, errors_b: dict[int, float],
            batch_size: int) -> Comparison | None:
    """Paired comparison on the shared seeds (``{seed: error}``); None when no seed is shared."""
    shared = sorted(set(errors_a) & set(errors_b))
    if not shared:
        return None
    diffs = [errors_a[s] - errors_b[s] for s in shared]
    mean = statistics.fmean(diffs)
    worse, better = (norm_a, norm_b) if mean >= 0 else (norm_b, norm_a)
    return Comparison(worse, better, batch_size, abs(mean), t_half_width(diffs), len(shared))
