"""Freezing parameters, and keeping the optimizer consistent while they are frozen.

Frozen parameters leave the optimizer's `param_groups` (so the optimizer neither updates nor decays them), but
their optimizer state stays, as the method card asks. Torch alone cannot save such an optimizer: `state_dict()`
raises `KeyError` for a parameter that has state but is in no group, and `load_state_dict()` refuses groups of
another size. `FrozenParamGroups` uses the optimizer's public state-dict hooks to put the frozen parameters back
in place while torch packs or unpacks the state, so checkpoints always hold the full, standard layout: they load
into a fresh optimizer and into a frozen one alike.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["FreezeResult", "FrozenParamGroups", "freeze_parameters", "frozen_param_groups", "unwrap_optimizer"]


@dataclass(frozen=True)
class FreezeResult:
    """
    What is frozen after a call to `LayerFreezer.update` / `LayerFreezer.freeze_units`.

    Args:
        frozen_units (`int`): number of units frozen so far (a prefix of the unit list).
        total_units (`int`): number of freezable units.
        frozen_params (`int`): number of parameter elements frozen so far.
        trainable_params (`int`): number of parameter elements of the model still trainable.
        fraction (`float`): the freeze fraction the schedule asked for (0 when units were frozen by count).
        newly_frozen_units (`int`): units frozen by this very call.
    """

    frozen_units: int
    total_units: int
    frozen_params: int
    trainable_params: int
    fraction: float
    newly_frozen_units: int

    @property
    def changed(self) -> bool:
        """Whether this call froze anything."""
        return self.newly_frozen_units > 0


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside an Accelerate `AcceleratedOptimizer` (or any wrapper exposing `.optimizer`)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def freeze_parameters(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Stop gradients for `parameters`: `requires_grad=False` and any stored gradient dropped."""
    for param in parameters:
        param.requires_grad_(False)
        param.grad = None


class FrozenParamGroups:
    """
    Removes frozen parameters from an optimizer's `param_groups`, keeping their state and a standard `state_dict`.

    One instance serves one optimizer for its whole life (use `frozen_param_groups(optimizer)` to get it): it
    remembers each group's full parameter list, so `state_dict()` packs and `load_state_dict()` unpacks the full
    layout, and the frozen parameters are taken out again right after. Empty groups are kept, since LR schedulers
    index groups by position.

    Args:
        optimizer (`torch.optim.Optimizer`):
            A torch optimizer (not an `AcceleratedOptimizer`: it has no state-dict hooks of its own).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.frozen_ids: set[int] = set()
        # The layout of each group as built by the user, before anything was removed.
        self._full_params = [list(group["params"]) for group in optimizer.param_groups]
        self._full_names = [
            list(group["param_names"]) if "param_names" in group else None for group in optimizer.param_groups
        ]
        seen: set[int] = set()
        for params in self._full_params:
            for param in params:
                if id(param) in seen:
                    raise ValueError("optimizer holds the same parameter in two param groups; torch forbids this")
                seen.add(id(param))
        self._hook_handles = [
            optimizer.register_state_dict_pre_hook(self._restore_before_state_dict),
            optimizer.register_state_dict_post_hook(self._remove_after_state_dict),
            optimizer.register_load_state_dict_pre_hook(self._restore_before_load),
            optimizer.register_load_state_dict_post_hook(self._remove_after_load),
        ]

    @property
    def parameter_ids(self) -> set[int]:
        """Ids of every parameter the optimizer was built with, frozen or not."""
        return {id(p) for params in self._full_params for p in params}

    def remove(self, parameters: Iterable[torch.Tensor]) -> int:
        """Take `parameters` out of every param group (by identity); returns how many were in the optimizer."""
        new_ids = {id(p) for p in parameters} - self.frozen_ids
        known = self.parameter_ids
        self.frozen_ids |= new_ids
        self._apply_removal()
        return len(new_ids & known)

    def trainable_parameters(self) -> list[torch.Tensor]:
        """The parameters the optimizer still updates."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _apply_removal(self) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            if index >= len(self._full_params):
                break  # a group the user added after freezing started; nothing of ours is in it
            full_params, full_names = self._full_params[index], self._full_names[index]
            keep = [i for i, p in enumerate(full_params) if id(p) not in self.frozen_ids]
            group["params"] = [full_params[i] for i in keep]
            if full_names is not None and "param_names" in group:
                group["param_names"] = [full_names[i] for i in keep]

    def _restore_full_layout(self) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            if index >= len(self._full_params):
                break
            group["params"] = list(self._full_params[index])
            if self._full_names[index] is not None and "param_names" in group:
                group["param_names"] = list(self._full_names[index])

    # Optimizer state-dict hooks (public torch API since 2.1).
    def _restore_before_state_dict(self, optimizer: torch.optim.Optimizer) -> None:
        self._restore_full_layout()

    def _remove_after_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        self._apply_removal()
        return state_dict

    def _restore_before_load(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        self._restore_full_layout()

    def _remove_after_load(self, optimizer: torch.optim.Optimizer) -> None:
        self._apply_removal()


_GROUPS_BY_OPTIMIZER: weakref.WeakKeyDictionary[torch.optim.Optimizer, FrozenParamGroups] = weakref.WeakKeyDictionary()


def frozen_param_groups(optimizer: torch.optim.Optimizer) -> FrozenParamGroups:
    """
    The `FrozenParamGroups` of `optimizer`, created on first use.

    There is exactly one per optimizer, so a second freezer on the same optimizer (a second `trainer.train()`
    call, say) shares the recorded full layout instead of taking an already-filtered one for the full one.
    """
    optimizer = unwrap_optimizer(optimizer)
    groups = _GROUPS_BY_OPTIMIZER.get(optimizer)
    if groups is None:
        groups = FrozenParamGroups(optimizer)
        _GROUPS_BY_OPTIMIZER[optimizer] = groups
    return groups
