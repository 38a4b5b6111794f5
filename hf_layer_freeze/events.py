"""A freeze event, and the listeners that carry its side effects.

Freezing changes which parameters train. Everything else that has to follow (DDP's gradient buckets, the inputs of
re-entrant gradient checkpoints, the `requires_grad` guard, compiled code, BatchNorm statistics, the activation
cache) is a listener: built from the freezer by its own file (`from_freezer`, `None` when its option is off), listed
once in `listeners.LISTENERS`; the engine notifies each one of each event, gathers its `metrics()` and `state_dict()`
where it has them, and releases each with `close()`, never naming one. A new side effect adds a listener (a class
and a line in `LISTENERS`, or `LayerFreezer.add_listener` from outside), not a branch in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from .units import FreezableUnit

__all__ = ["FreezeEvent", "FreezeListener"]


@dataclass(frozen=True)
class FreezeEvent:
    """
    What one call of the engine changed.

    Args:
        units (`tuple[FreezableUnit, ...]`): every unit, in freezing order.
        frozen_units (`int`): how many leading units are frozen now.
        frozen (`tuple[FreezableUnit, ...]`): units frozen by this event.
        unfrozen (`tuple[FreezableUnit, ...]`): units given back by this event.
        parameters (`tuple[torch.nn.Parameter, ...]`): parameters whose `requires_grad` this event changed (empty for
            the event that announces the freezer to its listeners when it is built).
    """

    units: tuple[FreezableUnit, ...]
    frozen_units: int
    frozen: tuple[FreezableUnit, ...] = ()
    unfrozen: tuple[FreezableUnit, ...] = ()
    parameters: tuple[nn.Parameter, ...] = ()

    @property
    def first_trainable(self) -> FreezableUnit | None:
        """The first unit that still trains, or `None` when every unit is frozen."""
        return self.units[self.frozen_units] if self.frozen_units < len(self.units) else None


class FreezeListener(Protocol):
    """
    A side effect of freezing: told of every event, released by `close()`. It may also define `metrics() ->
    dict[str, float]` (namespaced `layer_freeze/...` keys, joined to `LayerFreezer.metrics()`), and `state_dict()` /
    `load_state_dict(state)` (JSON-safe entries merged into the freezer's checkpoint state, and the whole of it back).

    Example:

    ```python
    >>> import timm, torch
    >>> from hf_layer_freeze import LayerFreezer
    >>> class CountEvents:
    ...     def __init__(self):
    ...         self.events = 0
    ...     def on_freeze_event(self, event):
    ...         self.events += 1
    ...     def metrics(self):
    ...         return {"layer_freeze/events": self.events}
    ...     def close(self):
    ...         pass
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    >>> freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> freezer.add_listener(CountEvents())
    >>> freezer.update(0.75).changed, freezer.metrics()["layer_freeze/events"]
    (True, 1)

    ```
    """

    def on_freeze_event(self, event: FreezeEvent) -> None:
        """Follow what `event` changed."""

    def close(self) -> None:
        """Remove every hook or wrapper this listener put on the model."""
