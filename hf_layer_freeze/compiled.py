"""`torch.compile` beside freezing: a graph traced for the new frozen set after each freeze event.

Dynamo does not guard on a parameter's `requires_grad` on every torch release (pytorch issue 139476: torch 2.11 runs
the graph traced before the freeze, whose backward still computes every frozen gradient; 2.14 retraces). So after
each freeze event the freezer drops Dynamo's cached code for this model: the code objects of its modules' `forward`
methods (where Dynamo's cache lives, whether the model was compiled with `torch.compile(model)`, `model.compile()`,
Accelerate's `dynamo_backend` or the Trainer's `torch_compile`), and the resume functions Dynamo made from them at
graph breaks. Other compiled functions keep their code; other instances of the same module classes recompile once.
"""

from __future__ import annotations

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
    "has_compiled_code",
    "invalidate_compiled_code",
    "recompile_limit",
    "resolve_max_freeze_events",
]

MIN_TORCH_FOR_COMPILE = "2.11"


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
    from torch._dynamo import resume_execution

    cache = getattr(getattr(resume_execution, "ContinueExecutionCache", None), "cache", None)
    if cache is None or code not in cache:
        return
    for resumed in list(cache[code].values()):
        if isinstance(resumed, types.CodeType):
            yield resumed
            yield from _resume_codes(resumed)


def has_compiled_code(model: nn.Module) -> bool:
    """Whether Dynamo holds graphs for `model`'s code now (compiled by any route, the Trainer's `torch_compile`
    included, which wraps the model after callbacks get it, so that the model itself does not say so)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return is_compiled(model) or any(_debug_get_cache_entry_list(code) for code in _module_codes(model))


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
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def from_freezer(cls, freezer: LayerFreezer) -> CompiledCodeInvalidation:
        """Always on (a no-op for a model never compiled): the model as given."""
        return cls(freezer.model)

    def on_freeze_event(self, event: FreezeEvent) -> None:
        if event.parameters:
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
