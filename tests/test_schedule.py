from __future__ import annotations

import ast
import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hf_layer_freeze import freeze_fraction, num_units_to_freeze


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
