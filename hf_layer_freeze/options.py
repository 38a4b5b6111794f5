"""The freezer's configuration, validated in one place for `LayerFreezer` and `LayerFreezingCallback`.

Pure Python (no torch), and JSON-safe values only, so the callback can be saved and restored with the Trainer's
`ExportableState` mechanism.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .schedule import validate_choice, validate_freeze_level, validate_freeze_start

__all__ = ["BUDGETS", "GRANULARITIES", "ORDERS", "SCHEDULES", "FreezeOptions"]

SCHEDULES = ("linear", "adaptive")
DEFAULT_CACHE_MAX_BYTES = 4 * 2**30  # host memory for cached activations: 4 GiB
ORDERS = ("definition", "execution")
GRANULARITIES = ("module", "block")
BUDGETS = ("units", "params", "flops")


@dataclass(frozen=True, kw_only=True)
class FreezeOptions:
    """
    The schedule and how units are chosen and frozen; the defaults are the method card's. See `LayerFreezer` for
    each option.

    Raises `ValueError` naming the option, the allowed values and the value received.

    Example:

    ```python
    >>> from hf_layer_freeze import FreezeOptions
    >>> FreezeOptions(freeze_start=0.2, budget="flops").freeze_level
    1.0
    >>> FreezeOptions(order="random")
    Traceback (most recent call last):
    ...
    ValueError: order must be one of ('definition', 'execution'), got 'random'

    ```
    """

    freeze_start: float = 0.5
    freeze_level: float = 1.0
    order: str = "definition"
    granularity: str = "module"
    budget: str = "units"
    freeze_batchnorm: bool = False
    max_freeze_events: int | None = None
    schedule: str = "linear"
    check_every: int = 20
    change_threshold: float = 1.0
    head: tuple[str, ...] | None = None
    cache_activations: bool = False
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES

    def __post_init__(self) -> None:
        # frozen dataclass: normalize ints to floats through object.__setattr__
        object.__setattr__(self, "freeze_start", validate_freeze_start(self.freeze_start))
        object.__setattr__(self, "freeze_level", validate_freeze_level(self.freeze_level))
        validate_choice("order", self.order, ORDERS)
        validate_choice("granularity", self.granularity, GRANULARITIES)
        validate_choice("budget", self.budget, BUDGETS)
        if not isinstance(self.freeze_batchnorm, bool):
            raise ValueError(f"freeze_batchnorm must be True or False, got {self.freeze_batchnorm!r}")
        validate_choice("schedule", self.schedule, SCHEDULES)
        every = self.check_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"check_every must be an integer >= 1 (optimizer steps between checks), got {every!r}")
        threshold = self.change_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
            raise ValueError(f"change_threshold must be a positive number, got {threshold!r}")
        object.__setattr__(self, "change_threshold", float(threshold))
        object.__setattr__(self, "head", _validate_head(self.head))
        if not isinstance(self.cache_activations, bool):
            raise ValueError(f"cache_activations must be True or False, got {self.cache_activations!r}")
        budget = self.cache_max_bytes
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"cache_max_bytes must be an integer >= 1 (bytes of host memory), got {budget!r}")
        events = self.max_freeze_events
        if events is not None and (isinstance(events, bool) or not isinstance(events, int) or events < 1):
            raise ValueError(f"max_freeze_events must be None or an integer >= 1, got {events!r}")

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-safe keyword arguments."""
        options = asdict(self)
        options["head"] = None if self.head is None else list(self.head)
        return options


def _validate_head(head: object) -> tuple[str, ...] | None:
    """`head` as a tuple of module names, or `None`; a `ValueError` for anything else."""
    if head is None:
        return None
    names = (head,) if isinstance(head, str) else head
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"head must be None, a module name or a non-empty list of module names (as in model.named_modules()), "
            f"got {head!r}"
        )
    return tuple(names)
