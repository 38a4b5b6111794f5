"""schedule="adaptive": freeze the prefix of units whose gradient norm has settled, with the linear schedule's
guarantees (a prefix, never before freeze_start, never beyond freeze_level, never unfreezing, bounded events,
bitwise resume)."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from helpers import RandomImages, tiny_timm
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, Trainer, TrainingArguments

from hf_layer_freeze import FreezeOptions, LayerFreezer, LayerFreezingCallback, num_units_to_freeze
from hf_layer_freeze.schedule import bounded_unit_count

# A change_threshold no relative change of a real run reaches: its gradient norms are positive and finite, so every
# change is finite and the median positive, and every check after freeze_start freezes up to freeze_level, on any CPU.
SETTLED = 1e30


def _is_prefix(freezer: LayerFreezer) -> bool:
    states = [not any(p.requires_grad for p in unit.parameters) for unit in freezer.units]
    k = freezer.frozen_units
    return states == [True] * k + [False] * (len(states) - k)


def _counts_on_one_batch(model, optimizer, freezer: LayerFreezer, steps: int) -> list[int]:
    """Train `steps` steps on one fixed batch, calling `update(step / steps)` after each; the frozen count after each
    step, checking that what is frozen is always a prefix."""
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    counts = []
    for step in range(1, steps + 1):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        counts.append(freezer.update(step / steps).frozen_units)
        assert _is_prefix(freezer)
    return counts


def test_constant_gradients_freeze_at_the_first_check_after_warm_up_up_to_the_level():
    """With the same batch and a zero learning rate every gradient norm repeats exactly: every unit has settled,
    so the first check after freeze_start freezes up to freeze_level, and not one unit more."""
    model = tiny_timm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    freezer = LayerFreezer(model, optimizer, freeze_start=0.5, freeze_level=0.5, schedule="adaptive", check_every=10)
    counts = _counts_on_one_batch(model, optimizer, freezer, 100)
    assert counts[:59] == [0] * 59  # checks at 10, ..., 50 are before freeze_start; 60 is the first after it
    assert counts[59:] == [14] * 41  # freeze_level 0.5 of 28 units, never beyond
    assert freezer.gradient_norms.last_changes and max(freezer.gradient_norms.last_changes) == 0.0


def _scripted_gradients(model: torch.nn.Module, units, interval: int) -> None:
    """Gradients settled by construction: unit i's are `scale * ones`, the scale alternating between 1 and 2 from
    one check interval to the next until interval `i // 5`, then constant. From check `i // 5 + 1` on, its interval
    mean repeats bitwise (relative change exactly 0); before, it moves by 0.5 or 1.0, as every unit not yet settled
    does at that check. With `change_threshold=0.5` the settled prefix is then forced on any CPU: 0 is within any
    multiple of the median, 0.5 or 1.0 is more than half of a median that is 0, half of it, or itself."""
    scales = {id(p): 1.0 + min(interval, i // 5) % 2 for i, unit in enumerate(units) for p in unit.parameters}
    for param in model.parameters():
        if param.requires_grad:  # the head (no unit) trains on a constant gradient
            param.grad = torch.full_like(param, scales.get(id(param), 1.0))


@pytest.mark.parametrize("freeze_start", [0.35, 0.0])
def test_a_settling_prefix_freezes_growing_within_the_event_bound_after_the_warm_up(freeze_start):
    set_seed(0)
    model = tiny_timm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    freezer = LayerFreezer(
        model, optimizer, freeze_start=freeze_start, schedule="adaptive", check_every=2, change_threshold=0.5,
        max_freeze_events=3,
    )  # fmt: skip
    units, steps = list(freezer.units), 20
    counts, expected, count = [], [], 0
    for step in range(1, steps + 1):
        _scripted_gradients(model, units, interval=(step - 1) // 2)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        counts.append(freezer.update(step / steps).frozen_units)
        assert _is_prefix(freezer)
        # ground truth by integer arithmetic: at check k (step 2k + 2) units i with i // 5 < k have settled
        check = step // 2 - 1
        if step % 2 == 0 and check >= 1 and step / steps > freeze_start:
            count = max(count, bounded_unit_count(min(len(units), 5 * check), len(units), 3))
        expected.append(count)
    assert counts == expected
    assert counts == sorted(counts)  # never unfreezes
    # warm-up: nothing before progress 0.35, though 10 units had settled by step 6; without one (freeze_start=0) the
    # check at step 6 freezes them (the 9 of the first level)
    assert counts[5] == (0 if freeze_start else 9)
    assert set(counts) <= {0, 9, 18, 28} and len(set(counts)) >= 2  # the levels of 3 events, and some freezing
    assert set(counts) == {0, 9, 18, 28}  # a growing prefix: every level reached, the last one at freeze_level 1.0
    assert all(p.requires_grad for p in model.get_classifier().parameters())


def _accelerate_run(steps: range, state, save_at=None, path=None):
    accelerator, model, optimizer, loader, freezer = state
    history = []
    step = steps.start
    while step < steps.stop:
        for batch in loader:
            if step >= steps.stop:
                break
            loss = torch.nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            history.append(freezer.update(step / 24).frozen_units)
            if step == save_at:
                accelerator.save_state(path)
    return history


def _accelerate_setup(skip_batches: int = 0):
    set_seed(0)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model = tiny_timm("resnet10t")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(RandomImages(96), batch_size=4, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    freezer = LayerFreezer(
        model, optimizer, freeze_start=0.55, freeze_level=0.5, schedule="adaptive", check_every=3,
        change_threshold=SETTLED,
    )  # fmt: skip
    accelerator.register_for_checkpointing(freezer)
    if skip_batches:
        loader = accelerator.skip_first_batches(loader, skip_batches)
    return accelerator, model, optimizer, loader, freezer


def test_accelerate_resume_mid_interval_decides_and_ends_bitwise_as_the_uninterrupted_run(tmp_path):
    """Checks every 3 steps; the first after freeze_start 0.55 is at 15 (12 / 24 <= 0.55 < 15 / 24): the resumed run
    takes that decision itself, from the history saved at step 13 (check 12's means and step 13's sum). Forced on
    any CPU: `change_threshold=SETTLED` freezes up to freeze_level 0.5 there, and half the units stay to track."""
    full = _accelerate_setup()
    expected = _accelerate_run(range(0, 24), full)
    level = num_units_to_freeze(0.5, full[-1].num_units)
    assert expected == [0 if step < 15 else level for step in range(1, 25)]
    assert 0 < expected[-1] and len(set(expected)) >= 2, expected  # the run froze, after the checkpoint

    first = _accelerate_setup()
    _accelerate_run(range(0, 13), first, save_at=13, path=tmp_path / "ckpt")  # 13: mid-interval (checks every 3)
    assert first[-1].gradient_norms.steps == 1 and first[-1].gradient_norms.previous is not None
    resumed = _accelerate_setup(skip_batches=13)
    resumed[0].load_state(tmp_path / "ckpt")
    assert resumed[-1].gradient_norms.state_dict() == first[-1].gradient_norms.state_dict()
    history = _accelerate_run(range(13, 24), resumed)
    assert history == expected[13:]
    assert full[-1].gradient_norms.state_dict() == resumed[-1].gradient_norms.state_dict()
    for a, b in zip(full[1].parameters(), resumed[1].parameters(), strict=True):
        assert torch.equal(a, b)


def _trainer(tmp_path, callback, **overrides):
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=10))
    args = dict(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=8, learning_rate=1e-3,
                use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                disable_tqdm=True)  # fmt: skip
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=RandomImages(64), callbacks=[callback])


def test_trainer_logs_the_criterion_and_saves_its_history_in_the_checkpoint(tmp_path):
    callback = LayerFreezingCallback(
        freeze_start=0.2, freeze_level=0.5, schedule="adaptive", check_every=2, change_threshold=SETTLED
    )
    trainer = _trainer(tmp_path, callback, save_strategy="steps", save_steps=7)
    trainer.train()
    logged = [log for log in trainer.state.log_history if "layer_freeze/grad_norm_change_median" in log]
    assert logged and all("layer_freeze/grad_norm_change_first_trainable" in log for log in logged)
    assert callback.frozen_units > 0
    assert callback.frozen_units == num_units_to_freeze(0.5, callback.freezer.num_units)  # forced at the check at 4
    saved = json.loads((tmp_path / "checkpoint-7" / "trainer_state.json").read_text())
    attributes = saved["stateful_callbacks"]["LayerFreezingCallback"]["attributes"]
    assert attributes["saved_gradient_norms"]["steps"] == 1  # checks at 2, 4, 6: step 7 is mid-interval
    assert len(attributes["saved_gradient_norms"]["previous"]) == callback.freezer.num_units
    assert saved["stateful_callbacks"]["LayerFreezingCallback"]["args"]["schedule"] == "adaptive"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "auto"}, r"schedule must be one of \('linear', 'adaptive'\), got 'auto'"),
        ({"check_every": 0}, r"check_every must be an integer >= 1 .*got 0"),
        ({"change_threshold": 0.0}, r"change_threshold must be a positive number, got 0.0"),
    ],
)
def test_adaptive_options_are_validated_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreezeOptions(**kwargs)
    with pytest.raises(ValueError, match=match):
        LayerFreezingCallback(**kwargs)


def test_from_the_first_step_the_checks_count_optimizer_steps_and_can_freeze_within_the_first_epoch(tmp_path):
    """freeze_start=0 and check_every=2 in a run of 2 epochs of 8 steps: checks at steps 2, 4, ... whatever the
    epoch's length. The first (step 2) only sets the reference, so nothing freezes there although every unit has
    settled (`change_threshold=SETTLED` forces it); the second (step 4, in the first epoch) freezes up to
    freeze_level."""
    from helpers import FreezeTimeline

    callback = LayerFreezingCallback(
        freeze_start=0.0, freeze_level=0.5, schedule="adaptive", check_every=2, change_threshold=SETTLED
    )
    timeline = FreezeTimeline()
    trainer = _trainer(tmp_path, callback, max_steps=-1, num_train_epochs=2)
    trainer.add_callback(timeline)
    trainer.train()
    assert len(timeline.steps) == 16 and trainer.state.max_steps == 16  # 64 images, batches of 8: 8 steps an epoch
    level = num_units_to_freeze(0.5, callback.freezer.num_units)
    prefix = frozenset(n for unit in callback.freezer.units[:level] for n in unit.parameter_names)
    assert timeline.steps == [frozenset()] * 3 + [prefix] * 13  # frozen after step 4, within the first epoch
    assert callback.frozen_units == level


@pytest.mark.parametrize("freeze_start", [0.5, 0.0])
def test_the_start_level_is_a_floor_from_freeze_start_on(freeze_start):
    """freeze_start_level=0.25 with the adaptive schedule: 7 of 28 units frozen from freeze_start on (at progress 0,
    before the first step, when freeze_start=0), settled or not; the checks then freeze what has settled beyond it
    (everything, with constant gradients) up to freeze_level 0.5."""
    model = tiny_timm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    freezer = LayerFreezer(
        model, optimizer, freeze_start=freeze_start, freeze_level=0.5, freeze_start_level=0.25, schedule="adaptive",
        check_every=4,
    )  # fmt: skip
    assert freezer.update(0.0).frozen_units == (7 if freeze_start == 0 else 0)
    counts = _counts_on_one_batch(model, optimizer, freezer, 40)
    if freeze_start:  # nothing before 0.5; the floor at 0.5 (step 20); the first check after it (24) up to the level
        assert counts == [0] * 19 + [7] * 4 + [14] * 17
    else:  # the floor from the first step; the second check (8) up to the level
        assert counts == [7] * 7 + [14] * 33
