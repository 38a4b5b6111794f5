from __future__ import annotations

import ast
import bisect
import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hf_layer_freeze import LayerFreezer, freeze_fraction, num_units_to_freeze
from hf_layer_freeze.plan_simulation import schedule_changes, update_steps
from hf_layer_freeze.schedule import freezing_epoch_ends, progress_at_step, resolve_freeze_every, updates_at_step


def test_zero_until_freeze_start_then_linear_to_freeze_level():
    assert freeze_fraction(0.0) == 0.0
    assert freeze_fraction(0.5) == 0.0  # at freeze_start: still nothing
    assert freeze_fraction(0.5 + 1e-9) > 0.0
    assert freeze_fraction(0.75) == pytest.approx(0.5)
    assert freeze_fraction(1.0) == 1.0
    assert freeze_fraction(1.0, freeze_start=0.1, freeze_level=0.6) == pytest.approx(0.6)
    assert freeze_fraction(0.55, freeze_start=0.1, freeze_level=0.8) == pytest.approx(0.8 * 0.45 / 0.9)
    assert freeze_fraction(0.3, freeze_start=0.0, freeze_level=1.0) == pytest.approx(0.3)


def test_freeze_level_zero_never_freezes():
    assert all(freeze_fraction(p / 10, 0.2, 0.0) == 0.0 for p in range(11))


@given(
    start=st.floats(0, 0.999),
    level=st.floats(0, 1),
    a=st.floats(0, 1),
    b=st.floats(0, 1),
)
def test_schedule_is_monotonic_and_bounded(start, level, a, b):
    lo, hi = sorted((a, b))
    f_lo, f_hi = freeze_fraction(lo, start, level), freeze_fraction(hi, start, level)
    assert 0.0 <= f_lo <= f_hi <= level


@given(fraction=st.floats(0, 1), n=st.integers(0, 500))
def test_unit_count_is_floor_of_fraction_times_n(fraction, n):
    exact = Fraction(fraction) * n  # the float's exact value, times n: no rounding anywhere
    k = num_units_to_freeze(fraction, n)
    if math.ceil(exact) - exact > Fraction(1, 10**8):
        assert k == math.floor(exact)
    else:  # within binary-rounding distance below an integer: that integer, or the floor
        assert k in (math.floor(exact), math.ceil(exact))


@given(thousandths=st.integers(0, 1000), n=st.integers(0, 500))
def test_unit_count_of_a_decimal_fraction_is_its_exact_floor(thousandths, n):
    # 0.29 is stored as 0.28999999999999998: the count must still be that of the decimal the user wrote
    assert num_units_to_freeze(thousandths / 1000, n) == thousandths * n // 1000


def test_unit_count_survives_binary_rounding():
    assert 0.29 * 100 < 29  # what floor alone would get wrong
    assert num_units_to_freeze(0.29, 100) == 29
    assert num_units_to_freeze(0.5, 7) == 3


@pytest.mark.parametrize(
    ("kwargs", "name", "allowed"),
    [
        ({"progress": 0.5, "freeze_start": 1.0}, "freeze_start", "[0, 1)"),
        ({"progress": 0.5, "freeze_start": -0.1}, "freeze_start", "[0, 1)"),
        ({"progress": 0.5, "freeze_level": 1.5}, "freeze_level", "[0, 1]"),
        ({"progress": 0.5, "freeze_level": -1}, "freeze_level", "[0, 1]"),
        ({"progress": 1.01}, "progress", "[0, 1]"),
        ({"progress": -0.5}, "progress", "[0, 1]"),
        ({"progress": float("nan")}, "progress", "[0, 1]"),
        ({"progress": "0.5"}, "progress", "[0, 1]"),
    ],
)
def test_out_of_range_arguments_name_argument_range_and_value(kwargs, name, allowed):
    with pytest.raises(ValueError) as error:
        freeze_fraction(**kwargs)
    message = str(error.value)
    assert name in message and allowed in message and repr(kwargs[name]) in message


def test_schedule_module_does_not_import_torch():
    source = Path(__file__).parents[1].joinpath("hf_layer_freeze", "schedule.py").read_text()
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert "torch" not in imported


def _epoch_ends_by_search(num_epochs: int, freeze_start: float) -> int:
    """Ground truth for any count: `e / num_epochs > freeze_start` grows with e, so bisect for its first epoch."""
    epochs = range(1, num_epochs)
    return len(epochs) - bisect.bisect_left(epochs, True, key=lambda e: e / num_epochs > freeze_start)


