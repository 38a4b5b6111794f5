"""The wrappers training frameworks put around a model, walked in one place.

DDP, `DataParallel`, FSDP1 and `torch.compile`'s `OptimizedModule` each hold the model one level down (`.module` or
`._orig_mod`), in whatever order `accelerator.prepare` or the Trainer stacked them. Parameters are shared with the
wrappers, so freezing through the innermost model freezes the wrapped one.
"""

from __future__ import annotations

from collections.abc import Iterator

from accelerate.utils import is_compiled_module
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["find_ddp_wrapper", "is_compiled", "unwrap_model", "wrapper_chain"]


def _parallel_wrappers() -> tuple[type[nn.Module], ...]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return (DistributedDataParallel, nn.DataParallel)
    return (DistributedDataParallel, nn.DataParallel, FullyShardedDataParallel)


def wrapper_chain(model: nn.Module) -> Iterator[nn.Module]:
    """`model`, then each module it wraps, outermost first, ending with the bare model."""
    parallel = _parallel_wrappers()
    while True:
        yield model
        if isinstance(model, parallel):
            model = model.module
        elif is_compiled_module(model):
            model = model._orig_mod
        else:
            return


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP, `DataParallel`, FSDP1 and `torch.compile` wrappers, in any order."""
    *_, bare = wrapper_chain(model)
    return bare


def find_ddp_wrapper(model: nn.Module) -> DistributedDataParallel | None:
    """The outermost `DistributedDataParallel` in `model`'s wrapper chain, or `None`."""
    return next((m for m in wrapper_chain(model) if isinstance(m, DistributedDataParallel)), None)


def is_compiled(model: nn.Module) -> bool:
    """Whether `model` or a module in its wrapper chain is compiled (`torch.compile(m)` or in place `m.compile()`)."""
    return any(
        is_compiled_module(m) or getattr(m, "_compiled_call_impl", None) is not None for m in wrapper_chain(model)
    )
