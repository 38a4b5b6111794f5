"""The freezing schedule: pure arithmetic, no torch.

Progress through training (a number in [0, 1]) maps to a freeze fraction, and the fraction to a count of units.
Keeping this layer free of torch makes it trivially testable and lets tools (plans, benchmarks) reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from numbers import Real

__all__ = [
    "MIN_EPOCH_FREEZES",
    "bounded_unit_count",
    "freeze_fraction",
    "freezing_epoch_ends",
    "num_units_for_budget",
    "num_units_to_freeze",
    "progress_at_step",
    "relative_changes",
    "resolve_freeze_every",
    "settled_prefix",
    "updates_at_step",
    "validate_choice",
    "validate_freeze_level",
    "validate_freeze_start",
    "validate_freeze_start_level",
    "validate_progress",
]

# floor(fraction * N) must not lose a unit to binary rounding (0.29 * 100 == 28.999999999999996).
_FLOOR_TOLERANCE = 1e-9


def _is_number(value: object) -> bool:
    """A real number, Python's or numpy's (`np.float32(0.5)`), but not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def validate_freeze_start(freeze_start: float) -> float:
    """Return `freeze_start` as a float, or raise `ValueError` unless it is in [0, 1)."""
    if not _is_number(freeze_start) or not 0 <= freeze_start < 1:
        raise ValueError(f"freeze_start must be a number in [0, 1), got {freeze_start!r}")
    return float(freeze_start)


def validate_freeze_level(freeze_level: float) -> float:
    """Return `freeze_level` as a float, or raise `ValueError` unless it is in [0, 1]."""
    if not _is_number(freeze_level) or not 0 <= freeze_level <= 1:
        raise ValueError(f"freeze_level must be a number in [0, 1], got {freeze_level!r}")
    return float(freeze_level)


def validate_freeze_start_level(start_level: float, freeze_level: float = 1.0) -> float:
    """Return `start_level` as a float, or raise `ValueError` unless it is in [0, 1] and at most `freeze_level`."""
    if not _is_number(start_level) or not 0 <= start_level <= 1:
        raise ValueError(f"freeze_start_level must be a number in [0, 1], got {start_level!r}")
    if start_level > freeze_level:
        raise ValueError(
            f"freeze_start_level must be at most freeze_level (the schedule grows from one to the other), got "
            f"freeze_start_level={start_level!r} and freeze_level={freeze_level!r}"
        )
    return float(start_level)


def validate_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return `value`, or raise `ValueError` naming `name`, the allowed values and the value."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def validate_progress(progress: float) -> float:
    """Return `progress` as a float, or raise `ValueError` unless it is in [0, 1]."""
    if not _is_number(progress) or not 0 <= progress <= 1:
        raise ValueError(f"progress must be a number in [0, 1] (a fraction of training), got {progress!r}")
    return float(progress)


