"""What one forward pass says about each unit: when it is first used, and its forward FLOPs.

`order="execution"` sorts units by first use, `budget="flops"` weighs them by FLOPs, `plan` and the benchmarks report
the share of FLOPs frozen: all of them use this one attribution rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .units import FreezableUnit
from .wrappers import unwrap_model

__all__ = ["UnitProfile", "profile_units"]


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
