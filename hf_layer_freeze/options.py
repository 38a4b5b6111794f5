"""The freezer's options beyond the schedule, validated once for `LayerFreezer` and `LayerFreezingCallback`.

Pure Python (no torch), and JSON-safe values only, so the callback can be saved and restored with the Trainer's
`ExportableState` mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedule import validate_choice

__all__ = ["BUDGETS", "GRANULARITIES", "ORDERS", "FreezeOptions"]

ORDERS = ("definition", "execution")
GRANULARITIES = ("module", "block")
BUDGETS = ("units", "params", "flops")


@dataclass(frozen=True)
class FreezeOptions:
    """
    How units are chosen and frozen; the defaults are the method card's. See `LayerFreezer` for each option.

    Raises `ValueError` naming the option, the allowed values and the value received.
    """

    order: str = "definition"
    granularity: str = "module"
    budget: str = "units"
    freeze_batchnorm: bool = False
    max_freeze_events: int | None = None

    def __post_init__(self) -> None:
        validate_choice("order", self.order, ORDERS)
        validate_choice("granularity", self.granularity, GRANULARITIES)
        validate_choice("budget", self.budget, BUDGETS)
        if not isinstance(self.freeze_batchnorm, bool):
            raise ValueError(f"freeze_batchnorm must be True or False, got {self.freeze_batchnorm!r}")
        events = self.max_freeze_events
        if events is not None and (isinstance(events, bool) or not isinstance(events, int) or events < 1):
            raise ValueError(f"max_freeze_events must be None or an integer >= 1, got {events!r}")