def freeze_fraction(
    progress: float, freeze_start: float = 0.5, freeze_level: float = 1.0, start_level: float = 0.0
) -> float:
    """
    The fraction of freezable units that should be frozen at `progress` through training.

    It is 0 before `freeze_start`; from `freeze_start` on it grows linearly from `start_level` to `freeze_level` at
    `progress == 1`: `start_level + (freeze_level - start_level) * (progress - freeze_start) / (1 - freeze_start)`.
    At `progress == freeze_start` it is `start_level`: with the default `start_level=0` that is 0 (nothing is frozen
    until training is past `freeze_start`, the method card's rule), and with `freeze_start=0` and `start_level > 0`
    that prefix is frozen from the first step (progress 0, before any optimizer step). `start_level ==
    freeze_level` is a static prefix: that fraction, from `freeze_start` to the end. The defaults are Composer's.

    Args:
        progress (`float`):
            How far training has gone, in [0, 1] (for instance `global_step / max_steps`).
        freeze_start (`float`, *optional*, defaults to 0.5):
            The fraction of training, in [0, 1), at which freezing begins.
        freeze_level (`float`, *optional*, defaults to 1.0):
            The fraction of units frozen at the end of training, in [0, 1].
        start_level (`float`, *optional*, defaults to 0.0):
            The fraction frozen at `freeze_start`, in [0, `freeze_level`] (the `freeze_start_level` option).

    Returns:
        `float`: the freeze fraction, in [0, `freeze_level`].

    Raises:
        `ValueError`: an argument out of its range (named, with the range and the value).

    Example:

    ```python
    >>> from hf_layer_freeze import freeze_fraction
    >>> freeze_fraction(0.75, freeze_start=0.5, freeze_level=1.0)
    0.5
    >>> freeze_fraction(0.4)
    0.0
    >>> freeze_fraction(0.0, freeze_start=0.0, freeze_level=1.0, start_level=0.5)  # from the first step
    0.5
    >>> freeze_fraction(0.5, freeze_start=0.0, freeze_level=1.0, start_level=0.5)
    0.75
    >>> freeze_fraction(0.9, freeze_start=0.0, freeze_level=0.5, start_level=0.5)  # a static prefix
    0.5

    ```
    """
    progress = validate_progress(progress)
    freeze_start = validate_freeze_start(freeze_start)
    freeze_level = validate_freeze_level(freeze_level)
    start_level = validate_freeze_start_level(start_level, freeze_level)
    if progress < freeze_start:
        return 0.0
    # with start_level=0 this is the card's `freeze_level * (progress - freeze_start) / (1 - freeze_start)`, bitwise
    grown = (freeze_level - start_level) * (progress - freeze_start) / (1.0 - freeze_start)
    return min(freeze_level, start_level + grown)


def num_units_to_freeze(fraction: float, num_units: int) -> int:
    """
    `floor(fraction * num_units)`: how many of `num_units` units a freeze fraction covers.

    Example:

    ```python
    >>> from hf_layer_freeze import num_units_to_freeze
    >>> num_units_to_freeze(0.5, 7)
    3

    ```
    """
    if not _is_number(fraction) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 0:
        raise ValueError(f"num_units must be a non-negative integer, got {num_units!r}")
    return min(num_units, math.floor(fraction * num_units + _FLOOR_TOLERANCE))


def num_units_for_budget(fraction: float, weights: list[int] | tuple[int, ...]) -> int:
    """
    How many leading units fit in `fraction` of the total weight (parameters or FLOPs of each unit, in order).

    The largest k with `sum(weights[:k]) <= fraction * sum(weights)` (leading units of weight 0, such as embeddings
    weighed by FLOPs, fit in any fraction). With all weights equal this is `num_units_to_freeze(fraction,
    len(weights))`.

    Example:

    ```python
    >>> from hf_layer_freeze.schedule import num_units_for_budget
    >>> num_units_for_budget(0.5, [10, 10, 60, 20])  # the first two units hold 20% of the weight, three hold 80%
    2
    >>> num_units_for_budget(0.01, [0, 10, 10])  # a unit of weight 0 fits in any budget
    1

    ```
    """
    if not _is_number(fraction) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative")
    total = sum(weights)
    if total == 0:
        return num_units_to_freeze(fraction, len(weights))
    budget = fraction * total * (1 + _FLOOR_TOLERANCE)
    count, cumulative = 0, 0
    for weight in weights:
        cumulative += weight
        if cumulative > budget:
            break
        count += 1
    return count


