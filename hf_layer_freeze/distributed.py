"""Distributed bookkeeping: keeping DDP consistent when parameters freeze, and refusing what cannot work.

DDP builds its reducer (gradient buckets and autograd hooks) once, from the parameters that require gradients
at wrap time. After a freeze the reducer still waits for gradients that never come: with
`find_unused_parameters=False` buckets holding frozen parameters are never all-reduced (ranks drift apart
silently) and the next forward fails; with `find_unused_parameters=True` training is right but frozen
parameters are still all-reduced as zeros. `rebuild_ddp_reducer` rebuilds the reducer of the *same* DDP object
in place, exactly as DDP's own `__setstate__` does, so only trainable parameters are bucketed. It relies on DDP
internals, all named here: `check_ddp_internals` fails loudly when the installed torch lacks one of them.
DeepSpeed and FSDP are handled here too: FSDP needs nothing (frozen parameters simply produce no gradient), the
setups that cannot work are refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .events import FreezeEvent
from .wrappers import find_ddp_wrapper, unwrap_model, wrapper_chain

if TYPE_CHECKING:
    from .freezer import LayerFreezer

logger = logging.getLogger(__name__)

__all__ = [
    "DDPReducerSync",
    "check_ddp_internals",
    "check_supported_wrapping",
    "is_distributed",
    "is_fsdp_managed",
    "rebuild_ddp_reducer",
]

# Every private attribute of torch's DDP that this module touches, checked before it is used (see
# `check_ddp_internals`): on the class and the c10d types when the freezer is built, on the wrapper when it is known.
_DDP_CLASS_INTERNALS = (
    "_build_params_for_reducer",
    "_build_debug_param_to_name_mapping",
    "_ddp_init_helper",
    "_get_active_ddp_module",
)
_REDUCER_INTERNALS = ("_remove_autograd_hooks", "_set_static_graph", "prepare_for_forward")
_LOGGER_INTERNALS = ("_set_comm_hook_name", "_set_static_graph")
_DIST_INTERNALS = ("_register_comm_hook",)
_DDP_INSTANCE_INTERNALS = (
    "_comm_hooks",
    "reducer",
    "logger",
    "static_graph",
    "require_backward_grad_sync",
    "_has_rebuilt_buckets",  # written by the rebuild
)
_STATIC_GRAPH_INTERNALS = ("_static_graph_delay_allreduce_enqueued",)  # written by the rebuild with static_graph


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _missing_internals(ddp: DistributedDataParallel | None = None) -> list[str]:
    from torch._C._distributed_c10d import Logger, Reducer

    missing = [f"DistributedDataParallel.{n}" for n in _DDP_CLASS_INTERNALS if not hasattr(DistributedDataParallel, n)]
    missing += [f"Reducer.{n}" for n in _REDUCER_INTERNALS if not hasattr(Reducer, n)]
    missing += [f"Logger.{n}" for n in _LOGGER_INTERNALS if not hasattr(Logger, n)]
    missing += [f"torch.distributed.{n}" for n in _DIST_INTERNALS if not hasattr(dist, n)]
    if ddp is not None:
        names = _DDP_INSTANCE_INTERNALS + (_STATIC_GRAPH_INTERNALS if getattr(ddp, "static_graph", False) else ())
        missing += [f"DistributedDataParallel().{n}" for n in names if not hasattr(ddp, n)]
    return missing


def check_ddp_internals(ddp: DistributedDataParallel | None = None) -> None:
    """
    Raise `RuntimeError` if this torch lacks a DDP internal that the reducer rebuild uses, and
    `NotImplementedError` for the DDP options freezing does not support. Without `ddp`, only the class-level
    internals are checked (the wrapper is not known yet).
    """
    missing = _missing_internals(ddp)
    if missing:
        raise RuntimeError(
            f"torch {torch.__version__} lacks {', '.join(missing)}, which hf_layer_freeze needs to rebuild DDP's "
            "gradient buckets after a freeze. Install a tested torch (see constraints.txt) or report this version."
        )
    if ddp is None:
        return
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


def active_ddp_module() -> DistributedDataParallel | None:
    """The DDP module whose forward is running now, as DDP itself records it for TorchDynamo."""
    return DistributedDataParallel._get_active_ddp_module()


def rebuild_ddp_reducer(ddp: DistributedDataParallel) -> None:
    """
    Rebuild `ddp`'s reducer in place so that it buckets exactly the parameters that still require gradients.

    Call it between iterations (after the optimizer step, before the next forward), on every rank at the same
    step. Communication hooks registered with `register_comm_hook` are registered again on the new reducer, and
    `static_graph` is kept. This is what DDP's own `__setstate__` does to build a reducer.
    """
    check_ddp_internals(ddp)
    ddp.reducer._remove_autograd_hooks()
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
    logger.debug("Rebuilt DDP reducer for %d parameters.", len(parameters))


class DDPReducerSync:
    """
    Keeps the reducer of a model's DDP wrapper matched to the parameters that still train.

    The wrapper is found in `model`'s wrapper chain, handed over with `set_ddp_model`, or, when the model is bare
    but runs under torch.distributed (a Trainer callback only ever gets the bare model), discovered during the first
    training forward from what DDP itself records for TorchDynamo. After `parameters_changed()` the reducer is
    rebuilt at once if the wrapper is known, else as soon as it is.

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped.
    """

    def __init__(self, model: nn.Module) -> None:
        self._bare_model = unwrap_model(model)
        self.ddp: DistributedDataParallel | None = find_ddp_wrapper(model)
        self._needs_rebuild = False
        self._discovery_hook: torch.utils.hooks.RemovableHandle | None = None
        if self.ddp is not None:
            check_ddp_internals(self.ddp)  # fail now, not at the first freeze hours into training
        elif is_distributed() and not is_fsdp_managed(model):
            check_ddp_internals()
            self._discovery_hook = self._bare_model.register_forward_pre_hook(self._discover)

    @classmethod
    def from_freezer(cls, freezer: LayerFreezer) -> DDPReducerSync:
        """Always on: the model as given (a DDP wrapper in its chain is used from the start)."""
        return cls(freezer.model)

    def set_ddp_model(self, ddp_model: DistributedDataParallel) -> None:
        """Use `ddp_model`, which wraps the model; a freeze that happened before it was known is applied now."""
        if not isinstance(ddp_model, DistributedDataParallel):
            raise ValueError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
        if unwrap_model(ddp_model) is not self._bare_model:
            raise ValueError("ddp_model does not wrap the model this LayerFreezer freezes")
        check_ddp_internals(ddp_model)
        self.ddp = ddp_model
        self.close()
        self.sync()

    def on_freeze_event(self, event: FreezeEvent) -> None:
        """A freeze listener: parameters stopped (or started) requiring gradients, so the reducer is rebuilt."""
        if event.parameters:
            self.parameters_changed()

    def parameters_changed(self) -> None:
        """Parameters stopped (or started) requiring gradients: rebuild the reducer, now or once it is known."""
        self._needs_rebuild = True
        self.sync()

    def sync(self) -> None:
        """Rebuild the reducer if a change is pending and the wrapper is known."""
        if self.ddp is None or not self._needs_rebuild:
            return
        rebuild_ddp_reducer(self.ddp)
        self._needs_rebuild = False
        # Inside DDP's forward (a freeze made by a forward pre-hook), DDP prepared its old reducer for this pass:
        # prepare the new one.
        if active_ddp_module() is self.ddp and self.ddp.require_backward_grad_sync:
            self.ddp.reducer.prepare_for_forward()

    def close(self) -> None:
        """Remove the discovery hook, if any."""
        if self._discovery_hook is not None:
            self._discovery_hook.remove()
            self._discovery_hook = None

    def _discover(self, module: nn.Module, args: tuple) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return  # evaluation forwards may run outside DDP
        ddp = active_ddp_module()
        if ddp is None or unwrap_model(ddp) is not module:
            raise RuntimeError(
                "LayerFreezer runs under torch.distributed, but the model's training forward is not running inside "
                "a DistributedDataParallel wrapper it can see. Without rebuilding DDP's gradient buckets after each "
                "freeze, ranks would silently diverge. Pass the wrapped model (LayerFreezer(accelerator.prepare("
                "model), ...)), or hand the wrapper over with `freezer.set_ddp_model(ddp_model)` (Trainer: "
                "`callback.freezer.set_ddp_model(trainer.model_wrapped)`)."
            )
        self.set_ddp_model(ddp)


def is_fsdp_managed(module: nn.Module) -> bool:
    """Whether FSDP (1 or 2) manages `module` or one of its submodules."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules())


