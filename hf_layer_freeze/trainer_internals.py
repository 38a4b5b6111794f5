"""The `Trainer` internals the callback touches, in one place.

The Trainer hands callbacks no public route to its callback handler nor to itself, and tells them nothing when
`train()` raises (an interrupt, an error in a step, an out-of-memory error that `auto_find_batch_size` does not catch):
no `on_train_end` comes. So this file finds the handler and the Trainer among the callers' frames (the one place that
looks at frames; `tests/test_callback.py` fails loudly if a transformers release changes how events are called), and
wraps the Trainer instance's `train` so that the model is given back on every exit path, as Accelerate wraps an
optimizer's `step` for its GradScaler.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler

__all__ = ["calling_callback_handler", "calling_trainer", "on_train_exception"]


def _calling_self(callback: TrainerCallback, kind: type, max_depth: int) -> Any:
    """The nearest caller's `self` of type `kind` whose callback handler holds `callback`, or `None`."""
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth + 2):  # this function's frame and its caller's come first
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if not isinstance(candidate, kind):
                continue
            is_handler = isinstance(candidate, CallbackHandler)
            handler = candidate if is_handler else getattr(candidate, "callback_handler", None)
            if handler is not None and any(cb is callback for cb in handler.callbacks):
                return candidate
        return None
    finally:
        del frame


def calling_callback_handler(callback: TrainerCallback, max_depth: int = 4) -> CallbackHandler | None:
    """The Trainer's `CallbackHandler` that is calling an event of `callback` right now (its `call_event` is among
    the callers' frames), or `None`."""
    return _calling_self(callback, CallbackHandler, max_depth)


def calling_trainer(callback: TrainerCallback, max_depth: int = 6) -> Trainer | None:
    """The `Trainer` whose callback handler is calling an event of `callback` right now, or `None`."""
    return _calling_self(callback, Trainer, max_depth)


def on_train_exception(trainer: Trainer, handle: Callable[[BaseException], None]) -> None:
    """
    Call `handle(exception)` whenever `trainer.train()` raises, before the exception goes on to the caller. Wraps the
    instance's `train` once per handler (a second wrap by the same handler is a no-op).
    """
    train = trainer.train
    handlers = getattr(train, "_layer_freeze_exception_handlers", None)
    if handlers is not None:
        if handle not in handlers:
            handlers.append(handle)
        return
    handlers = [handle]

    @functools.wraps(train)
    def train_giving_back_on_exception(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        except BaseException as exception:
            for each in list(handlers):
                each(exception)
            raise

    train_giving_back_on_exception._layer_freeze_exception_handlers = handlers
    trainer.train = train_giving_back_on_exception
