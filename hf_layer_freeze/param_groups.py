"""Freezing parameters, and keeping the optimizer consistent while they are frozen.

Frozen parameters leave the optimizer's `param_groups` (so the optimizer neither updates nor decays them), but
their optimizer state stays, as the method card asks. Torch alone cannot save such an optimizer: `state_dict()`
raises `KeyError` for a parameter that has state but is in no group, and `load_state_dict()` refuses groups of
another size. `frozen_param_groups(optimizer)` uses the optimizer's public state-dict hooks to put the frozen
parameters back in place while torch packs or unpacks the state, so checkpoints always hold the full, standard
layout: they load into a fresh optimizer and into a frozen one alike.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

__all__ = ["freeze_parameters", "frozen_param_groups", "unwrap_optimizer"]


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


class _FrozenParamGroups:
    """
    Removes frozen parameters from an optimizer's `param_groups`, keeping their state and a standard `state_dict`.

    One instance serves one optimizer for its whole life, which is why it is private: `frozen_param_groups(optimizer)`
    gets it (a second instance built later would take the already-filtered groups for the full layout). It
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

    def remove(self, parameters: Iterable[torch.Tensor]) -> None:
        """Take `parameters` out of every param group (by identity)."""
        self.frozen_ids |= {id(p) for p in parameters}
        self._apply_removal()

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put `parameters` back in their groups, in their original places."""
        self.frozen_ids -= {id(p) for p in parameters}
        self._apply_removal()

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


_GROUPS_BY_OPTIMIZER: weakref.WeakKeyDictionary[torch.optim.Optimizer, _FrozenParamGroups] = (
    weakref.WeakKeyDictionary()
)


def frozen_param_groups(optimizer: torch.optim.Optimizer) -> _FrozenParamGroups:
    """
    The `_FrozenParamGroups` of `optimizer`, created on first use.

    There is exactly one per optimizer, so a second freezer on the same optimizer (a second `trainer.train()`
    call, say) shares the recorded full layout instead of taking an already-filtered one for the full one.
    """
    optimizer = unwrap_optimizer(optimizer)
    groups = _GROUPS_BY_OPTIMIZER.get(optimizer)
    if groups is None:
        groups = _FrozenParamGroups(optimizer)
        _GROUPS_BY_OPTIMIZER[optimizer] = groups
    return groups
