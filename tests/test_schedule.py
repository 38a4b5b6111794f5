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

from hf_layer_freeze import freeze_fraction, num_units_to_freeze
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


def _trainer_freeze_steps(tmp_path, monkeypatch, *, epochs, steps_per_epoch, freeze_every, freeze_start, max_steps=-1):
    """A real `Trainer` run with the callback: the steps after which its count of frozen units changed, read from
    `requires_grad` (not the freezer's account), the steps at which the callback's `updates_at_step` said yes, and
    the callback."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import hf_layer_freeze.callback as callback_module
    from hf_layer_freeze import LayerFreezingCallback, freezable_units

    class Points(torch.utils.data.Dataset):
        def __len__(self):
            return 4 * steps_per_epoch

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return {"x": torch.randn(8, generator=generator), "labels": index % 2}

    class FrozenCounts(TrainerCallback):  # listed after the callback: the count after its update at this step
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.units, self.counts = freezable_units(model), [0]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.counts.append(sum(1 for u in self.units if not any(p.requires_grad for p in u.parameters)))

    said_yes = []
    shared = callback_module.updates_at_step

    def spy(step, max_steps, **kwargs):
        answer = shared(step, max_steps, **kwargs)
        if answer and step not in said_yes:
            said_yes.append(step)
        return answer

    callback = LayerFreezingCallback(freeze_start=freeze_start, freeze_level=1.0, freeze_every=freeze_every)
    counts = FrozenCounts()
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=4,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
    )  # fmt: skip
    monkeypatch.setattr(callback_module, "updates_at_step", spy)
    Trainer(model=_TinyNet(), args=args, train_dataset=Points(), callbacks=[callback, counts]).train()
    changed = [step for step in range(1, len(counts.counts)) if counts.counts[step] != counts.counts[step - 1]]
    return changed, said_yes, callback


def test_the_callback_and_plan_time_updates_with_the_one_shared_rule():
    import hf_layer_freeze.callback
    import hf_layer_freeze.plan_simulation
    from hf_layer_freeze import schedule

    assert hf_layer_freeze.callback.updates_at_step is schedule.updates_at_step
    assert hf_layer_freeze.plan_simulation.updates_at_step is schedule.updates_at_step
    assert hf_layer_freeze.plan_simulation.progress_at_step is schedule.progress_at_step


@pytest.mark.parametrize(
    ("epochs", "steps_per_epoch", "freeze_every", "freeze_start", "max_steps"),
    [
        (2, 6, "step", 0.25, -1),  # by step, within epochs
        (6, 2, "epoch", 0.0, -1),  # at each epoch end but the last
        (2, 4, "auto", 0.0, -1),  # auto: too few epoch ends, by step
        (10, 2, "auto", 0.5, -1),  # auto: by epoch
        (4, 2, "epoch", 0.0, 7),  # max_steps ends inside an epoch: epochs end at 2, 4, 6 and (early) 7
    ],
)
def test_plans_simulated_freeze_steps_are_a_real_trainer_runs(
    tmp_path, monkeypatch, epochs, steps_per_epoch, freeze_every, freeze_start, max_steps
):
    changed, said_yes, callback = _trainer_freeze_steps(
        tmp_path, monkeypatch, epochs=epochs, steps_per_epoch=steps_per_epoch, freeze_every=freeze_every,
        freeze_start=freeze_start, max_steps=max_steps,
    )  # fmt: skip
    total = max_steps if max_steps > 0 else epochs * steps_per_epoch
    simulated = update_steps(
        total, freeze_every=freeze_every, steps_per_epoch=steps_per_epoch, freeze_start=freeze_start
    )
    assert said_yes == simulated  # the callback updated exactly where plan simulates an update
    events = schedule_changes(callback.freezer.num_units_at, total, simulated)
    assert [step - 1 for step, _ in events[1:]] == changed and len(changed) >= 3  # the count changed there, only
    assert events[-1][1] == callback.frozen_units


@pytest.mark.parametrize(("epochs", "steps_per_epoch", "freeze_every"), [(2, 6, "step"), (6, 2, "epoch")])
def test_plan_rows_freeze_where_a_real_trainer_run_freezes(
    tmp_path, monkeypatch, epochs, steps_per_epoch, freeze_every
):
    from hf_layer_freeze.plan import PlanModel, plan_rows

    changed, _, callback = _trainer_freeze_steps(
        tmp_path,
        monkeypatch,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        freeze_every=freeze_every,
        freeze_start=0.0,
    )
    plan_model = PlanModel(_TinyNet().train(), (torch.zeros(4, 8),))
    if freeze_every == "step":
        rows, _ = plan_rows(plan_model, steps=epochs * steps_per_epoch, freeze_start=0.0)
        planned = [row.step - 1 for row in rows[1:]]  # a row starts at the first step trained with its freeze
    else:
        rows, _ = plan_rows(plan_model, epochs=epochs, freeze_start=0.0)
        planned = [
            (row.epoch - 1) * steps_per_epoch
            for previous, row in zip(rows, rows[1:], strict=False)
            if row.frozen_units != previous.frozen_units
        ]
    assert planned == changed and len(changed) >= 3
    assert rows[-1].frozen_units == callback.frozen_units and rows[0].num_units == callback.freezer.num_units == 6
