"""The `Trainer` internals the callback touches, in one place.

The Trainer hands callbacks no public route to its callback handler nor to itself, and tells them nothing when
`train()` raises (an interrupt, an error in a step, an out-of-memory error that `auto_find_batch_size` does not catch):
no `on_train_end` comes. So this file finds the handler and the Trainer among the callers' frames (the one place that
looks at frames; `tests/test_callback.py` fails loudly if a transformers release changes how events are called), and
wraps the Trainer instance's `train` so that the model is given back on every exit path, as Accelerate wraps an
optimizer's `step` for its GradScaler.

It also keeps what the callback must know of the Trainer's bookkeeping: the order of its callback list (this callback
runs first, so reporting integrations see its metrics), the callbacks the user gave each Trainer (with
`restore_callback_states_from_checkpoint=True` the Trainer swaps them for callbacks rebuilt from the checkpoint), and
the `sys.maxsize` epochs the Trainer plans for a dataloader without a length. Each is tested in
`tests/test_callback.py` or `tests/test_streaming.py`, so a transformers release that changes one fails there by name.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_callback import CallbackHandler

from .trainer_resume import changed_options

__all__ = [
    "attach_to_trainer",
    "calling_callback_handler",
    "calling_trainer",
    "on_train_exception",
    "planned_epochs",
    "replaced_callbacks",
    "run_first",
]

# The callbacks the user gave each Trainer (by its callback handler), recorded at `on_init_end`: with
# `restore_callback_states_from_checkpoint=True` the Trainer replaces them by callbacks rebuilt from the checkpoint,
# and the rebuilt one finds here what the user asked for, to say what changed and to report back to the user's object.
_GIVEN_CALLBACKS: weakref.WeakKeyDictionary[CallbackHandler, list[TrainerCallback]] = weakref.WeakKeyDictionary()


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


def run_first(callback: TrainerCallback) -> CallbackHandler | None:
    """
    Move `callback` to the front of the Trainer's callback list, so that reporting integrations (TensorBoard, W&B,
    ...), which the Trainer puts before user callbacks, see the `layer_freeze/` metrics it adds to each log. Returns
    the handler calling `callback` now, or `None` (with a warning) when none is found.
    """
    handler = calling_callback_handler(callback, max_depth=5)
    if handler is None:
        warnings.warn(
            "LayerFreezingCallback could not find the Trainer's callback handler; reporting callbacks listed "
            "before it will not see the layer_freeze/ metrics.",
            stacklevel=3,
        )
    elif handler.callbacks[0] is not callback:
        # A new list: the handler is iterating over the old one right now.
        handler.callbacks = [callback] + [cb for cb in handler.callbacks if cb is not callback]
    return handler


def attach_to_trainer(callback: TrainerCallback, on_exception: Callable[[BaseException], None]) -> None:
    """
    At `on_init_end`: run `callback` first, remember it as one the user gave this Trainer, and have
    `on_exception(exception)` called when `trainer.train()` raises (no `on_train_end` comes then).
    """
    handler = run_first(callback)
    if handler is not None:
        _GIVEN_CALLBACKS.setdefault(handler, []).append(callback)
    trainer = calling_trainer(callback, max_depth=7)
    if trainer is not None:
        on_train_exception(trainer, on_exception)


def replaced_callbacks(callback: TrainerCallback) -> list[TrainerCallback]:
    """
    At `on_train_begin`: run `callback` first and, when `restore_callback_states_from_checkpoint=True` made the
    Trainer swap the user's callback for `callback` (built from the checkpoint's options), return the user's (so it
    can report what training did: `frozen_units`, `freezer`), warning with each option that differs from what the
    user gave. Empty otherwise.
    """
    handler = run_first(callback)
    if handler is None:
        return []
    given = [cb for cb in _GIVEN_CALLBACKS.get(handler, []) if cb is not callback and cb not in handler.callbacks]
    if not given or callback in _GIVEN_CALLBACKS.get(handler, []):
        return []
    _GIVEN_CALLBACKS[handler] = [cb for cb in _GIVEN_CALLBACKS[handler] if cb is not given[0]] + [callback]
    changed = changed_options(given=callback.state()["args"], other=given[0].state()["args"], other_name="given")
    if changed:
        warnings.warn(
            "restore_callback_states_from_checkpoint=True: the Trainer replaced your LayerFreezingCallback by one "
            f"rebuilt from the checkpoint, whose options are in force: {changed} (the value you gave in "
            "brackets). To train with your options, resume without restore_callback_states_from_checkpoint.",
            stacklevel=2,
        )
    return given[:1]


def planned_epochs(state: TrainerState) -> int | None:
    """
    The run's length in epochs, or `None` when the Trainer does not know it: for a training dataloader without a
    length (a streaming `IterableDataset`) trained for `max_steps`, the Trainer sets `num_train_epochs` to
    `sys.maxsize` and repeats the data until `max_steps` (`Trainer.set_initial_training_values`), so that count is
    no plan to freeze by.
    """
    epochs = state.num_train_epochs
    if not epochs or epochs >= sys.maxsize:
        return None
    return epochs
