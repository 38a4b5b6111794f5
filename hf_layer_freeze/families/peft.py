"""PEFT models: a `PeftModel` wraps a model (`get_base_model()`); a tuner layer (LoRA's) is one unit."""

from __future__ import annotations

import sys

from torch import nn

from .protocol import ModelFamily

__all__ = ["PeftFamily", "peft_base_model"]


def peft_base_model(model: nn.Module) -> nn.Module:
    """The model a PEFT `PeftModel` wraps (PEFT's own `get_base_model()`), or `model` itself."""
    peft = sys.modules.get("peft")  # no PEFT imported: no PeftModel can exist
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT tuner layers in `model` (a LoRA layer holds its adapters' A and B matrices, and more)."""
    if sys.modules.get("peft") is None:  # no PEFT imported: no tuner layer can exist
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class PeftFamily(ModelFamily):
    """
    PEFT: a `PeftModel` is looked through to the model it wraps, so the other families answer on the model inside
    (the `modules_to_save` copy of a classifier sits where the classifier sat: it is head); a tuner layer is one unit
    at every granularity.
    """

    name = "peft"

    def matches(self, model: nn.Module) -> bool:
        return sys.modules.get("peft") is not None

    def wraps(self, model: nn.Module) -> nn.Module | None:
        inner = peft_base_model(model)
        return None if inner is model else inner

    def grouped_modules(self, model: nn.Module) -> list[nn.Module] | None:
        return _tuner_layers(model) or None
