"""The Trainer glue: schedule through real `Trainer.train()` runs, logging, and checkpoint/resume equality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import RandomImages, RandomTokenDataset
from transformers import (
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_layer_freeze import LayerFreezingCallback, freezable_units

NUM_UNITS = 28  # resnet10t


def _model(seed: int = 0) -> TimmWrapperForImageClassification:
    torch.manual_seed(seed)
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=10))


class EventRecorder(TrainerCallback):
    """Records the frozen-unit count at each event, and every log it is shown."""

    def __init__(self):
        self.epoch_ends: list[tuple[int, int]] = []
        self.logs: list[dict] = []
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.units = freezable_units(model)  # before anything is frozen: units are what trains now

    def _frozen(self, model) -> int:
        return sum(1 for u in self.units if not any(p.requires_grad for p in u.parameters))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.epoch_ends.append((state.global_step, self._frozen(model)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _args(tmp_path: Path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        num_train_epochs=4,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        weight_decay=0.05,
        use_cpu=True,
        report_to=[],
        logging_steps=2,
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


def test_trainer_freezes_at_each_epoch_end_on_schedule(tmp_path):
    recorder = EventRecorder()  # listed first, like the Trainer's own reporting integrations
    callback = LayerFreezingCallback(freeze_start=0.25, freeze_level=1.0, freeze_every="epoch")
    trainer = Trainer(
        model=_model(), args=_args(tmp_path), train_dataset=RandomImages(64), callbacks=[recorder, callback]
    )
    trainer.train()
    steps_per_epoch = 4
    expected = [(e * steps_per_epoch, callback.freezer.num_units_at(e * steps_per_epoch / 16)) for e in range(1, 4)]
    expected.append((16, expected[-1][1]))  # after the last step a freeze would save nothing: none is made
    assert recorder.epoch_ends == expected
    assert [n for _, n in expected] == [0, 9, 18, 18]
    assert callback.frozen_units == 18
    assert all(p.requires_grad for p in trainer.model.timm_model.get_classifier().parameters())
    # the metrics reach callbacks listed before this one (TensorBoard, W&B, ...) and the log history
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert train_logs and all("layer_freeze/frozen_units" in log for log in train_logs)
    assert {log["layer_freeze/frozen_units"] for log in train_logs} >= {0, 9, 18}
    assert train_logs[-1]["layer_freeze/fraction"] == pytest.approx(2 / 3)
    history = [log for log in trainer.state.log_history if "loss" in log]
    assert all(isinstance(log["layer_freeze/frozen_params"], int) for log in history)


def test_freeze_every_step_follows_the_schedule_within_epochs(tmp_path):
    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.counts = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.counts.append(callback.frozen_units)

    callback = LayerFreezingCallback(freeze_start=0.0, freeze_level=1.0, freeze_every="step")
    recorder = StepRecorder()
    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path, num_train_epochs=2),
        train_dataset=RandomImages(64),
        callbacks=[callback, recorder],
    )
    trainer.train()
    expected = [callback.freezer.num_units_at(s / 8) for s in range(1, 8)]
    assert recorder.counts == [*expected, expected[-1]]  # no freeze after the last step: it would save nothing
    assert len(set(recorder.counts)) == 7  # grows at every step, not only at the 2 epoch ends


def test_max_steps_progress_uses_global_step_over_max_steps(tmp_path):
    recorder = EventRecorder()
    callback = LayerFreezingCallback(freeze_every="epoch", freeze_start=0.5)
    # 6 steps with 4 per epoch: epochs end at steps 4 and 6 (the second one early, at max_steps)
    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path, max_steps=6),
        train_dataset=RandomImages(64),
        callbacks=[recorder, callback],
    )
    trainer.train()
    # the second epoch end is after the last step: no freeze there, the model ends as it trained
    assert recorder.epoch_ends == [
        (4, callback.freezer.num_units_at(4 / 6)),
        (6, callback.freezer.num_units_at(4 / 6)),
    ]


def _train_state(trainer: Trainer):
    tensors = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    saved = trainer.optimizer.state_dict()
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).clone()
    return tensors, saved["param_groups"]


RESUME_CASES = {
    # name: (TrainingArguments overrides, callback kwargs, checkpoint step to resume from)
    "epochs": (dict(num_train_epochs=4, save_strategy="epoch"), dict(freeze_start=0.25), 8),
    "max_steps-mid-epoch": (dict(max_steps=14, save_strategy="steps", save_steps=5), dict(freeze_start=0.2), 10),
    # saved at an epoch's last step, before that epoch's on_epoch_end froze more
    "max_steps-epoch-boundary": (dict(max_steps=14, save_strategy="steps", save_steps=4), dict(freeze_start=0.2), 8),
    "step-mode": (dict(max_steps=14, save_strategy="steps", save_steps=5), dict(freeze_every="step"), 10),
    # the options: the unit order and FLOPs are recorded on the first forward after resuming
    "execution-order-flops-budget-batchnorm": (
        dict(max_steps=14, save_strategy="steps", save_steps=5),
        dict(freeze_start=0.2, order="execution", budget="flops", freeze_batchnorm=True),
        10,
    ),
    # the adaptive schedule's gradient-norm history travels in trainer_state.json; 10 is mid-interval (checks every 3)
    # and the resumed run decides at 12, the first check after freeze_start (9 / 14 <= 0.7 < 12 / 14), from check 9's
    # means and step 10's sum; a change_threshold no change reaches forces that decision (freeze up to freeze_level)
    "adaptive-schedule": (
        dict(max_steps=14, save_strategy="steps", save_steps=5),
        dict(freeze_start=0.7, freeze_level=0.5, schedule="adaptive", check_every=3, change_threshold=1e30),
        10,
    ),
    "block-granularity-params-budget": (
        dict(num_train_epochs=4, save_strategy="epoch"),
        dict(freeze_start=0.25, granularity="block", budget="params"),
        8,
    ),
    # a static prefix frozen from the first step (on_train_begin): the resumed run holds it from its first step too
    "static-prefix-from-the-first-step": (
        dict(max_steps=14, save_strategy="steps", save_steps=5),
        dict(freeze_start=0.0, freeze_start_level=0.5, freeze_level=0.5),
        10,
    ),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_mid_freeze_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, case):
    overrides, callback_kwargs, resume_step = RESUME_CASES[case]
    full_callback = LayerFreezingCallback(**callback_kwargs)
    full = Trainer(
        model=_model(),
        args=_args(tmp_path / "full", **overrides),
        train_dataset=RandomImages(64),
        callbacks=[full_callback],
    )
    full.train()
    assert full_callback.frozen_units > 0  # the run froze something for the resumed one to reproduce
    checkpoint = tmp_path / "full" / f"checkpoint-{resume_step}"
    assert checkpoint.is_dir()

    resumed_callback = LayerFreezingCallback(**callback_kwargs)
    resumed = Trainer(
        model=_model(seed=7),  # other initial weights: everything must come from the checkpoint
        args=_args(tmp_path / "resumed", **overrides),
        train_dataset=RandomImages(64),
        callbacks=[resumed_callback],
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    expected_tensors, expected_groups = _train_state(full)
    tensors, groups = _train_state(resumed)
    assert tensors.keys() == expected_tensors.keys()
    mismatched = [k for k in tensors if not torch.equal(tensors[k], expected_tensors[k])]
    assert not mismatched, mismatched[:5]
    assert groups == expected_groups


def _train_four_epochs_with_checkpoints(output_dir: Path) -> dict:
    """A run saving a checkpoint each epoch (freeze_start=0.25: 9 units frozen at checkpoint-8); returns the
    arguments a resumed run must share."""
    overrides = dict(num_train_epochs=4, save_strategy="epoch")
    Trainer(
        model=_model(),
        args=_args(output_dir, **overrides),
        train_dataset=RandomImages(64),
        callbacks=[LayerFreezingCallback(freeze_every="epoch", freeze_start=0.25)],
    ).train()
    return overrides


def test_resume_reapplies_the_freeze_before_the_first_step(tmp_path):
    overrides = _train_four_epochs_with_checkpoints(tmp_path / "full")

    seen = {}

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if "units" not in seen:
                seen["units"] = callback.frozen_units
                seen["in_optimizer"] = sum(len(g["params"]) for g in optimizer.param_groups)

    callback = LayerFreezingCallback(freeze_every="epoch", freeze_start=0.25)
    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path / "resumed", **overrides),
        train_dataset=RandomImages(64),
        callbacks=[callback, FirstStep()],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))
    assert seen["units"] == 9
    frozen_tensors = sum(len(u.parameters) for u in callback.freezer.units[:9])
    assert seen["in_optimizer"] == len(list(trainer.model.parameters())) - frozen_tensors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"freeze_start": 1.0}, r"freeze_start must be a number in \[0, 1\), got 1.0"),
        ({"freeze_level": -0.5}, r"freeze_level must be a number in \[0, 1\], got -0.5"),
        ({"freeze_every": "batch"}, r"freeze_every must be one of \('auto', 'epoch', 'step'\), got 'batch'"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerFreezingCallback(**kwargs)


def test_callback_state_is_json_safe_and_restorable_as_the_trainer_restores_it():
    import json

    callback = LayerFreezingCallback(freeze_start=0.3, freeze_level=0.8, freeze_every="step", budget="params")
    state = json.loads(json.dumps(callback.state()))
    # What Trainer._load_callback_state does with restore_callback_states_from_checkpoint=True.
    restored = LayerFreezingCallback(**state["args"])
    for attribute, value in state["attributes"].items():
        setattr(restored, attribute, value)
    assert restored.state() == callback.state()
    assert (restored.freeze_start, restored.freeze_level, restored.freeze_every) == (0.3, 0.8, "step")
    assert restored.saved_frozen_units == 0


def test_resume_with_restore_callback_states_from_checkpoint(tmp_path):
    overrides = _train_four_epochs_with_checkpoints(tmp_path / "full")
    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path / "resumed", restore_callback_states_from_checkpoint=True, **overrides),
        train_dataset=RandomImages(64),
        callbacks=[LayerFreezingCallback(freeze_every="epoch", freeze_start=0.25)],
    )
    seen = {}

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.setdefault("units", sum(not p.requires_grad for p in model.parameters()))

    trainer.add_callback(FirstStep())
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))
    (restored,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LayerFreezingCallback)]
    assert restored.saved_frozen_units == 9
    assert seen["units"] == sum(len(u.parameters) for u in restored.freezer.units[:9])


def test_the_trainer_callback_handler_is_found_and_the_callback_moved_first(tmp_path):
    """The one place that reads the caller's frames (`trainer_internals.calling_callback_handler`): if a transformers
    release calls events another way, this fails here, by name, instead of metrics silently missing from TensorBoard
    or W&B."""
    import warnings

    from hf_layer_freeze.trainer_internals import calling_callback_handler

    assert calling_callback_handler(LayerFreezingCallback()) is None  # not called by a handler
    recorder = EventRecorder()  # listed first, as the Trainer lists its reporting integrations
    callback = LayerFreezingCallback()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LayerFreezingCallback could not find")
        trainer = Trainer(
            model=_model(), args=_args(tmp_path), train_dataset=RandomImages(16), callbacks=[recorder, callback]
        )
    assert trainer.callback_handler.callbacks[0] is callback, "on_init_end did not reach the callback handler"
    assert recorder in trainer.callback_handler.callbacks


def test_hooks_are_released_at_the_end_of_training(tmp_path):
    model = _model()
    callback = LayerFreezingCallback(freeze_start=0.0, order="execution", freeze_batchnorm=True)
    Trainer(
        model=model, args=_args(tmp_path, num_train_epochs=2), train_dataset=RandomImages(32), callbacks=[callback]
    ).train()
    assert callback.frozen_units > 0
    leftover = [name for name, module in model.named_modules() if module._forward_pre_hooks]
    assert leftover == []


@pytest.mark.parametrize("keep_frozen", [False, True])
def test_the_model_is_given_back_unfrozen_unless_kept_frozen(tmp_path, keep_frozen):
    model = _model()
    callback = LayerFreezingCallback(
        freeze_every="epoch", freeze_start=0.0, freeze_batchnorm=True, keep_frozen=keep_frozen
    )
    trainer = Trainer(
        model=model, args=_args(tmp_path, num_train_epochs=2), train_dataset=RandomImages(32), callbacks=[callback]
    )
    trainer.train()
    assert callback.frozen_units == NUM_UNITS // 2  # what training ended with (frozen after epoch 1), either way
    metrics = callback.metrics()  # after training: the state training ended with, all of it, not the hand-back's
    assert metrics["layer_freeze/frozen_units"] == NUM_UNITS // 2
    assert metrics["layer_freeze/frozen_params"] == sum(u.numel for u in callback.freezer.units[: NUM_UNITS // 2])
    params = list(model.parameters())
    in_optimizer = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    if keep_frozen:
        assert sum(p.requires_grad for p in params) < len(params)
        return
    assert all(p.requires_grad for p in params)
    assert sorted(id(p) for p in in_optimizer) == sorted(id(p) for p in params)  # whole, each parameter once
    # a second train() trains the whole model again, the stem included
    stem = model.timm_model.conv1[0].weight.detach().clone()
    trainer.remove_callback(LayerFreezingCallback)
    trainer.train()
    assert not torch.equal(stem, model.timm_model.conv1[0].weight)


def test_a_second_freezer_owns_only_what_trains_when_it_is_built_and_gives_back_only_that():
    from hf_layer_freeze import LayerFreezer

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = LayerFreezer(model, optimizer)
    first.freeze_units(5)
    frozen_by_first = [p for unit in first.units[:5] for p in unit.parameters]
    first.close()  # as keep_frozen=True does at the end of training: what it froze is the user's now
    # (a freezer still open holds what it froze for the library: tests/test_reentry.py)
    second = LayerFreezer(model, optimizer)
    # the first freezer's units are not the second's: its schedule and counts describe what trains now
    assert second.num_units == NUM_UNITS - 5 and second.frozen_units == 0 and second.result().frozen_params == 0
    assert second.units[0].name == first.units[5].name
    result = second.freeze_units(7)
    assert (result.frozen_units, result.newly_frozen_units) == (7, 7)
    assert result.frozen_params == sum(unit.numel for unit in first.units[5:12])
    assert second.unfreeze().frozen_units == 0
    # what the second froze trains again and is back in the optimizer; what the first froze stays frozen
    assert all(p.requires_grad for unit in second.units for p in unit.parameters)
    assert not any(p.requires_grad for p in frozen_by_first)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for unit in second.units for p in unit.parameters} <= in_optimizer
    assert not {id(p) for p in frozen_by_first} & in_optimizer


def test_each_freeze_is_logged_at_its_own_step_when_logging_once_an_epoch(tmp_path):
    recorder = EventRecorder()
    callback = LayerFreezingCallback(freeze_every="epoch", freeze_start=0.25)
    Trainer(
        model=_model(),
        args=_args(tmp_path, logging_steps=4),  # 4 steps an epoch: one log per epoch, at the epoch's last step
        train_dataset=RandomImages(64),
        callbacks=[recorder, callback],
    ).train()
    train_logs = [(log["epoch"], log["layer_freeze/frozen_units"]) for log in recorder.logs if "loss" in log]
    assert train_logs == [(1.0, 0), (2.0, 9), (3.0, 18), (4.0, 18)]


def test_a_run_shorter_than_its_freezing_epochs_warns_and_reports_what_it_trained_with(tmp_path):
    callback = LayerFreezingCallback(freeze_every="epoch", freeze_start=0.0)
    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path, max_steps=3),  # an epoch is 4 steps
        train_dataset=RandomImages(64),
        callbacks=[callback],
    )
    with pytest.warns(UserWarning, match=r"freezes at 0 epoch end\(s\).*Use freeze_every='auto'.* or 'step'"):
        trainer.train()
    assert callback.frozen_units == 0  # nothing froze while training; nothing is made to look as if it had
    stepwise = LayerFreezingCallback(freeze_start=0.0, freeze_every="step")
    Trainer(
        model=_model(), args=_args(tmp_path, max_steps=3), train_dataset=RandomImages(64), callbacks=[stepwise]
    ).train()
    assert stepwise.frozen_units == stepwise.freezer.num_units_at(2 / 3)  # frozen after step 2, trained at step 3


def test_resume_with_changed_options_says_which_by_name(tmp_path):
    overrides = _train_four_epochs_with_checkpoints(tmp_path / "full")  # saved with freeze_start=0.25, level 1.0
    callback = LayerFreezingCallback(freeze_every="epoch", freeze_start=0.25, freeze_level=0.5)
    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path / "resumed", **overrides),
        train_dataset=RandomImages(64),
        callbacks=[callback],
    )
    with pytest.warns(UserWarning, match=r"differ from the checkpoint's: freeze_level=0.5 \[checkpoint: 1.0\]") as w:
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))
    assert "freeze_start" not in str([str(x.message) for x in w if "differ" in str(x.message)])
    # the given options are in force; the 9 units frozen at the checkpoint stay frozen
    assert callback.freezer.freeze_level == 0.5
    assert callback.frozen_units == max(9, callback.freezer.num_units_at(12 / 16))


def test_restore_callback_states_says_the_users_options_were_replaced(tmp_path):
    overrides = _train_four_epochs_with_checkpoints(tmp_path / "full")
    given = LayerFreezingCallback(freeze_every="epoch", freeze_start=0.25, freeze_level=0.5)
    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path / "resumed", restore_callback_states_from_checkpoint=True, **overrides),
        train_dataset=RandomImages(64),
        callbacks=[given],
    )
    with pytest.warns(UserWarning, match=r"replaced your LayerFreezingCallback.*freeze_level=1.0 \[given: 0.5\]"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))
    (restored,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LayerFreezingCallback)]
    assert restored is not given and restored.freeze_level == 1.0
    # the user's object reports what training did, not an untouched 0
    assert given.freezer is restored.freezer
    assert given.frozen_units == restored.frozen_units == 18


def test_resume_with_the_same_options_warns_nothing(tmp_path):
    import warnings

    overrides = _train_four_epochs_with_checkpoints(tmp_path / "full")
    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path / "resumed", **overrides),
        train_dataset=RandomImages(64),
        callbacks=[LayerFreezingCallback(freeze_every="epoch", freeze_start=0.25)],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(differ from the checkpoint|replaced your)")
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))


def _text_model(name: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    if name == "bert-encoder":
        return tf.BertForSequenceClassification(tf.BertConfig(**text, num_labels=3))
    return tf.LlamaForCausalLM(tf.LlamaConfig(**text, num_key_value_heads=2, tie_word_embeddings=True))


@pytest.mark.parametrize("granularity", ["module", "block"])
@pytest.mark.parametrize("name", ["bert-encoder", "llama-causal-lm-tied"])
def test_trainer_trains_transformers_text_models_with_freezing(tmp_path, name, granularity):
    """Encoder and causal LM (tied embeddings) under the Trainer: every step trains exactly the unfrozen tensors,
    frozen ones stay bitwise unchanged, and the head (and the embedding it shares) trains to the end."""
    from helpers import StepWatch

    model = _text_model(name)
    watch = StepWatch()
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step", granularity=granularity, keep_frozen=True)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-2),
        train_dataset=RandomTokenDataset(n=32, vocab=64, causal=name.startswith("llama")),
        callbacks=[callback, watch],
    )
    trainer.train()
    assert len(watch.steps) == 8
    assert watch.trained_exactly_the_unfrozen(), watch.steps
    # the schedule was followed to its last step, and the head was never frozen
    assert callback.frozen_units == callback.freezer.num_units_at(7 / 8) > 0
    head = model.classifier if name == "bert-encoder" else model.lm_head
    assert all(p.requires_grad for p in head.parameters())
    assert watch.steps[-1][1] >= len(list(head.parameters()))


def test_tensorboard_receives_every_freeze_at_its_own_step(tmp_path):
    """The real reporting integration: `report_to=["tensorboard"]` writes the layer_freeze/ scalars, and the frozen
    count it shows at each step is what that step's log said."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step")
    trainer = Trainer(
        model=_model(),
        args=_args(tmp_path, num_train_epochs=2, logging_steps=1, report_to=["tensorboard"]),  # fmt: skip
        train_dataset=RandomImages(64),
        callbacks=[callback],
    )
    trainer.train()
    (run,) = list(tmp_path.rglob("events.out.tfevents.*"))  # under output_dir/runs/ by default
    events = EventAccumulator(str(run.parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/layer_freeze/frozen_units", "train/layer_freeze/fraction"} <= tags, tags
    shown = {e.step: int(e.value) for e in events.Scalars("train/layer_freeze/frozen_units")}
    logged = {log["step"]: log["layer_freeze/frozen_units"] for log in trainer.state.log_history if "loss" in log}
    assert shown == logged and len(shown) == 8
    assert len(set(shown.values())) >= 4  # the freezes, each at its own step


class _CountsAtStepEnd(TrainerCallback):
    """The callback's frozen count after every step (list it after the callback)."""

    def __init__(self, callback):
        self.callback, self.counts = callback, []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(self.callback.frozen_units)


@pytest.mark.parametrize("epochs, steps_per_epoch, by", [(2, 4, "step"), (10, 2, "epoch")])
def test_the_default_freezes_by_step_in_a_short_fine_tuning_run_and_by_epoch_in_a_long_one(
    tmp_path, epochs, steps_per_epoch, by
):
    callback = LayerFreezingCallback()  # freeze_every="auto", the card's start and level
    counts = _CountsAtStepEnd(callback)
    args = _args(tmp_path, num_train_epochs=epochs, per_device_train_batch_size=16, logging_steps=50)
    dataset = RandomImages(16 * steps_per_epoch)
    Trainer(model=_model(), args=args, train_dataset=dataset, callbacks=[callback, counts]).train()
    total = epochs * steps_per_epoch
    changes = [step for step in range(1, total) if counts.counts[step] != counts.counts[step - 1]]
    if by == "step":  # 2 epochs: by epoch nothing would freeze before the last step; here the schedule is followed
        expected = [callback.freezer.num_units_at(s / total) for s in range(1, total)]
        assert counts.counts[:-1] == expected and len(changes) >= 2
    else:  # 10 epochs: the card's rule, a freeze at each epoch end after freeze_start
        assert changes and all((step + 1) % steps_per_epoch == 0 for step in changes)
        assert len(changes) == sum(1 for e in range(6, 10))  # epoch ends 6..9 of 10


def test_freezing_by_step_does_not_flood_the_logs(tmp_path):
    recorder = EventRecorder()
    callback = LayerFreezingCallback(freeze_every="step")
    counts = _CountsAtStepEnd(callback)
    args = _args(tmp_path, num_train_epochs=1, per_device_train_batch_size=2, logging_steps=50)
    dataset = RandomImages(128)  # 64 steps
    Trainer(model=_model(), args=args, train_dataset=dataset, callbacks=[recorder, callback, counts]).train()
    events = sum(1 for a, b in zip(counts.counts, counts.counts[1:], strict=False) if a != b)
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert events >= 10  # the schedule moved at many steps ...
    assert len(train_logs) <= 2 * (64 // 50 + 1)  # ... and added at most one log per logging window
