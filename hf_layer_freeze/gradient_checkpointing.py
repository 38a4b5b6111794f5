"""Gradient checkpointing beside freezing: keep re-entrant checkpoints training what is not frozen.

A re-entrant checkpoint (`torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`) builds its backward only if
one of its tensor inputs requires a gradient: it never looks at the parameters inside. Once the units before a
checkpointed layer are frozen, its input no longer requires a gradient, and every trainable parameter inside it,
and in every later checkpointed layer, silently stops training. Non-reentrant checkpoints do not have this problem.

The fix makes the input of the first checkpointed layer that holds a trainable unit require a gradient:
- transformers layers (`GradientCheckpointingLayer`) pass their positional inputs to the checkpoint function the
  model set on them (`layer._gradient_checkpointing_func`), whether the release checkpoints their `forward`
  (recent ones) or their `__call__` (earlier 5.x, where the layer's own hooks run inside the checkpoint): that
  function, on that one layer, is wrapped so that its floating-point inputs require a gradient, and backward stops
  right there. The wrapper is checked before each forward of the model, since `gradient_checkpointing_enable`
  sets the function anew.
- timm checkpoints blocks from its model's own forward (`checkpoint_seq`), where no hook runs outside the
  checkpoint but the model's: with timm's re-entrant mode on (`timm.layers.set_reentrant_ckpt(True)` or
  `TIMM_REENTRANT_CKPT=1`), the model's input gets `requires_grad`. Training is then right, but backward runs
  through the frozen checkpointed blocks too (no weight gradients, still their input gradients): a warning says so.

A user's own re-entrant checkpoint (`torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)` in their
`forward`) has no hook outside it to make its input require a gradient. `ReentrantCheckpointCheck` refuses it by
name instead: on the first training forward after each freeze event, a module holding a unit that still trains and
running inside torch's re-entrant `CheckpointFunction` whose inputs require no gradient raises, naming the fix
(`use_reentrant=False`), before the step that would silently not train it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .compiled import has_compiled_code
from .events import FreezeEvent
from .families import checkpointed_layer
from .wrappers import unwrap_model

if TYPE_CHECKING:
    from .freezer import LayerFreezer

logger = logging.getLogger(__name__)

__all__ = ["CheckpointInputGrads", "ReentrantCheckpointCheck"]


def _requiring_grad(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
        return value.detach().requires_grad_()  # a new leaf: only this consumer builds a graph from it
    return value


class _InputsRequireGrad:
    """A transformers layer's checkpoint function, whose positional floating-point inputs now require a gradient."""

    def __init__(self, checkpoint_function: Any) -> None:
        self.checkpoint_function = checkpoint_function

    @property
    def keywords(self) -> dict[str, Any]:
        """The keywords of the wrapped `functools.partial(checkpoint, use_reentrant=...)`."""
        return getattr(self.checkpoint_function, "keywords", None) or {}

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        # non-reentrant checkpoints differentiate through their parameters: they need nothing
        if torch.is_grad_enabled() and self.keywords.get("use_reentrant") is not False:
            args = tuple(_requiring_grad(a) for a in args)
        return self.checkpoint_function(function, *args, **kwargs)


