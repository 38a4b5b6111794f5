"""`freeze_batchnorm=True`: frozen BatchNorm layers normalize with their running statistics and stop updating them.

Training loops call `model.train()` every step, so setting eval mode once is not enough: a forward pre-hook puts
each frozen BatchNorm layer back in eval mode before it runs. Giving a unit back removes its hooks, and the layer
follows the model's mode again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .events import FreezeEvent
from .forward_hooks import has_forward_pre_hook
from .wrappers import unwrap_model

if TYPE_CHECKING:
    from .freezer import LayerFreezer

__all__ = ["BatchNormLock", "keeps_eval_mode"]


def _stay_in_eval(module: nn.Module, args: tuple) -> None:
    module.training = False


def keeps_eval_mode(module: nn.Module) -> bool:
    """Whether a `BatchNormLock` keeps `module` in eval mode."""
    return has_forward_pre_hook(module, _stay_in_eval)


class BatchNormLock:
    """
    A freeze listener that keeps the BatchNorm layers of frozen units in eval mode.

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_model(model)
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}

    @classmethod
    def from_freezer(cls, freezer: LayerFreezer) -> BatchNormLock | None:
        """With `freeze_batchnorm=True`."""
        return cls(freezer.bare_model) if freezer.options.freeze_batchnorm else None

    def on_freeze_event(self, event: FreezeEvent) -> None:
        for unit in event.frozen:
            for module in unit.owner_modules(self.model):
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in self._hooks:
                    module.eval()
                    self._hooks[id(module)] = module.register_forward_pre_hook(_stay_in_eval)
        released = False
        for unit in event.unfrozen:
            for module in unit.owner_modules(self.model):
                handle = self._hooks.pop(id(module), None)
                if handle is not None:
                    handle.remove()
                    released = True
        if released and self.model.training:
            self.model.train()  # the released layers follow the model's mode again

    def close(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
