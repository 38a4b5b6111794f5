"""`LayerFreezingCallback`: progressive layer freezing for the Hugging Face `Trainer`."""

from __future__ import annotations

import logging
import sys
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, ExportableState

from .compiled import resolve_max_freeze_events
from .freezer import LayerFreezer
from .heads import peft_base_model
from .options import DEFAULT_CACHE_MAX_BYTES, FreezeOptions
from .record import ledger_for
from .schedule import MIN_EPOCH_FREEZES, freezing_epoch_ends, resolve_freeze_every, validate_choice
from .trainer_internals import calling_callback_handler as _calling_callback_handler
from .trainer_internals import calling_trainer, on_train_exception
from .wrappers import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["LayerFreezingCallback"]

FREEZE_EVERY_CHOICES = ("auto", "epoch", "step")

# The callbacks the user gave each Trainer (by its callback handler), recorded at `on_init_end`: with
# `restore_callback_states_from_checkpoint=True` the Trainer replaces them by callbacks rebuilt from the checkpoint,
# and the rebuilt one finds here what the user asked for, to say what changed and to report back to the user's object.
_GIVEN_CALLBACKS: weakref.WeakKeyDictionary[CallbackHandler, list[LayerFreezingCallback]] = weakref.WeakKeyDictionary()


class LayerFreezingCallback(TrainerCallback, ExportableState):
    """
    A [`~transformers.TrainerCallback`] that progressively freezes the earliest units of the model.

    Progress is `state.global_step / state.max_steps`, so it is right whether training is set by epochs or by
    `max_steps`. The first `floor(freeze_fraction(progress) * N)` units are frozen (see `LayerFreezer`): at the end
    of each epoch (the method card's rule) when the run has enough epochs for several freezes, else as soon as the
    schedule asks for one more unit (`freeze_every="auto"`), so fine-tuning runs of 1 to 3 epochs follow the
    schedule too. The schedule follows the planned length (`state.max_steps`): a run stopped early (for instance by
    `EarlyStoppingCallback`) has frozen what the schedule had reached at that step.

    Fine-tuning is the normal case: only parameters that train when training begins are units (PEFT's base weights,
    or an embedding frozen by hand, are not the callback's to freeze or to give back), a LoRA layer's adapters
    freeze together, and the head is found inside PEFT models and inside your own module around a backbone.

    On `trainer.train(resume_from_checkpoint=...)` the freeze in effect when the checkpoint was saved is applied
    again before the first step (the Trainer has loaded the optimizer state by then), so a resumed run ends
    bitwise equal to an uninterrupted one. Under DDP the wrapper is found during the first training forward and
    its gradient buckets are rebuilt after each freeze, so frozen parameters are not all-reduced.

    A freeze holds: what the callback froze and other code made trainable again (PEFT's `disable_adapter()`, which
    TRL's `DPOTrainer` enters at every step with a PEFT model and `ref_model=None`) is frozen again before each step
    and each forward, with a warning the first time (`LayerFreezer.refreeze`).

    The metrics `layer_freeze/fraction`, `layer_freeze/frozen_units` and `layer_freeze/frozen_params` join every
    training log of the Trainer (so TensorBoard, W&B, ... show them). A freeze at an epoch end is logged at its own
    step; freezing by step adds at most one log per `logging_steps` window, so the logs are not flooded.

    Args:
        freeze_start (`float`, *optional*, defaults to 0.5):
            Fraction of training, in [0, 1), after which freezing starts.
        freeze_level (`float`, *optional*, defaults to 1.0):
            Fraction of the units frozen at the end of training, in [0, 1].
        freeze_every (`str`, *optional*, defaults to `"auto"`):
            `"epoch"` to freeze at the end of each epoch (exactly the method card's), `"step"` to freeze as soon as
            the count of units grows, `"auto"`: `"epoch"` when at least 4 epoch ends fall after `freeze_start` and
            before the end of the run (`schedule.resolve_freeze_every`), `"step"` otherwise, and `"step"` when the
            Trainer does not know an epoch's length (a streaming `IterableDataset` trained for `max_steps`).
        order, granularity, budget, freeze_batchnorm, max_freeze_events:
            As in [`LayerFreezer`]: `order` in `("definition", "execution")`, `granularity` in `("module",
            "block")`, `budget` in `("units", "params", "flops")`, `freeze_batchnorm` a bool, `max_freeze_events`
            `None` or a positive integer. With `TrainingArguments(torch_compile=True)` the callback bounds the
            freeze events itself, as `LayerFreezer` does for a compiled model (3 at Dynamo's default limit of 8).
        schedule, check_every, change_threshold:
            As in [`LayerFreezer`]: `schedule="adaptive"` freezes the prefix of units whose gradient norm has settled,
            checked every `check_every` optimizer steps (whatever `freeze_every` says); its history is saved with each
            checkpoint, and the criterion is logged as `layer_freeze/grad_norm_change_*`.
        head (`str` or `list[str]`, *optional*):
            As in [`LayerFreezer`]: names of the head modules, never frozen (by default found by rule).
        cache_activations, cache_max_bytes:
            As in [`LayerFreezer`]: activation caching, off by default; its hit rate and host memory are logged as
            `layer_freeze/cache_hit_rate` and `layer_freeze/cache_bytes`.
        keep_frozen (`bool`, *optional*, defaults to `False`):
            At the end of training the model is given back as it was given: frozen parameters require gradients
            again and are back in the optimizer (`LayerFreezer.unfreeze`), exactly those the callback froze, so a
            second `trainer.train()` trains what the first one was given. `True` leaves them frozen (and the user's:
            a later freezer treats them as frozen by hand). The model is given back on every exit path: when
            `trainer.train()` raises (an interrupt, an error; the callback wraps the Trainer's `train` for this,
            since no `on_train_end` comes), and before an attempt that `auto_find_batch_size` retries.

    Example:

    ```python
    from transformers import Trainer, TrainingArguments
    from hf_layer_freeze import LayerFreezingCallback

    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir="out", num_train_epochs=10),
        train_dataset=train_dataset,
        callbacks=[LayerFreezingCallback(freeze_start=0.5, freeze_level=1.0)],
    )
    trainer.train()
    ```
    """

    def __init__(
        self,
        *,
        freeze_start: float = 0.5,
        freeze_level: float = 1.0,
        freeze_every: str = "auto",
        order: str = "definition",
        granularity: str = "module",
        budget: str = "units",
        freeze_batchnorm: bool = False,
        max_freeze_events: int | None = None,
        keep_frozen: bool = False,
        schedule: str = "linear",
        check_every: int = 20,
        change_threshold: float = 1.0,
        head: str | list[str] | None = None,
        cache_activations: bool = False,
        cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
    ) -> None:
        self.options = FreezeOptions(
            freeze_start=freeze_start,
            freeze_level=freeze_level,
            order=order,
            granularity=granularity,
            budget=budget,
            freeze_batchnorm=freeze_batchnorm,
            max_freeze_events=max_freeze_events,
            schedule=schedule,
            check_every=check_every,
            change_threshold=change_threshold,
            head=head,
            cache_activations=cache_activations,
            cache_max_bytes=cache_max_bytes,
        )
        self.freeze_every = validate_choice("freeze_every", freeze_every, FREEZE_EVERY_CHOICES)
        if not isinstance(keep_frozen, bool):
            raise ValueError(f"keep_frozen must be True or False, got {keep_frozen!r}")
        self.keep_frozen = keep_frozen
        self._frozen_at_end: int | None = None
        self._result_at_end = None  # the freezer's result when training ended, before the hand-back
        self._freezing_by = "epoch" if freeze_every == "epoch" else "step"  # "auto" is decided in on_train_begin
        self._last_forced_log: int | None = None
        self._replaced: list[LayerFreezingCallback] = []  # the user's callbacks this one stands in for
        self.freezer: LayerFreezer | None = None
        # The count a checkpoint recorded, set by the Trainer when `restore_callback_states_from_checkpoint=True`
        # rebuilds this callback from the checkpoint's state; otherwise read from `state.stateful_callbacks`.
        self.saved_frozen_units: int | None = None
        # schedule="adaptive": the gradient-norm history a checkpoint recorded (set like `saved_frozen_units`).
        self.saved_gradient_norms: dict[str, Any] | None = None

    @property
    def freeze_start(self) -> float:
        return self.options.freeze_start

    @property
    def freeze_level(self) -> float:
        return self.options.freeze_level

    # ExportableState: saved into trainer_state.json with each checkpoint.
    def state(self) -> dict[str, Any]:
        return {
            "args": {**self.options.to_dict(), "freeze_every": self.freeze_every, "keep_frozen": self.keep_frozen},
            "attributes": {"saved_frozen_units": self.frozen_units, "saved_gradient_norms": self._gradient_norms()},
        }

    def _gradient_norms(self) -> dict[str, Any] | None:
        if self.freezer is not None and self.freezer.gradient_norms is not None:
            return self.freezer.gradient_norms.state_dict()
        return self.saved_gradient_norms

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        handler = self._run_before_other_callbacks()
        if handler is not None:
            _GIVEN_CALLBACKS.setdefault(handler, []).append(self)
        trainer = calling_trainer(self)
        if trainer is not None:  # no on_train_end comes when train() raises: give the model back then too
            on_train_exception(trainer, self._end_after_exception)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs,
    ):
        handler = self._run_before_other_callbacks()
        if model is None or optimizer is None:
            raise ValueError("LayerFreezingCallback needs the Trainer's model and optimizer in on_train_begin")
        if self.freezer is not None and not self.freezer.closed:
            # An attempt that never reached on_train_end: auto_find_batch_size retrying after an out-of-memory error
            # (inside the same train() call), or a train() whose exception this callback could not see.
            logger.warning(
                "LayerFreezingCallback: the previous training attempt did not end (auto_find_batch_size retried it, "
                "or it raised); gave back the %d units it froze before starting again.",
                self.freezer.frozen_units,
            )
            self.freezer.unfreeze()
            self.freezer.close()
        self._frozen_at_end = None
        if state.global_step > 0:  # a resume starts from its checkpoint's freeze, not from what a run kept frozen
            kept = ledger_for(peft_base_model(unwrap_model(model))).give_back_kept()
            if kept:
                logger.warning(
                    "LayerFreezingCallback: resuming from a checkpoint; gave back the %d parameter tensors an earlier "
                    "run in this process left frozen (keep_frozen=True), so the checkpoint's freeze is applied to the "
                    "model as it was given.",
                    len(kept),
                )
        options = self.options.to_dict()
        if args.torch_compile:  # the Trainer compiles the model after handing it to callbacks: bound the recompiles
            options["max_freeze_events"] = resolve_max_freeze_events(
                model, self.options.max_freeze_events, compiled=True
            )
        self.freezer = LayerFreezer(model, optimizer, **options)
        logger.info("LayerFreezingCallback options in force: %s", _format_options(self.state()["args"]))
        self._report_replaced_callbacks(handler)
        self._freezing_by = resolve_freeze_every(self.freeze_every, _planned_epochs(state), self.freeze_start)
        self._last_forced_log = None
        if self.freeze_every == "auto" and self.options.schedule == "linear":
            logger.info(
                "freeze_every='auto': freezing by %s (%s epoch(s) of %d steps).",
                self._freezing_by,
                _planned_epochs(state) or "an unknown number of",
                state.max_steps,
            )
        self._warn_if_epochs_are_too_coarse(state)
        # Resume: the Trainer loaded the optimizer state before this event; re-apply the freeze in force then.
        if state.global_step > 0:
            self._warn_if_options_changed_since_checkpoint(state)
        at_resume = self._units_at_resume(state)
        if at_resume > self.freezer.num_units:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint froze {at_resume} units, but this model has "
                f"{self.freezer.num_units} freezable units now (parameters frozen since, outside "
                "LayerFreezingCallback, are not its units): resume on the model as it was given when that run began"
            )
        self.freezer.freeze_units(at_resume)
        if self.freezer.gradient_norms is not None and state.global_step > 0:
            saved = self._saved_attribute(state, "saved_gradient_norms")
            if saved is not None:  # the adaptive schedule's history: the next check compares as it would have
                self.freezer.gradient_norms.load_state_dict(saved)
        for given in self._replaced:
            given.freezer = self.freezer

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._end("Training ended")

    def _end_after_exception(self, exception: BaseException) -> None:
        # training did not end: whatever keep_frozen says, the model is given back as it was given (a resume in
        # this process then starts from its checkpoint's freeze, exactly as on a fresh model)
        self._end(f"trainer.train() raised {type(exception).__name__}", give_back=True)

    def _end(self, how: str, give_back: bool = False) -> None:
        """Record what training ended with, give the model back (unless `keep_frozen`), release every hook."""
        if self.freezer is None or self.freezer.closed:
            return
        self._frozen_at_end = self.frozen_units
        self._result_at_end = self.freezer.result()  # what training ended with, before the hand-back
        for given in self._replaced:
            given._frozen_at_end, given._result_at_end = self._frozen_at_end, self._result_at_end
        if give_back or not self.keep_frozen:
            self.freezer.unfreeze()
            logger.info(
                "%s with %d units frozen; gave them back. Parameters frozen before training stay frozen.",
                how,
                self._frozen_at_end,
            )
        self.freezer.close()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.freezer is not None and not self.freezer.closed:
            self.freezer.refreeze()  # other code (PEFT's disable_adapter()) may have made frozen tensors trainable

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The step that completes an epoch (the Trainer's `state.epoch` is then whole) freezes here rather than in
        # on_epoch_end, which comes after this step's log and checkpoint: the log at this step shows the freeze
        # (the Trainer drops a second log at the same step) and the checkpoint holds it.
        adaptive = self.options.schedule == "adaptive"  # checks every `check_every` steps, whatever the epochs
        at_epoch_end = state.epoch is not None and float(state.epoch).is_integer()
        if adaptive or self._freezing_by == "step" or at_epoch_end:
            self._update(state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._update(state, control)

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs):
        if logs is None or self.freezer is None or not any(k in logs for k in ("loss", "train_loss")):
            return
        metrics = self.metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    @property
    def frozen_units(self) -> int:
        """
        Units frozen so far, counting a freeze that waits for the first forward pass (what a checkpoint keeps); after
        training, the units that were frozen when it ended (even if they were unfrozen since).
        """
        if self._frozen_at_end is not None:
            return self._frozen_at_end
        return 0 if self.freezer is None else self.freezer.record.saved_units

    def metrics(self) -> dict[str, float]:
        """The values this callback logs, under the `layer_freeze/` namespace (`LayerFreezer.metrics()`)."""
        if self.freezer is None:
            return {}
        metrics = self.freezer.metrics()
        if self._frozen_at_end is not None:  # after training: what it ended with, not what the hand-back left
            metrics["layer_freeze/fraction"] = self._result_at_end.fraction
            metrics["layer_freeze/frozen_units"] = self._frozen_at_end
            metrics["layer_freeze/frozen_params"] = self._result_at_end.frozen_params
        return metrics

    def _update(self, state: TrainerState, control: TrainerControl) -> None:
        if self.freezer is None:
            raise RuntimeError("LayerFreezingCallback got a step before on_train_begin")
        if state.global_step >= state.max_steps:
            return  # after the last step a freeze saves nothing: the model ends as it trained
        result = self.freezer.update(self._progress(state))
        if not result.changed:
            return
        # A freeze is logged at its own step; by step, at most once per logging window (no flood of logs).
        window = max(1, int(state.logging_steps or 1))
        if (
            self._freezing_by == "epoch"
            or self._last_forced_log is None
            or (state.global_step - self._last_forced_log >= window)
        ):
            control.should_log = True
            self._last_forced_log = state.global_step

    def _warn_if_epochs_are_too_coarse(self, state: TrainerState) -> None:
        """With `freeze_every="epoch"` asked for, a run of few epochs freezes at few epoch ends, or at none (a
        `max_steps` shorter than an epoch): say so before training, with the next step. ("auto" chose for itself.)"""
        epochs = _planned_epochs(state)
        adaptive = self.options.schedule == "adaptive"
        if adaptive or self.freeze_every != "epoch" or self.options.freeze_level == 0:
            return
        if epochs is None:
            warnings.warn(
                "LayerFreezingCallback(freeze_every='epoch'): the Trainer does not know how long an epoch is (the "
                f"training dataset has no __len__, e.g. a streaming IterableDataset, trained for max_steps="
                f"{state.max_steps}), so it freezes only where a pass over the data ends, and a stream that lasts "
                "the whole run freezes nothing. Use freeze_every='step' (or 'auto', which chooses it here) to follow "
                "the schedule by step.",
                stacklevel=2,
            )
            return
        ends = freezing_epoch_ends(epochs, self.options.freeze_start)
        if ends < 2:
            warnings.warn(
                f"LayerFreezingCallback(freeze_every='epoch') in a run of {epochs} epoch(s) and {state.max_steps} "
                f"steps freezes at {ends} epoch end(s) before training ends (a freeze after the last step saves "
                "nothing and is not made). Use freeze_every='auto' (by step below "
                f"{MIN_EPOCH_FREEZES} freezing epoch ends) or 'step' to follow the schedule within epochs.",
                stacklevel=2,
            )

    @staticmethod
    def _progress(state: TrainerState) -> float:
        if not state.max_steps or state.max_steps <= 0:
            raise ValueError(f"state.max_steps must be positive to compute training progress, got {state.max_steps}")
        return min(1.0, state.global_step / state.max_steps)

    def _units_at_resume(self, state: TrainerState) -> int:
        """How many units were frozen at the step training (re)starts from."""
        if state.global_step == 0:
            return 0
        saved = self._saved_attribute(state, "saved_frozen_units")
        units = None if saved is None else int(saved)
        if self.options.schedule == "adaptive":  # no schedule to recompute: only the checkpoint knows
            return units or 0
        if self.options.budget == "flops" and not self.freezer.profiled:
            from_schedule = 0  # FLOPs are counted on the first batch: only the saved count can tell
        else:
            from_schedule = self.freezer.num_units_at(self._progress(state))
        if units is None:
            # A checkpoint saved without this callback: the schedule is the best guess.
            return from_schedule
        if self._freezing_by == "step":
            return max(units, from_schedule)
        # A checkpoint saved at an epoch's last step may precede that epoch's on_epoch_end; resumption will not
        # run it, so apply what it would have frozen.
        at_epoch_end = state.epoch is not None and float(state.epoch).is_integer()
        return max(units, from_schedule) if at_epoch_end else units

    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        """What this callback saved in the checkpoint's `trainer_state.json` (its `state()`), if anything."""
        saved = state.stateful_callbacks.get(type(self).__name__) if state.stateful_callbacks else None
        if isinstance(saved, list):  # several callbacks of this class: take ours by its arguments
            saved = next((s for s in saved if s.get("args") == self.state()["args"]), None)
        return saved or None

    def _saved_attribute(self, state: TrainerState, name: str) -> Any:
        """
        An attribute of `state()` the checkpoint holds: set on this callback by the Trainer when
        `restore_callback_states_from_checkpoint=True` rebuilt it, otherwise read from `trainer_state.json`; `None`
        when the checkpoint has none.
        """
        value = getattr(self, name)
        if value is None:
            saved = self._saved_state(state)
            value = saved.get("attributes", {}).get(name) if saved else None
        return value

    def _warn_if_options_changed_since_checkpoint(self, state: TrainerState) -> None:
        """A run resumed with other options than its checkpoint's continues with the new ones: say which, by name."""
        saved = self._saved_state(state)
        if saved is None or not isinstance(saved.get("args"), dict):
            return
        changed = _changed_options(given=self.state()["args"], other=saved["args"])
        if changed:
            warnings.warn(
                f"Resuming with LayerFreezingCallback options that differ from the checkpoint's: {changed} "
                "(checkpoint's value in brackets). The options given now are in force from here on; the units "
                "frozen at the checkpoint stay frozen (freezing never unfreezes).",
                stacklevel=2,
            )

    def _report_replaced_callbacks(self, handler: CallbackHandler | None) -> None:
        """
        With `restore_callback_states_from_checkpoint=True` the Trainer swaps the user's callback for this one, built
        from the checkpoint's options. Say so, naming each option that differs from what the user gave, and let the
        user's object report what training did (`frozen_units`, `freezer`).
        """
        if handler is None:
            return
        given = [cb for cb in _GIVEN_CALLBACKS.get(handler, []) if cb is not self and cb not in handler.callbacks]
        if not given or self in _GIVEN_CALLBACKS.get(handler, []):
            return
        self._replaced = given[:1]
        _GIVEN_CALLBACKS[handler] = [cb for cb in _GIVEN_CALLBACKS[handler] if cb is not given[0]] + [self]
        changed = _changed_options(given=self.state()["args"], other=given[0].state()["args"], other_name="given")
        if changed:
            warnings.warn(
                "restore_callback_states_from_checkpoint=True: the Trainer replaced your LayerFreezingCallback by one "
                f"rebuilt from the checkpoint, whose options are in force: {changed} (the value you gave in "
                "brackets). To train with your options, resume without restore_callback_states_from_checkpoint.",
                stacklevel=2,
            )

    def _run_before_other_callbacks(self) -> CallbackHandler | None:
        """
        Move this callback to the front of the Trainer's callback list, so that reporting integrations
        (TensorBoard, W&B, ...), which the Trainer puts before user callbacks, see the `layer_freeze/` metrics
        this callback adds to each log.
        """
        handler = _calling_callback_handler(self)
        if handler is None:
            warnings.warn(
                "LayerFreezingCallback could not find the Trainer's callback handler; reporting callbacks listed "
                "before it will not see the layer_freeze/ metrics.",
                stacklevel=2,
            )
        elif handler.callbacks[0] is not self:
            # A new list: the handler is iterating over the old one right now.
            handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
        return handler


def _planned_epochs(state: TrainerState) -> int | None:
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


def _format_options(options: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in options.items())


def _changed_options(given: dict[str, Any], other: dict[str, Any], other_name: str = "checkpoint") -> str:
    """`"name=value [other value], ..."` for each option whose value differs, or `""`."""
    names = [name for name in given if name in other and given[name] != other[name]]
    return ", ".join(f"{name}={given[name]!r} [{other_name}: {other[name]!r}]" for name in names)
