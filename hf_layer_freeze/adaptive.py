"""The adaptive schedule (`schedule="adaptive"`): freeze the prefix of units whose gradient norm has settled.

`AdaptiveSchedule` is a `schedules.FreezeSchedule`: every `check_every` optimizer steps it compares each trainable
unit's mean gradient norm over the interval with the previous interval's, and asks for the longest settled prefix
(`schedule.settled_prefix`), never before `freeze_start`, never beyond `freeze_level`, never fewer units than are
frozen. The checks count optimizer steps from the first one, whatever an epoch's length: with `freeze_start=0` the
first check (step `check_every`) sets the reference and the second (step `2 * check_every`) can freeze.
`freeze_start_level` is a floor: that fraction of the budget is frozen from `freeze_start` on (at progress 0 when
`freeze_start=0`), whether or not it has settled, and the settled prefix is sought after it. It owns the tracker
below, which only it reads and writes.

`GradientNormTracker` is a step pre-hook on the optimizer (the torch optimizer inside Accelerate's wrapper), so it
sees the gradients the optimizer is about to apply, in the Trainer and in custom loops alike: after gradient
accumulation, after clipping, unscaled by a `GradScaler` (whose skipped steps it does not see). It adds each unit's
gradient norm to a running sum on the gradients' device (one `torch._foreach_norm` per step: no host sync) and
hands out the mean over the steps since the last check. Under `torch.distributed` the sums are all-reduced at each
check, so every rank takes the same decision (with sharded gradients, FSDP, the summed per-shard norms are not the
full norms: not tested, not claimed). Its state is plain Python numbers,
so it goes into the Trainer's JSON checkpoint state and a resumed run decides exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .param_groups import optimizer_holding_units, unwrap_optimizer
from .schedule import relative_changes, settled_prefix
from .units import FreezableUnit

if TYPE_CHECKING:
    from .freezer import LayerFreezer
    from .options import FreezeOptions
    from .schedules import UnitBudget

__all__ = ["AdaptiveSchedule", "GradientNormTracker"]


class GradientNormTracker:
    """
    Sums each unit's gradient norm over the optimizer steps between two checks.

    Args:
        optimizer (`torch.optim.Optimizer`):
            The optimizer, raw or wrapped by Accelerate.
        units (`Callable[[], list[FreezableUnit]]`):
            The units, in their current order (which `order="execution"` may set after construction).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, units: Callable[[], list[FreezableUnit]]) -> None:
        self._units = units
        self._sums: torch.Tensor | None = None
        self.steps = 0
        self.previous: list[float] | None = None  # the means at the last check
        self.last_changes: list[float] = []  # relative changes of the trainable units at the last check
        self._handle = unwrap_optimizer(optimizer).register_step_pre_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads: list[torch.Tensor] = []
        owners: list[int] = []
        for index, unit in enumerate(self._units()):
            for param in unit.parameters:
                if param.grad is not None:
                    grads.append(param.grad)
                    owners.append(index)
        if not grads:
            return
        squares = torch.stack([norm.float() for norm in torch._foreach_norm(grads)]) ** 2
        if self._sums is None:
            self._sums = torch.zeros(len(self._units()), device=squares.device)
        per_unit = torch.zeros_like(self._sums).index_add_(0, torch.tensor(owners, device=squares.device), squares)
        self._sums += per_unit.sqrt()
        self.steps += 1

    def interval_means(self) -> list[float] | None:
        """The mean gradient norm of each unit since the last check (0 for frozen units), then start a new interval.
        `None` when no step was recorded. Every rank must call it at the same step."""
        if self.steps == 0 or self._sums is None:
            return None
        sums = self._sums
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.clone()
            dist.all_reduce(sums)  # every rank decides on the same numbers
        means = (sums / self.steps).tolist()
        self._sums.zero_()
        self.steps = 0
        return means

    def check(self) -> tuple[list[float] | None, list[float] | None]:
        """Close the interval: `(the previous check's means, this check's)`, this check's becoming the previous."""
        means = self.interval_means()
        previous, self.previous = self.previous, means
        return previous, means

    def compare(self, previous: list[float], means: list[float], first: int) -> list[float]:
        """The relative changes of the units from `first` on between two checks, kept as `last_changes`."""
        self.last_changes = relative_changes(previous[first:], means[first:])
        return self.last_changes

    def close(self) -> None:
        """Remove the optimizer hook."""
        self._handle.remove()

    def state_dict(self) -> dict[str, Any]:
        """The running sums, the step count and the last check's means, as JSON-safe numbers."""
        return {
            "steps": self.steps,
            "sums": None if self._sums is None else self._sums.tolist(),
            "previous": self.previous,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (float32 sums round-trip exactly through Python floats)."""
        self.steps = int(state.get("steps", 0))
        sums = state.get("sums")
        if sums is not None:
            device = self._sums.device if self._sums is not None else _parameters_device(self._units())
            self._sums = torch.tensor(sums, dtype=torch.float32, device=device)
        previous = state.get("previous")
        self.previous = None if previous is None else [float(v) for v in previous]


class AdaptiveSchedule:
    """
    The adaptive schedule (see the module docstring); its gradient norms are read by a step pre-hook on the first
    optimizer that holds units, and `update(progress)` makes the checks, so it acts at every step.

    Args:
        options (`FreezeOptions`): the freezer's options (`freeze_start`, `freeze_level`, `freeze_start_level`,
            `check_every`, `change_threshold`).
        budget (`UnitBudget`): how `freeze_level` becomes a count, and the freeze-event levels.
        freezer (`LayerFreezer`): the freezer being built (its optimizers and units).
    """

    acts_every_step = True

    def __init__(self, options: FreezeOptions, budget: UnitBudget, freezer: LayerFreezer) -> None:
        self.options = options
        self.budget = budget
        holder = optimizer_holding_units(freezer.optimizers, freezer.units)
        self.gradient_norms = GradientNormTracker(holder, lambda: freezer.units)

    def units_at(self, progress: float, freezer: LayerFreezer) -> int | None:
        floor = self.floor(progress, freezer)
        at_least = floor if floor > freezer.frozen_units else None  # the floor, where no check decides more
        if self.gradient_norms.steps < self.options.check_every:
            return at_least
        previous, means = self.gradient_norms.check()  # the first check only sets the reference
        if previous is None or progress <= self.options.freeze_start or not self.budget.ready(freezer):
            return at_least
        first = max(freezer.frozen_units, floor)
        changes = self.gradient_norms.compare(previous, means, first)
        level = self.budget.units_for(self.options.freeze_level, freezer)
        count = min(first + settled_prefix(changes, self.options.change_threshold), level)
        return max(first, self.budget.bounded(count, freezer))

    def floor(self, progress: float, freezer: LayerFreezer) -> int:
        """The units frozen whatever has settled: `freeze_start_level` of the budget from `freeze_start` on (at
        `freeze_start` itself, so `freeze_start=0` freezes them from the first step), 0 before."""
        start_level = self.options.freeze_start_level
        if start_level == 0 or progress < self.options.freeze_start or not self.budget.ready(freezer):
            return 0
        return self.budget.bounded(self.budget.units_for(start_level, freezer), freezer)

    def fraction(self, progress: float, freezer: LayerFreezer) -> float:
        return freezer.frozen_units / freezer.num_units

    def metrics(self) -> dict[str, float]:
        """The criterion at the last check: `layer_freeze/grad_norm_change_first_trainable` and `..._median`."""
        changes = self.gradient_norms.last_changes
        metrics: dict[str, float] = {}
        if changes and math.isfinite(changes[0]):  # trackers refuse infinities
            metrics["layer_freeze/grad_norm_change_first_trainable"] = changes[0]
        finite = [c for c in changes if math.isfinite(c)]
        if finite:  # the median the criterion compares with
            metrics["layer_freeze/grad_norm_change_median"] = statistics.median(finite)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"gradient_norms": self.gradient_norms.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("gradient_norms") is not None:
            self.gradient_norms.load_state_dict(state["gradient_norms"])

    def close(self) -> None:
        self.gradient_norms.close()


def _parameters_device(units: list[FreezableUnit]) -> torch.device:
    for unit in units:
        for param in unit.parameters:
            return param.device
    return torch.device("cpu")
