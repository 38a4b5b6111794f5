"""Other code that sets `requires_grad=True` on what the freezer froze: undone before it costs anything.

A freeze is not a flag set once. PEFT's `disable_adapter()` context sets `requires_grad=True` on every adapter tensor
of the active adapter when it exits (`BaseTunerLayer.enable_adapters` -> `set_adapter`), frozen or not, and TRL's
`DPOTrainer` with a PEFT model and `ref_model=None` enters it at every step, between the policy's forward and its
backward, to compute the reference log-probabilities. Left alone, the frozen adapters would get gradients from the
next forward (and count in `max_grad_norm`'s clipping), and a non-reentrant gradient checkpoint would recompute a
layer with other `requires_grad` flags than its forward had (`CheckpointError`).

`RequiresGradGuard`, a freeze listener, checks that what the freezer holds frozen is still frozen, and freezes it again
if not (saying so once, by name):
- before each forward of the model (so no gradient reaches a frozen tensor, whoever rewrote it);
- when backward reaches the model's outputs, before any of the model's own backward runs (so a checkpointed layer is
  recomputed with the flags its forward saw, whatever ran between the forward and the backward).
- right after PEFT re-enables adapters (`enable_adapter_layers()`, `set_adapter()` of a `PeftModel`'s tuner, which
  `disable_adapter()` calls on exit), so a forward through an inner module of the model (a head of one's own on
  `get_base_model().model`) cannot meet the rewrite either.
The checks around forwards are skipped while torch.compile traces the model; the Trainer callback also checks at each
step's start.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .events import FreezeEvent
from .wrappers import unwrap_model

if TYPE_CHECKING:
    from .freezer import LayerFreezer

logger = logging.getLogger(__name__)

__all__ = ["RequiresGradGuard"]


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors requiring a gradient among a forward's outputs (a tensor, a tuple or list, a dict/ModelOutput)."""
    if isinstance(output, torch.Tensor):
        values = [output]
    elif isinstance(output, dict):
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        return []
    return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]


# The methods of a PEFT tuner (`BaseTuner`) that set `requires_grad=True` on adapters.
_PEFT_REWRITERS = ("enable_adapter_layers", "set_adapter")


def _peft_tuner(model: nn.Module) -> nn.Module | None:
    """The PEFT tuner (a `LoraModel`, ...) of a `PeftModel`, or `model` itself if it is one, else `None`."""
    peft = sys.modules.get("peft")  # no PEFT imported: no PEFT model can exist
    if peft is None:
        return None
    from peft.tuners.tuners_utils import BaseTuner

    tuner = model.base_model if isinstance(model, peft.PeftModel) else model
    return tuner if isinstance(tuner, BaseTuner) else None


class RequiresGradGuard:
    """
    A freeze listener that keeps frozen what the freezer holds frozen (see the module docstring).

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped.
        refreeze (`Callable[[], list[tuple[str, torch.nn.Parameter]]]`):
            Freezes again what the freezer holds and other code made trainable; returns those (name, parameter) pairs
            (`FrozenRecord.refreeze`).
    """

    def __init__(self, model: nn.Module, refreeze: Callable[[], list[tuple[str, nn.Parameter]]]) -> None:
        self._refreeze = refreeze
        self._active = False
        self._warned = False
        bare = unwrap_model(model)
        self._handles = [
            bare.register_forward_pre_hook(self._before_forward),
            bare.register_forward_hook(self._after_forward),
        ]
        self._tuner = _peft_tuner(bare)
        self._wrapped: list[str] = []
        for name in _PEFT_REWRITERS if self._tuner is not None else ():
            method = getattr(self._tuner, name, None)
            if callable(method) and name not in vars(self._tuner):  # on the class: an instance attribute undoes it
                setattr(self._tuner, name, self._checking_after(method))
                self._wrapped.append(name)

    @classmethod
    def from_freezer(cls, freezer: LayerFreezer) -> RequiresGradGuard:
        """Always on: keeps frozen what the freezer's record holds."""
        return cls(freezer.bare_model, freezer.record.refreeze)

    def _checking_after(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def then_check(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            self.check()
            return result

        return then_check

    def on_freeze_event(self, event: FreezeEvent) -> None:
        """Check from the first freeze on (nothing to keep frozen before it)."""
        self._active = event.frozen_units > 0 or bool(event.frozen)

    def check(self) -> int:
        """Freeze again what other code made trainable; warn the first time. Returns how many tensors it froze."""
        if not self._active:
            return 0
        rewritten = self._refreeze()
        if rewritten and not self._warned:
            self._warned = True
            names = ", ".join(name for name, _ in rewritten[:3]) + (", ..." if len(rewritten) > 3 else "")
            warnings.warn(
                f"Other code set requires_grad=True on {len(rewritten)} parameter tensor(s) the LayerFreezer froze "
                f"({names}); they are frozen again (checked before each forward and when backward reaches the model's "
                "outputs; this warning is shown once). PEFT's disable_adapter() does this when it exits (TRL's "
                "DPOTrainer enters it at each step with a PEFT model and ref_model=None). To train them again, call "
                "freezer.unfreeze().",
                stacklevel=2,
            )
        elif rewritten:
            logger.debug("Froze again %d parameter tensor(s) other code made trainable.", len(rewritten))
        return len(rewritten)

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if self._active and not torch.compiler.is_compiling():
            self.check()

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        tensors = _output_tensors(output)
        if tensors:
            # One hook: the first output whose gradient is computed runs it, before the model's own backward.
            done = [False]

            def check_once(grad: torch.Tensor) -> None:
                if not done[0]:
                    done[0] = True
                    self.check()

            for tensor in tensors:
                tensor.register_hook(check_once)

    def close(self) -> None:
        """Remove the hooks, and give PEFT's tuner its own methods back."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name in self._wrapped:
            vars(self._tuner).pop(name, None)  # the class's method again
        self._wrapped = []
        self._active = False
