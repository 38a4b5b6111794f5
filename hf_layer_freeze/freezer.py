"""`LayerFreezer`: the freezing engine, used by the Trainer callback, custom (Accelerate) loops and `plan`."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .adaptive import GradientNormTracker
from .checkpointing import CheckpointInputGrads
from .compiled import invalidate_compiled_code, recompile_limit
from .distributed import DDPReducerSync, check_supported_wrapping
from .options import FreezeOptions
from .param_groups import freeze_parameters, frozen_param_groups
from .profiling import UnitProfile, profile_units
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
from .wrappers import is_compiled, unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["FreezeResult", "LayerFreezer"]


@dataclass(frozen=True)
class FreezeResult:
    """
    What is frozen after a call to `LayerFreezer.update` / `LayerFreezer.freeze_units`.

    Args:
        frozen_units (`int`): number of units frozen so far (a prefix of the unit list).
        total_units (`int`): number of freezable units.
        frozen_params (`int`): number of parameter elements frozen so far.
        fraction (`float`): the freeze fraction the schedule asked for (0 when units were frozen by count).
        newly_frozen_units (`int`): units frozen by this very call.
        frozen_before (`int`, *optional*, defaults to 0): of `frozen_units`, the prefix that was already frozen
            when this freezer was built (by another freezer, or by hand): not this freezer's doing, and left frozen
            by `unfreeze()`.
    """

    frozen_units: int
    total_units: int
    frozen_params: int
    fraction: float
    newly_frozen_units: int
    frozen_before: int = 0

    @property
    def frozen_by_this_freezer(self) -> int:
        """Units this freezer froze itself (`frozen_units - frozen_before`)."""
        return self.frozen_units - self.frozen_before

    @property
    def changed(self) -> bool:
        """Whether this call froze anything."""
        return self.newly_frozen_units > 0


def _stay_in_eval(module: nn.Module, args: tuple) -> None:
    module.training = False


def resolve_max_freeze_events(
    model: nn.Module, max_freeze_events: int | None, compiled: bool | None = None
) -> int | None:
    """
    The bound on distinct freeze events. Under `torch.compile` each event recompiles the training graph and the
    evaluation graph once (seconds to minutes each), and past `torch._dynamo.config.recompile_limit` Dynamo
    silently runs eager. So a compiled model gets `(recompile_limit - 2) // 2` events by default, and a warning if a
    given bound would exceed it. `compiled` overrides the detection (the Trainer hands callbacks the model before
    `torch_compile` wraps it).
    """
    if not (is_compiled(model) if compiled is None else compiled):
        return max_freeze_events
    limit = recompile_limit()
    safe = max(1, (limit - 2) // 2)
    if max_freeze_events is None:
        logger.info("Compiled model: at most %d freeze events (recompile_limit %d).", safe, limit)
        return safe
    if max_freeze_events > safe:
        warnings.warn(
            f"max_freeze_events={max_freeze_events} on a compiled model: each freeze event recompiles the training "
            f"and the evaluation graph, and past torch._dynamo.config.recompile_limit={limit} Dynamo silently falls "
            f"back to eager. Keep max_freeze_events <= {safe}, or raise the limit to at least "
            f"{2 * max_freeze_events + 2}.",
            stacklevel=3,
        )
    return max_freeze_events


class LayerFreezer:
    """
    Progressively freezes the earliest units of a model and keeps its optimizer (and DDP) consistent.

    `update(progress)` freezes the first `floor(freeze_fraction(progress) * N)` of the model's N freezable units
    (see `freezable_units`): their parameters get `requires_grad=False`, lose their gradient, and leave every
    param group of the optimizer (empty groups stay, since LR schedulers index them). Their optimizer state is
    kept, and `optimizer.state_dict()` keeps the full standard layout, so checkpoints load into a fresh optimizer
    and into a frozen one alike. Freezing is monotonic and idempotent. Under DDP, the reducer is rebuilt in place
    after each freeze so that frozen parameters are no longer all-reduced.

    The freezer is checkpointable: register it with `accelerator.register_for_checkpointing(freezer)` and
    `accelerator.load_state` re-applies the freeze that was in effect when the state was saved, whether the
    freezer has already frozen something or not.

    Args:
        model (`torch.nn.Module`):
            The model, raw or as returned by `accelerator.prepare` (DDP-wrapped, compiled).
        optimizer (`torch.optim.Optimizer`):
            Its optimizer, raw or an Accelerate `AcceleratedOptimizer`.
        freeze_start (`float`, *optional*, defaults to 0.5):
            Fraction of training, in [0, 1), after which freezing starts.
        freeze_level (`float`, *optional*, defaults to 1.0):
            Fraction of the units frozen at the end of training, in [0, 1].
        order (`str`, *optional*, defaults to `"definition"`):
            `"definition"`: depth-first order of the ownership tree (the method card's). `"execution"`: order of
            first use in a forward pass, recorded once on the first training batch, so the frozen set is a prefix
            of the computation even where the code defines modules in another order.
        granularity (`str`, *optional*, defaults to `"module"`):
            `"module"`: every module owning parameters is a unit. `"block"`: the model's own blocks, so no block
            is half frozen: a timm model's `group_matcher()` groups (stem, blocks, stages), a transformers model's
            layers (the classes it lists in `_no_split_modules`).
        budget (`str`, *optional*, defaults to `"units"`):
            What the freeze fraction counts: `"units"` (the card's), `"params"` (cumulative parameters) or
            `"flops"` (cumulative forward FLOPs, counted once on the first training batch).
        freeze_batchnorm (`bool`, *optional*, defaults to `False`):
            Also freeze the running statistics of frozen BatchNorm layers (they normalize with them).
        max_freeze_events (`int`, *optional*):
            At most this many distinct freeze events (the unit count is rounded down to evenly spaced levels).
            Unbounded by default, except for a compiled model: each event recompiles it, so the default keeps it
            within `torch._dynamo.config.recompile_limit`.
        schedule (`str`, *optional*, defaults to `"linear"`):
            `"linear"`: the method card's, by the clock. `"adaptive"`: freeze a unit once its training has settled.
            Every `check_every` optimizer steps the mean gradient norm of each unit over the interval is compared
            with the previous interval's; the longest prefix of trainable units whose relative change is at most
            `change_threshold` times the median change of all trainable units is frozen (see
            `schedule.settled_prefix`). Never before `freeze_start`, never beyond `freeze_level`, always a prefix,
            never unfreezing. The gradient norms are read by a step pre-hook on the optimizer; `update(progress)`
            makes the checks, so call it every step (the callback does).
        check_every (`int`, *optional*, defaults to 20):
            `schedule="adaptive"`: optimizer steps between two checks.
        change_threshold (`float`, *optional*, defaults to 1.0):
            `schedule="adaptive"`: a unit has settled when its relative change is at most this times the median.

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
        optimizer: torch.optim.Optimizer,
        freeze_start: float = 0.5,
        freeze_level: float = 1.0,
        order: str = "definition",
        granularity: str = "module",
        budget: str = "units",
        freeze_batchnorm: bool = False,
        max_freeze_events: int | None = None,
        schedule: str = "linear",
        check_every: int = 20,
        change_threshold: float = 1.0,
    ) -> None:
        options = FreezeOptions(
            freeze_start=freeze_start,
            freeze_level=freeze_level,
            order=order,
            granularity=granularity,
            budget=budget,
            freeze_batchnorm=freeze_batchnorm,
            max_freeze_events=max_freeze_events,
            schedule=schedule,
            check_every=check_every,
            change_threshold=change_threshold,
        )
        self.options = options
        self.freeze_start, self.freeze_level = options.freeze_start, options.freeze_level
        self.order, self.granularity, self.budget = options.order, options.granularity, options.budget
        self.freeze_batchnorm = options.freeze_batchnorm
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.max_freeze_events = resolve_max_freeze_events(model, options.max_freeze_events)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_supported_wrapping(model, optimizer)

        self.model = model
        self.optimizer = optimizer
        self.units: list[FreezableUnit] = freezable_units(model, options.granularity)
        if not self.units:
            raise ValueError(
                f"model ({type(unwrap_model(model)).__name__}) has no freezable unit: it needs at least one module "
                "owning parameters besides the classification head"
            )
        self._param_groups = frozen_param_groups(optimizer)
        model_param_ids = {id(p) for p in unwrap_model(model).parameters()}
        if not model_param_ids & self._param_groups.parameter_ids:
            raise ValueError(
                "optimizer holds none of the model's parameters: build it from model.parameters() "
                "(the same model passed to LayerFreezer)"
            )
        self._ddp_sync = DDPReducerSync(model)
        self._checkpoint_input_grads = CheckpointInputGrads(model)
        self.frozen_units = 0
        self.fraction = 0.0
        self._warned_empty_optimizer = False
        self._batchnorm_hooks: list[torch.utils.hooks.RemovableHandle] = []
        # order="execution" and budget="flops" need one forward pass: the first training forward provides it.
        self.profile: UnitProfile | None = None
        self._pending_count: int | None = None
        self._profile_hook = None
        if options.order == "execution" or options.budget == "flops":
            self._profile_hook = unwrap_model(model).register_forward_pre_hook(
                self._profile_on_first_forward, with_kwargs=True, prepend=True
            )
        # Units that are frozen already (a second freezer on the same model) count as frozen, but are not ours to
        # unfreeze.
        while self.frozen_units < len(self.units) and not any(
            p.requires_grad for p in self.units[self.frozen_units].parameters
        ):
            self.frozen_units += 1
        self._already_frozen_units = self.frozen_units
        self.gradient_norms: GradientNormTracker | None = None
        if options.schedule == "adaptive":
            self.gradient_norms = GradientNormTracker(optimizer, lambda: self.units)
        if self.frozen_units:
            logger.info(
                "%d of %d units were frozen before this LayerFreezer was built: they count as frozen "
                "(FreezeResult.frozen_before) and unfreeze() leaves them frozen.",
                self.frozen_units,
                self.num_units,
            )

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

    def unfreeze(self) -> FreezeResult:
        """
        Give the model back as it was given: every parameter this freezer froze requires gradients again and is back
        in its optimizer param group, in its place (its optimizer state, kept all along, with it); frozen BatchNorm
        layers update their statistics again. A second `trainer.train()` then trains the whole model. Units that
        were frozen before this freezer was built stay frozen.

        Returns:
            `FreezeResult`: nothing frozen, `newly_frozen_units` 0.
        """
        params = [p for unit in self.units[self._already_frozen_units : self.frozen_units] for p in unit.parameters]
        for param in params:
            param.requires_grad_(True)
        self._param_groups.restore(params)
        for handle in self._batchnorm_hooks:
            handle.remove()
        self._batchnorm_hooks.clear()
        if params and unwrap_model(self.model).training:
            unwrap_model(self.model).train()  # BatchNorm layers locked in eval mode follow the model again
        self.frozen_units = self._already_frozen_units
        self.fraction = 0.0
        self._pending_count = None
        self._checkpoint_input_grads.update(self.units, self.frozen_units)
        if params:
            self._ddp_sync.parameters_changed()
            invalidate_compiled_code(self.model)
        return self.result()

    def close(self) -> None:
        """
        Remove every hook the freezer put on the model (DDP discovery, first-forward profiling, frozen BatchNorm).
        What is frozen stays frozen. The Trainer callback calls it at the end of training.
        """
        self._ddp_sync.close()
        self._checkpoint_input_grads.close()
        if self.gradient_norms is not None:
            self.gradient_norms.close()
        if self._profile_hook is not None:
            self._profile_hook.remove()
            self._profile_hook = None
        for handle in self._batchnorm_hooks:
            handle.remove()
        self._batchnorm_hooks.clear()

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
                "with order='execution', profile before freezing anything: the order decides what is frozen"
            )
        profile = profile_units(self.model, self.units, *args, **kwargs)
        if self.order == "execution":
            ranks = sorted(range(self.num_units), key=lambda i: profile.first_use[i])
            self.units = [self.units[i] for i in ranks]
            profile = UnitProfile(
                tuple(profile.first_use[i] for i in ranks), tuple(profile.forward_flops[i] for i in ranks)
            )
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
        count = self._cap_to_keep_optimizer_nonempty(count)
        newly = self.units[self.frozen_units : count]
        if newly:
            params = [p for unit in newly for p in unit.parameters]
            freeze_parameters(params)
            self._param_groups.remove(params)
            if self.freeze_batchnorm:
                self._lock_batchnorm_in_eval(newly)
            self.frozen_units = count
            logger.info("Froze %d units (up to %s).", count, newly[-1].name or "<root>")
            self._checkpoint_input_grads.update(self.units, count)
            self._ddp_sync.parameters_changed()  # without a known wrapper yet, waits for the first training forward
            invalidate_compiled_code(self.model)  # compiled: the next step traces a backward without these gradients
        return self.result(newly_frozen_units=len(newly))

    def _lock_batchnorm_in_eval(self, units: list[FreezableUnit]) -> None:
        """Frozen BatchNorm layers normalize with their running statistics and stop updating them, even though
        training loops call `model.train()` every step: a pre-forward hook puts them back in eval mode."""
        for unit in units:
            for module in unit.owner_modules(self.model):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
                    self._batchnorm_hooks.append(module.register_forward_pre_hook(_stay_in_eval))

    def _cap_to_keep_optimizer_nonempty(self, count: int) -> int:
        """
        The largest count <= `count` that leaves the optimizer at least one parameter. An optimizer with nothing
        left updates nothing, and a GradScaler then fails with "No inf checks were recorded for this optimizer".
        """
        remaining = {id(p) for p in self._param_groups.trainable_parameters()}
        for index in range(self.frozen_units, count):
            unit_ids = {id(p) for p in self.units[index].parameters}
            if remaining and remaining <= unit_ids:
                if not self._warned_empty_optimizer:
                    warnings.warn(
                        f"Freezing unit {index} ({self.units[index].name or '<root>'}) would leave the optimizer "
                        f"with no parameter, so freezing stops at {index} of {self.num_units} units. Put the "
                        "classification head in the optimizer, or lower freeze_level.",
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
            frozen_params=sum(unit.numel for unit in self.units[: self.frozen_units]),
            fraction=self.fraction,
            newly_frozen_units=newly_frozen_units,
            frozen_before=self._already_frozen_units,
        )

    # Checkpointing through `accelerator.register_for_checkpointing`.
    def state_dict(self) -> dict[str, Any]:
        """The freezer's progress: how many units are frozen (or waiting to be), the fraction reached, and for the
        adaptive schedule the gradient-norm history its next check compares with."""
        state = {
            "frozen_units": max(self.frozen_units, self._pending_count or 0),
            "fraction": self.fraction,
            "num_units": self.num_units,
        }
        if self.gradient_norms is not None:
            state["gradient_norms"] = self.gradient_norms.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Re-apply the freeze recorded by `state_dict()` (monotonic: never unfreezes)."""
        if state_dict.get("num_units", self.num_units) != self.num_units:
            raise ValueError(
                f"state_dict was saved for a model with {state_dict['num_units']} freezable units, "
                f"this one has {self.num_units}"
            )
        self.freeze_units(int(state_dict["frozen_units"]))
        self.fraction = max(self.fraction, float(state_dict.get("fraction", 0.0)))
        if self.gradient_norms is not None and state_dict.get("gradient_norms") is not None:
            self.gradient_norms.load_state_dict(state_dict["gradient_norms"])
