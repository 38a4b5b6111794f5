"""Schedules: how many units the freezer has frozen at each point of training.

A schedule answers the engine's one question, "how many leading units at this progress?", from the freezer's units
(their order, their weights by `budget`, what is frozen already). The engine applies whatever count it returns
(a lower one gives units back) and never asks which schedule it has. Each schedule also says whether it acts at every
step (`acts_every_step`: the callback then updates at each step), and contributes its own metrics and checkpoint
state. `build_schedule` makes the one the `schedule` option names, from `SCHEDULES`:

- `"linear"` (`LinearSchedule`): the method card's clock, `schedule.freeze_fraction` turned into a unit count;
- `"adaptive"` (`adaptive.AdaptiveSchedule`): the prefix of units whose gradient norm has settled.

A new schedule (gradual unfreezing, say) is a class with the `FreezeSchedule` methods, one line in `SCHEDULES` and
its name among the `schedule` option's allowed values (`options.SCHEDULES`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from .adaptive import AdaptiveSchedule
from .schedule import bounded_unit_count, freeze_fraction, num_units_for_budget, num_units_to_freeze, validate_progress

if TYPE_CHECKING:
    from .freezer import LayerFreezer
    from .options import FreezeOptions

__all__ = ["SCHEDULES", "FreezeSchedule", "LinearSchedule", "UnitBudget", "as_progress", "build_schedule"]


def as_progress(progress: Any) -> float:
    """`progress` (a Python or numpy number, or a 0-d tensor) as a float in [0, 1], or a `ValueError` naming it."""
    if isinstance(progress, torch.Tensor):
        if progress.ndim != 0 or progress.is_complex() or progress.dtype == torch.bool:
            raise ValueError(
                "progress must be a number in [0, 1] (a fraction of training), got a tensor of shape "
                f"{tuple(progress.shape)} and dtype {progress.dtype}"
            )
        progress = progress.item()
    return validate_progress(progress)


class FreezeSchedule(Protocol):
    """What the engine asks a schedule. `freezer` is the `LayerFreezer` asking (its units, its frozen count)."""

    acts_every_step: bool  # whether `units_at` may decide at any step (else at the caller's update points)
    budget: UnitBudget

    def units_at(self, progress: float, freezer: LayerFreezer) -> int | None:
        """How many leading units to have frozen at `progress` (a lower count than what is frozen gives units back),
        or `None` for no decision now."""

    def fraction(self, progress: float, freezer: LayerFreezer) -> float:
        """The freeze fraction reached once `units_at`'s count is applied (what `FreezeResult.fraction` reports)."""

    def metrics(self) -> dict[str, float]:
        """The schedule's own `layer_freeze/...` metrics."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe entries for the freezer's checkpoint state (merged into `LayerFreezer.state_dict()`)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from the freezer's checkpoint state (entries it does not find are left as they are)."""

    def close(self) -> None:
        """Remove any hook the schedule put on the model or the optimizer."""


class UnitBudget:
    """
    How many leading units a freeze fraction covers: by count (`budget="units"`), cumulative parameters (`"params"`)
    or cumulative forward FLOPs (`"flops"`, from the freezer's first-forward profile), rounded down to at most
    `max_freeze_events` levels.

    Args:
        options (`FreezeOptions`): the freezer's options (`budget`, `freeze_start`, `freeze_level`,
            `freeze_start_level`).
        max_freeze_events (`int`, *optional*): the bound in force (a compiled model gets one by default).
    """

    def __init__(self, options: FreezeOptions, max_freeze_events: int | None) -> None:
        self.options = options
        self.max_freeze_events = max_freeze_events

    def ready(self, freezer: LayerFreezer) -> bool:
        """Whether units can be counted: `budget="flops"` needs the profile."""
        return freezer.profiled or self.options.budget != "flops"

    def units_for(self, fraction: float, freezer: LayerFreezer) -> int:
        """How many leading units fit in `fraction` of the budget; none for 0 (a schedule that has not started freezes
        nothing, not even leading units of weight 0, such as embeddings weighed by FLOPs)."""
        if fraction == 0 or self.options.budget == "units":
            return num_units_to_freeze(fraction, freezer.num_units)
        if not self.ready(freezer):
            raise RuntimeError("budget='flops' needs the first forward pass (or profile_with) before counting")
        if self.options.budget == "params":
            return num_units_for_budget(fraction, [unit.numel for unit in freezer.units])
        return num_units_for_budget(fraction, list(freezer.profile.forward_flops))

    def bounded(self, count: int, freezer: LayerFreezer) -> int:
        """`count` rounded down to a freeze-event level (unchanged without `max_freeze_events`)."""
        if self.max_freeze_events is None:
            return count
        return bounded_unit_count(count, self.units_for(self.options.freeze_level, freezer), self.max_freeze_events)

    def linear_fraction(self, progress: float) -> float:
        """The linear clock's fraction at `progress` (`schedule.freeze_fraction` of the options)."""
        options = self.options
        return freeze_fraction(progress, options.freeze_start, options.freeze_level, options.freeze_start_level)

    def units_at(self, progress: float, freezer: LayerFreezer) -> int:
        """The linear clock's count at `progress` (`LayerFreezer.num_units_at`)."""
        return self.bounded(self.units_for(self.linear_fraction(progress), freezer), freezer)


class LinearSchedule:
    """
    The method card's schedule: `freeze_fraction(progress)` of the budget, 0 before `freeze_start`, then growing
    linearly from `freeze_start_level` at `freeze_start` to `freeze_level` at the end of training; monotonic (a
    smaller progress keeps what is frozen).

    Args:
        options (`FreezeOptions`): the freezer's options.
        budget (`UnitBudget`): how a fraction becomes a count.
    """

    acts_every_step = False

    def __init__(self, options: FreezeOptions, budget: UnitBudget, freezer: LayerFreezer | None = None) -> None:
        self.options = options
        self.budget = budget

    def units_at(self, progress: float, freezer: LayerFreezer) -> int:
        if not self.budget.ready(freezer):
            raise RuntimeError(
                "budget='flops' cannot count units before the first forward pass; call "
                "freezer.profile_with(batch) before resuming"
            )
        # With order="execution" before the first forward, the engine records the count and applies it there.
        return max(freezer.frozen_units, self.budget.units_at(progress, freezer))

    def fraction(self, progress: float, freezer: LayerFreezer) -> float:
        return self.budget.linear_fraction(progress)

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}  # a pure function of progress: nothing to save

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# The schedules by the name the `schedule` option gives (options.SCHEDULES lists the same names).
SCHEDULES: dict[str, type] = {"linear": LinearSchedule, "adaptive": AdaptiveSchedule}


def build_schedule(options: FreezeOptions, freezer: LayerFreezer, max_freeze_events: int | None) -> FreezeSchedule:
    """
    The schedule `options.schedule` names, for `freezer` (whose units and optimizers are known).

    Args:
        options (`FreezeOptions`): the freezer's options.
        freezer (`LayerFreezer`): the freezer being built.
        max_freeze_events (`int`, *optional*): the bound on freeze events in force.

    Returns:
        `FreezeSchedule`: a `LinearSchedule` or an `adaptive.AdaptiveSchedule`.
    """
    return SCHEDULES[options.schedule](options, UnitBudget(options, max_freeze_events), freezer)
