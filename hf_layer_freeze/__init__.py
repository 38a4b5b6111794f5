"""Progressive layer freezing (FreezeOut, Composer's LayerFreezing) for the Hugging Face Trainer and Accelerate."""

from __future__ import annotations

from .accelerate import LayerFreezer
from .callback import LayerFreezingCallback
from .freezing import FreezeResult, FrozenParamGroups, frozen_param_groups
from .options import FreezeOptions
from .schedule import freeze_fraction, num_units_to_freeze
from .units import FreezableUnit, freezable_units

__version__ = "0.1.0"

__all__ = [
    "FreezableUnit",
    "FreezeOptions",
    "FreezeResult",
    "FrozenParamGroups",
    "LayerFreezer",
    "LayerFreezingCallback",
    "__version__",
    "freezable_units",
    "freeze_fraction",
    "frozen_param_groups",
    "num_units_to_freeze",
]