@pytest.mark.timeout(30)  # the Trainer's sys.maxsize epochs of a streaming dataset: counted one by one, it never ends
@pytest.mark.parametrize("num_epochs", [10**9 + 7, 2**53 + 1, sys.maxsize])
@pytest.mark.parametrize("freeze_start", [0.0, 0.1, 0.3, 0.5, 0.6, 0.9, 1 / 3])
def test_freezing_epoch_ends_counts_any_number_of_epochs_in_closed_form(num_epochs, freeze_start):
    assert freezing_epoch_ends(num_epochs, freeze_start) == _epoch_ends_by_search(num_epochs, freeze_start)
    assert resolve_freeze_every("auto", num_epochs, freeze_start) == "epoch"


@given(
    num_epochs=st.one_of(st.integers(0, 400), st.floats(0, 400, allow_nan=False)),
    freeze_start=st.floats(0, 1, exclude_max=True),
)
def test_freezing_epoch_ends_is_the_count_of_epochs_whose_progress_is_past_freeze_start(num_epochs, freeze_start):
    # the definition, epoch by epoch, with the float the schedule compares (6 / 10 is not past 0.6)
    expected = sum(1 for epoch in range(1, int(num_epochs)) if epoch / num_epochs > freeze_start)
    assert freezing_epoch_ends(num_epochs, freeze_start) == expected


def test_auto_is_by_step_when_the_epoch_count_is_unknown():
    assert resolve_freeze_every("auto", None, 0.5) == "step"
    with pytest.raises(ValueError, match=r"num_epochs must be a finite number >= 0, got inf"):
        freezing_epoch_ends(math.inf, 0.5)


# The callback's timing rule (`updates_at_step`), and plan's simulation of it against real `Trainer` runs.


