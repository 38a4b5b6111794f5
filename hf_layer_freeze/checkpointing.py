"""Gradient checkpointing beside freezing: keep re-entrant checkpoints training what is not frozen.

A re-entrant checkpoint (`torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`) builds its backward only if
one of its tensor inputs requires a gradient: it never looks at the parameters inside. Once the units before a
checkpointed layer are frozen, its input no longer requires a gradient, and every trainable parameter inside it,
and in every later checkpointed layer, silently stops training. Non-reentrant checkpoints do not have this problem.

The fix makes the input of the first checkpointed layer that holds a trainable unit require a gradient:
- transformers layers (`GradientCheckpointingLayer`) checkpoint their `forward`, so a forward pre-hook on the
  layer runs outside the checkpoint: the layer's input gets `requires_grad`, and backward stops right there.
- timm checkpoints blocks from its model's own forward (`checkpoint_seq`), where no hook runs outside the
  checkpoint but the model's: with timm's re-entrant mode on (`timm.layers.set_reentrant_ckpt(True)` or
  `TIMM_REENTRANT_CKPT=1`), the model's input gets `requires_grad`. Training is then right, but backward runs
  through the frozen checkpointed blocks too (no weight gradients, still their input gradients): a warning says so.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from .units import FreezableUnit
from .wrappers import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["CheckpointInputGrads"]


def _requiring_grad(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
        return value.detach().requires_grad_()  # a new leaf: only this consumer builds a graph from it
    return value


def _transformers_checkpoint_layer() -> type | None:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers without per-layer checkpointing
        return None
    return GradientCheckpointingLayer


class CheckpointInputGrads:
    """
    Makes the input of the first checkpointed layer that still trains require a gradient, so that re-entrant
    gradient checkpointing keeps training every unit after the frozen prefix. Call `update` after each freeze.

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_model(model)
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._timm_checkpointing_modules: list[nn.Module] = []
        self._warned = False

    def update(self, units: list[FreezableUnit], frozen_units: int) -> None:
        """Move the hook to the first unit that still trains (none while nothing is frozen, or everything is)."""
        self.close()
        if frozen_units == 0 or frozen_units >= len(units):
            return
        first_trainable = units[frozen_units].module
        layer_type = _transformers_checkpoint_layer()
        layer = None
        if layer_type is not None:
            # The outermost transformers layer around the first trainable unit: that is the checkpoint boundary.
            for module in self.model.modules():
                if isinstance(module, layer_type) and any(m is first_trainable for m in module.modules()):
                    layer = module
                    break
        if layer is not None:
            self._handle = layer.register_forward_pre_hook(self._layer_input_requires_grad, with_kwargs=True)
        else:
            self._timm_checkpointing_modules = [m for m in self.model.modules() if hasattr(m, "grad_checkpointing")]
            if self._timm_checkpointing_modules:
                self._handle = self.model.register_forward_pre_hook(self._model_input_requires_grad, with_kwargs=True)

    def _timm_reentrant_checkpointing(self) -> bool:
        """Whether a timm model inside the model checkpoints its blocks, re-entrantly."""
        if not any(m.grad_checkpointing is True for m in self._timm_checkpointing_modules):
            return False
        try:
            from timm.layers import use_reentrant_ckpt
        except ImportError:  # a timm too old to say: it checkpointed re-entrantly
            return True
        return bool(use_reentrant_ckpt())

    def close(self) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @staticmethod
    def _layer_input_requires_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not (module.training and torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False)):
            return None
        checkpoint_kwargs = getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", None) or {}
        if checkpoint_kwargs.get("use_reentrant") is False:
            return None  # non-reentrant checkpoints differentiate through their parameters: nothing to do
        # Re-entrant checkpoints only see positional tensors (transformers passes hidden states positionally).
        return tuple(_requiring_grad(a) for a in args), kwargs

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
