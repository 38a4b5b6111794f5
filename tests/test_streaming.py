"""Streaming data: a training dataset without `__len__` (a `torch.utils.data.IterableDataset`) trained for
`max_steps`. The Trainer then knows no epoch length (it sets `num_train_epochs` to `sys.maxsize`); the callback reaches
the first step, freezes by step on schedule, and says by name what `freeze_every="epoch"` would do."""

from __future__ import annotations

import pytest
import torch
from helpers import RandomImages, StepWatch
from transformers import (
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)

from hf_layer_freeze import LayerFreezingCallback, freezable_units, freeze_fraction, num_units_to_freeze
from hf_layer_freeze.trainer_internals import planned_epochs

MAX_STEPS, BATCH = 12, 8


class Stream(torch.utils.data.IterableDataset):
    """The examples of `RandomImages(examples)` in order, with no length: once per pass (each `iter()`, a Trainer
    epoch), or endlessly."""

    def __init__(self, examples: int = 64, endless: bool = True) -> None:
        self.images = RandomImages(examples)
        self.endless = endless

    def __iter__(self):
        yield from (self.images[i] for i in range(len(self.images)))
        while self.endless:
            yield from (self.images[i] for i in range(len(self.images)))


class FrozenUnits(TrainerCallback):
    """The units frozen after each optimizer step, read from `requires_grad` (list it after the freezing callback)."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.units = freezable_units(model)  # before anything is frozen
        self.num_train_epochs = state.num_train_epochs

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.counts.append(sum(not any(p.requires_grad for p in unit.parameters) for unit in self.units))


def _trainer(tmp_path, dataset, callbacks) -> Trainer:
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=10))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=MAX_STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)


@pytest.mark.timeout(300)  # before the fix, on_train_begin counted sys.maxsize epoch ends one by one: a hang
@pytest.mark.parametrize(
    "endless",
    [True, False],  # an endless stream (the whole run is one Trainer epoch), and passes of 24 examples (3 steps each)
    ids=["endless-stream", "stream-of-3-step-passes"],
)
def test_a_streaming_dataset_with_max_steps_freezes_by_step_on_schedule(tmp_path, endless):
    callback = LayerFreezingCallback(freeze_start=0.25, freeze_level=1.0)  # freeze_every="auto", the default
    units, watch = FrozenUnits(), StepWatch()
    dataset = Stream(64 if endless else 3 * BATCH, endless)
    trainer = _trainer(tmp_path, dataset, [callback, units, watch])
    trainer.train()
    assert units.num_train_epochs > 10**18  # what the Trainer sets when it knows no epoch length
    # the one reader of that sentinel (trainer_internals): a release that plans streams another way fails here
    assert planned_epochs(TrainerState(num_train_epochs=units.num_train_epochs)) is None
    num_units = len(units.units)
    # ground truth by integer arithmetic: the linear schedule at step s of 12; no freeze after the last step
    expected = [num_units_to_freeze(freeze_fraction(s / MAX_STEPS, 0.25, 1.0), num_units) for s in range(1, MAX_STEPS)]
    assert units.counts == [*expected, expected[-1]]
    assert len(set(units.counts)) >= 8  # by step: the count grows within the run's one (or each 3-step) epoch
    assert callback.frozen_units == expected[-1] > 0
    assert watch.trained_exactly_the_unfrozen()  # every still-trainable tensor changed, no frozen one did
    assert all(p.requires_grad for p in trainer.model.parameters())  # given back as given (keep_frozen=False)


@pytest.mark.timeout(300)  # before the fix, the coarse-epoch warning counted sys.maxsize epoch ends: a hang
def test_freeze_every_epoch_on_a_stream_warns_by_name_with_the_next_step(tmp_path):
    callback = LayerFreezingCallback(freeze_start=0.25, freeze_every="epoch")
    units = FrozenUnits()
    trainer = _trainer(tmp_path, Stream(), [callback, units])
    with pytest.warns(UserWarning, match=r"freeze_every='epoch'.*does not know how long an epoch is.*max_steps=12.*"
                                         r"Use freeze_every='step' \(or 'auto'"):  # fmt: skip
        trainer.train()
    # what the warning says: the endless stream is one epoch, which ends at the last step, after which nothing freezes
    assert units.counts == [0] * MAX_STEPS and callback.frozen_units == 0