def test_updates_at_step_never_after_the_last_step_and_by_epoch_only_at_epoch_ends():
    assert [s for s in range(1, 9) if updates_at_step(s, 8, freezing_by="step")] == list(range(1, 8))
    ends = [s for s in range(1, 9) if updates_at_step(s, 8, freezing_by="epoch", epoch_ended=s % 3 == 0)]
    assert ends == [3, 6]  # and not at step 8, the last, were it an epoch end
    assert not updates_at_step(8, 8, freezing_by="epoch", epoch_ended=True)
    assert not updates_at_step(9, 8, freezing_by="step", every_step=True)
    assert updates_at_step(1, 8, freezing_by="epoch", every_step=True)  # the adaptive schedule checks every step
    assert (progress_at_step(3, 12), progress_at_step(13, 12)) == (0.25, 1.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: updates_at_step(1, 8, freezing_by="auto"),
            "freezing_by must be one of ('epoch', 'step'), got 'auto'",
        ),
        (lambda: progress_at_step(1, 0), "max_steps must be a positive integer (the run's optimizer steps), got 0"),
    ],
)
def test_the_timing_rule_refuses_in_one_line(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


class _TinyNet(torch.nn.Module):
    """Six linear layers, the units, and a classifier named by timm's rule (`get_classifier()`); the loss as the
    Trainer expects it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
        self.fc = torch.nn.Linear(8, 2)

    def get_classifier(self):
        return self.fc

    def forward(self, x, labels=None):
        logits = self.fc(self.blocks(x))
        if labels is None:
            return {"logits": logits}
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def _trainer_freeze_steps(
    tmp_path, monkeypatch, *, epochs, steps_per_epoch, freeze_every, freeze_start, max_steps=-1, freeze_start_level=0.0
):
    """A real `Trainer` run with the callback: the steps after which its count of frozen units changed, read from
    `requires_grad` (not the freezer's account; step 0: when training began), the steps at which the callback's
    `updates_at_step` said yes, and the callback."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import hf_layer_freeze.callback as callback_module
    from hf_layer_freeze import LayerFreezingCallback

    class Points(torch.utils.data.Dataset):
        def __len__(self):
            return 4 * steps_per_epoch

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return {"x": torch.randn(8, generator=generator), "labels": index % 2}

    class FrozenCounts(TrainerCallback):  # listed after the callback: the count after its update at this step
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.units = callback.freezer.units  # what trained when training began
            self.counts = [self.frozen()]  # what the callback froze before the first step

        def frozen(self) -> int:
            return sum(1 for u in self.units if not any(p.requires_grad for p in u.parameters))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.counts.append(self.frozen())

    said_yes = []
    shared = callback_module.updates_at_step

    def spy(step, max_steps, **kwargs):
        answer = shared(step, max_steps, **kwargs)
        if answer and step not in said_yes:
            said_yes.append(step)
        return answer

    callback = LayerFreezingCallback(
        freeze_start=freeze_start, freeze_level=1.0, freeze_start_level=freeze_start_level, freeze_every=freeze_every
    )
    counts = FrozenCounts()
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=4,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
    )  # fmt: skip
    monkeypatch.setattr(callback_module, "updates_at_step", spy)
    Trainer(model=_TinyNet(), args=args, train_dataset=Points(), callbacks=[callback, counts]).train()
    changed = [step for step in range(1, len(counts.counts)) if counts.counts[step] != counts.counts[step - 1]]
    callback.frozen_at_begin = counts.counts[0]
    return changed, said_yes, callback


def test_the_callback_and_plan_time_updates_with_the_one_shared_rule():
    import hf_layer_freeze.callback
    import hf_layer_freeze.plan_simulation
    from hf_layer_freeze import schedule

    assert hf_layer_freeze.callback.updates_at_step is schedule.updates_at_step
    assert hf_layer_freeze.plan_simulation.updates_at_step is schedule.updates_at_step
    assert hf_layer_freeze.plan_simulation.progress_at_step is schedule.progress_at_step


@pytest.mark.parametrize(
    ("epochs", "steps_per_epoch", "freeze_every", "freeze_start", "max_steps", "start_level"),
    [
        (2, 6, "step", 0.25, -1, 0.0),  # by step, within epochs
        (6, 2, "epoch", 0.0, -1, 0.0),  # at each epoch end but the last
        (2, 4, "auto", 0.0, -1, 0.0),  # auto: too few epoch ends, by step
        (10, 2, "auto", 0.5, -1, 0.0),  # auto: by epoch
        (4, 2, "epoch", 0.0, 7, 0.0),  # max_steps ends inside an epoch: epochs end at 2, 4, 6 and (early) 7
        (2, 6, "step", 0.0, -1, 0.25),  # a quarter frozen from the first step (on_train_begin), then by step
        # auto: 4 epoch ends from 0.5 on, counting the one at 0.5 (which freezes 0.3): by epoch (3 without it: by step)
        (8, 2, "auto", 0.5, -1, 0.3),
    ],
)
def test_plans_simulated_freeze_steps_are_a_real_trainer_runs(
    tmp_path, monkeypatch, epochs, steps_per_epoch, freeze_every, freeze_start, max_steps, start_level
):
    changed, said_yes, callback = _trainer_freeze_steps(
        tmp_path, monkeypatch, epochs=epochs, steps_per_epoch=steps_per_epoch, freeze_every=freeze_every,
        freeze_start=freeze_start, max_steps=max_steps, freeze_start_level=start_level,
    )  # fmt: skip
    total = max_steps if max_steps > 0 else epochs * steps_per_epoch
    simulated = update_steps(
        total,
        freeze_every=freeze_every,
        steps_per_epoch=steps_per_epoch,
        freeze_start=freeze_start,
        freeze_start_level=start_level,
    )
    assert said_yes == simulated  # the callback updated exactly where plan simulates an update
    events = schedule_changes(callback.freezer.num_units_at, total, simulated)
    assert events[0] == (1, callback.frozen_at_begin)  # what the first step trained with
    assert (callback.frozen_at_begin > 0) == (freeze_start == 0 and start_level > 0)
    assert [step - 1 for step, _ in events[1:]] == changed and len(changed) >= 3  # the count changed there, only
    assert events[-1][1] == callback.frozen_units


@pytest.mark.parametrize(
    ("epochs", "steps_per_epoch", "freeze_every", "start_level"),
    [(2, 6, "step", 0.0), (6, 2, "epoch", 0.0), (2, 6, "step", 0.25), (6, 2, "epoch", 0.25)],
)
def test_plan_rows_freeze_where_a_real_trainer_run_freezes(
    tmp_path, monkeypatch, epochs, steps_per_epoch, freeze_every, start_level
):
    from hf_layer_freeze.plan import PlanModel, plan_rows

    changed, _, callback = _trainer_freeze_steps(
        tmp_path,
        monkeypatch,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        freeze_every=freeze_every,
        freeze_start=0.0,
        freeze_start_level=start_level,
    )
    plan_model = PlanModel(_TinyNet().train(), (torch.zeros(4, 8),))
    length = {"steps": epochs * steps_per_epoch} if freeze_every == "step" else {"epochs": epochs}
    rows, _ = plan_rows(plan_model, freeze_start=0.0, freeze_start_level=start_level, **length)
    if freeze_every == "step":
        planned = [row.step - 1 for row in rows[1:]]  # a row starts at the first step trained with its freeze
    else:
        planned = [
            (row.epoch - 1) * steps_per_epoch
            for previous, row in zip(rows, rows[1:], strict=False)
            if row.frozen_units != previous.frozen_units
        ]
    assert planned == changed and len(changed) >= 3
    assert rows[0].frozen_units == callback.frozen_at_begin == (1 if start_level else 0)  # floor(0.25 * 6)
    assert rows[-1].frozen_units == callback.frozen_units and rows[0].num_units == callback.freezer.num_units == 6


# freeze_start_level: the linear schedule from a given fraction at freeze_start.


def _cards_fraction(progress: float, freeze_start: float, freeze_level: float) -> float:
    """The schedule as it was before `start_level` (Composer's): the ground truth for `start_level=0`."""
    if progress <= freeze_start:
        return 0.0
    return min(freeze_level, freeze_level * (progress - freeze_start) / (1.0 - freeze_start))


@given(start=st.floats(0, 0.999), level=st.floats(0, 1), progress=st.floats(0, 1))
def test_a_start_level_of_zero_is_the_cards_schedule_bitwise(start, level, progress):
    assert freeze_fraction(progress, start, level) == _cards_fraction(progress, start, level)
    assert freeze_fraction(progress, start, level, 0.0) == _cards_fraction(progress, start, level)


def test_the_start_level_is_the_fraction_at_freeze_start_and_grows_to_the_level():
    assert freeze_fraction(0.0, 0.0, 1.0, 0.5) == 0.5  # freeze_start=0: from the first step (progress 0)
    assert freeze_fraction(0.5, 0.0, 1.0, 0.5) == 0.75
    assert freeze_fraction(1.0, 0.0, 1.0, 0.5) == 1.0
    assert [freeze_fraction(p, 0.2, 0.8, 0.4) for p in (0.0, 0.1999, 0.2)] == [0.0, 0.0, 0.4]  # at freeze_start
    assert freeze_fraction(0.6, 0.2, 0.8, 0.4) == pytest.approx(0.6)
    # a static prefix: the level from freeze_start to the end
    assert all(freeze_fraction(p / 10, 0.0, 0.5, 0.5) == 0.5 for p in range(11))
    assert [freeze_fraction(p / 10, 0.3, 0.5, 0.5) for p in range(11)] == [0.0] * 3 + [0.5] * 8


@given(
    start=st.floats(0, 0.999),
    level=st.floats(0, 1),
    share=st.floats(0, 1),
    a=st.floats(0, 1),
    b=st.floats(0, 1),
)
def test_a_schedule_from_a_start_level_is_monotonic_and_bounded(start, level, share, a, b):
    start_level = share * level
    lo, hi = sorted((a, b))
    f_lo, f_hi = freeze_fraction(lo, start, level, start_level), freeze_fraction(hi, start, level, start_level)
    assert 0.0 <= f_lo <= f_hi <= level
    assert f_hi >= start_level if hi >= start else f_hi == 0.0


def test_a_static_prefix_from_the_first_step_is_not_warned_about_few_epoch_ends():
    from hf_layer_freeze.schedule import coarse_epochs_warning

    assert coarse_epochs_warning("epoch", 2, 10, 0.0, 0.5, 0.5) is None  # frozen at on_train_begin
    assert "freezes at 1 epoch end(s)" in coarse_epochs_warning("epoch", 2, 10, 0.0, 1.0, 0.1)  # a ramp: it grows


def test_a_start_level_above_the_level_names_both_values():
    with pytest.raises(ValueError) as error:
        freeze_fraction(0.5, 0.0, 0.5, 0.75)
    assert str(error.value) == (
        "freeze_start_level must be at most freeze_level (the schedule grows from one to the other), got "
        "freeze_start_level=0.75 and freeze_level=0.5"
    )
    with pytest.raises(ValueError, match=r"freeze_start_level must be a number in \[0, 1\], got -0.1"):
        freeze_fraction(0.5, 0.0, 1.0, -0.1)


@given(
    num_epochs=st.one_of(st.integers(0, 400), st.floats(0, 400, allow_nan=False)),
    freeze_start=st.floats(0, 1, exclude_max=True),
)
def test_freezing_epoch_ends_with_a_start_level_count_the_epoch_end_at_freeze_start(num_epochs, freeze_start):
    # the fraction is the start level at freeze_start itself: an epoch end there freezes
    expected = sum(1 for epoch in range(1, int(num_epochs)) if epoch / num_epochs >= freeze_start)
    assert freezing_epoch_ends(num_epochs, freeze_start, start_level=0.25) == expected


@pytest.mark.timeout(30)
@pytest.mark.parametrize("num_epochs", [10**9 + 7, 2**53 + 1, sys.maxsize])
@pytest.mark.parametrize("freeze_start", [0.0, 0.1, 0.5, 0.6, 1 / 3])
def test_freezing_epoch_ends_with_a_start_level_in_closed_form(num_epochs, freeze_start):
    epochs = range(1, num_epochs)
    expected = len(epochs) - bisect.bisect_left(epochs, True, key=lambda e: e / num_epochs >= freeze_start)
    assert freezing_epoch_ends(num_epochs, freeze_start, start_level=0.5) == expected


def _steps(model, optimizer, steps: int, freezer=None, seed: int = 0) -> None:
    """`steps` optimizer steps of `_TinyNet` on random points; with a freezer, `update(step / steps)` after each."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x, y = torch.randn(4, 8, generator=generator), torch.randint(0, 2, (4,), generator=generator)
        torch.nn.functional.cross_entropy(model(x)["logits"], y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if freezer is not None:
            freezer.update(step / steps)


@pytest.mark.parametrize("options", [{}, {"budget": "flops"}, {"order": "execution"}, {"budget": "params"}])
def test_a_prefix_frozen_from_the_first_step_in_a_custom_loop_never_moves(options):
    """`update(0.0)` before the first step freezes floor(0.5 * 6) = 3 units before that step's backward: with
    budget="flops" (the units are weighed on the first forward) and order="execution" (ordered there) it waits for
    that forward and is applied in it. Their parameters stay bitwise as given; the ramp (0.5 to 1.0) freezes the rest
    later, and every one of them trained first."""
    model = _TinyNet()
    given = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # weight decay moves any parameter it still holds
    freezer = LayerFreezer(model, optimizer, freeze_start=0.0, freeze_start_level=0.5, **options)
    waits = options.get("budget") == "flops" or options.get("order") == "execution"
    assert freezer.update(0.0).frozen_units == (0 if waits else 3)  # 0: waits for the first forward
    _steps(model, optimizer, 6, freezer)  # the ramp: 3 units at 1/6, 4 at 2/6, ...
    assert freezer.frozen_units == 6 and freezer.profiled
    prefix = {name for unit in freezer.units[:3] for name in unit.parameter_names}
    assert prefix == {f"blocks.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")}
    for name, param in model.named_parameters():
        assert torch.equal(param, given[name]) == (name in prefix), name


@pytest.mark.parametrize(
    "options",
    [
        {"freeze_every": "epoch"},
        {"freeze_every": "step", "budget": "flops"},  # FLOPs weighed on the first forward, frozen in it
        {"freeze_every": "step", "schedule": "adaptive", "check_every": 2},  # the adaptive floor
    ],
)
def test_a_static_prefix_from_the_first_step_trains_frozen_from_step_one_in_a_trainer(tmp_path, options):
    """freeze_start=0 and freeze_start_level=freeze_level=0.5: the callback freezes the first 3 of 6 units at
    on_train_begin (with budget="flops" in the first forward, which weighs the units), before the first optimizer
    step, whatever the timing; they stay bitwise as given, every other tensor changes at every step, and the
    hand-back gives them back at the end."""
    from helpers import StepWatch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_layer_freeze import LayerFreezingCallback

    class Points(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return {"x": torch.randn(8, generator=generator), "labels": index % 2}

    class FrozenAtStepBegin(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.steps.append(frozenset(n for n, p in model.named_parameters() if not p.requires_grad))

    model = _TinyNet()
    given = {name: param.detach().clone() for name, param in model.named_parameters()}
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_start_level=0.5, freeze_level=0.5, **options)
    frozen, watch = FrozenAtStepBegin(), StepWatch()
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=Points(), callbacks=[callback, frozen, watch]).train()
    prefix = {f"blocks.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")}
    # frozen before every step, the first included (with budget="flops", in its forward: before its backward)
    first = frozenset() if options.get("budget") == "flops" else frozenset(prefix)
    assert frozen.steps == [first] + [frozenset(prefix)] * 11
    assert watch.trained_exactly_the_unfrozen() and all(still == 8 for _, still, _ in watch.steps)  # 6 + the head's 2
    for name, param in model.named_parameters():
        assert torch.equal(param, given[name]) == (name in prefix), name
    assert callback.frozen_units == 3 and all(param.requires_grad for param in model.parameters())  # given back