_DEEPSPEED_REFUSAL = (
    "Layer freezing does not support DeepSpeed: ZeRO fixes the trainable parameters at deepspeed.initialize. Use DDP "
    "or FSDP (use_orig_params=True / FSDP2), or disable the callback."
)
_FLAT_PARAMETERS_REFUSAL = (
    "Layer freezing needs FSDP's `use_orig_params=True` (or FSDP2's fully_shard): with flat parameters a module's "
    "weights cannot be frozen on their own. Set use_orig_params=True (Accelerate: "
    "FullyShardedDataParallelPlugin(use_orig_params=True))."
)
# DeepSpeed's classes and Accelerate's wrappers of them (`DeepSpeedOptimizerWrapper`, `DummyOptim`, ...), recognized
# by the module that defines them, so that deepspeed is never imported.
_DEEPSPEED_MODULES = ("deepspeed", "accelerate.utils.deepspeed")
# What DeepSpeed ZeRO-3 puts on every parameter it partitions (`deepspeed.runtime.zero.partition_parameters`).
_ZERO3_PARAMETER_ATTRIBUTES = ("ds_id", "ds_status")
_TRUE_FLAGS = ("1", "true", "yes", "y", "on", "t")


def _deepspeed_class(obj: object) -> str | None:
    """The first class of `obj`'s MRO that DeepSpeed (or Accelerate's DeepSpeed glue) defines, by qualified name."""
    for cls in type(obj).__mro__:
        module = getattr(cls, "__module__", None) or ""
        if any(module == name or module.startswith(f"{name}.") for name in _DEEPSPEED_MODULES):
            return f"{cls.__qualname__} ({module})"
    return None


