"""Runs that are re-entered: a `train()` retried by `auto_find_batch_size`, interrupted and called again, resumed in
the same process, two freezers on one model, a `with LayerFreezer(...)` block left by an exception. What the library
froze is known to every later freezer of the model, given back on every exit path, and a resume in the same process
equals the same resume on a fresh model."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import FreezeTimeline, RandomImages, StepWatch
from test_callback import NUM_UNITS, _args, _model, _train_state
from transformers import Trainer, TrainerCallback

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback


class RaiseAtStep(TrainerCallback):
    """Raises `exception` once, at the end of optimizer step `step`."""

    def __init__(self, step: int, exception: BaseException) -> None:
        self.step, self.exception, self.raised = step, exception, False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.raised and state.global_step == self.step:
            self.raised = True
            raise self.exception


def _given(model: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _in_optimizer(trainer: Trainer) -> list[int]:
    return sorted(id(p) for group in trainer.optimizer.param_groups for p in group["params"])


def test_auto_find_batch_size_retry_starts_from_the_model_as_given(tmp_path):
    # the first attempt fails with an out-of-memory error at step 8, with units frozen; the Trainer retries it with
    # half the batch inside the same train() call
    model = _model()
    given = _given(model)
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step")
    timeline, watch = FreezeTimeline(), StepWatch()
    oom = RaiseAtStep(8, RuntimeError("CUDA out of memory. (raised by the test)"))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=12, auto_find_batch_size=True),
        train_dataset=RandomImages(64),
        callbacks=[callback, oom, timeline, watch],
    )
    trainer.train()
    assert oom.raised and trainer._train_batch_size < 16  # the retry ran, with a smaller batch
    assert callback.freezer.num_units == NUM_UNITS  # the retry's freezer sees every unit the model was given with
    assert set(timeline.trainable_at_begin) == {n for n, trains in given.items() if trains}
    # the retry (its 12 steps are the last ones recorded) froze on schedule from nothing, and trained the rest
    units = callback.freezer.units
    counts = [callback.freezer.num_units_at(s / 12) for s in range(1, 12)] + [callback.freezer.num_units_at(11 / 12)]
    assert timeline.steps[-12:] == [{n for u in units[:c] for n in u.parameter_names} for c in counts]
    assert all(changed == still and not moved for changed, still, moved in watch.steps[-12:]), watch.steps[-12:]
    assert _given(model) == given  # handed back as given
    assert _in_optimizer(trainer) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize("keep_frozen", [False, True], ids=["give-back", "keep-frozen"])
def test_an_interrupted_train_gives_the_model_back_and_a_second_train_trains_it_all(tmp_path, keep_frozen):
    model = _model()
    given = _given(model)
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step", keep_frozen=keep_frozen)
    interrupt = RaiseAtStep(10, KeyboardInterrupt())
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=16),
        train_dataset=RandomImages(64),
        callbacks=[callback, interrupt],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    frozen_at_interrupt = callback.frozen_units
    assert frozen_at_interrupt > 0 and callback.freezer.closed
    # given back, though no on_train_end came; keep_frozen is for the end of training, and this run did not end
    assert _given(model) == given
    assert _in_optimizer(trainer) == sorted(id(p) for p in model.parameters())
    watch = StepWatch()
    trainer.add_callback(watch)
    trainer.train()  # again, from the start
    assert callback.freezer.num_units == NUM_UNITS
    assert watch.trained_exactly_the_unfrozen(), watch.steps
    assert (_given(model) == given) != keep_frozen  # this run ended: keep_frozen=True keeps its freeze


@pytest.mark.parametrize(
    "first_run", ["interrupted", "interrupted-keep-frozen", "finished-keep-frozen"], ids=lambda run: run
)
def test_a_resume_in_the_same_process_after_an_interrupt_equals_the_same_resume_on_a_fresh_model(tmp_path, first_run):
    overrides = dict(max_steps=16, save_strategy="steps", save_steps=4)
    options = dict(freeze_start=0.2, freeze_every="step")
    keep_frozen = first_run.endswith("keep-frozen")
    callback = LayerFreezingCallback(**options, keep_frozen=keep_frozen)
    stops = [] if first_run.startswith("finished") else [RaiseAtStep(10, KeyboardInterrupt())]
    interrupted = Trainer(
        model=_model(),
        args=_args(tmp_path / "a", **overrides),
        train_dataset=RandomImages(64),
        callbacks=[callback, *stops],
    )
    if stops:
        with pytest.raises(KeyboardInterrupt):
            interrupted.train()
    else:
        interrupted.train()  # to the end, keep_frozen=True: the model is left frozen
        assert sum(not p.requires_grad for p in interrupted.model.parameters()) > 0
    checkpoint = tmp_path / "checkpoint-8"
    shutil.copytree(tmp_path / "a" / "checkpoint-8", checkpoint)  # the same files for both resumes
    at_resume = []

    class FrozenAtResume(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if not at_resume:
                at_resume.append(sum(not p.requires_grad for p in model.parameters()))

    interrupted.add_callback(FrozenAtResume())
    interrupted.train(resume_from_checkpoint=str(checkpoint))
    in_process = at_resume.pop()

    fresh_callback = LayerFreezingCallback(**options, keep_frozen=keep_frozen)
    fresh = Trainer(
        model=_model(seed=7),
        args=_args(tmp_path / "b", **overrides),
        train_dataset=RandomImages(64),
        callbacks=[fresh_callback, FrozenAtResume()],
    )
    fresh.train(resume_from_checkpoint=str(checkpoint))
    assert in_process == at_resume.pop() > 0  # the checkpoint's freeze, no more
    expected_tensors, expected_groups = _train_state(fresh)
    tensors, groups = _train_state(interrupted)
    mismatched = [k for k in tensors if not torch.equal(tensors[k], expected_tensors[k])]
    assert not mismatched, mismatched[:5]
    assert groups == expected_groups


def _mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)], torch.nn.Linear(8, 2))


def test_two_freezers_on_one_model_keep_every_frozen_tensor_out_of_both_optimizers():
    # one optimizer for the weights, one for the biases, one freezer each (a unit holds a weight and a bias)
    model = _mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizers = [torch.optim.AdamW(weights, lr=0.05, weight_decay=0.1), torch.optim.AdamW(biases, lr=0.05)]
    with pytest.warns(UserWarning, match="in none of the 1 optimizer"):
        first = LayerFreezer(model, optimizers[0], freeze_start=0.0)
    second = LayerFreezer(model, optimizers[1], freeze_start=0.0)
    generator = torch.Generator().manual_seed(0)
    frozen_seen = 0
    for step in range(8):
        for freezer in (first, second):
            freezer.update(step / 8)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        frozen_seen = max(frozen_seen, len(frozen))
        held = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
        assert not held & {id(p) for p in frozen}, f"step {step}: a frozen tensor is in an optimizer"
        before = [p.detach().clone() for p in model.parameters()]
        trains = [p.requires_grad for p in model.parameters()]
        model(torch.randn(4, 8, generator=generator)).square().mean().backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        for was, p, train in zip(before, model.parameters(), trains, strict=True):
            assert torch.equal(was, p) != train, f"step {step}: trained {train}, changed {not torch.equal(was, p)}"
    assert frozen_seen >= 4
    first.unfreeze()  # the second still holds them: they stay frozen
    assert [p.requires_grad for p in model.parameters()] == trains
    second.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    assert sorted(id(p) for o in optimizers for g in o.param_groups for p in g["params"]) == sorted(
        id(p) for p in model.parameters()
    )


def test_closing_one_of_two_freezers_first_still_gives_every_tensor_back_to_its_optimizer():
    model = _mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizers = [torch.optim.SGD(weights, lr=0.1), torch.optim.SGD(biases, lr=0.1)]
    with pytest.warns(UserWarning, match="in none of the 1 optimizer"):
        first = LayerFreezer(model, optimizers[0], freeze_start=0.0)
    second = LayerFreezer(model, optimizers[1], freeze_start=0.0)
    first.freeze_units(3)
    assert [len(o.param_groups[0]["params"]) for o in optimizers] == [2, 2]
    second.unfreeze()
    second.close()  # closed first: its optimizer still gets back what the other one gives back
    first.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    assert [[id(p) for p in o.param_groups[0]["params"]] for o in optimizers] == [
        [id(p) for p in weights],
        [id(p) for p in biases],
    ]


def test_a_freezer_built_while_another_holds_frozen_tensors_sees_the_model_as_given():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stale = LayerFreezer(model, optimizer, freeze_start=0.0)
    stale.freeze_units(3)  # e.g. a custom loop that raised, the freezer still referenced
    with pytest.warns(UserWarning, match="held frozen by another LayerFreezer that was not closed"):
        fresh = LayerFreezer(model, optimizer, freeze_start=0.0)
    assert [u.name for u in fresh.units] == [u.name for u in stale.units]
    fresh.freeze_units(2)
    assert fresh.result().frozen_params == sum(u.numel for u in fresh.units[:2])
    stale.unfreeze()  # what only the stale one held trains again; the fresh one's prefix stays frozen
    assert [p.requires_grad for p in model.parameters()] == [False] * 4 + [True] * 6


def test_a_with_block_gives_the_model_back_when_it_raises():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="in the loop"), LayerFreezer(model, optimizer, freeze_start=0.0) as freezer:
        freezer.freeze_units(3)
        raise RuntimeError("in the loop")
    assert freezer.closed and all(p.requires_grad for p in model.parameters())
    assert len(optimizer.param_groups[0]["params"]) == 10
