"""The schedule over a whole run, simulated: at which step each freeze event happens, and the FLOPs of each step.

The steps at which the freezer is updated are those at which `LayerFreezingCallback` updates it: both ask
`schedule.updates_at_step`, so a plan cannot drift from the callback's timing. A run is `epochs` epochs with freezing
at each epoch end (the callback's `freeze_every="epoch"`), or `steps` steps with freezing as soon as the schedule asks
for one more unit (`freeze_every="step"`).

The FLOPs of a training step (forward and backward) are counted by `torch.utils.flop_counter.FlopCounterMode` for each
number of frozen units the schedule reaches; the share of forward FLOPs frozen is `profiling.profile_units`'s
attribution. The predicted speedup is the FLOP ratio; measured CPU savings ranged from 0.67 to 1.19 of the FLOP
ideal's saving (docs/benchmarks.md; the lowest, xception41, was not profiled).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .freezer import LayerFreezer
from .plan_models import PlanModel, _positive
from .schedule import progress_at_step, resolve_freeze_every, updates_at_step

__all__ = ["PlanRow", "plan_rows", "schedule_changes", "step_flops", "update_steps"]


@dataclass(frozen=True)
class PlanRow:
    """
    One row of the plan: what is frozen while it trains, and its predicted cost.

    Args:
        epoch (`int` or `None`): the epoch this row describes (a plan in epochs), `None` in a plan in steps.
        frozen_units (`int`): units frozen while it trains.
        num_units (`int`): the freezer's units.
        params_frozen (`float`): share of the units' parameters frozen (they are the ones that train when the freezer
            is built: with LoRA, the adapters).
        forward_flops_frozen (`float`): share of the units' forward FLOPs frozen (attributed by
            `profiling.profile_units`).
        step_speedup (`float`): predicted speedup of a training step over a step with nothing frozen.
        step (`int`, *optional*): in a plan in steps, the first step (1-based) that trains with this freeze; the row
            lasts until the next row's step.
    """

    epoch: int | None
    frozen_units: int
    num_units: int
    params_frozen: float
    forward_flops_frozen: float
    step_speedup: float
    step: int | None = None


def update_steps(
    max_steps: int,
    *,
    freeze_every: str,
    steps_per_epoch: int | None = None,
    freeze_start: float = 0.5,
    freeze_start_level: float = 0.0,
) -> list[int]:
    """
    The optimizer steps after which `LayerFreezingCallback` updates its freezer in a run of `max_steps` steps with
    the linear schedule: `schedule.updates_at_step` asked at every step, as the callback asks it.

    Args:
        max_steps (`int`): the run's length in optimizer steps.
        freeze_every (`str`): the callback's `freeze_every`, `"epoch"`, `"step"` or `"auto"` (resolved as the
            callback resolves it, `schedule.resolve_freeze_every`).
        steps_per_epoch (`int`, *optional*): optimizer steps per epoch; `None` for a run whose epoch length is unknown
            (a streaming dataset trained for `max_steps`: no epoch ends).
        freeze_start (`float`, *optional*, defaults to 0.5): the schedule's start, which `"auto"` reads.
        freeze_start_level (`float`, *optional*, defaults to 0.0): the fraction frozen at `freeze_start`, which
            `"auto"` reads too (an epoch end at `freeze_start` freezes when it is above 0).

    Example:

    ```python
    >>> from hf_layer_freeze.plan_simulation import update_steps
    >>> update_steps(12, freeze_every="epoch", steps_per_epoch=4), update_steps(4, freeze_every="step")
    ([4, 8], [1, 2, 3])

    ```
    """
    _positive("max_steps", max_steps)
    _positive("steps_per_epoch", steps_per_epoch)
    # the Trainer's `num_train_epochs` for a run of `max_steps`: a last, shorter epoch counts
    num_epochs = math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else None
    freezing_by = resolve_freeze_every(freeze_every, num_epochs, freeze_start, freeze_start_level)
    return [
        step
        for step in range(1, max_steps + 1)
        if updates_at_step(
            step, max_steps, freezing_by=freezing_by, epoch_ended=bool(steps_per_epoch) and step % steps_per_epoch == 0
        )
    ]


def schedule_changes(
    num_units_at: Callable[[float], int], max_steps: int, steps: Sequence[int]
) -> list[tuple[int, int]]:
    """
    `(first step, units)`: the first step (1-based) that trains with each count of units the schedule asks for, when
    the freezer is updated when training begins (progress 0, as the callback's `on_train_begin` does) and after each
    of `steps` (`update_steps`) at progress `schedule.progress_at_step`. The first is `(1, units at progress 0)`:
    `(1, 0)` unless the schedule freezes from the first step (`freeze_start=0`, `freeze_start_level > 0`); then one
    for each update that changes the count.

    `num_units_at` (a freezer's, non-decreasing in progress) is asked by bisection over `steps`, so a million steps
    cost a few dozen calls.

    Example:

    ```python
    >>> from hf_layer_freeze.plan_simulation import schedule_changes
    >>> schedule_changes(lambda progress: int(progress * 4), 8, [1, 2, 3, 4, 5, 6, 7])
    [(1, 0), (3, 1), (5, 2), (7, 3)]
    >>> schedule_changes(lambda progress: 2 + int(progress * 2), 8, [1, 2, 3, 4, 5, 6, 7])  # 2 from the first step
    [(1, 2), (5, 3)]

    ```
    """

    def count_at(index: int) -> int:  # index 0: the update when training begins
        return num_units_at(0.0 if index == 0 else progress_at_step(steps[index - 1], max_steps))

    at_start = count_at(0)
    changes = [(0, at_start)]

    def split(low: int, high: int, at_low: int, at_high: int) -> None:
        if at_low == at_high:
            return
        if high == low + 1:
            changes.append((high, at_high))
            return
        middle = (low + high) // 2
        at_middle = count_at(middle)
        split(low, middle, at_low, at_middle)
        split(middle, high, at_middle, at_high)

    if steps:
        split(0, len(steps), at_start, count_at(len(steps)))
    return [(1 if index == 0 else steps[index - 1] + 1, count) for index, count in changes]


def _training_loss(output: Any) -> torch.Tensor | None:
    """A scalar standing in for the loss: the sum of the output tensors that carry a gradient (a timm model's logits,
    a transformers model's logits, a QA model's start and end logits)."""
    values = [output] if isinstance(output, torch.Tensor) else output.values() if hasattr(output, "values") else output
    tensors = [v.float().sum() for v in values if isinstance(v, torch.Tensor) and v.requires_grad]
    return torch.stack(tensors).sum() if tensors else None


def step_flops(plan_model: PlanModel) -> int:
    """FLOPs of one training step (forward and backward) of `plan_model`, counted by torch's `FlopCounterMode`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = _training_loss(plan_model.model(*plan_model.args, **plan_model.kwargs))
        if loss is not None:
            loss.backward()
    for param in plan_model.model.parameters():
        param.grad = None
    return counter.get_total_flops()


def plan_rows(
    plan_model: PlanModel,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    freeze_start: float = 0.5,
    freeze_level: float = 1.0,
    freeze_start_level: float = 0.0,
    order: str = "definition",
    granularity: str = "module",
    embeddings: str = "unit",
    budget: str = "units",
) -> tuple[list[PlanRow], float]:
    """The plan of an already built `PlanModel` (see `plan.freeze_plan`)."""
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs and steps, got epochs={epochs!r}, steps={steps!r}")
    _positive("epochs", epochs)
    _positive("steps", steps)
    length = epochs or steps
    model = plan_model.model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    freezer = LayerFreezer(
        model,
        optimizer,
        freeze_start=freeze_start,
        freeze_level=freeze_level,
        freeze_start_level=freeze_start_level,
        order=order,
        granularity=granularity,
        embeddings=embeddings,
        budget=budget,
    )
    freezer.profile_with(*plan_model.args, **plan_model.kwargs)
    # Units own only what trains when the freezer is built (with LoRA, the adapters): their parameters are the
    # trainable ones the freezer can freeze, the head's excepted.
    total_params = sum(unit.numel for unit in freezer.units) or 1
    total_flops = sum(freezer.profile.forward_flops) or 1
    # A plan in epochs is a run of one step per epoch (progress e / epochs at the end of epoch e, as for any number
    # of steps per epoch): epoch (or step) i trains with what the callback froze after i - 1.
    when = (
        update_steps(length, freeze_every="epoch", steps_per_epoch=1)
        if epochs
        else update_steps(length, freeze_every="step")
    )
    targets = schedule_changes(freezer.num_units_at, length, when)
    base = step_flops(plan_model)
    events: list[tuple[int, PlanRow, int]] = []  # (first epoch or step, row, step FLOPs), one per frozen count
    for start, target in targets:
        frozen = freezer.freeze_units(target).frozen_units  # may stop short: the optimizer keeps a parameter
        if events and events[-1][1].frozen_units == frozen:
            continue
        cost = step_flops(plan_model) if frozen else base
        row = PlanRow(
            epoch=start if epochs else None,
            frozen_units=frozen,
            num_units=freezer.num_units,
            params_frozen=sum(u.numel for u in freezer.units[:frozen]) / total_params,
            forward_flops_frozen=sum(freezer.profile.forward_flops[:frozen]) / total_flops,
            step_speedup=base / cost,
            step=None if epochs else start,
        )
        events.append((start, row, cost))
    ends = [start for start, _, _ in events[1:]] + [length + 1]
    saved = 1 - sum(cost * (end - start) for (start, _, cost), end in zip(events, ends, strict=True)) / (length * base)
    if steps:
        return [row for _, row, _ in events], saved
    rows = [
        PlanRow(**{**asdict(row), "epoch": epoch})
        for (start, row, _), end in zip(events, ends, strict=True)
        for epoch in range(start, end)
    ]
    return rows, saved
