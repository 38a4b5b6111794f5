"""A freeze event, and the listeners that carry its side effects.

Freezing changes which parameters train. Everything else that has to follow (DDP's gradient buckets, the inputs of
re-entrant gradient checkpoints, compiled code, BatchNorm statistics) is a listener: the engine notifies each one of
each event, and releases each with `close()`. A new side effect adds a listener, not a branch in the engine.
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
    """A side effect of freezing: told of every event, released by `close()`."""

    def on_freeze_event(self, event: FreezeEvent) -> None:
        """Follow what `event` changed."""

    def close(self) -> None:
        """Remove every hook or wrapper this listener put on the model."""
