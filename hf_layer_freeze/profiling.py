"""What one forward pass says about each unit: when it is first used, and its forward FLOPs.

`order="execution"` sorts units by first use, `budget="flops"` weighs them by FLOPs, `plan` and the benchmarks report
the share of FLOPs frozen: all of them use this one attribution rule. `FirstForwardProfiling` is the freezer's
profiling lifecycle: profile on the first training forward, then apply the freeze that waited for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .units import FreezableUnit
from .wrappers import unwrap_model

if TYPE_CHECKING:
    from .freezer import LayerFreezer

__all__ = ["FirstForwardProfiling", "UnitProfile", "order_by_first_use", "profile_units"]


@dataclass(frozen=True)
class UnitProfile:
    """
    What one forward pass says about each unit (same order as the units profiled).

    Args:
        first_use (`tuple[int, ...]`): rank of the unit's first use in the forward pass (its earliest owner module).
        forward_flops (`tuple[int, ...]`): forward FLOPs attributed to the unit (its modules' own FLOPs, plus those of
            parameter-free modules, such as an attention's matmuls, given to their first unit).
    """

    first_use: tuple[int, ...]
    forward_flops: tuple[int, ...]


@torch.no_grad()
def profile_units(model: nn.Module, units: list[FreezableUnit], *args, **kwargs) -> UnitProfile:
    """
    Run one forward of `model(*args, **kwargs)` to record each unit's first use and its forward FLOPs.

    The pass runs in eval mode without gradients (BatchNorm statistics and RNG untouched) and restores the train
    mode after. The order is that of module calls, so it is the same on every rank for the same model.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = unwrap_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    order: dict[int, int] = {}

    def record(module, _args):
        order.setdefault(id(module), len(order))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    was_training = {id(m): m.training for m in model.modules()}
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with counter:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module in model.modules():
            module.training = was_training[id(module)]

    root = type(model).__name__
    inclusive = {key: sum(counts.values()) for key, counts in counter.get_flop_counts().items()}

    def flops_of(name: str) -> int:
        return inclusive.get(f"{root}.{name}" if name else root, 0)

    # A module's own FLOPs are its count less those of its nearest descendants that were called: a container that
    # is never called itself (a ModuleList of layers) must not make its parent keep every layer's FLOPs.
    own = {name: flops_of(name) for name, _ in model.named_modules()}
    for name in [name for name, value in own.items() if name and value]:
        parent = name.rpartition(".")[0]
        while parent and not flops_of(parent):  # up to the nearest ancestor that was called
            parent = parent.rpartition(".")[0]
        own[parent] -= flops_of(name)
    own = {name: max(0, value) for name, value in own.items()}

    unit_of_module: dict[str, int] = {}
    for index, unit in enumerate(units):
        for owner in unit.owner_modules(model):
            unit_of_module.setdefault(names[id(owner)], index)
    forward_flops = [0] * len(units)
    for name, value in own.items():
        index = unit_of_module.get(name)
        if index is None:  # a parameter-free module (or the head): give it to its first unit below, if any
            below = [i for n, i in unit_of_module.items() if n.startswith(f"{name}.") or not name]
            index = min(below) if below else None
        if index is not None and value:
            forward_flops[index] += value
    first_use = []
    for unit in units:
        ranks = [order[id(m)] for m in unit.owner_modules(model) if id(m) in order]
        first_use.append(min(ranks) if ranks else len(order))
    return UnitProfile(tuple(first_use), tuple(forward_flops))


def order_by_first_use(units: list[FreezableUnit], profile: UnitProfile) -> tuple[list[FreezableUnit], UnitProfile]:
    """`units` sorted by first use in the forward pass, and `profile` in that order (`order="execution"`)."""
    ranks = sorted(range(len(units)), key=lambda i: profile.first_use[i])
    ordered = UnitProfile(tuple(profile.first_use[i] for i in ranks), tuple(profile.forward_flops[i] for i in ranks))
    return [units[i] for i in ranks], ordered


class FirstForwardProfiling:
    """
    The first-forward profiling of a freezer whose options need one forward pass (`order="execution"` sets the unit
    order from it, `budget="flops"` the units' weights): a forward pre-hook on the bare model that profiles the units
    on the first training batch (`LayerFreezer.profile_with`), then applies the freeze that waited for the order
    (`FrozenRecord.pending_units`).

    Args:
        freezer (`LayerFreezer`):
            The freezer, whose options, bare model and record it reads (held only while the profile is to come).
    """

    def __init__(self, freezer: LayerFreezer) -> None:
        self.sets_order = freezer.options.order == "execution"
        self._freezer: LayerFreezer | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        if self.sets_order or freezer.options.budget == "flops":
            self._freezer = freezer
            self._hook = freezer.bare_model.register_forward_pre_hook(self._on_forward, with_kwargs=True, prepend=True)

    @property
    def waiting(self) -> bool:
        """Whether the profile is still to come (at the first training forward, or `profile_with`)."""
        return self._hook is not None

    @property
    def holds_freezing(self) -> bool:
        """Whether freezing waits for the profile: the order it sets decides what a count freezes."""
        return self.waiting and self.sets_order

    def profile(self, freezer: LayerFreezer, *args: Any, **kwargs: Any) -> tuple[list[FreezableUnit], UnitProfile]:
        """Profile `freezer`'s units on `model(*args, **kwargs)` now; returns the units in freezing order (a new list
        when the profile sets it) and their profile."""
        if freezer.frozen_units and self.sets_order:
            raise RuntimeError(
                "with order='execution', profile before this LayerFreezer freezes anything: the order decides what is "
                "frozen"
            )
        units = freezer.units
        profile = profile_units(freezer.bare_model, units, *args, **kwargs)
        if self.sets_order:
            units, profile = order_by_first_use(units, profile)
        self.close()
        return units, profile

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        freezer = self._freezer
        if self._hook is None or freezer is None or not (torch.is_grad_enabled() and module.training):
            return
        self.close()  # also keeps the profiling forward below from re-entering
        with torch.no_grad():
            freezer.profile_with(*args, **kwargs)
        count = freezer.record.take_pending()
        if count is not None:
            freezer.freeze_units(count)  # inside DDP's forward: the reducer sync prepares the rebuilt reducer

    def close(self) -> None:
        """Remove the hook (the profile is final, or the freezer closed)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._freezer = None
