"""Resuming a `Trainer` run: the freeze a checkpoint recorded, applied again before the first step.

`LayerFreezingCallback` saves `state()` into each checkpoint's `trainer_state.json` (the Trainer's `ExportableState`):
its options and, as attributes, the count of frozen units and the adaptive schedule's gradient-norm history. On
`trainer.train(resume_from_checkpoint=...)` the Trainer has loaded the optimizer state by `on_train_begin`; this
file reads what the checkpoint recorded (set on the callback by the Trainer when
`restore_callback_states_from_checkpoint=True` rebuilt it, else read from `state.stateful_callbacks`), reconciles it
with the schedule, says which options changed since, and freezes. The callback calls `give_back_kept_frozen` before
building its freezer and `resume_freeze` after.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Protocol

from torch import nn
from transformers import TrainerState

from .families import look_through
from .freezer import LayerFreezer
from .record import ledger_for

logger = logging.getLogger(__name__)

__all__ = ["ResumableCallback", "changed_options", "give_back_kept_frozen", "resume_freeze"]


class ResumableCallback(Protocol):
    """What `resume_freeze` reads of the callback: its saved state and what the Trainer restored into it."""

    saved_frozen_units: int | None
    saved_gradient_norms: dict[str, Any] | None

    def state(self) -> dict[str, Any]: ...


def give_back_kept_frozen(model: nn.Module, state: TrainerState) -> None:
    """
    Before a resume builds its freezer: give back what an earlier run in this process left frozen (`keep_frozen=True`),
    so the checkpoint's freeze applies to the model as it was given, not on top of that run's.

    Args:
        model (`nn.Module`): the bare model (DDP and compile wrappers removed; a PEFT model is looked through here).
        state (`TrainerState`): the Trainer's state; nothing is done unless it resumes (`global_step > 0`).
    """
    if state.global_step == 0:
        return
    kept = ledger_for(look_through(model)).give_back_kept()
    if kept:
        logger.warning(
            "LayerFreezingCallback: resuming from a checkpoint; gave back the %d parameter tensors an earlier "
            "run in this process left frozen (keep_frozen=True), so the checkpoint's freeze is applied to the "
            "model as it was given.",
            len(kept),
        )


def resume_freeze(
    callback: ResumableCallback, freezer: LayerFreezer, state: TrainerState, progress: float, freezing_by: str
) -> int:
    """
    Apply the freeze in force at the step training (re)starts from: nothing on a fresh run; on a resume, the count the
    checkpoint recorded (reconciled with the schedule), warning first about any option changed since the checkpoint,
    and the adaptive schedule's history, so its next check compares as it would have.

    Args:
        callback (`ResumableCallback`): the `LayerFreezingCallback` resuming.
        freezer (`LayerFreezer`): its freezer, just built on the Trainer's model and optimizer.
        state (`TrainerState`): the Trainer's state at `on_train_begin`.
        progress (`float`): the callback's progress at `state.global_step`, in [0, 1].
        freezing_by (`str`): `"epoch"` or `"step"`, what `freeze_every` resolved to.

    Returns:
        `int`: the units frozen (or waiting for the first forward to be).

    Raises:
        `ValueError`: the checkpoint froze more units than the model has now.
    """
    if state.global_step > 0:
        _warn_if_options_changed_since_checkpoint(callback, state)
    at_resume = _units_at_resume(callback, freezer, state, progress, freezing_by)
    if at_resume > freezer.num_units:
        raise ValueError(
            f"resume_from_checkpoint: the checkpoint froze {at_resume} units, but this model has "
            f"{freezer.num_units} freezable units now (parameters frozen since, outside "
            "LayerFreezingCallback, are not its units): resume on the model as it was given when that run began"
        )
    freezer.freeze_units(at_resume)
    if freezer.gradient_norms is not None and state.global_step > 0:
        saved = _saved_attribute(callback, state, "saved_gradient_norms")
        if saved is not None:  # the adaptive schedule's history: the next check compares as it would have
            freezer.gradient_norms.load_state_dict(saved)
    return at_resume


def _units_at_resume(
    callback: ResumableCallback, freezer: LayerFreezer, state: TrainerState, progress: float, freezing_by: str
) -> int:
    """How many units were frozen at the step training (re)starts from."""
    if state.global_step == 0:
        return 0
    saved = _saved_attribute(callback, state, "saved_frozen_units")
    units = None if saved is None else int(saved)
    if freezer.options.schedule == "adaptive":  # no schedule to recompute: only the checkpoint knows
        return units or 0
    if not freezer.schedule.budget.ready(freezer):
        from_schedule = 0  # FLOPs are counted on the first batch: only the saved count can tell
    else:
        from_schedule = freezer.num_units_at(progress)
    if units is None:
        # A checkpoint saved without this callback: the schedule is the best guess.
        return from_schedule
    if freezing_by == "step":
        return max(units, from_schedule)
    # A checkpoint saved at an epoch's last step may precede that epoch's on_epoch_end; resumption will not
    # run it, so apply what it would have frozen.
    at_epoch_end = state.epoch is not None and float(state.epoch).is_integer()
    return max(units, from_schedule) if at_epoch_end else units


def _saved_state(callback: ResumableCallback, state: TrainerState) -> dict[str, Any] | None:
    """What the callback saved in the checkpoint's `trainer_state.json` (its `state()`), if anything."""
    saved = state.stateful_callbacks.get(type(callback).__name__) if state.stateful_callbacks else None
    if isinstance(saved, list):  # several callbacks of this class: take ours by its arguments
        saved = next((s for s in saved if s.get("args") == callback.state()["args"]), None)
    return saved or None


def _saved_attribute(callback: ResumableCallback, state: TrainerState, name: str) -> Any:
    """
    An attribute of `state()` the checkpoint holds: set on the callback by the Trainer when
    `restore_callback_states_from_checkpoint=True` rebuilt it, otherwise read from `trainer_state.json`; `None`
    when the checkpoint has none.
    """
    value = getattr(callback, name)
    if value is None:
        saved = _saved_state(callback, state)
        value = saved.get("attributes", {}).get(name) if saved else None
    return value


def _warn_if_options_changed_since_checkpoint(callback: ResumableCallback, state: TrainerState) -> None:
    """A run resumed with other options than its checkpoint's continues with the new ones: say which, by name."""
    saved = _saved_state(callback, state)
    if saved is None or not isinstance(saved.get("args"), dict):
        return
    changed = changed_options(given=callback.state()["args"], other=saved["args"])
    if changed:
        warnings.warn(
            f"Resuming with LayerFreezingCallback options that differ from the checkpoint's: {changed} "
            "(checkpoint's value in brackets). The options given now are in force from here on; the units "
            "frozen at the checkpoint stay frozen (freezing never unfreezes).",
            stacklevel=3,
        )


def changed_options(given: dict[str, Any], other: dict[str, Any], other_name: str = "checkpoint") -> str:
    """`"name=value [other value], ..."` for each option whose value differs, or `""`."""
    names = [name for name in given if name in other and given[name] != other[name]]
    return ", ".join(f"{name}={given[name]!r} [{other_name}: {other[name]!r}]" for name in names)