def _optimizer_chain(optimizer: object) -> Iterator[object]:
    """
    `optimizer`, then each optimizer it wraps, outermost first: Accelerate's `AcceleratedOptimizer` (and its
    `DeepSpeedOptimizerWrapper`) and DeepSpeed's ZeRO / fp16 / bf16 optimizers all hold the next one in `.optimizer`.
    """
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        yield optimizer
        optimizer = getattr(optimizer, "optimizer", None)


def _accelerate_runs_deepspeed() -> str | None:
    """
    Why Accelerate says this process runs DeepSpeed, or `None`. Its state is read only where something already
    initialized it, through the shared dicts `accelerate.state` keeps it in: building `AcceleratorState()` or
    `PartialState()` here would initialize it, process group included.
    """
    from accelerate.state import AcceleratorState, PartialState, is_initialized
    from accelerate.utils import DistributedType

    if is_initialized():  # an Accelerator exists: its state already weighed the environment and `cpu=True`
        if getattr(AcceleratorState, "_shared_state", {}).get("distributed_type") == DistributedType.DEEPSPEED:
            return "Accelerate's AcceleratorState has distributed_type DEEPSPEED"
        return None
    if getattr(PartialState, "_shared_state", {}).get("distributed_type") == DistributedType.DEEPSPEED:
        return "Accelerate's PartialState has distributed_type DEEPSPEED"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in _TRUE_FLAGS:
        return "ACCELERATE_USE_DEEPSPEED is set in the environment"
    return None


def _deepspeed_evidence(model: nn.Module, optimizers: list[object]) -> str | None:
    """What shows that `model` or `optimizers` run under DeepSpeed, or `None`."""
    for index, obj in enumerate(wrapper_chain(model)):
        if name := _deepspeed_class(obj):
            return f"the model{' wraps' if index else ' is'} a {name}"
    for optimizer in optimizers:
        for index, obj in enumerate(_optimizer_chain(optimizer)):
            if name := _deepspeed_class(obj):
                return f"the optimizer{' wraps' if index else ' is'} a {name}"
    for name, param in model.named_parameters() if isinstance(model, nn.Module) else ():
        if any(hasattr(param, attribute) for attribute in _ZERO3_PARAMETER_ATTRIBUTES):
            return f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3"
    return _accelerate_runs_deepspeed()


def _flat_parameters_evidence(model: nn.Module) -> str | None:
    """What shows that `model` holds FSDP1 flat parameters, or `None`."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel, _flat_param
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    if not isinstance(model, nn.Module):
        return None
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel) and not getattr(module, "_use_orig_params", False):
            return f"FSDP module {name or '<root>'!r} has use_orig_params=False"
    # `_is_flat_param` is the flag FSDP's own `isinstance(t, FlatParameter)` checks; the class is checked too in case a
    # later torch drops the flag (`isinstance(t, ())` is False where the class is gone).
    flat_parameter = getattr(_flat_param, "FlatParameter", ())
    for name, param in model.named_parameters():
        if getattr(param, "_is_flat_param", False) or isinstance(param, flat_parameter):
            return f"parameter {name!r} is an FSDP1 FlatParameter: the module given is inside an FSDP1 wrapper"
    return None


def check_supported_wrapping(model: nn.Module, optimizer: object) -> None:
    """
    Refuse, with `NotImplementedError` and the next step, the setups where freezing cannot work correctly, whichever of
    their objects is passed (a Trainer callback gets the bare model and Accelerate's wrapper of the optimizer).

    - DeepSpeed fixes the set of trainable parameters when `deepspeed.initialize` runs. Recognized from the model or
      its wrappers (`DeepSpeedEngine`), the optimizer or anything it wraps (Accelerate's `DeepSpeedOptimizerWrapper`,
      DeepSpeed's ZeRO optimizers), ZeRO-3's partitioned parameters, Accelerate's state where it is initialized, and
      `ACCELERATE_USE_DEEPSPEED` in the environment where it is not. deepspeed itself is never imported.
    - FSDP1 with `use_orig_params=False` flattens parameters; freezing by module cannot reach them. Recognized from
      the FSDP wrapper, or from the `FlatParameter`s of a module given from inside it (`fsdp.module`).

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped.
        optimizer (`torch.optim.Optimizer` or `list[torch.optim.Optimizer]`):
            Its optimizer(s), bare or wrapped. Nothing but `.optimizer` is read from them, so this runs before they
            are validated.
    """
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if evidence := _deepspeed_evidence(model, optimizers):
        raise NotImplementedError(f"{_DEEPSPEED_REFUSAL} (Found: {evidence}.)")
    if evidence := _flat_parameters_evidence(model):
        raise NotImplementedError(f"{_FLAT_PARAMETERS_REFUSAL} (Found: {evidence}.)")
