"""The frontier arithmetic of benchmarks/bench_finetune.py (benchmarks/finetune_stats.py), on synthetic numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from finetune_stats import (  # noqa: E402
    compare_to_curve,
    cost_to_reach,
    format_ratio,
    quality_at_cost,
    running_best,
    t_interval,
)

# Accuracy against cost: 0.5 at 0, 0.7 at 1, 0.8 at 2, 0.78 at 3 (worse than at 2: the running best keeps 0.8).
CURVE = [(0.0, 0.5), (1.0, 0.7), (2.0, 0.8), (3.0, 0.78)]


def test_running_best_never_gets_worse_with_cost():
    assert running_best(CURVE, higher_is_better=True) == [(0.0, 0.5), (1.0, 0.7), (2.0, 0.8), (3.0, 0.8)]
    losses = [(0.0, 5.0), (2.0, 4.0), (1.0, 4.5), (3.0, 4.2)]
    assert running_best(losses, higher_is_better=False) == [(0.0, 5.0), (1.0, 4.5), (2.0, 4.0), (3.0, 4.0)]


def test_cost_to_reach_interpolates_and_censors_above_the_curve():
    assert cost_to_reach(CURVE, 0.75, True) == (pytest.approx(1.5), False)
    assert cost_to_reach(CURVE, 0.8, True) == (2.0, False)  # the cheapest run that reaches it
    assert cost_to_reach(CURVE, 0.4, True) == (0.0, False)  # worse than no fine-tuning
    assert cost_to_reach(CURVE, 0.9, True) == (3.0, True)  # better than every baseline run: at least the longest
    assert cost_to_reach([(0.0, 5.0), (1.0, 4.0)], 4.5, False) == (pytest.approx(0.5), False)


def test_quality_at_cost_is_none_beyond_the_curve():
    assert quality_at_cost(CURVE, 0.5, True) == pytest.approx(0.6)
    assert quality_at_cost(CURVE, 2.5, True) == 0.8
    assert quality_at_cost(CURVE, 3.5, True) is None


def test_t_interval_matches_the_textbook_value():
    interval = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert (interval.mean, interval.sd) == (2.0, 1.0)
    assert interval.low == pytest.approx(2 - 4.303 / 3**0.5)
    assert interval.excludes(-1.0) == "above" and interval.excludes(0.0) is None and interval.excludes(5.0) == "below"
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])


def test_compare_to_curve_pairs_seeds_and_marks_censoring():
    curves = {0: CURVE, 1: [(c, q + 0.01) for c, q in CURVE], 2: CURVE}
    # Seed 0 reaches 0.75 at cost 1 (the baseline needs 1.5); seed 1 reaches 0.71 at 0.5 (needs 1.0); seed 2 beats
    # the whole curve at cost 1.5 (censored: needs at least 3). Seed 3 has no curve and does not count.
    runs = {0: (1.0, 0.75), 1: (0.5, 0.71), 2: (1.5, 0.9), 3: (1.0, 0.0)}
    comparison = compare_to_curve(curves, runs, higher_is_better=True)
    assert comparison.ratios == pytest.approx([1.5, 2.0, 2.0])
    assert comparison.censored == [False, False, True]
    assert comparison.ratio.censored == 1
    assert format_ratio(comparison.ratio).startswith(">=1.83x")
    # Differences at equal cost, + favouring the configuration: 0.75 - 0.7, 0.71 - 0.61, 0.9 - 0.75.
    assert comparison.difference.mean == pytest.approx((0.05 + 0.10 + 0.15) / 3)
