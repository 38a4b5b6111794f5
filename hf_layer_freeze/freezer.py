"""`LayerFreezer`: the freezing engine, used by the Trainer callback, custom (Accelerate) loops and `plan`.

The engine coordinates and delegates: a schedule (`schedule.py`) decides how many units, `units.py` and `heads.py`
decide which, a `FrozenRecord` holds what this freezer froze, each optimizer keeps its own param-group bookkeeping
(`param_groups.py`), and the side effects of a freeze event are listeners it notifies (`events.py`: DDP's reducer,
re-entrant gradient checkpointing, compiled code, BatchNorm).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .activation_cache import ActivationCache
from .adaptive import GradientNormTracker
from .batchnorm import BatchNormLock
from .compiled import CompiledCodeInvalidation, resolve_max_freeze_events
from .distributed import DDPReducerSync, check_supported_wrapping
from .events import FreezeEvent, FreezeListener
from .gradient_checkpointing import CheckpointInputGrads, ReentrantCheckpointCheck
from .heads import peft_base_model
from .options import FreezeOptions, FreezeOptionsKwargs, Unpack, document_options
from .param_groups import check_supported_optimizer, frozen_param_groups
from .profiling import UnitProfile, profile_units
from .record import FrozenRecord, ledger_for
from .rewrites import RequiresGradGuard
from .schedule import (
    bounded_unit_count,
    freeze_fraction,
    num_units_for_budget,
    num_units_to_freeze,
    relative_changes,
    settled_prefix,
    validate_progress,
)
from .units import FreezableUnit, freezable_units
from .wrappers import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["FreezeResult", "LayerFreezer"]


@dataclass(frozen=True)
class FreezeResult:
    """
    What is frozen after a call to `LayerFreezer.update` / `LayerFreezer.freeze_units`.

    Args:
        frozen_units (`int`): number of units frozen so far (a prefix of the unit list).
        total_units (`int`): number of freezable units: the modules owning a parameter that trained when the
            freezer was built (head excluded).
        frozen_params (`int`): number of parameter elements this freezer froze so far.
        fraction (`float`): the freeze fraction the schedule asked for (0 when units were frozen by count).
        newly_frozen_units (`int`): units frozen by this very call.
    """

    frozen_units: int
    total_units: int
    frozen_params: int
    fraction: float
    newly_frozen_units: int

    @property
    def changed(self) -> bool:
        """Whether this call froze anything."""
        return self.newly_frozen_units > 0


def _optimizer_list(optimizer: Any) -> list[torch.optim.Optimizer]:
    """`optimizer` as a non-empty list of optimizers, or a `ValueError` naming what was given."""
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        given = optimizer if isinstance(optimizer, (list, tuple)) else None
        got = type(optimizer).__name__ if given is None else [type(o).__name__ for o in given]
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or a non-empty list of them, got {got}")
    return optimizers


@document_options(FreezeOptions)
class LayerFreezer:
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
        self.optimizers = _optimizer_list(optimizer)
        for each in self.optimizers:
            check_supported_optimizer(each)  # before anything is hooked on it
        self.max_freeze_events = resolve_max_freeze_events(model, options.max_freeze_events)

        self.model = model
        # What the other freezers of this model (in this process) hold frozen is the library's, not the user's.
        self.ledger = ledger_for(peft_base_model(unwrap_model(model)))
        held = self.ledger.held_parameters()
        if held:
            warnings.warn(
                f"{len(held)} parameter tensors of this model are held frozen by another LayerFreezer that was not "
                "closed (an earlier run that raised or was interrupted, or a second freezer built on purpose). This "
                "freezer counts them among its units, and they stay frozen until every freezer holding them gives "
                "them back (freezer.unfreeze()) or is closed (freezer.close(), which leaves them frozen).",
                stacklevel=2,
            )
        self.units: list[FreezableUnit] = freezable_units(model, options.granularity, options.head, held=held)
        if not self.units:
            raise ValueError(
                f"model ({type(unwrap_model(model)).__name__}) has no freezable unit: it needs at least one module "
                "owning trainable parameters besides the head"
            )
        self._param_groups = [frozen_param_groups(o) for o in self.optimizers]
        self._check_optimizers_hold_the_units()
        self.record = FrozenRecord(self.ledger)
        self._closed = False
        self.ledger.register(self.record, self._param_groups)  # what another freezer holds leaves these optimizers
        self.frozen_units = 0
        self.fraction = 0.0
        self._warned_empty_optimizer = False
        # order="execution" and budget="flops" need one forward pass: the first training forward provides it.
        self.profile: UnitProfile | None = None
        self._pending_count: int | None = None
        self._profile_hook = None
        if options.order == "execution" or options.budget == "flops":
            self._profile_hook = unwrap_model(model).register_forward_pre_hook(
                self._profile_on_first_forward, with_kwargs=True, prepend=True
            )
        self.gradient_norms: GradientNormTracker | None = None
        if options.schedule == "adaptive":
            self.gradient_norms = GradientNormTracker(self._optimizer_holding_units(), lambda: self.units)
        self._ddp_sync = DDPReducerSync(model)
        self.guard = RequiresGradGuard(model, self.record.refreeze)
        self.listeners: list[FreezeListener] = [self._ddp_sync, CheckpointInputGrads(model), self.guard]
        self.listeners.append(ReentrantCheckpointCheck(model))
        self.listeners.append(CompiledCodeInvalidation(model))
        if options.freeze_batchnorm:
            self.listeners.append(BatchNormLock(model))
        self.activation_cache: ActivationCache | None = None
        if options.cache_activations:
            self.activation_cache = ActivationCache(model, options.cache_max_bytes)
            self.listeners.append(self.activation_cache)
        self._notify(FreezeEvent(tuple(self.units), 0))  # parameters frozen before the freezer count from now

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The first optimizer given (see `optimizers` for all of them)."""
        return self.optimizers[0]

    @property
    def freeze_start(self) -> float:
        return self.options.freeze_start

    @property
    def freeze_level(self) -> float:
        return self.options.freeze_level

    @property
    def order(self) -> str:
        return self.options.order

    @property
    def budget(self) -> str:
        return self.options.budget

    @property
    def num_units(self) -> int:
        """Number of freezable units."""
        return len(self.units)

    @property
    def ddp_model(self) -> DistributedDataParallel | None:
        """The DDP wrapper whose reducer is rebuilt after each freeze, if any."""
        return self._ddp_sync.ddp

    def set_ddp_model(self, ddp_model: DistributedDataParallel) -> None:
        """
        Hand over the DDP wrapper of the model (for callers that only hold the unwrapped model, as Trainer
        callbacks do). A freeze that happened before it was known is applied to its reducer now.
        """
        self._ddp_sync.set_ddp_model(ddp_model)

    def _check_optimizers_hold_the_units(self) -> None:
        """Refuse optimizers that hold none of the model's parameters; warn once about unit parameters in none."""
        held = set().union(*(groups.parameter_ids for groups in self._param_groups))
        if not held & {id(p) for p in unwrap_model(self.model).parameters()}:
            raise ValueError(
                "optimizer holds none of the model's parameters: build it from model.parameters() "
                "(the same model passed to LayerFreezer)"
            )
        held |= self.ledger.registered_parameter_ids()  # another open freezer of the model keeps its optimizers right
        missing = [p for unit in self.units for p in unit.parameters if id(p) not in held]
        if missing:
            warnings.warn(
                f"{len(missing)} trainable parameter tensors ({sum(p.numel() for p in missing):,} elements) that "
                f"this LayerFreezer may freeze are in none of the {len(self.optimizers)} optimizer(s) it was given: "
                "another optimizer may keep changing them after they freeze. Pass every optimizer: "
                "LayerFreezer(model, [optimizer, other_optimizer]).",
                stacklevel=3,
            )

    def _optimizer_holding_units(self) -> torch.optim.Optimizer:
        unit_ids = {id(p) for unit in self.units for p in unit.parameters}
        for optimizer, groups in zip(self.optimizers, self._param_groups, strict=True):
            if groups.parameter_ids & unit_ids:
                return optimizer
        return self.optimizers[0]

    def _notify(self, event: FreezeEvent) -> None:
        for listener in self.listeners:
            listener.on_freeze_event(event)

    def unfreeze(self) -> FreezeResult:
        """
        Give the model back as it was given: every parameter this freezer froze requires gradients again and is back
        in its optimizer param group, in its place (its optimizer state, kept all along, with it); frozen BatchNorm
        layers update their statistics again. A second `trainer.train()` then trains exactly what the first one was
        given. Parameters that were frozen before this freezer was built, or by someone else since, stay frozen.

        Returns:
            `FreezeResult`: nothing frozen, `newly_frozen_units` 0.
        """
        unfrozen = tuple(self.units[: self.frozen_units])
        params = [p for _, p in self.record.give_back()]  # back in every optimizer's groups, in their places
        self.frozen_units = 0
        self.fraction = 0.0
        self._pending_count = None
        self._notify(FreezeEvent(tuple(self.units), 0, unfrozen=unfrozen, parameters=tuple(params)))
        return self.result()

    def refreeze(self) -> int:
        """
        Freeze again what this freezer froze and other code made trainable since (PEFT's `disable_adapter()` does on
        exit), warning the first time. The freezer checks this itself before each forward and when backward reaches
        the model's outputs (`rewrites.RequiresGradGuard`); call it where other code may have rewritten
        `requires_grad` in between (the Trainer callback calls it at each step's start).

        Returns:
            `int`: how many parameter tensors were frozen again.
        """
        return self.guard.check()

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
        Remove every hook the freezer put on the model (DDP discovery, first-forward profiling, frozen BatchNorm,
        gradient checkpointing, gradient-norm tracking, the `requires_grad` guard). What is frozen stays frozen and is
        the user's from then on: a later freezer of the model treats it as frozen by hand. The Trainer callback calls
        it at the end of training (after giving the model back, unless `keep_frozen=True`).
        """
        self._closed = True
        for listener in self.listeners:
            listener.close()
        self.record.close()
        if self.gradient_norms is not None:
            self.gradient_norms.close()
        if self._profile_hook is not None:
            self._profile_hook.remove()
            self._profile_hook = None

    @property
    def profiled(self) -> bool:
        """Whether the unit order and weights are final (always, unless they wait for the first forward)."""
        return self._profile_hook is None

    def profile_with(self, *args: Any, **kwargs: Any) -> UnitProfile:
        """
        Profile the units on an example input now (`model(*args, **kwargs)`, no gradient, eval mode) instead of
        waiting for the first training forward: order them by first use (`order="execution"`) and count their
        forward FLOPs (`budget="flops"`). Every rank must pass inputs of the same shape.
        """
        if self.frozen_units and self.order == "execution":
            raise RuntimeError(
                "with order='execution', profile before this LayerFreezer freezes anything: the order decides what is "
                "frozen"
            )
        profile = profile_units(self.model, self.units, *args, **kwargs)
        if self.order == "execution":
            ranks = sorted(range(self.num_units), key=lambda i: profile.first_use[i])
            self.units = [self.units[i] for i in ranks]
            profile = UnitProfile(
                tuple(profile.first_use[i] for i in ranks), tuple(profile.forward_flops[i] for i in ranks)
            )
            self._notify(FreezeEvent(tuple(self.units), self.frozen_units))  # the first trainable unit may move
        self.profile = profile
        if self._profile_hook is not None:
            self._profile_hook.remove()
            self._profile_hook = None
        return profile

    def _profile_on_first_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._profile_hook is None or not (torch.is_grad_enabled() and module.training):
            return
        self._profile_hook.remove()  # also keeps the profiling forward below from re-entering
        self._profile_hook = None
        with torch.no_grad():
            self.profile_with(*args, **kwargs)
        if self._pending_count is not None:
            count, self._pending_count = self._pending_count, None
            self.freeze_units(count)  # inside DDP's forward: the reducer sync prepares the rebuilt reducer

    def _unit_weights(self) -> list[int]:
        if self.budget == "params":
            return [unit.numel for unit in self.units]
        return list(self.profile.forward_flops)

    def num_units_at(self, progress: float) -> int:
        """How many units the schedule freezes at `progress` (no side effect; needs the profile if any)."""
        count = self._count_for_fraction(freeze_fraction(progress, self.freeze_start, self.freeze_level))
        if self.max_freeze_events is None:
            return count
        return bounded_unit_count(count, self._count_for_fraction(self.freeze_level), self.max_freeze_events)

    def _count_for_fraction(self, fraction: float) -> int:
        if self.budget == "units":
            return num_units_to_freeze(fraction, self.num_units)
        if not self.profiled and self.budget == "flops":
            raise RuntimeError("budget='flops' needs the first forward pass (or profile_with) before counting")
        return num_units_for_budget(fraction, self._unit_weights())

    def update(self, progress: float) -> FreezeResult:
        """
        Freeze the units the schedule asks for at `progress` through training.

        Args:
            progress (`float`):
                Fraction of training done, in [0, 1] (for instance `step / total_steps`); a Python or numpy number,
                or a 0-d tensor. Every rank must pass the same value: derive it from step counts, never from timing.

        Returns:
            `FreezeResult`: what is frozen now.
        """
        if isinstance(progress, torch.Tensor):
            if progress.ndim != 0 or progress.is_complex() or progress.dtype == torch.bool:
                raise ValueError(
                    "progress must be a number in [0, 1] (a fraction of training), got a tensor of shape "
                    f"{tuple(progress.shape)} and dtype {progress.dtype}"
                )
            progress = progress.item()
        if self.options.schedule == "adaptive":
            return self._update_adaptive(validate_progress(progress))
        fraction = freeze_fraction(progress, self.freeze_start, self.freeze_level)
        if self.budget == "flops" and not self.profiled:
            raise RuntimeError(
                "budget='flops' cannot count units before the first forward pass; call "
                "freezer.profile_with(batch) before resuming"
            )
        self.fraction = max(self.fraction, fraction)
        # With order="execution" before the first forward, freeze_units records the count and applies it there.
        return self.freeze_units(self.num_units_at(progress))

    def _update_adaptive(self, progress: float) -> FreezeResult:
        """Every `check_every` steps: freeze the settled prefix of the trainable units (after `freeze_start`)."""
        tracker = self.gradient_norms
        if tracker.steps < self.options.check_every:
            return self.result()
        means = tracker.interval_means()
        previous, tracker.previous = tracker.previous, means
        if previous is None or progress <= self.freeze_start or (self.budget == "flops" and not self.profiled):
            return self.result()
        first = self.frozen_units
        tracker.last_changes = relative_changes(previous[first:], means[first:])
        level = self._count_for_fraction(self.freeze_level)
        count = min(first + settled_prefix(tracker.last_changes, self.options.change_threshold), level)
        if self.max_freeze_events is not None:
            count = max(first, bounded_unit_count(count, level, self.max_freeze_events))
        result = self.freeze_units(max(first, count))
        self.fraction = max(self.fraction, self.frozen_units / self.num_units)
        return self.result(newly_frozen_units=result.newly_frozen_units)

    def freeze_units(self, count: int) -> FreezeResult:
        """
        Freeze the first `count` units (never unfreezes: a smaller count than what is frozen does nothing).

        Args:
            count (`int`):
                Number of units to have frozen, in [0, `num_units`].
        """
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= self.num_units:
            raise ValueError(f"count must be an integer in [0, {self.num_units}], got {count!r}")
        if not self.profiled and self.order == "execution":
            if count > self.frozen_units:
                self._pending_count = max(self._pending_count or 0, count)  # applied at the first forward
            return self.result()
        count = self._cap_to_keep_an_optimizer_nonempty(count)
        newly = tuple(self.units[self.frozen_units : count])
        if not newly:
            return self.result()
        frozen = self.record.freeze(
            (name, p) for unit in newly for name, p in zip(unit.parameter_names, unit.parameters, strict=True)
        )
        params = tuple(p for _, p in frozen)  # out of every optimizer's groups (the ledger's bookkeeping)
        self.frozen_units = count
        logger.info("Froze %d units (up to %s).", count, newly[-1].name or "<root>")
        # without a known DDP wrapper yet, the reducer waits for the first training forward
        self._notify(FreezeEvent(tuple(self.units), count, frozen=newly, parameters=params))
        return self.result(newly_frozen_units=len(newly))

    def _cap_to_keep_an_optimizer_nonempty(self, count: int) -> int:
        """
        The largest count <= `count` that leaves the optimizers at least one parameter. Optimizers with nothing
        left update nothing, and a GradScaler then fails with "No inf checks were recorded for this optimizer".
        """
        remaining = {id(p) for groups in self._param_groups for p in groups.trainable_parameters()}
        for index in range(self.frozen_units, count):
            unit_ids = {id(p) for p in self.units[index].parameters}
            if remaining and remaining <= unit_ids:
                if not self._warned_empty_optimizer:
                    warnings.warn(
                        f"Freezing unit {index} ({self.units[index].name or '<root>'}) would leave the optimizer "
                        f"with no parameter, so freezing stops at {index} of {self.num_units} units. Put the "
                        "head in the optimizer, or lower freeze_level.",
                        stacklevel=3,
                    )
                    self._warned_empty_optimizer = True
                return index
            remaining -= unit_ids
        return count

    def result(self, newly_frozen_units: int = 0) -> FreezeResult:
        """What is frozen now, as a `FreezeResult`."""
        return FreezeResult(
            frozen_units=self.frozen_units,
            total_units=self.num_units,
            frozen_params=self.record.numel,
            fraction=self.fraction,
            newly_frozen_units=newly_frozen_units,
        )

    # Checkpointing through `accelerator.register_for_checkpointing`.
    def state_dict(self) -> dict[str, Any]:
        """The freezer's progress: how many units are frozen (or waiting to be), the names of the parameters it
        froze, the fraction reached, and for the adaptive schedule the gradient-norm history its next check compares
        with."""
        state = {
            "frozen_units": max(self.frozen_units, self._pending_count or 0),
            "frozen_parameter_names": self.record.names,
            "fraction": self.fraction,
            "num_units": self.num_units,
        }
        if self.gradient_norms is not None:
            state["gradient_norms"] = self.gradient_norms.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Re-apply the freeze recorded by `state_dict()` (monotonic: never unfreezes). States saved before the
        record existed hold only the count, and load the same way."""
        if state_dict.get("num_units", self.num_units) != self.num_units:
            raise ValueError(
                f"state_dict was saved for a model with {state_dict['num_units']} freezable units, "
                f"this one has {self.num_units}"
            )
        count = int(state_dict["frozen_units"])
        names = state_dict.get("frozen_parameter_names") or []
        if self.profiled or self.order != "execution":  # else the order, and so the names of a count, waits
            in_units = {name for unit in self.units[:count] for name in unit.parameter_names}
            unknown = [name for name in names if name not in in_units]
            if unknown:
                raise ValueError(
                    f"state_dict froze {unknown[0]!r}, which is not in the first {count} freezable units of this "
                    "model: it was saved for another model, or with other options (head, granularity, order)"
                )
        self.freeze_units(count)
        self.fraction = max(self.fraction, float(state_dict.get("fraction", 0.0)))
        if self.gradient_norms is not None and state_dict.get("gradient_norms") is not None:
            self.gradient_norms.load_state_dict(state_dict["gradient_norms"])
