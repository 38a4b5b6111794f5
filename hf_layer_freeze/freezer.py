"""`LayerFreezer`: the freezing engine, used by the Trainer callback, custom (Accelerate) loops and `plan`.

The engine coordinates and delegates, naming no feature: a schedule (`schedules.py`, built from the `schedule`
option) decides how many units, `units.py` and `heads.py` decide which, a `FrozenRecord` holds what this freezer
froze (parameters, unit count, pending count, fraction), each optimizer keeps its own param-group bookkeeping
(`param_groups.py`), `profiling.py` runs the first-forward profile, and the side effects of a freeze event are the
listeners of `listeners.LISTENERS` it notifies (`events.py`), plus any added with `add_listener`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .compiled import resolve_max_freeze_events
from .distributed import check_supported_wrapping
from .events import FreezeEvent, FreezeListener
from .families import look_through
from .listeners import ListenerHost, build_listeners
from .options import FreezeOptions, FreezeOptionsKwargs, Unpack, document_options
from .param_groups import (
    cap_to_keep_a_parameter,
    check_optimizers_hold_units,
    frozen_param_groups,
    supported_optimizers,
)
from .profiling import FirstForwardProfiling, UnitProfile
from .record import FreezeResult, FrozenRecord, ledger_for
from .schedules import as_progress, build_schedule
from .units import FreezableUnit, freezable_units
from .wrappers import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["FreezeResult", "LayerFreezer"]


@document_options(FreezeOptions)
class LayerFreezer(ListenerHost):
    """
    Progressively freezes the earliest units of a model and keeps its optimizers (and DDP) consistent.

    `update(progress)` freezes the first `floor(freeze_fraction(progress) * N)` of the model's N freezable units
    (see `freezable_units`: modules owning a parameter that trains when the freezer is built, head excluded): their
    parameters get `requires_grad=False`, lose their gradient, and leave every param group of every optimizer given
    (empty groups stay, since LR schedulers index them). Their optimizer state is kept, and `optimizer.state_dict()`
    keeps the full standard layout, so checkpoints load into a fresh optimizer and into a frozen one alike. Freezing
    is monotonic and idempotent, and touches only parameters that still train: what was frozen before the freezer
    was built (PEFT's base weights, an embedding frozen by hand) is not its own, and `unfreeze()` gives back exactly
    what it froze. Under DDP, the reducer is rebuilt in place after each freeze so that frozen parameters are no
    longer all-reduced.

    The freezer is checkpointable: register it with `accelerator.register_for_checkpointing(freezer)` and
    `accelerator.load_state` re-applies the freeze that was in effect when the state was saved, whether the
    freezer has already frozen something or not.

    Args:
        model (`torch.nn.Module`):
            The model, raw or as returned by `accelerator.prepare` (DDP-wrapped, compiled), or a PEFT model.
        optimizer (`torch.optim.Optimizer` or `list[torch.optim.Optimizer]`):
            Its optimizer, raw or an Accelerate `AcceleratedOptimizer`, or several (as Composer's `freeze_layers`
            takes): frozen parameters leave every one. Trainable parameters in none of them get a warning, since an
            optimizer the freezer does not know would keep updating them after they freeze.
    Raises:
        `ValueError`: a bad option (named, with the allowed values), a model with no freezable unit, an optimizer
            holding none of the model's parameters.
        `NotImplementedError`: DeepSpeed, FSDP1 flat parameters, and other setups freezing cannot serve, with the
            next step.

    Example:

    ```python
    >>> import timm, torch
    >>> from hf_layer_freeze import LayerFreezer
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> freezer = LayerFreezer(model, optimizer, freeze_start=0.5, freeze_level=1.0)
    >>> freezer.update(0.75).frozen_units  # half of the 28 units
    14

    ```

    In an Accelerate loop:

    ```python
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    freezer = LayerFreezer(model, optimizer)
    accelerator.register_for_checkpointing(freezer)
    for epoch in range(num_epochs):
        for batch in loader:
            ...
        freezer.update((epoch + 1) / num_epochs)  # at the end of each epoch, as the method card says
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        **options: Unpack[FreezeOptionsKwargs],
    ) -> None:
        self.options = FreezeOptions.from_kwargs(**options)
        options = self.options
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_supported_wrapping(model, optimizer)
        self.optimizers = supported_optimizers(optimizer)
        self.max_freeze_events = resolve_max_freeze_events(model, options.max_freeze_events)
        self.model = model
        self.bare_model = unwrap_model(model)  # unwrapped once: the parts built below get this handle
        # What the other freezers of this model (in this process) hold frozen is the library's, not the user's.
        self.ledger = ledger_for(look_through(self.bare_model))
        held = self.ledger.held_by_others()
        self.units: list[FreezableUnit] = freezable_units(
            self.bare_model, options.granularity, options.head, held=held, embeddings=options.embeddings
        )
        if not self.units:
            raise ValueError(
                f"model ({type(self.bare_model).__name__}) has no freezable unit: it needs at least one module "
                "owning trainable parameters besides the head"
            )
        self._param_groups = [frozen_param_groups(o) for o in self.optimizers]
        also_held = self.ledger.registered_parameter_ids()  # another open freezer's optimizers keep them right
        check_optimizers_hold_units(self._param_groups, self.bare_model, self.units, also_held)
        self.record = FrozenRecord(self.ledger)
        self._closed = False
        self.ledger.register(self.record, self._param_groups)  # what another freezer holds leaves these optimizers
        self._warned_empty_optimizer = False
        self.listeners: list[FreezeListener] = build_listeners(self)  # closed again if one refuses
        # order="execution" and budget="flops" need one forward pass: the first training forward provides it.
        self.profile: UnitProfile | None = None
        self._profiling = FirstForwardProfiling(self)
        self._start_waits_for_profile = False  # update(0.0) before the profile a budget="flops" count needs
        self.schedule = build_schedule(options, self, self.max_freeze_events)
        self._notify(FreezeEvent(tuple(self.units), 0))  # parameters frozen before the freezer count from now

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The first optimizer given (see `optimizers` for all of them)."""
        return self.optimizers[0]

    freeze_start = property(lambda self: self.options.freeze_start)
    freeze_level = property(lambda self: self.options.freeze_level)
    order = property(lambda self: self.options.order)
    budget = property(lambda self: self.options.budget)

    @property
    def num_units(self) -> int:
        """Number of freezable units."""
        return len(self.units)

    @property
    def frozen_units(self) -> int:
        """How many leading units are frozen (the record's count)."""
        return self.record.frozen_units

    @property
    def fraction(self) -> float:
        """The freeze fraction the schedule reached (the record's)."""
        return self.record.fraction

    def _parts(self, method: str) -> list[Any]:
        """The schedule and the listeners that have `method` (metrics and checkpoint state)."""
        return [p for p in (self.schedule, *self.listeners) if callable(getattr(p, method, None))]

    def _joined(self, base: dict[str, Any], method: str) -> dict[str, Any]:
        """`base` with what each part's `method` returns; a key given twice is an error (a part would overwrite the
        freezer's count, or another part's value, in a log or a checkpoint)."""
        joined = dict(base)
        for part in self._parts(method):
            values = getattr(part, method)()
            taken = sorted(set(values) & set(joined))
            if taken:
                raise ValueError(
                    f"{type(part).__name__}.{method}() returns {taken}, already given by the freezer or "
                    f"another listener: use keys of its own (for instance prefixed with its name)"
                )
            joined.update(values)
        return joined

    def unfreeze(self) -> FreezeResult:
        """
        Give the model back as it was given: every parameter this freezer froze requires gradients again and is back
        in its optimizer param group, in its place (its optimizer state, kept all along, with it); frozen BatchNorm
        layers update their statistics again. A second `trainer.train()` then trains exactly what the first one was
        given. Parameters that were frozen before this freezer was built, or by someone else since, stay frozen.

        Returns:
            `FreezeResult`: nothing frozen, `newly_frozen_units` 0.
        """
        self._give_back_to(0)
        return self.result()

    def _give_back_to(self, count: int) -> None:
        """Give back the units after the first `count` (all of them, and the fraction and pending count, for 0)."""
        unfrozen = tuple(self.units[count : self.frozen_units])
        if count == 0:
            self._start_waits_for_profile = False  # given back as given: nothing waits to be frozen either
        given = None if count == 0 else [p for unit in unfrozen for p in unit.parameters]
        params = [p for _, p in self.record.give_back(given, frozen_units=count)]  # back in every optimizer's groups
        self._notify(FreezeEvent(tuple(self.units), count, unfrozen=unfrozen, parameters=tuple(params)))

    @property
    def closed(self) -> bool:
        """Whether `close()` was called: the freezer no longer holds anything frozen, nor hooks the model."""
        return self._closed

    def __enter__(self) -> LayerFreezer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """`with LayerFreezer(...) as freezer:` gives the model back as it was given whichever way the block exits
        (an exception included): `unfreeze()`, then `close()`."""
        if not self._closed:
            self.unfreeze()
            self.close()

    def close(self) -> None:
        """
        Remove every hook the freezer put on the model (its listeners', the first-forward profiling, the schedule's
        gradient-norm tracking). What is frozen stays frozen and is the user's from then on: a later freezer of the
        model treats it as frozen by hand. The Trainer callback calls it at the end of training (after giving the
        model back, unless `keep_frozen=True`).
        """
        self._closed = True
        for listener in self.listeners:
            listener.close()
        self.record.close()
        self.schedule.close()
        self._profiling.close()

    @property
    def profiled(self) -> bool:
        """Whether the unit order and weights are final (always, unless they wait for the first forward)."""
        return not self._profiling.waiting

    def profile_with(self, *args: Any, **kwargs: Any) -> UnitProfile:
        """
        Profile the units on an example input now (`model(*args, **kwargs)`, no gradient, eval mode) instead of
        waiting for the first training forward: order them by first use (`order="execution"`) and count their
        forward FLOPs (`budget="flops"`). Every rank must pass inputs of the same shape.
        """
        units, self.profile = self._profiling.profile(self, *args, **kwargs)
        if units is not self.units:  # order="execution": the first trainable unit may move
            self.units = units
            self._notify(FreezeEvent(tuple(self.units), self.frozen_units))
        if self._start_waits_for_profile:  # the start of training's update, now that units can be counted
            self._start_waits_for_profile = False
            self.update(0.0)
        return self.profile

    def num_units_at(self, progress: float) -> int:
        """How many units the linear clock freezes at `progress` (no side effect; needs the profile if any)."""
        return self.schedule.budget.units_at(progress, self)

    def update(self, progress: float) -> FreezeResult:
        """
        Have frozen the units the schedule asks for at `progress` through training (`LinearSchedule`: by the clock;
        `AdaptiveSchedule`: what has settled, checked every `check_every` steps).

        `update(0.0)` before the first step applies what the schedule freezes from the start (`freeze_start=0` with
        `freeze_start_level > 0`); with `budget="flops"`, whose units are weighed on the first training forward, it
        is applied at that forward (before its backward), unless `profile_with` is called first.

        Args:
            progress (`float`):
                Fraction of training done, in [0, 1] (for instance `step / total_steps`); a Python or numpy number,
                or a 0-d tensor. Every rank must pass the same value: derive it from step counts, never from timing.

        Returns:
            `FreezeResult`: what is frozen now.
        """
        progress = as_progress(progress)
        if progress == 0 and not self.schedule.budget.ready(self):
            self._start_waits_for_profile = True  # applied by profile_with, at the first training forward
            return self.result()
        count = self.schedule.units_at(progress, self)
        if count is None:
            return self.result()
        if count < self.frozen_units:  # a schedule that gives units back
            self._give_back_to(count)
            newly = 0
        else:
            newly = self.freeze_units(count).newly_frozen_units
        self.record.reach(self.schedule.fraction(progress, self))
        return self.result(newly_frozen_units=newly)

    def freeze_units(self, count: int) -> FreezeResult:
        """
        Freeze the first `count` units (never unfreezes: a smaller count than what is frozen does nothing).

        Args:
            count (`int`):
                Number of units to have frozen, in [0, `num_units`].
        """
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= self.num_units:
            raise ValueError(f"count must be an integer in [0, {self.num_units}], got {count!r}")
        if self._profiling.holds_freezing:
            self.record.wait_for(count)  # applied at the first forward, which sets the order
            return self.result()
        warn = not self._warned_empty_optimizer
        capped = cap_to_keep_a_parameter(self._param_groups, self.units, self.frozen_units, count, warn=warn)
        self._warned_empty_optimizer |= capped < count
        newly = tuple(self.units[self.frozen_units : capped])
        if not newly:
            return self.result()
        named = ((name, p) for unit in newly for name, p in zip(unit.parameter_names, unit.parameters, strict=True))
        params = tuple(p for _, p in self.record.freeze(named, frozen_units=capped))  # out of every optimizer
        logger.info("Froze %d units (up to %s).", capped, newly[-1].name or "<root>")
        # without a known DDP wrapper yet, the reducer waits for the first training forward
        self._notify(FreezeEvent(tuple(self.units), capped, frozen=newly, parameters=params))
        return self.result(newly_frozen_units=len(newly))

    def result(self, newly_frozen_units: int = 0) -> FreezeResult:
        """What is frozen now, as a `FreezeResult`."""
        return FreezeResult(self.frozen_units, self.num_units, self.record.numel, self.fraction, newly_frozen_units)

    def metrics(self) -> dict[str, float]:
        """
        What the freezer reports, under the `layer_freeze/` namespace: `fraction`, `frozen_units` (a count waiting for
        the first forward included) and `frozen_params`, then the schedule's and the listeners' own (the adaptive
        criterion; the activation cache's hit rates, rows served and forward FLOPs skipped since the last call, and
        its bytes; the gradient and optimizer-state bytes). The Trainer callback logs
        them; in an Accelerate loop, `accelerator.log(freezer.metrics(), step=step)`.

        Returns:
            `dict[str, float]`: the metrics by name.
        """
        return self._joined(self.record.metrics(), "metrics")

    # Checkpointing through `accelerator.register_for_checkpointing`.
    def state_dict(self) -> dict[str, Any]:
        """The freezer's progress: how many units are frozen (or waiting to be), the names of the parameters it
        froze, the fraction reached, and what its schedule and listeners keep (for the adaptive schedule the
        gradient-norm history its next check compares with)."""
        return self._joined(self.record.state_dict(self.num_units), "state_dict")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Re-apply the freeze recorded by `state_dict()` (monotonic: never unfreezes). States saved before the
        record existed hold only the count, and load the same way."""
        # while the order waits for the first forward, so do the names of a count
        self.freeze_units(FrozenRecord.saved_count(state_dict, self.units, not self._profiling.holds_freezing))
        self.record.reach(float(state_dict.get("fraction", 0.0)))
        for part in self._parts("load_state_dict"):
            part.load_state_dict(state_dict)
