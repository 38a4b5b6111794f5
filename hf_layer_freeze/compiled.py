"""`torch.compile` beside freezing: a graph traced for the new frozen set after each freeze event.

Dynamo does not guard on a parameter's `requires_grad` on every torch release (pytorch issue 139476: torch 2.11 runs
the graph traced before the freeze, whose backward still computes every frozen gradient; 2.14 retraces). So after
each freeze event the freezer drops Dynamo's cached code for this model: the code objects of its modules' `forward`
methods (where Dynamo's cache lives, whether the model was compiled with `torch.compile(model)`, `model.compile()`,
Accelerate's `dynamo_backend` or the Trainer's `torch_compile`), and the resume functions Dynamo made from them at
graph breaks. Other compiled functions keep their code; other instances of the same module classes recompile once.

Dynamo offers no public route to a code object's cache, so this file uses its internals, all named in
`_DYNAMO_INTERNALS` and checked by `check_dynamo_internals` when a freezer for a compiled model is built (a torch
lacking one fails then, with its version and the name, not at the first freeze hours into training).
"""

from __future__ import annotations

import importlib
import logging
import types
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from .events import FreezeEvent
from .wrappers import is_compiled, unwrap_model

if TYPE_CHECKING:
    from .freezer import LayerFreezer

logger = logging.getLogger(__name__)

__all__ = [
    "CompiledCodeInvalidation",
    "check_dynamo_internals",
    "has_compiled_code",
    "invalidate_compiled_code",
    "missing_dynamo_internals",
    "recompile_limit",
    "resolve_max_freeze_events",
]

MIN_TORCH_FOR_COMPILE = "2.11"

# The Dynamo internals this file uses, as (module, attribute path); no public API gives a code object's graphs.
_DYNAMO_INTERNALS = (
    ("torch._dynamo", "reset_code"),  # drop the graphs of one code object
    ("torch._dynamo.eval_frame", "_debug_get_cache_entry_list"),  # the graphs of one code object
    ("torch._dynamo.resume_execution", "ContinueExecutionCache.cache"),  # the resume functions made at graph breaks
)
_RECOMPILE_LIMITS = ("recompile_limit", "cache_size_limit")  # torch._dynamo.config, named cache_size_limit < 2.7
_MISSING = object()


def missing_dynamo_internals() -> list[str]:
    """The names, among the Dynamo internals this file uses, that this torch lacks."""
    missing = []
    for module_name, path in _DYNAMO_INTERNALS:
        try:
            found: object = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"{module_name}.{path}")
            continue
        for attribute in path.split("."):
            found = getattr(found, attribute, _MISSING)
            if found is _MISSING:
                missing.append(f"{module_name}.{path}")
                break
    config = getattr(torch._dynamo, "config", None)
    if not any(hasattr(config, name) for name in _RECOMPILE_LIMITS):
        missing.append(f"torch._dynamo.config.{_RECOMPILE_LIMITS[0]} (or {_RECOMPILE_LIMITS[1]})")
    return missing


def check_dynamo_internals() -> None:
    """
    Raise `NotImplementedError`, naming the torch version and each missing name, if this torch lacks a Dynamo
    internal that `hf_layer_freeze` needs to retrace a compiled model after a freeze (cheap: a few `getattr`).
    """
    missing = missing_dynamo_internals()
    if missing:
        raise NotImplementedError(
            f"torch {torch.__version__} lacks {', '.join(missing)}, which hf_layer_freeze needs to drop a compiled "
            f"model's graphs after each freeze. Use a tested torch (>= {MIN_TORCH_FOR_COMPILE}, see constraints.txt), "
            "or train the model uncompiled."
        )


def recompile_limit() -> int:
    """
    How many graphs Dynamo keeps for one code object before it silently runs the code eagerly:
    `torch._dynamo.config.recompile_limit`, named `cache_size_limit` before torch 2.7.
    """
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise NotImplementedError(
        f"torch {torch.__version__} has neither torch._dynamo.config.recompile_limit nor cache_size_limit, so "
        f"hf_layer_freeze cannot bound the recompiles of a compiled model. Use torch >= {MIN_TORCH_FOR_COMPILE}, or "
        "train the model uncompiled."
    )


def _module_codes(model: nn.Module) -> Iterator[types.CodeType]:
    """The code of each distinct `forward` among the modules of `model`."""
    seen: set[int] = set()
    for module in unwrap_model(model).modules():
        code = getattr(type(module).forward, "__code__", None)
        if code is not None and id(code) not in seen:
            seen.add(id(code))
            yield code


def _resume_codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """The resume functions Dynamo generated from `code` at graph breaks (and from those, recursively)."""
    from torch._dynamo.resume_execution import ContinueExecutionCache

    cache = ContinueExecutionCache.cache
    if code not in cache:
        return
    for resumed in list(cache[code].values()):
        if isinstance(resumed, types.CodeType):
            yield resumed
            yield from _resume_codes(resumed)


def has_compiled_code(model: nn.Module) -> bool:
    """Whether Dynamo holds graphs for `model`'s code now (compiled by any route, the Trainer's `torch_compile`
    included, which wraps the model after callbacks get it, so that the model itself does not say so)."""
    if is_compiled(model):
        return True
    if missing_dynamo_internals():  # a torch without them: only a compiled wrapper can say (checked when built)
        return False
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return any(_debug_get_cache_entry_list(code) for code in _module_codes(model))


def invalidate_compiled_code(model: nn.Module) -> int:
    """
    Drop the graphs Dynamo compiled for `model`'s code, so that its next call traces the model as it is now (with
    its new frozen set: a backward without the frozen gradients). Returns how many code objects had graphs.

    A no-op for a model that was never compiled.
    """
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    dropped = 0
    for top in _module_codes(model):
        for code in (top, *_resume_codes(top)):
            if _debug_get_cache_entry_list(code):
                torch._dynamo.reset_code(code)
                dropped += 1
    return dropped


class CompiledCodeInvalidation:
    """
    A freeze listener: after each event that changed which parameters train, the model's compiled code is dropped,
    so the next step traces a backward for the new frozen set. A no-op for a model that was never compiled.

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped.
        compiled (`bool`, *optional*):
            Whether the model is or will be compiled (the Trainer's `torch_compile` compiles it after callbacks get
            it); by default, whether it is compiled now.

    Raises:
        `NotImplementedError`: the model is (or will be) compiled and this torch lacks a Dynamo internal that
            dropping its graphs needs (`check_dynamo_internals`).
    """

    def __init__(self, model: nn.Module, compiled: bool | None = None) -> None:
        self.model = model
        if is_compiled(model) if compiled is None else compiled:
            check_dynamo_internals()  # fail now, not at the first freeze hours into training
            self._dynamo_usable = True
        else:  # a torch lacking them can still train an uncompiled model: nothing is dropped then
            self._dynamo_usable = not missing_dynamo_internals()

    @classmethod
    def from_freezer(cls, freezer: LayerFreezer) -> CompiledCodeInvalidation:
        """Always on (a no-op for a model never compiled): the model as given."""
        return cls(freezer.model)

    def on_freeze_event(self, event: FreezeEvent) -> None:
        if not event.parameters:
            return
        if not self._dynamo_usable:
            if is_compiled(self.model):  # compiled in place after the freezer was built
                check_dynamo_internals()
            return
        invalidate_compiled_code(self.model)

    def close(self) -> None:
        """Nothing to release: dropping code leaves no hook behind."""


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
    check_dynamo_internals()  # a compiled model (or one the Trainer will compile): fail before training starts
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