class CheckpointInputGrads:
    """
    A freeze listener that makes the input of the first checkpointed layer that still trains require a gradient, so
    that re-entrant gradient checkpointing keeps training every unit after the frozen prefix.

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_model(model)
        # One hook for the freezer's life, reading the current state: an event may come from inside a forward (the
        # first-forward profile), where removing a hook the running forward has listed would break that forward.
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._layer: nn.Module | None = None
        self._timm_checkpointing_modules: list[nn.Module] = []
        self._warned = False

    @classmethod
    def from_freezer(cls, freezer: LayerFreezer) -> CheckpointInputGrads:
        """Always on (it acts only where the model checkpoints re-entrantly)."""
        return cls(freezer.bare_model)

    def on_freeze_event(self, event: FreezeEvent) -> None:
        """Move the fix to the first unit that still trains. Also before anything is frozen by this freezer:
        parameters frozen before it (PEFT's base weights, an embedding frozen by hand) stop the checkpoint's input
        from requiring a gradient just the same."""
        self._unwrap_layer()
        self._timm_checkpointing_modules = []
        # whether the model that checkpoints inside its forward does so re-entrantly now (its family's answer)
        self._reentrant_now: Callable[[], bool] | None = None
        first = event.first_trainable
        if first is None or all(p.requires_grad for p in self.model.parameters()):
            return  # everything frozen, or nothing: no input to fix
        # where checkpointing begins around the first trainable unit, as the model's family knows it (`families/`)
        found = checkpointed_layer(self.model, first.module)
        if found is not None and found.reentrant is None:
            self._layer = found.module
            self._wrap_layer_checkpoint_function()
        elif found is not None:  # the model checkpoints inside its own forward
            self._timm_checkpointing_modules = [found.module]
            self._reentrant_now = found.reentrant
        if (self._layer is not None or self._timm_checkpointing_modules) and self._handle is None:
            self._handle = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._layer is not None:
            # transformers' gradient_checkpointing_enable sets the function anew: wrap it again if so
            self._wrap_layer_checkpoint_function()
            return None
        if self._timm_checkpointing_modules:
            return self._model_input_requires_grad(module, args, kwargs)
        return None

    def _wrap_layer_checkpoint_function(self) -> None:
        function = getattr(self._layer, "_gradient_checkpointing_func", None)
        if function is not None and not isinstance(function, _InputsRequireGrad):
            self._layer._gradient_checkpointing_func = _InputsRequireGrad(function)

    def _unwrap_layer(self) -> None:
        """Give the layer back its own checkpoint function."""
        if self._layer is not None:
            function = getattr(self._layer, "_gradient_checkpointing_func", None)
            if isinstance(function, _InputsRequireGrad):
                self._layer._gradient_checkpointing_func = function.checkpoint_function
            self._layer = None

    def _timm_reentrant_checkpointing(self) -> bool:
        """Whether the model checkpoints inside its forward (timm's blocks), re-entrantly, now."""
        return bool(self._timm_checkpointing_modules) and self._reentrant_now is not None and self._reentrant_now()

    def close(self) -> None:
        """Remove the hook, and give the layer back its own checkpoint function."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._unwrap_layer()
        self._timm_checkpointing_modules = []

    def _model_input_requires_grad(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not (module.training and torch.is_grad_enabled() and self._timm_reentrant_checkpointing()):
            return None
        if not self._warned:
            warnings.warn(
                "timm re-entrant gradient checkpointing with frozen units: the model's input now requires a "
                "gradient so that the checkpointed blocks after the frozen ones keep training. Backward then runs "
                "through the frozen checkpointed blocks too (without weight gradients). Use timm's default "
                "non-reentrant checkpointing (timm.layers.set_reentrant_ckpt(False)) to skip them.",
                stacklevel=2,
            )
            self._warned = True
        return tuple(_requiring_grad(a) for a in args), {k: _requiring_grad(v) for k, v in kwargs.items()}


def _reentrant_checkpoint_forward() -> Any:
    """The code of torch's re-entrant checkpoint's forward, whose frame holds the checkpoint's inputs (`args`)."""
    from torch.utils import checkpoint

    function = getattr(getattr(checkpoint, "CheckpointFunction", None), "forward", None)
    code = getattr(function, "__code__", None)
    if code is None or "args" not in code.co_varnames:
        raise NotImplementedError(
            f"torch {torch.__version__}: torch.utils.checkpoint.CheckpointFunction.forward(ctx, run_function, "
            "preserve_rng_state, *args) is not there; hf_layer_freeze checks re-entrant checkpoints through it"
        )
    return code


class ReentrantCheckpointCheck:
    """
    A freeze listener that refuses a re-entrant gradient checkpoint whose inputs require no gradient around a unit
    that still trains (a user's `torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)`), which would
    silently stop training it. It checks the first training forward after each freeze event, then takes its hooks
    off until the next one. Not under `torch.compile` (a model compiled by any route, see `has_compiled_code`):
    Dynamo guards on each module's hooks, so hooks put on and taken off would recompile the model twice more per
    freeze event.

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped.
    """

    def __init__(self, model: nn.Module) -> None:
        self._given = model
        self.model = unwrap_model(model)
        self._code = _reentrant_checkpoint_forward()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []  # on the units that still train
        self._names: dict[int, str] = {}
        self._training_forward = False
        self._depth = 0  # model forwards running, nested ones included
        # The model's own hooks stay for the freezer's life: an event may come from inside a forward (the
        # first-forward profile), where removing a hook the running forward has listed would break that forward.
        self._model_handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def from_freezer(cls, freezer: LayerFreezer) -> ReentrantCheckpointCheck:
        """Always on: the model as given (whether it is compiled decides whether it hooks)."""
        return cls(freezer.model)

    def on_freeze_event(self, event: FreezeEvent) -> None:
        """Check the next training forward: the units that still train, and whether they get a gradient."""
        self._remove()
        if has_compiled_code(self._given):
            return  # hooks put on and taken off would recompile it (Dynamo guards on each module's hooks)
        names = {id(m): n for n, m in self.model.named_modules()}
        trainable = [u.module for u in event.units[event.frozen_units :] if any(p.requires_grad for p in u.parameters)]
        if not trainable or all(p.requires_grad for p in self.model.parameters()):
            return  # nothing trains, or nothing is frozen: no checkpoint input lost its gradient
        self._names = {id(m): names.get(id(m), "") for m in trainable}
        self._handles = [m.register_forward_pre_hook(self._check) for m in dict.fromkeys(trainable)]
        if not self._model_handles:
            self._model_handles = [
                self.model.register_forward_pre_hook(self._model_begins),
                self.model.register_forward_hook(self._model_ends, always_call=True),
            ]

    def _model_begins(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1
        if self._depth == 1:  # a forward nested in a hook of the model's (the first-forward profile) is not it
            self._training_forward = bool(self._handles) and torch.is_grad_enabled()

    def _model_ends(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            if self._training_forward:  # checked once: the units' hooks come off until the next freeze event
                self._remove()
            self._training_forward = False

    def _check(self, module: nn.Module, args: tuple) -> None:
        # the fast path: a training forward with gradients on (a re-entrant checkpoint's forward has them off)
        if torch.is_grad_enabled() or not self._training_forward:
            return
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not self._code:
            frame = frame.f_back
        if frame is None:
            return  # gradients off by the user's own no_grad, not a checkpoint
        inputs = frame.f_locals.get("args", ())
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs):
            return
        name = self._names.get(id(module), type(module).__name__) or "<root>"
        raise NotImplementedError(
            f"{name!r} holds parameters that still train, but runs inside a re-entrant gradient checkpoint "
            "(torch.utils.checkpoint.checkpoint(..., use_reentrant=True)) whose inputs require no gradient now "
            "that what runs before it is frozen: it would silently stop training. Checkpoint with "
            "use_reentrant=False (torch's recommendation), or through the model's own gradient_checkpointing_enable() "
            "(transformers) or set_grad_checkpointing() (timm), which hf_layer_freeze keeps training."
        )

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def close(self) -> None:
        """Remove the hooks."""
        self._remove()
        for handle in self._model_handles:
            handle.remove()
        self._model_handles = []
        self._training_forward = False
        self._depth = 0
