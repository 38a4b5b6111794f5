"""Freezing parameters, and keeping the optimizer consistent while they are frozen.

Frozen parameters leave the optimizer's `param_groups` (so the optimizer neither updates nor decays them), but
their optimizer state stays, as the method card asks. Torch alone cannot save such an optimizer: `state_dict()`
raises `KeyError` for a parameter that has state but is in no group, and `load_state_dict()` refuses groups of
another size. `frozen_param_groups(optimizer)` uses the optimizer's public state-dict hooks to put the frozen
parameters back in place while torch packs or unpacks the state, so checkpoints always hold the full, standard
layout: they load into a fresh optimizer and into a frozen one alike.

Optimizers with train and eval modes (schedule-free, `optim="schedule_free_*"`) move every parameter of a group
between two points when they switch (`optimizer.train()` / `optimizer.eval()`, which the Trainer calls before each
training step and each evaluation): a frozen parameter left out of that switch would be evaluated at its
training-mode value, and once given back it would be moved by a switch it never took. So the same full layout is in
place during each switch, and frozen parameters follow the modes exactly as they would inside their groups.

Readers of `param_groups` other than torch's own `state_dict()` / `load_state_dict()`, namely torch's distributed
checkpoint state-dict API (`get_optimizer_state_dict`, `set_optimizer_state_dict`, what Accelerate's FSDP
checkpointing uses), see the same full layout while they run: `full_layout()` holds it, and
`hf_layer_freeze/distributed_checkpoint.py` holds it around torch's calls.

Layer-wise optimizers, which update each parameter inside backward hooks rather than through `param_groups`, and
optimizers that keep their own list of parameters outside `param_groups` (LBFGS, ZeroRedundancyOptimizer) are
refused by `check_supported_optimizer`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from .distributed_checkpoint import install_distributed_checkpoint_support

__all__ = [
    "cap_to_keep_a_parameter",
    "check_optimizers_hold_units",
    "check_supported_optimizer",
    "existing_frozen_param_groups",
    "freeze_parameters",
    "frozen_param_groups",
    "optimizer_holding_units",
    "supported_optimizers",
    "unwrap_optimizer",
]

# The methods that switch an optimizer between its training and evaluation points (schedule-free optimizers).
_MODE_SWITCHES = ("train", "eval")

# Optimizers that keep a list of parameters of their own, taken at construction, outside `param_groups`, keyed by
# (module, class name) so that nothing is imported to recognise them; the value says where the list lives.
_OWN_PARAMETER_LISTS = {
    ("torch.optim.lbfgs", "LBFGS"): "LBFGS._params, with a curvature history over all of them",
    (
        "torch.distributed.optim.zero_redundancy_optimizer",
        "ZeroRedundancyOptimizer",
    ): "ZeroRedundancyOptimizer._all_params, partitioned across ranks into a local optimizer",
}


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside an Accelerate `AcceleratedOptimizer` (or any wrapper exposing `.optimizer`)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def check_supported_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """
    Refuse, by name, the optimizers that freezing through `param_groups` cannot serve: those that update each
    parameter inside backward hooks, so that what their `param_groups` hold decides nothing.

    - The Trainer's layer-wise optimizers (`optim="galore_adamw_layerwise"`, `"apollo_adamw_layerwise"`, any
      `*_layerwise`): the Trainer gets a `transformers.trainer_pt_utils.LayerWiseDummyOptimizer` holding one dummy
      tensor, while one optimizer per parameter steps in a post-accumulate-grad hook.
    - LOMO (`optim="lomo"` / `"adalomo"`, the `lomo_optim` package): steps during backward (`fused_backward`).

    And those that keep their own list of parameters, taken at construction, outside `param_groups`, so that taking
    a parameter out of the groups does not take it out of their step:

    - `torch.optim.LBFGS` (`_params`, and a curvature history over all of them flattened into one vector, which
      freezing cannot shrink): frozen parameters would keep moving.
    - `torch.distributed.optim.ZeroRedundancyOptimizer` (`_all_params`, and a local optimizer over this rank's
      partition of them, fixed at construction).

    They are recognised by class and module name, so no package is imported. An Accelerate
    `AcceleratedOptimizer` is unwrapped first.

    Args:
        optimizer (`torch.optim.Optimizer`):
            The optimizer a freezer would keep consistent, raw or an Accelerate `AcceleratedOptimizer`.

    Raises:
        `NotImplementedError`: for a layer-wise optimizer or one with its own parameter list, with the next step.

    Example:

    ```python
    >>> import torch
    >>> from hf_layer_freeze.param_groups import check_supported_optimizer
    >>> check_supported_optimizer(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))  # supported: no error

    ```
    """
    inner = unwrap_optimizer(optimizer)
    for cls in type(inner).__mro__:
        package = cls.__module__.split(".")[0]
        if package == "transformers" and cls.__name__ == "LayerWiseDummyOptimizer":
            kind = "the Trainer's layer-wise optimizers (optim='*_layerwise', a LayerWiseDummyOptimizer)"
        elif package == "lomo_optim":
            kind = f"LOMO optimizers (optim='lomo' / 'adalomo', here lomo_optim's {type(inner).__name__})"
        elif (cls.__module__, cls.__name__) in _OWN_PARAMETER_LISTS:
            raise NotImplementedError(
                f"Layer freezing does not support {type(inner).__module__}.{type(inner).__qualname__}"
                + ("" if cls is type(inner) else f" (a {cls.__module__}.{cls.__name__})")
                + ": it keeps its own list of "
                f"parameters ({_OWN_PARAMETER_LISTS[cls.__module__, cls.__name__]}), taken when it was built, "
                "outside its param_groups, where freezing takes parameters out, so frozen parameters would keep "
                "being updated. Use an optimizer that steps through its param_groups (torch.optim.AdamW, SGD, "
                "...), or disable the callback."
            )
        else:
            continue
        raise NotImplementedError(
            f"Layer freezing does not support {kind}: they update each parameter inside backward hooks, not through "
            "the optimizer's param_groups, where freezing takes parameters out and keeps their state. Use "
            "optim='adamw_torch' (or any optimizer that steps through optimizer.step()), or disable the callback."
        )


def supported_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """`optimizer` (one, or a list or tuple of them) as a non-empty list of supported optimizers (see
    `check_supported_optimizer`), or a `ValueError` naming what was given."""
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        given = optimizer if isinstance(optimizer, (list, tuple)) else None
        got = type(optimizer).__name__ if given is None else [type(o).__name__ for o in given]
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or a non-empty list of them, got {got}")
    for each in optimizers:
        check_supported_optimizer(each)  # before anything is hooked on it
    return optimizers


def check_optimizers_hold_units(
    param_groups: Sequence[_FrozenParamGroups], model: torch.nn.Module, units: Sequence[Any], also_held: set[int]
) -> None:
    """
    Refuse optimizers that hold none of `model`'s parameters; warn once about unit parameters in none of them nor in
    `also_held` (the ids another open freezer's optimizers hold: that freezer keeps them right).
    """
    held = set().union(*(groups.parameter_ids for groups in param_groups))
    if not held & {id(p) for p in model.parameters()}:
        raise ValueError(
            "optimizer holds none of the model's parameters: build it from model.parameters() "
            "(the same model passed to LayerFreezer)"
        )
    held |= also_held
    missing = [p for unit in units for p in unit.parameters if id(p) not in held]
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameter tensors ({sum(p.numel() for p in missing):,} elements) that "
            f"this LayerFreezer may freeze are in none of the {len(param_groups)} optimizer(s) it was given: "
            "another optimizer may keep changing them after they freeze. Pass every optimizer: "
            "LayerFreezer(model, [optimizer, other_optimizer]).",
            stacklevel=3,
        )


def optimizer_holding_units(
    optimizers: Sequence[torch.optim.Optimizer], units: Sequence[Any]
) -> torch.optim.Optimizer:
    """The first of `optimizers` that holds a parameter of `units` (the first optimizer if none does)."""
    unit_ids = {id(p) for unit in units for p in unit.parameters}
    return next((o for o in optimizers if frozen_param_groups(o).parameter_ids & unit_ids), optimizers[0])


def cap_to_keep_a_parameter(
    param_groups: Sequence[_FrozenParamGroups], units: Sequence[Any], frozen: int, count: int, warn: bool = True
) -> int:
    """
    The largest count <= `count` of leading `units` (`frozen` of them frozen already) that leaves the optimizers at
    least one parameter, warning (if `warn`) when it stops short. Optimizers with nothing left update nothing, and a
    GradScaler then fails with "No inf checks were recorded for this optimizer".
    """
    remaining = {id(p) for groups in param_groups for p in groups.trainable_parameters()}
    for index in range(frozen, count):
        unit_ids = {id(p) for p in units[index].parameters}
        if remaining and remaining <= unit_ids:
            if warn:
                warnings.warn(
                    f"Freezing unit {index} ({units[index].name or '<root>'}) would leave the optimizer "
                    f"with no parameter, so freezing stops at {index} of {len(units)} units. Put the "
                    "head in the optimizer, or lower freeze_level.",
                    stacklevel=3,
                )
            return index
        remaining -= unit_ids
    return count


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
    layout, and the frozen parameters are taken out again right after. The optimizer's own `train()` / `eval()`
    mode switches, where it has them (schedule-free optimizers), run on the full layout in the same way: frozen
    parameters move between the training and evaluation points with their groups, as if never taken out. Empty
    groups are kept, since LR schedulers index groups by position.

    It holds the optimizer weakly (the registry of instances is keyed by the optimizer), so a finished run's
    optimizer, its state and the model's parameters can be freed.

    Args:
        optimizer (`torch.optim.Optimizer`):
            A torch optimizer (not an `AcceleratedOptimizer`: it has no state-dict hooks of its own).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizer = weakref.ref(optimizer)
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
        # How many `full_layout()` blocks are open: while any is, the hooks and mode switches leave the full
        # layout in place (torch's distributed checkpoint calls `state_dict()` in the middle of such a block).
        self._holds = 0
        install_distributed_checkpoint_support()  # checks torch's privates now, not at the first checkpoint
        self._hook_handles = [
            optimizer.register_state_dict_pre_hook(self._restore_before_state_dict),
            optimizer.register_state_dict_post_hook(self._remove_after_state_dict),
            optimizer.register_load_state_dict_pre_hook(self._restore_before_load),
            optimizer.register_load_state_dict_post_hook(self._remove_after_load),
        ]
        self._wrap_mode_switches(optimizer)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        optimizer = self._optimizer()
        if optimizer is None:
            raise RuntimeError("the optimizer of this _FrozenParamGroups was garbage-collected")
        return optimizer

    @property
    def parameter_ids(self) -> set[int]:
        """Ids of every parameter the optimizer was built with, frozen or not."""
        return {id(p) for params in self._full_params for p in params}

    def remove(self, parameters: Iterable[torch.Tensor]) -> None:
        """Take `parameters` out of every param group (by identity)."""
        self.frozen_ids |= {id(p) for p in parameters}
        self._remove_unless_held()

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put `parameters` back in their groups, in their original places."""
        self.frozen_ids -= {id(p) for p in parameters}
        self._remove_unless_held()

    def frozen_parameters(self) -> list[torch.Tensor]:
        """The parameters taken out of the groups, in the full layout's order."""
        return [p for params in self._full_params for p in params if id(p) in self.frozen_ids]

    def trainable_parameters(self) -> list[torch.Tensor]:
        """The parameters the optimizer still updates."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @contextlib.contextmanager
    def full_layout(self) -> Iterator[None]:
        """
        Every parameter back in its group, in its place, for the block; the frozen ones are taken out again at its
        end. For readers of `param_groups` other than torch's own `state_dict()` / `load_state_dict()` (those are
        served by hooks), such as torch's distributed checkpoint: they see the layout the optimizer was built with,
        as if nothing were frozen. Blocks nest. Nothing must step the optimizer inside one: frozen parameters would
        be in its groups.
        """
        self._restore_full_layout()
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            self._remove_unless_held()

    def _remove_unless_held(self) -> None:
        if self._holds == 0:
            self._apply_removal()

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

    def _wrap_mode_switches(self, optimizer: torch.optim.Optimizer) -> None:
        """
        Make the optimizer's own `train()` / `eval()` (where it has them) switch the full layout. Torch offers no
        hook for these methods, so the wrapper is set on this instance, as Accelerate wraps `optimizer.step` for its
        GradScaler; an `AcceleratedOptimizer`'s `train()` / `eval()` call the instance's. Torch's `Optimizer`
        pickles and copies only `defaults`, `state` and `param_groups`, so a copy never carries a wrapper.
        """
        for name in _MODE_SWITCHES:
            switch = getattr(optimizer, name, None)
            if callable(switch) and not getattr(switch, "_switches_full_layout", False):
                setattr(optimizer, name, self._with_full_layout(switch))

    def _with_full_layout(self, switch: Callable[..., object]) -> Callable[..., object]:
        @functools.wraps(switch)
        def switch_with_full_layout(*args, **kwargs):
            self._restore_full_layout()
            try:
                return switch(*args, **kwargs)
            finally:
                self._remove_unless_held()

        switch_with_full_layout._switches_full_layout = True
        return switch_with_full_layout

    # Optimizer state-dict hooks (public torch API since 2.1).
    def _restore_before_state_dict(self, optimizer: torch.optim.Optimizer) -> None:
        self._restore_full_layout()

    def _remove_after_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        self._remove_unless_held()
        return state_dict

    def _restore_before_load(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        self._restore_full_layout()

    def _remove_after_load(self, optimizer: torch.optim.Optimizer) -> None:
        self._remove_unless_held()


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


def existing_frozen_param_groups(optimizer: torch.optim.Optimizer) -> _FrozenParamGroups | None:
    """The `_FrozenParamGroups` of `optimizer` if a freezer made one, else `None` (none is created)."""
    return _GROUPS_BY_OPTIMIZER.get(unwrap_optimizer(optimizer))