def bounded_unit_count(count: int, final_count: int, max_freeze_events: int | None) -> int:
    """
    `count` rounded down to one of `max_freeze_events` evenly spaced levels of `final_count`, so that a run makes at
    most that many distinct freeze events (each one recompiles a compiled model). `None` leaves `count` unchanged.

    Example:

    ```python
    >>> from hf_layer_freeze.schedule import bounded_unit_count
    >>> [bounded_unit_count(k, 28, 3) for k in (0, 8, 9, 17, 18, 27, 28)]  # levels 9, 18, 28
    [0, 0, 9, 9, 18, 18, 28]

    ```
    """
    if max_freeze_events is None:
        return count
    levels = [final_count * i // max_freeze_events for i in range(1, max_freeze_events + 1)]
    return max((level for level in levels if level <= count), default=0)


def relative_changes(previous: Sequence[float], current: Sequence[float]) -> list[float]:
    """
    `|current - previous| / previous` for each unit: how much its gradient norm moved between two checks. 0 for a
    unit whose gradient was zero both times (it is not moving); infinite where a zero or non-finite value leaves no
    ratio.

    Example:

    ```python
    >>> from hf_layer_freeze.schedule import relative_changes
    >>> relative_changes([2.0, 4.0, 0.0, 0.0], [1.0, 5.0, 1.0, 0.0])
    [0.5, 0.25, inf, 0.0]

    ```
    """
    if len(previous) != len(current):
        raise ValueError(f"previous and current must have the same length, got {len(previous)} and {len(current)}")
    changes = []
    for before, now in zip(previous, current, strict=True):
        if before == 0 and now == 0:
            changes.append(0.0)
            continue
        usable = before > 0 and math.isfinite(before) and math.isfinite(now)
        changes.append(abs(now - before) / before if usable else math.inf)
    return changes


def settled_prefix(changes: Sequence[float], threshold: float = 1.0) -> int:
    """
    How many leading units have settled: the longest prefix whose relative changes are all at most `threshold`
    times the median change of all the units given (the trainable ones). Dividing by the median takes out what moves
    every layer's gradient norm together (the learning-rate schedule, the loss going down), leaving how settled a
    unit is compared with the rest of the network: the rule of AutoFreeze's percentile threshold.

    Example:

    ```python
    >>> from hf_layer_freeze.schedule import settled_prefix
    >>> settled_prefix([0.05, 0.1, 0.6, 0.02, 0.4, 0.5])  # median 0.25: the third unit has not settled
    2
    >>> settled_prefix([0.3, 0.1, 0.2], threshold=0.5)  # 0.3 > 0.5 * 0.2
    0

    ```
    """
    if not _is_number(threshold) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    finite = sorted(c for c in changes if math.isfinite(c))
    if not finite:
        return 0
    middle = len(finite) // 2
    median = finite[middle] if len(finite) % 2 else (finite[middle - 1] + finite[middle]) / 2
    count = 0
    for change in changes:
        if not change <= threshold * median:  # also stops at inf and nan
            break
        count += 1
    return count


# freeze_every="auto" freezes at epoch ends when at least this many of them fall inside the freezing part of the run.
MIN_EPOCH_FREEZES = 4


def freezing_epoch_ends(num_epochs: float, freeze_start: float, start_level: float = 0.0) -> int:
    """
    How many epoch ends fall strictly inside the freezing part of a run of `num_epochs` epochs: where the schedule
    freezes something (after `freeze_start`, or at it too when `start_level > 0`: `freeze_fraction` is then
    `start_level` there) and before the end (a freeze after the last step saves nothing and is not made). The
    epochs `e` in `[1, int(num_epochs))` whose progress `e / num_epochs` (the float the schedule compares) is above
    `freeze_start` (at least `freeze_start` when `start_level > 0`), counted in closed form: instant for any count
    (the Trainer's `sys.maxsize` epochs of a dataset without a length included).

    Example:

    ```python
    >>> import sys
    >>> from hf_layer_freeze.schedule import freezing_epoch_ends
    >>> freezing_epoch_ends(10, 0.5), freezing_epoch_ends(3, 0.5), freezing_epoch_ends(2, 0.5)
    (4, 1, 0)
    >>> freezing_epoch_ends(10, 0.6)  # 6 / 10 == 0.6 is not after freeze_start: epochs 7, 8 and 9
    3
    >>> freezing_epoch_ends(10, 0.6, start_level=0.3)  # ... but it freezes 0.3 at 0.6: epochs 6 to 9
    4
    >>> freezing_epoch_ends(sys.maxsize, 0.5) > 4
    True

    ```
    """
    if not _is_number(num_epochs) or not 0 <= num_epochs < math.inf:
        raise ValueError(f"num_epochs must be a finite number >= 0, got {num_epochs!r}")
    freeze_start = validate_freeze_start(freeze_start)
    start_level = validate_freeze_start_level(start_level)
    last = int(num_epochs) - 1  # the last epoch end before the end of the run
    if last < 1:
        return 0
    # `e / num_epochs > freeze_start` holds exactly when the exact quotient rounds above `freeze_start`: above the
    # midpoint between `freeze_start` and the next float (a quotient at the midpoint itself rounds to even, checked).
    # `>= freeze_start` (start_level > 0): at or above the midpoint between the float below and `freeze_start`.
    if start_level > 0:
        midpoint = (Fraction(math.nextafter(freeze_start, -math.inf)) + Fraction(freeze_start)) / 2
        first = max(1, math.ceil(midpoint * Fraction(num_epochs)))
        if not first / num_epochs >= freeze_start:
            first += 1
        return max(0, last - first + 1)
    midpoint = (Fraction(freeze_start) + Fraction(math.nextafter(freeze_start, math.inf))) / 2
    first = max(1, math.ceil(midpoint * Fraction(num_epochs)))
    if not first / num_epochs > freeze_start:
        first += 1
    return max(0, last - first + 1)


def coarse_epochs_warning(
    freeze_every: str,
    num_epochs: float | None,
    max_steps: int,
    freeze_start: float,
    freeze_level: float,
    start_level: float = 0.0,
) -> str | None:
    """
    With `freeze_every="epoch"` asked for, a run of few epochs freezes at few epoch ends, or at none (a `max_steps`
    shorter than an epoch, or epochs of unknown length: `num_epochs=None`): the warning that says so, with the next
    step, or `None`. (`"auto"` chose for itself; the adaptive schedule checks by step and is not asked.) A schedule
    that has nothing to do at epoch ends is not warned about: a static prefix (`start_level == freeze_level`)
    frozen from the first step (`freeze_start=0`), applied when training begins.
    """
    if freeze_every != "epoch" or freeze_level == 0:
        return None
    if freeze_start == 0 and start_level == freeze_level:
        return None
    if num_epochs is None:
        return (
            "LayerFreezingCallback(freeze_every='epoch'): the Trainer does not know how long an epoch is (the "
            f"training dataset has no __len__, e.g. a streaming IterableDataset, trained for max_steps={max_steps}), "
            "so it freezes only where a pass over the data ends, and a stream that lasts the whole run freezes "
            "nothing. Use freeze_every='step' (or 'auto', which chooses it here) to follow the schedule by step."
        )
    ends = freezing_epoch_ends(num_epochs, freeze_start, start_level)
    if ends >= 2:
        return None
    return (
        f"LayerFreezingCallback(freeze_every='epoch') in a run of {num_epochs} epoch(s) and {max_steps} steps freezes "
        f"at {ends} epoch end(s) before training ends (a freeze after the last step saves nothing and is not made). "
        f"Use freeze_every='auto' (by step below {MIN_EPOCH_FREEZES} freezing epoch ends) or 'step' to follow the "
        "schedule within epochs."
    )


def resolve_freeze_every(
    freeze_every: str, num_epochs: float | None, freeze_start: float, start_level: float = 0.0
) -> str:
    """
    `"epoch"` or `"step"`: what `freeze_every="auto"` means for a run of `num_epochs` epochs. By epoch (the method
    card's rule) when at least `MIN_EPOCH_FREEZES` epoch ends fall inside the freezing part of the run, by step
    otherwise: fine-tuning runs of 1 to 3 epochs follow the schedule within their epochs (`start_level`, the
    `freeze_start_level` option, counts an epoch end at `freeze_start` itself). `num_epochs=None` (a run
    whose epoch length is unknown, such as a streaming dataset trained for `max_steps`) is by step. `"epoch"` and
    `"step"` are returned as given.

    Example:

    ```python
    >>> from hf_layer_freeze.schedule import resolve_freeze_every
    >>> [resolve_freeze_every("auto", 10, 0.5), resolve_freeze_every("auto", 3, 0.5)]
    ['epoch', 'step']
    >>> resolve_freeze_every("auto", None, 0.5)
    'step'
    >>> resolve_freeze_every("epoch", 3, 0.5)
    'epoch'

    ```
    """
    if freeze_every != "auto":
        return freeze_every
    if not num_epochs or freezing_epoch_ends(num_epochs, freeze_start, start_level) < MIN_EPOCH_FREEZES:
        return "step"
    return "epoch"


FREEZING_BY = ("epoch", "step")
"""What `freeze_every` resolves to (`resolve_freeze_every`): when the callback updates its freezer."""


def progress_at_step(step: int, max_steps: int) -> float:
    """
    How far a run of `max_steps` optimizer steps has gone after `step` of them: `step / max_steps`, at most 1. The
    progress `LayerFreezingCallback` gives the schedule (whether training is set by epochs or by `max_steps`).

    Raises:
        `ValueError`: `max_steps` is not positive.

    Example:

    ```python
    >>> from hf_layer_freeze.schedule import progress_at_step
    >>> progress_at_step(3, 12), progress_at_step(14, 12)
    (0.25, 1.0)

    ```
    """
    if not max_steps or max_steps <= 0:
        raise ValueError(f"max_steps must be a positive integer (the run's optimizer steps), got {max_steps!r}")
    return min(1.0, step / max_steps)


def updates_at_step(
    step: int, max_steps: int, *, freezing_by: str, epoch_ended: bool = False, every_step: bool = False
) -> bool:
    """
    Whether `LayerFreezingCallback` calls `freezer.update` after optimizer step `step` of a run of `max_steps`: the
    one timing rule, which the callback follows at each step end and epoch end, and which `plan` simulates.

    Never at or after the last step (a freeze then saves nothing: the model ends as it trained). Before it: at every
    step when freezing by step, or when the schedule checks every step itself (`every_step`: the adaptive schedule,
    which counts its own `check_every`); at the steps that end an epoch whatever `freezing_by` says.

    Besides these step ends, a fresh run is updated once when it begins (`on_train_begin`, step 0, progress 0), before
    the first optimizer step, whatever the timing: what the schedule freezes from the first step (`freeze_start=0`
    with `freeze_start_level > 0`) trains frozen from step 1. `plan_simulation.schedule_changes` counts that update
    as the freeze the first step trains with. (A resumed run re-applies its checkpoint's freeze there instead.)

    Args:
        step (`int`): the optimizer steps done (`state.global_step`).
        max_steps (`int`): the run's planned length in optimizer steps (`state.max_steps`).
        freezing_by (`str`): `"epoch"` or `"step"`, what `freeze_every` resolved to (`resolve_freeze_every`).
        epoch_ended (`bool`, *optional*, defaults to `False`): this step ends an epoch.
        every_step (`bool`, *optional*, defaults to `False`): the schedule decides at every step
            (`schedule="adaptive"`).

    Returns:
        `bool`: whether the freezer is updated, at progress `progress_at_step(step, max_steps)`.

    Example:

    ```python
    >>> from hf_layer_freeze.schedule import updates_at_step
    >>> [s for s in range(1, 13) if updates_at_step(s, 12, freezing_by="epoch", epoch_ended=s % 4 == 0)]
    [4, 8]
    >>> [s for s in range(1, 6) if updates_at_step(s, 5, freezing_by="step")]
    [1, 2, 3, 4]

    ```
    """
    validate_choice("freezing_by", freezing_by, FREEZING_BY)
    if step >= max_steps:
        return False
    return every_step or freezing_by == "step" or epoch_ended
