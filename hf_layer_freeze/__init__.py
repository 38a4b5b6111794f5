"""Progressive layer freezing (FreezeOut, Composer's LayerFreezing) for the Hugging Face Trainer and Accelerate."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .callback import LayerFreezingCallback
from .families import ModelFamily, register_family
from .freezer import FreezeResult, LayerFreezer
from .heads import Head, find_head
from .options import FreezeOptions
from .param_groups import frozen_param_groups
from .schedule import freeze_fraction, num_units_to_freeze
from .units import FreezableUnit, freezable_units

try:
    __version__ = version("hf_layer_freeze")  # the one version, in pyproject.toml
except PackageNotFoundError:  # pragma: no cover - imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "FreezableUnit",
    "FreezeOptions",
    "FreezeResult",
    "Head",
    "LayerFreezer",
    "LayerFreezingCallback",
    "ModelFamily",
    "__version__",
    "find_head",
    "freezable_units",
    "freeze_fraction",
    "frozen_param_groups",
    "num_units_to_freeze",
    "register_family",
]
