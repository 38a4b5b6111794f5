"""Torch's distributed checkpoint state-dict API beside freezing: the full optimizer layout while it runs.

`torch.distributed.checkpoint.state_dict` (`get_optimizer_state_dict`, `set_optimizer_state_dict`,
`get_state_dict`, `set_state_dict`: what DCP users and Accelerate's FSDP2 checkpointing call) does not only call the
optimizer's `state_dict()` / `load_state_dict()`, which the freezer's hooks serve: it maps parameters to their names
through `optimizer.param_groups` itself, before and after those calls. With frozen parameters out of the groups, that
mapping misses them (`KeyError` on save) or drops their state. And on load it keeps the saved state only of
parameters with `requires_grad=True`, so a frozen parameter's state would be lost when loading into a frozen
optimizer.

Torch offers no hook around these functions, so, once per process, the two private functions that every public
entry point goes through (`_get_optim_state_dict`, `_load_optim_state_dict`, looked up by the public ones at each
call, so wrapping them reaches callers that imported the public functions earlier) are wrapped: while they run, each
optimizer a freezer serves holds its full layout (`_FrozenParamGroups.full_layout()`), and on load its frozen
parameters that have saved state require a gradient, so that their state is loaded like any other (and when the
state dict of a stateless optimizer is taken, as a template for `dcp.load`, the frozen parameters get the placeholder
state torch gives every trainable one, so that their saved state is read too). Both are put back as they were when
the call ends. Optimizers no freezer serves pass through untouched. The privates are checked when
the first freezer is built, naming the torch version if they are not as expected.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["install_distributed_checkpoint_support"]

_MODULE = "torch.distributed.checkpoint.state_dict"
# The wrapped privates and the parameters each takes (torch 2.11 to 2.14).
_PRIVATES = {
    "_get_optim_state_dict": ("model", "optimizers", "info"),
    "_load_optim_state_dict": ("model", "optimizers", "state_dict", "info"),
}
# Set on our wrappers, holding the function they wrap.
_WRAPPED = "_hf_layer_freeze_wraps"


def _unexpected(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"hf_layer_freeze keeps torch's distributed checkpoint state dicts ({_MODULE}) in the full optimizer layout "
        f"through its private functions {', '.join(_PRIVATES)}, but in torch {torch.__version__} {what}. Use a torch "
        "release from 2.11 to 2.14, or report the torch version to hf_layer_freeze."
    )


def install_distributed_checkpoint_support() -> None:
    """
    Wrap torch's distributed checkpoint optimizer functions so that they see each freezer's full layout (once per
    process; later calls only return). Nothing is done where torch was built without `torch.distributed`.

    Raises:
        `NotImplementedError`: if torch's private functions are missing or take other parameters, naming the torch
            version.
    """
    if not torch.distributed.is_available():
        return  # no distributed checkpoint either
    module = importlib.import_module(_MODULE)
    info_fields = getattr(getattr(module, "_StateDictInfo", None), "__dataclass_fields__", {})
    if "fqn_param_mapping" not in info_fields:
        raise _unexpected("_StateDictInfo has no fqn_param_mapping field")
    for name, expected in _PRIVATES.items():
        function = getattr(module, name, None)
        if getattr(function, _WRAPPED, None) is not None:
            continue
        if not callable(function):
            raise _unexpected(f"{name} is missing")
        parameters = tuple(inspect.signature(function).parameters)
        if parameters != expected:
            raise _unexpected(f"{name} takes {parameters}, not {expected}")
        wrapper = (
            _get_with_full_layout(function) if name == "_get_optim_state_dict" else _load_with_full_layout(function)
        )
        setattr(wrapper, _WRAPPED, function)
        setattr(module, name, wrapper)


def _get_with_full_layout(get: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(get)
    def get_optim_state_dict(model, optimizers, info):
        with contextlib.ExitStack() as stack:
            for groups in _served(optimizers):
                stack.enter_context(groups.full_layout())
                if not groups.optimizer.state:
                    # torch creates the state of a stateless optimizer with a step at lr=0 on zero gradients of
                    # the parameters that require one; the frozen ones get theirs too, so that the state dict, a
                    # template `dcp.load` fills when resuming, asks for their saved state
                    stack.enter_context(
                        _requiring_grad([p for p in groups.frozen_parameters() if not p.requires_grad])
                    )
            return get(model, optimizers, info)

    return get_optim_state_dict


def _load_with_full_layout(load: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load)
    def load_optim_state_dict(model, optimizers, state_dict, info):
        saved = _saved_state_names(state_dict)
        with contextlib.ExitStack() as stack:
            for groups in _served(optimizers):
                stack.enter_context(groups.full_layout())
                frozen = [
                    p
                    for p in groups.frozen_parameters()
                    if not p.requires_grad and saved & set(info.fqn_param_mapping.get(p, ()))
                ]
                stack.enter_context(_requiring_grad(frozen))
            return load(model, optimizers, state_dict, info)

    return load_optim_state_dict


def _served(optimizers: tuple[torch.optim.Optimizer, ...]) -> Iterator[Any]:
    """The `_FrozenParamGroups` of each optimizer a freezer serves."""
    from .param_groups import existing_frozen_param_groups  # param_groups imports this module

    for optimizer in optimizers:
        groups = existing_frozen_param_groups(optimizer)
        if groups is not None:
            yield groups


def _saved_state_names(state_dict: dict[str, Any]) -> set[str]:
    """The parameter names that have state in a distributed checkpoint optimizer state dict, nested
    (`{"state": {name: ...}}`) or flattened (`{"state.<name>.<key>": ...}`, where a name holds dots: every prefix is
    taken, and only those that are a parameter's name will match)."""
    if not state_dict:
        return set()
    if "state" in state_dict:
        return {name for name in state_dict["state"] if isinstance(name, str)}
    names = set()
    for key in state_dict:
        if isinstance(key, str) and key.startswith("state."):
            parts = key[len("state.") :].split(".")
            names.update(".".join(parts[:end]) for end in range(1, len(parts)))
    return names


@contextlib.contextmanager
def _requiring_grad(parameters: list[torch.Tensor]) -> Iterator[None]:
    """`requires_grad=True` on `parameters` for the block, then frozen again with no gradient (torch's load may give
    them a zero one to create missing state)."""
    from .param_groups import freeze_parameters

    for param in parameters:
        param.requires_grad_(True)
    try:
        yield
    finally:
        freeze_parameters(parameters)
