from __future__ import annotations

import ast
import bisect
import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hf_layer_freeze import freeze_fraction, num_units_to_freeze
from hf_layer_freeze.schedule import freezing_epoch_ends, resolve_freeze_every


def test_zero_until_freeze_start_then_linear_to_freeze_level():
    assert freeze_fraction(0.0) == 0.0
    assert freeze_fraction(0.5) == 0.0  # at freeze_start: still nothing
    assert freeze_fraction(0.5 + 1e-9) > 0.0
    assert freeze_fraction(0.75) == pytest.approx(0.5)
    assert freeze_fraction(1.0) == 1.0
    assert freeze_fraction(1.0, freeze_start=0.1, freeze_level=0.6) == pytest.approx(0.6)
    assert freeze_fraction(0.55, freeze_start=0.1, freeze_level=0.8) == pytest.approx(0.8 * 0.45 / 0.9)
    assert freeze_fraction(0.3, freeze_start=0.0, freeze_level=1.0) == pytest.approx(0.3)


def test_freeze_level_zero_never_freezes():
    assert all(freeze_fraction(p / 10, 0.2, 0.0) == 0.0 for p in range(11))


@given(
    start=st.floats(0, 0.999),
    level=st.floats(0, 1),
    a=st.floats(0, 1),
    b=st.floats(0, 1),
)
def test_schedule_is_monotonic_and_bounded(start, level, a, b):
    lo, hi = sorted((a, b))
    f_lo, f_hi = freeze_fraction(lo, start, level), freeze_fraction(hi, start, level)
    assert 0.0 <= f_lo <= f_hi <= level


@given(fraction=st.floats(0, 1), n=st.integers(0, 500))
def test_unit_count_is_floor_of_fraction_times_n(fraction, n):
    exact = Fraction(fraction) * n  # the float's exact value, times n: no rounding anywhere
    k = num_units_to_freeze(fraction, n)
    if math.ceil(exact) - exact > Fraction(1, 10**8):
        assert k == math.floor(exact)
    else:  # within binary-rounding distance below an integer: that integer, or the floor
        assert k in (math.floor(exact), math.ceil(exact))


@given(thousandths=st.integers(0, 1000), n=st.integers(0, 500))
def test_unit_count_of_a_decimal_fraction_is_its_exact_floor(thousandths, n):
    # 0.29 is stored as 0.28999999999999998: the count must still be that of the decimal the user wrote
    assert num_units_to_freeze(thousandths / 1000, n) == thousandths * n // 1000


def test_unit_count_survives_binary_rounding():
    assert 0.29 * 100 < 29  # what floor alone would get wrong
    assert num_units_to_freeze(0.29, 100) == 29
    assert num_units_to_freeze(0.5, 7) == 3


@pytest.mark.parametrize(
    ("kwargs", "name", "allowed"),
    [
        ({"progress": 0.5, "freeze_start": 1.0}, "freeze_start", "[0, 1)"),
        ({"progress": 0.5, "freeze_start": -0.1}, "freeze_start", "[0, 1)"),
        ({"progress": 0.5, "freeze_level": 1.5}, "freeze_level", "[0, 1]"),
        ({"progress": 0.5, "freeze_level": -1}, "freeze_level", "[0, 1]"),
        ({"progress": 1.01}, "progress", "[0, 1]"),
        ({"progress": -0.5}, "progress", "[0, 1]"),
        ({"progress": float("nan")}, "progress", "[0, 1]"),
        ({"progress": "0.5"}, "progress", "[0, 1]"),
    ],
)
def test_out_of_range_arguments_name_argument_range_and_value(kwargs, name, allowed):
    with pytest.raises(ValueError) as error:
        freeze_fraction(**kwargs)
    message = str(error.value)
    assert name in message and allowed in message and repr(kwargs[name]) in message


def test_schedule_module_does_not_import_torch():
    source = Path(__file__).parents[1].joinpath("hf_layer_freeze", "schedule.py").read_text()
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert "torch" not in imported


def _epoch_ends_by_search(num_epochs: int, freeze_start: float) -> int:
    """Ground truth for any count: `e / num_epochs > freeze_start` grows with e, so bisect for its first epoch."""
    epochs = range(1, num_epochs)
    return len(epochs) - bisect.bisect_left(epochs, True, key=lambda e: e / num_epochs > freeze_start)


@pytest.mark.timeout(30)  # the Trainer's sys.maxsize epochs of a streaming dataset: counted one by one, it never ends
@pytest.mark.parametrize("num_epochs", [10**9 + 7, 2**53 + 1, sys.maxsize])
@pytest.mark.parametrize("freeze_start", [0.0, 0.1, 0.3, 0.5, 0.6, 0.9, 1 / 3])
def test_freezing_epoch_ends_counts_any_number_of_epochs_in_closed_form(num_epochs, freeze_start):
    assert freezing_epoch_ends(num_epochs, freeze_start) == _epoch_ends_by_search(num_epochs, freeze_start)
    assert resolve_freeze_every("auto", num_epochs, freeze_start) == "epoch"


@given(
    num_epochs=st.one_of(st.integers(0, 400), st.floats(0, 400, allow_nan=False)),
    freeze_start=st.floats(0, 1, exclude_max=True),
)
def test_freezing_epoch_ends_is_the_count_of_epochs_whose_progress_is_past_freeze_start(num_epochs, freeze_start):
    # the definition, epoch by epoch, with the float the schedule compares (6 / 10 is not past 0.6)
    expected = sum(1 for epoch in range(1, int(num_epochs)) if epoch / num_epochs > freeze_start)
    assert freezing_epoch_ends(num_epochs, freeze_start) == expected


def test_auto_is_by_step_when_the_epoch_count_is_unknown():
    assert resolve_freeze_every("auto", None, 0.5) == "step"
    with pytest.raises(ValueError, match=r"num_epochs must be a finite number >= 0, got inf"):
        freezing_epoch_ends(math.inf, 0.5)
