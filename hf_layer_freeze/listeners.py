"""The freeze listeners a `LayerFreezer` builds, in the order it notifies them.

Each listener's own file builds it from the freezer (`from_freezer(freezer)`: its options, the model as given or
bare, its record), or returns `None` when its option is off. The engine builds `LISTENERS` in order and names none of
them; a new side effect is a class in its own file and one entry here. Listeners added from outside
(`LayerFreezer.add_listener`) come after these. `ListenerHost` is the freezer's side of it: finding, adding and
notifying listeners, and the properties that reach a built-in one by its class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from torch.nn.parallel import DistributedDataParallel

from .activation_cache import ActivationCache
from .adaptive import GradientNormTracker
from .batchnorm import BatchNormLock
from .compiled import CompiledCodeInvalidation
from .distributed import DDPReducerSync
from .events import FreezeEvent, FreezeListener
from .gradient_checkpointing import CheckpointInputGrads, ReentrantCheckpointCheck
from .rewrites import RequiresGradGuard
from .state_offload import StateOffload

if TYPE_CHECKING:
    from .freezer import LayerFreezer

__all__ = ["LISTENERS", "ListenerHost", "build_listeners"]

L = TypeVar("L")

LISTENERS: tuple[type, ...] = (
    DDPReducerSync,  # first: the reducer follows every change before anything runs a forward
    CheckpointInputGrads,
    RequiresGradGuard,
    ReentrantCheckpointCheck,
    CompiledCodeInvalidation,
    BatchNormLock,
    ActivationCache,
    StateOffload,  # last: counts (and moves) the optimizer state once the others have followed the event
)


def build_listeners(freezer: LayerFreezer) -> list[FreezeListener]:
    """
    The listeners of `LISTENERS` that `freezer`'s options turn on, in order. When one refuses (raises: an unsupported
    setup), those already built are closed before the exception propagates, so no hook stays on the model.
    """
    built: list[FreezeListener] = []
    try:
        for kind in LISTENERS:
            listener = kind.from_freezer(freezer)
            if listener is not None:
                built.append(listener)
    except BaseException:
        for listener in reversed(built):
            listener.close()
        raise
    return built


class ListenerHost:
    """The listeners of a `LayerFreezer` (a base class of it): `listener(kind)`, `add_listener`, the notification."""

    listeners: list[FreezeListener]
    _closed: bool

    def listener(self, kind: type[L]) -> L | None:
        """The first listener of class `kind` (a built-in one, or one added with `add_listener`), or `None`."""
        return next((each for each in self.listeners if isinstance(each, kind)), None)

    def add_listener(self, listener: FreezeListener) -> None:
        """
        Notify `listener` of every later freeze event (after the built-in listeners), join its `metrics()` and
        `state_dict()` (where it has them) to the freezer's, and close it with the freezer.

        Args:
            listener (`FreezeListener`): an object with `on_freeze_event(event)` and `close()` methods.

        Raises:
            `ValueError`: `listener` lacks one of those methods, or was added already.
            `RuntimeError`: the freezer is closed.

        Example: see `events.FreezeListener`.
        """
        if not all(callable(getattr(listener, name, None)) for name in ("on_freeze_event", "close")):
            raise ValueError(f"listener must have on_freeze_event(event) and close() methods, got {listener!r}")
        if self._closed:
            raise RuntimeError("add_listener: this LayerFreezer is closed; build a new one")
        if any(listener is known for known in self.listeners):
            raise ValueError(f"listener was added already (it would be notified twice), got {listener!r}")
        self.listeners.append(listener)

    def _notify(self, event: FreezeEvent) -> None:
        for listener in self.listeners:
            listener.on_freeze_event(event)

    @property
    def activation_cache(self) -> ActivationCache | None:
        """The activation cache (`cache_activations=True`), else `None`."""
        return self.listener(ActivationCache)

    @property
    def guard(self) -> RequiresGradGuard:
        """The `requires_grad` guard (`rewrites.RequiresGradGuard`)."""
        return self.listener(RequiresGradGuard)

    @property
    def gradient_norms(self) -> GradientNormTracker | None:
        """The adaptive schedule's gradient-norm tracker (`schedule="adaptive"`), else `None`."""
        return getattr(getattr(self, "schedule", None), "gradient_norms", None)

    @property
    def ddp_model(self) -> DistributedDataParallel | None:
        """The DDP wrapper whose reducer is rebuilt after each freeze, if any."""
        return self.listener(DDPReducerSync).ddp

    def set_ddp_model(self, ddp_model: DistributedDataParallel) -> None:
        """
        Hand over the DDP wrapper of the model (for callers that only hold the unwrapped model, as Trainer
        callbacks do). A freeze that happened before it was known is applied to its reducer now.
        """
        self.listener(DDPReducerSync).set_ddp_model(ddp_model)

    def refreeze(self) -> int:
        """
        Freeze again what this freezer froze and other code made trainable since (PEFT's `disable_adapter()` does on
        exit), warning the first time. The freezer checks this itself before each forward and when backward reaches
        the model's outputs (`rewrites.RequiresGradGuard`); call it where other code may have rewritten
        `requires_grad` in between (the Trainer callback calls it at each step's start).

        Returns:
            `int`: how many parameter tensors were frozen again.
        """
        return self.guard.check()
