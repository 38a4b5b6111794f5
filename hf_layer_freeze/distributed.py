"""Distributed bookkeeping: keeping DDP consistent when parameters freeze, and refusing what cannot work.

DDP builds its reducer (gradient buckets and autograd hooks) once, from the parameters that require gradients
at wrap time. After a freeze the reducer still waits for gradients that never come: with
`find_unused_parameters=False` buckets holding frozen parameters are never all-reduced (ranks drift apart
silently) and the next forward fails; with `find_unused_parameters=True` training is right but frozen
parameters are still all-reduced as zeros. `rebuild_ddp_reducer` rebuilds the reducer of the *same* DDP object
in place, exactly as DDP's own `__setstate__` does, so only trainable parameters are bucketed. It relies on DDP
internals: `check_ddp_internals` fails loudly when the installed torch lacks one of them.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

__all__ = [
    "check_supported_wrapping",
    "check_ddp_internals",
    "find_ddp_wrapper",
    "is_distributed",
    "is_fsdp_managed",
    "rebuild_ddp_reducer",
]

_DDP_INTERNALS = (
    "_build_params_for_reducer",
    "_build_debug_param_to_name_mapping",
    "_ddp_init_helper",
    "_comm_hooks",
    "reducer",
    "logger",
    "static_graph",
    "_get_active_ddp_module",
)


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def find_ddp_wrapper(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper at the top of `model`'s wrapper chain (through `torch.compile`), or `None`."""
    while True:
        if isinstance(model, DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner


def active_ddp_module() -> DistributedDataParallel | None:
    """The DDP module whose forward is running now, as DDP itself records it for TorchDynamo."""
    getter = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    if getter is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no DistributedDataParallel._get_active_ddp_module; hf_layer_freeze "
            "cannot find the DDP wrapper by itself. Pass it explicitly (LayerFreezer(ddp_model, ...) or "
            "LayerFreezingCallback.set_ddp_model(trainer.model_wrapped)) or pin a tested torch version."
        )
    return getter()


def check_ddp_internals(ddp: DistributedDataParallel) -> None:
    """Raise `RuntimeError` if this torch's DDP lacks an internal that `rebuild_ddp_reducer` uses."""
    missing = [name for name in _DDP_INTERNALS if not hasattr(ddp, name)]
    if missing:
        raise RuntimeError(
            f"torch {torch.__version__}'s DistributedDataParallel lacks {', '.join(missing)}, which hf_layer_freeze "
            "needs to rebuild DDP's gradient buckets after a freeze. Install a tested torch (see constraints.txt) "
            "or report this version."
        )
    if getattr(ddp, "_use_python_reducer", False):
        raise NotImplementedError(
            "Layer freezing does not support DDP's python reducer (compiled DDP, "
            "torch._dynamo.config.optimize_ddp='python_reducer'). Use the default C++ reducer."
        )
    if getattr(ddp, "mixed_precision", None) is not None:
        raise NotImplementedError(
            "Layer freezing does not support DDP's native `mixed_precision` argument. Use autocast "
            "(Accelerate's mixed_precision='bf16'/'fp16', Trainer's bf16=True) instead."
        )
    if getattr(ddp, "_delay_all_reduce_params", None):
        raise NotImplementedError(
            "Layer freezing does not support DDP's delayed all-reduce (`delay_all_reduce_named_params`). "
            "Drop that option or disable the freezer."
        )


def rebuild_ddp_reducer(ddp: DistributedDataParallel) -> int:
    """
    Rebuild `ddp`'s reducer in place so that it buckets exactly the parameters that still require gradients.

    Call it between iterations (after the optimizer step, before the next forward), on every rank at the same
    step. Communication hooks registered with `register_comm_hook` are registered again on the new reducer, and
    `static_graph` is kept. Returns the number of parameter elements the new reducer all-reduces.
    """
    check_ddp_internals(ddp)
    old_reducer = ddp.reducer
    old_reducer._remove_autograd_hooks()
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    if not parameters:
        raise ValueError("After this freeze no DDP parameter requires a gradient; keep at least one trainable.")
    param_to_name_mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, param_to_name_mapping, ddp.static_graph)
    for hook, state in ddp._comm_hooks:
        ddp.logger._set_comm_hook_name(hook.__qualname__)
        dist._register_comm_hook(ddp.reducer, state, hook)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
        ddp._static_graph_delay_allreduce_enqueued = False
    ddp._has_rebuilt_buckets = False
    numel = sum(p.numel() for p in parameters)
    logger.debug("Rebuilt DDP reducer for %d parameters (%d elements).", len(parameters), numel)
    return numel


def is_fsdp_managed(module: nn.Module) -> bool:
    """Whether FSDP (1 or 2) manages `module` or one of its submodules."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules())


def check_supported_wrapping(model: nn.Module, optimizer: object) -> None:
    """
    Refuse, with `NotImplementedError` and the next step, the setups where freezing cannot work correctly.

    - DeepSpeed fixes the set of trainable parameters when `deepspeed.initialize` runs.
    - FSDP1 with `use_orig_params=False` flattens parameters; freezing by module cannot reach them.
    """
    for obj in (model, optimizer):
        if type(obj).__module__.startswith("deepspeed"):
            raise NotImplementedError(
                "Layer freezing does not support DeepSpeed: ZeRO fixes the trainable parameters at "
                "deepspeed.initialize. Use DDP or FSDP (use_orig_params=True / FSDP2), or disable the callback."
            )
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel) and not getattr(module, "_use_orig_params", False):
            raise NotImplementedError(
                "Layer freezing needs FSDP's `use_orig_params=True` (or FSDP2's fully_shard): with flat "
                "parameters a module's weights cannot be frozen on their own. Set use_orig_params=True "
                "(Accelerate: FullyShardedDataParallelPlugin(use_orig_params=True))."
            )
