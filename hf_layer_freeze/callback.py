"""`LayerFreezingCallback`: progressive layer freezing for the Hugging Face `Trainer`.

The Trainer glue, thin: it reads progress from the Trainer, decides when to call the freezer's `update`, logs, and
delegates the rest: resuming from a checkpoint to `trainer_resume.py`, every Trainer internal it must touch to
`trainer_internals.py`, and what is frozen to the freezer, which it asks.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .compiled import resolve_max_freeze_events
from .freezer import FreezeResult, LayerFreezer
from .options import CallbackOptions, CallbackOptionsKwargs, Unpack, document_options
from .schedule import coarse_epochs_warning, progress_at_step, resolve_freeze_every, updates_at_step
from .trainer_internals import attach_to_trainer, planned_epochs, replaced_callbacks
from .trainer_resume import give_back_kept_frozen, resume_freeze
from .wrappers import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["LayerFreezingCallback"]


@document_options(CallbackOptions)
class LayerFreezingCallback(TrainerCallback, ExportableState):
    """
    A [`~transformers.TrainerCallback`] that progressively freezes the earliest units of the model.

    Progress is `state.global_step / state.max_steps`, so it is right whether training is set by epochs or by
    `max_steps`. The first `floor(freeze_fraction(progress) * N)` units are frozen (see `LayerFreezer`): at the end
    of each epoch (the method card's rule) when the run has enough epochs for several freezes, else as soon as the
    schedule asks for one more unit (`freeze_every="auto"`), so fine-tuning runs of 1 to 3 epochs follow the
    schedule too. The schedule follows the planned length (`state.max_steps`): a run stopped early (for instance by
    `EarlyStoppingCallback`) has frozen what the schedule had reached at that step. What the schedule freezes from the
    first step (`freeze_start=0` with `freeze_start_level > 0`: a static prefix, or a ramp from it) is frozen at
    `on_train_begin`, before the first optimizer step.

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

    The options (below) are `LayerFreezer`'s and the callback's own `freeze_every` and `keep_frozen`. With
    `TrainingArguments(torch_compile=True)` the callback bounds the freeze events itself, as `LayerFreezer` does for a
    compiled model (3 at Dynamo's default limit of 8). `schedule="adaptive"` checks every `check_every` optimizer steps
    whatever `freeze_every` says, and its history is saved with each checkpoint. The adaptive criterion is logged as
    `layer_freeze/grad_norm_change_*`; activation caching's as `layer_freeze/cache_hit_rate` (batches served whole),
    `layer_freeze/cache_rows_served`, `layer_freeze/cache_row_hit_rate`, `layer_freeze/cache_forward_flops_skipped`
    and `layer_freeze/cache_bytes` (host memory); the bytes of gradients and optimizer state as
    `layer_freeze/grad_bytes`, `layer_freeze/optimizer_state_bytes` and `layer_freeze/offloaded_state_bytes`
    (`offload_frozen_state=True`).

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

    def __init__(self, **options: Unpack[CallbackOptionsKwargs]) -> None:
        given = CallbackOptions.from_kwargs(**options)
        self.options = given.freeze_options()
        freeze_every, keep_frozen = given.freeze_every, given.keep_frozen
        self.freeze_every = freeze_every
        self.keep_frozen = keep_frozen
        # The one snapshot of what is frozen: what training ended with, which must outlive the hand-back (the freezer
        # then holds nothing frozen). While training, the freezer is asked.
        self._result_at_end: FreezeResult | None = None
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
        # run first; no on_train_end comes when train() raises: give the model back then too
        attach_to_trainer(self, on_exception=self._end_after_exception)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs,
    ):
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
        self._result_at_end = None
        give_back_kept_frozen(unwrap_model(model), state)  # a resume starts from its checkpoint's freeze
        options = self.options.to_dict()
        if args.torch_compile:  # the Trainer compiles the model after handing it to callbacks: bound the recompiles
            options["max_freeze_events"] = resolve_max_freeze_events(
                model, self.options.max_freeze_events, compiled=True
            )
        self.freezer = LayerFreezer(model, optimizer, **options)
        logger.info("LayerFreezingCallback options in force: %s", _format_options(self.state()["args"]))
        self._replaced = replaced_callbacks(self)
        epochs = planned_epochs(state)
        start_level = self.options.freeze_start_level
        self._freezing_by = resolve_freeze_every(self.freeze_every, epochs, self.freeze_start, start_level)
        self._last_forced_log = None
        if self.freeze_every == "auto" and not self.freezer.schedule.acts_every_step:
            logger.info(
                "freeze_every='auto': freezing by %s (%s epoch(s) of %d steps).",
                self._freezing_by,
                epochs or "an unknown number of",
                state.max_steps,
            )
        if not self.freezer.schedule.acts_every_step:  # the adaptive schedule checks every `check_every` steps
            coarse = coarse_epochs_warning(
                self.freeze_every, epochs, state.max_steps, self.freeze_start, self.freeze_level, start_level
            )
            if coarse is not None:
                warnings.warn(coarse, stacklevel=1)
        # Resume: the Trainer loaded the optimizer state before this event; re-apply the freeze in force then.
        resume_freeze(self, self.freezer, state, self._progress(state), self._freezing_by)
        if state.global_step == 0:  # a fresh run: what the schedule freezes from the first step, before it
            self.freezer.update(0.0)
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
        self._result_at_end = self.freezer.result()  # what training ended with, before the hand-back
        for given in self._replaced:
            given._result_at_end = self._result_at_end
        if give_back or not self.keep_frozen:
            self.freezer.unfreeze()
            logger.info(
                "%s with %d units frozen; gave them back. Parameters frozen before training stay frozen.",
                how,
                self._result_at_end.frozen_units,
            )
        self.freezer.close()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.freezer is not None and not self.freezer.closed:
            self.freezer.refreeze()  # other code (PEFT's disable_adapter()) may have made frozen tensors trainable

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The step that completes an epoch (the Trainer's `state.epoch` is then whole) freezes here rather than in
        # on_epoch_end, which comes after this step's log and checkpoint: the log at this step shows the freeze
        # (the Trainer drops a second log at the same step) and the checkpoint holds it.
        # When to update is `schedule.updates_at_step`, the one rule `plan` simulates too.
        every_step = self.freezer.schedule.acts_every_step  # the adaptive schedule: every `check_every` steps
        at_epoch_end = state.epoch is not None and float(state.epoch).is_integer()
        by = {"freezing_by": self._freezing_by, "epoch_ended": at_epoch_end, "every_step": every_step}
        if updates_at_step(state.global_step, state.max_steps, **by):
            self._update(state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if updates_at_step(state.global_step, state.max_steps, freezing_by=self._freezing_by, epoch_ended=True):
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
        if self._result_at_end is not None:
            return self._result_at_end.frozen_units
        return 0 if self.freezer is None else self.freezer.record.saved_units

    def metrics(self) -> dict[str, float]:
        """The values this callback logs, under the `layer_freeze/` namespace (`LayerFreezer.metrics()`)."""
        if self.freezer is None:
            return {}
        metrics = self.freezer.metrics()
        if self._result_at_end is not None:  # after training: what it ended with, not what the hand-back left
            metrics["layer_freeze/fraction"] = self._result_at_end.fraction
            metrics["layer_freeze/frozen_units"] = self._result_at_end.frozen_units
            metrics["layer_freeze/frozen_params"] = self._result_at_end.frozen_params
        return metrics

    def _update(self, state: TrainerState, control: TrainerControl) -> None:
        if self.freezer is None:
            raise RuntimeError("LayerFreezingCallback got a step before on_train_begin")
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

    @staticmethod
    def _progress(state: TrainerState) -> float:
        return progress_at_step(state.global_step, state.max_steps)


def _format_options(options: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in options.items())
