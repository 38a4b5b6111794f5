"""The frontier arithmetic of `bench_finetune.py`: pure functions on numbers, no torch (tested in tests/).

Per seed, the unfrozen baseline is a curve: its runs at 0.25x-1.5x of its length S (the learning-rate schedule
compressed to each length), plus the backbone before fine-tuning at cost 0. Against that curve:

- `cost_to_reach(curve, quality)`: the baseline cost needed to reach `quality`, by linear interpolation on the
  curve's running best (a longer baseline run that came out worse does not make the quality cheaper or dearer to
  reach: the frontier is what the cheapest run reaching it costs). Above the curve's best (its longest runs):
  censored, the cost is at least the curve's largest (`censored=True`).
- `quality_at_cost(curve, cost)`: the baseline quality at `cost`, interpolated on the running best; `None` beyond
  the curve's largest cost.
- A configuration's cost ratio = `cost_to_reach(its quality) / its cost`: above 1, it reached the frontier's quality
  cheaper (freezing moved the frontier); censored ratios are lower bounds.
- `t_interval(values)`: mean and two-sided 95% Student-t interval over seeds (the values are per-seed paired
  differences or ratios). With censored ratios counted at their bounds, the mean and the lower end are lower bounds
  (the true values are larger), and the interval is reported as such.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30; beyond, the normal quantile is close enough.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    sd: float
    n: int
    censored: int = 0  # values that are bounds (lower bounds of ratios)

    def excludes(self, value: float) -> str | None:
        """`"above"` or `"below"` when the whole interval lies on that side of `value`, else `None`."""
        return "above" if self.low > value else "below" if self.high < value else None


def t_interval(values: list[float], censored: int = 0) -> Interval:
    """Mean, sample sd and the 95% t-interval of the mean of `values` (at least 2)."""
    if len(values) < 2:
        raise ValueError(f"t_interval needs at least 2 values, got {len(values)}")
    mean, sd = statistics.mean(values), statistics.stdev(values)
    half = t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, sd, len(values), censored)


def running_best(curve: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """`curve` ((cost, quality) points) sorted by cost, each quality replaced by the best at that cost or below."""
    sign = 1.0 if higher_is_better else -1.0
    out: list[tuple[float, float]] = []
    for cost, quality in sorted(curve):
        if out and sign * quality < sign * out[-1][1]:
            quality = out[-1][1]
        out.append((cost, quality))
    return out


def cost_to_reach(curve: list[tuple[float, float]], quality: float, higher_is_better: bool) -> tuple[float, bool]:
    """(baseline cost needed to reach `quality`, censored): see the module docstring."""
    if len(curve) < 2:
        raise ValueError(f"curve needs at least 2 points, got {len(curve)}")
    sign = 1.0 if higher_is_better else -1.0
    best = running_best(curve, higher_is_better)
    if sign * quality <= sign * best[0][1]:
        return best[0][0], False
    for (c0, q0), (c1, q1) in zip(best, best[1:], strict=False):
        if sign * q1 >= sign * quality:
            if q1 == q0:
                return c0, False
            return c0 + (c1 - c0) * (quality - q0) / (q1 - q0), False
    return best[-1][0], True


def quality_at_cost(curve: list[tuple[float, float]], cost: float, higher_is_better: bool) -> float | None:
    """The baseline's (running-best) quality at `cost`, linearly interpolated; `None` beyond its largest cost."""
    best = running_best(curve, higher_is_better)
    if cost > best[-1][0]:
        return None
    if cost <= best[0][0]:
        return best[0][1]
    for (c0, q0), (c1, q1) in zip(best, best[1:], strict=False):
        if c0 <= cost <= c1:
            return q0 if c1 == c0 else q0 + (q1 - q0) * (cost - c0) / (c1 - c0)
    return best[-1][1]


@dataclass(frozen=True)
class Comparison:
    """One configuration against the baseline curve, on one cost measure, over paired seeds."""

    ratio: Interval  # baseline cost to reach its quality / its cost; lower bounds where censored
    difference: Interval | None  # quality minus the baseline's at equal cost, + favouring freezing
    ratios: list[float]
    censored: list[bool]


def compare_to_curve(
    curves: dict[int, list[tuple[float, float]]],
    runs: dict[int, tuple[float, float]],
    higher_is_better: bool,
) -> Comparison:
    """Per seed: `curves[seed]` the baseline's (cost, quality) points, `runs[seed]` the configuration's (cost,
    quality).
    Only seeds in both count; at least 2."""
    seeds = sorted(set(curves) & set(runs))
    sign = 1.0 if higher_is_better else -1.0
    ratios, censored, differences = [], [], []
    for seed in seeds:
        cost, quality = runs[seed]
        needed, cut = cost_to_reach(curves[seed], quality, higher_is_better)
        ratios.append(needed / cost)
        censored.append(cut)
        at = quality_at_cost(curves[seed], cost, higher_is_better)
        if at is not None:
            differences.append(sign * (quality - at))
    ratio = t_interval(ratios, censored=sum(censored))
    difference = t_interval(differences) if len(differences) >= 2 else None
    return Comparison(ratio, difference, ratios, censored)


def format_ratio(interval: Interval) -> str:
    """`"1.42x (1.20-1.64)"`; where some seeds were censored, `">=1.42x (>=1.20-?)"`: the mean and the interval's
    lower end are lower bounds, its upper end unknown."""
    if interval.censored:
        return f">={interval.mean:.2f}x (>={interval.low:.2f}-?)"
    return f"{interval.mean:.2f}x ({interval.low:.2f}-{interval.high:.2f})"
