"""The optimizers a fine-tuner picks, through freeze events, evaluations and a resume: what each `optim` of the
Trainer does with frozen parameters, the train/eval modes of schedule-free optimizers, and the layer-wise optimizers
that freezing through `param_groups` cannot serve (refused by name)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import RandomImages, StepWatch, tiny_timm, train_steps
from test_callback import _args, _model, _train_state
from transformers import Trainer, TrainerCallback

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback
from hf_layer_freeze.param_groups import check_supported_optimizer, freeze_parameters, frozen_param_groups

schedulefree = pytest.importorskip("schedulefree")


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ (bitwise)."""
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_schedule_free_mode_switches_move_frozen_parameters_with_their_groups():
    """Layer 2 on its own: a schedule-free optimizer whose frozen parameters left the groups gives, at each
    `eval()` and `train()`, exactly what one that kept them (with no gradient) gives."""
    model = tiny_timm()
    reference = copy.deepcopy(model)
    optimizers = [schedulefree.AdamWScheduleFree(m.parameters(), lr=1e-2) for m in (model, reference)]
    for m, optimizer in zip((model, reference), optimizers, strict=True):
        optimizer.train()
        train_steps(m, optimizer, steps=2)  # z differs from the weights: the mode switches move them
    names = [name for name, _ in model.named_parameters()][:20]
    frozen = [p for name, p in model.named_parameters() if name in names]
    freeze_parameters(frozen)
    frozen_param_groups(optimizers[0]).remove(frozen)
    freeze_parameters(p for name, p in reference.named_parameters() if name in names)  # stays in its group

    train_values = _params(model)
    for switch in ("eval", "train", "eval"):
        for optimizer in optimizers:
            getattr(optimizer, switch)()
        assert not (differing := _differing(_params(model), _params(reference))), (switch, differing[:5])
    assert all(not torch.equal(train_values[n], p) for n, p in model.named_parameters() if n in names)
    # given back in eval mode: the next train() moves them as their group switches, and training goes on alike
    frozen_param_groups(optimizers[0]).restore(frozen)
    for m, optimizer in zip((model, reference), optimizers, strict=True):
        for p in m.parameters():
            p.requires_grad_(True)
        optimizer.train()
    assert not (differing := _differing(_params(model), _params(reference))), differing[:5]
    for m, optimizer in zip((model, reference), optimizers, strict=True):
        train_steps(m, optimizer, steps=1, seed=1)
    assert not (differing := _differing(_params(model), _params(reference))), differing[:5]


class _TrainModeStepWatch(StepWatch):
    """`StepWatch` measured between two training points: `optimizer.train()` first, as the Trainer's `training_step`
    does right after `on_step_begin` (a no-op for optimizers without modes, and for schedule-free ones the same switch
    a moment earlier), so a step after an evaluation is not charged with the eval-to-train switch."""

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer.train()  # an AcceleratedOptimizer: passes it on when the optimizer has modes
        super().on_step_begin(args, state, control, model=model, **kwargs)


class _FrozenNames(TrainerCallback):
    """Records, at the end of each step (after `LayerFreezingCallback`), the names of the frozen tensors."""

    def __init__(self) -> None:
        self.by_step: dict[int, set[str]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = {n for n, p in model.named_parameters() if not p.requires_grad}


class _ReplayFreeze(TrainerCallback):
    """The reference: freezes the same tensors at the same steps by `requires_grad` alone, so they stay in their
    param groups and follow the optimizer's mode switches as any other tensor does."""

    def __init__(self, by_step: dict[int, set[str]]) -> None:
        self.by_step = by_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        names = self.by_step.get(state.global_step, set())
        freeze_parameters(p for n, p in model.named_parameters() if n in names)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            p.requires_grad_(True)


class _EvalSnapshots(TrainerCallback):
    """The weights each evaluation saw (the optimizer is still in eval mode at `on_evaluate`)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.snapshots.append(_params(model))


def test_schedule_free_evaluations_and_hand_back_see_frozen_layers_as_if_never_frozen(tmp_path):
    """`optim="schedule_free_adamw"` with an evaluation after every step: every evaluation sees each frozen tensor at
    its evaluation point (what `eval()` gives from its state), and after the hand-back (in eval mode: the last step
    evaluates) the next `optimizer.train()` moves it as its group's switch dictates. Ground truth: the same run where
    frozen tensors only lose `requires_grad`, staying in the groups."""
    overrides = dict(optim="schedule_free_adamw", max_steps=4, eval_strategy="steps", eval_steps=1, learning_rate=1e-2)
    runs = {}
    frozen_names = _FrozenNames()
    for name, freezing in [
        ("freezing", [LayerFreezingCallback(freeze_start=0.0, freeze_every="step"), frozen_names]),
        ("reference", [_ReplayFreeze(frozen_names.by_step)]),
    ]:
        snapshots = _EvalSnapshots()
        trainer = Trainer(
            model=_model(),
            args=_args(tmp_path / name, **overrides),
            train_dataset=RandomImages(64),
            eval_dataset=RandomImages(16, seed=1),
            callbacks=[*freezing, snapshots],
        )
        trainer.train()
        at_hand_back = _params(trainer.model)
        trainer.optimizer.train()
        runs[name] = (snapshots.snapshots, at_hand_back, trainer)

    (evaluated, at_hand_back, trainer), (evaluated_ref, at_hand_back_ref, reference) = runs.values()
    # Frozen after 2 or 3 steps (after one step y equals z: the first weight of the average is 1), these tensors
    # differ between the two points: an evaluation at their training values would be told apart.
    frozen = frozen_names.by_step[3] - frozen_names.by_step[1]
    assert len(frozen) > 15 and len(evaluated) == 4
    assert all(not torch.equal(at_hand_back[n], trainer.model.get_parameter(n)) for n in frozen)
    for step, (seen, seen_ref) in enumerate(zip(evaluated, evaluated_ref, strict=True), start=1):
        assert not (differing := _differing(seen, seen_ref)), (f"evaluation at step {step}", differing[:5])
    assert not (differing := _differing(at_hand_back, at_hand_back_ref)), differing[:5]
    tensors, groups = _train_state(trainer)
    expected_tensors, expected_groups = _train_state(reference)  # the optimizer state, train_mode included
    assert not (differing := _differing(tensors, expected_tensors)), differing[:5]
    assert groups == expected_groups


OPTIMS = ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "schedule_free_adamw"]


@pytest.mark.parametrize("optim", OPTIMS)
def test_each_optim_trains_exactly_the_unfrozen_and_resumes_bitwise(tmp_path, optim):
    """Per optimizer: at every step every still-trainable tensor changes and no frozen one does (measured between
    training points: schedule-free evaluations move weights to their evaluation point and back), and a run resumed
    from a mid-freeze checkpoint, saved right after an evaluation, ends bitwise equal to the uninterrupted one."""
    overrides = dict(
        optim=optim, max_steps=6, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3
    )
    callback_kwargs = dict(freeze_start=0.0, freeze_every="step")
    watch = _TrainModeStepWatch()
    callback = LayerFreezingCallback(**callback_kwargs)
    full = Trainer(
        model=_model(),
        args=_args(tmp_path / "full", **overrides),
        train_dataset=RandomImages(64),
        eval_dataset=RandomImages(16, seed=1),
        callbacks=[callback, watch],
    )
    full.train()
    assert len(watch.steps) == 6
    assert watch.trained_exactly_the_unfrozen(), watch.steps
    trainable = [still for _, still, _ in watch.steps]
    assert trainable[2] > trainable[3] > trainable[4] > 0  # freezes at steps 4 and 5, after the checkpoint

    resumed = Trainer(
        model=_model(seed=7),  # other initial weights: everything must come from the checkpoint
        args=_args(tmp_path / "resumed", **overrides),
        train_dataset=RandomImages(64),
        eval_dataset=RandomImages(16, seed=1),
        callbacks=[LayerFreezingCallback(**callback_kwargs)],
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    tensors, groups = _train_state(resumed)
    expected_tensors, expected_groups = _train_state(full)
    mismatched = _differing(tensors, expected_tensors)
    assert not mismatched, mismatched[:5]
    assert groups == expected_groups


class Lomo(torch.optim.Optimizer):
    """Stands in for `lomo_optim.Lomo` (not installed): recognised by its module, never imported."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__(model.parameters(), {"lr": lr})


Lomo.__module__ = "lomo_optim.lomo"


def _layerwise_dummy(model: torch.nn.Module) -> torch.optim.Optimizer:
    """What `optim="*_layerwise"` gives the Trainer: a dummy, and one optimizer per parameter stepped in hooks."""
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    optimizer_dict = {p: torch.optim.AdamW([p], lr=1e-3) for p in model.parameters()}
    return LayerWiseDummyOptimizer(optimizer_dict=optimizer_dict, lr=1e-3)


@pytest.mark.parametrize("name", ["layerwise", "lomo"])
def test_optimizers_stepping_in_backward_hooks_are_refused_by_name(name):
    from accelerate import Accelerator

    model = tiny_timm()
    optimizer = _layerwise_dummy(model) if name == "layerwise" else Lomo(model)
    match = r"optim='\*_layerwise'" if name == "layerwise" else r"optim='lomo' / 'adalomo', here lomo_optim's Lomo"
    for given in (optimizer, Accelerator(cpu=True).prepare_optimizer(optimizer)):
        with pytest.raises(NotImplementedError, match=rf"{match}.*Use optim='adamw_torch'.*or disable the callback"):
            check_supported_optimizer(given)


def test_optimizers_stepping_through_param_groups_are_supported():
    from transformers.optimization import Adafactor

    model = tiny_timm()
    for optimizer in (
        torch.optim.AdamW(model.parameters(), fused=True),
        Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False),
        schedulefree.AdamWScheduleFree(model.parameters()),
    ):
        check_supported_optimizer(optimizer)


def test_the_freezer_refuses_a_layerwise_optimizer():
    model = tiny_timm()
    with pytest.raises(NotImplementedError, match="layer-wise"):
        LayerFreezer(model, _layerwise_dummy(model), freeze_start=0.5)


# Optimizers that keep their own list of parameters outside `param_groups`, refused by name.
REFUSED_OWN_PARAMETER_LISTS = {"LBFGS"}
TORCH_OPTIMIZERS = sorted(
    name
    for name in torch.optim.__all__
    if isinstance(cls := getattr(torch.optim, name), type) and issubclass(cls, torch.optim.Optimizer)
    if cls is not torch.optim.Optimizer
)


class _SparseEmbeddings(torch.nn.Module):
    """Two sparse embeddings summed: what `torch.optim.SparseAdam` takes (sparse gradients only)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Embedding(10, 3, sparse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x) + self.head(x)


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_each_torch_optimizer_keeps_frozen_tensors_unchanged_or_is_refused_by_name(name):
    """Every optimizer in `torch.optim`: after a freeze event, the frozen tensors stay bitwise unchanged while every
    still-trainable tensor changes; or the freezer refuses it at build, naming the class and the next step."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if name == "SparseAdam":
        model, head = _SparseEmbeddings(), "head"
        batches = [(torch.randint(0, 10, (6,), generator=generator),) for _ in range(5)]
    else:  # no biases: Muon takes 2-D parameters only
        layers = [torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 8, bias=False)]
        model, head = torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=False)), "4"
        batches = [(torch.randn(6, 4, generator=generator),) for _ in range(5)]
    optimizer = getattr(torch.optim, name)(model.parameters(), lr=0.1)
    if name in REFUSED_OWN_PARAMETER_LISTS:
        with pytest.raises(NotImplementedError, match=rf"torch\.optim\.\w+\.{name}: it keeps its own list.*Use an"):
            LayerFreezer(model, optimizer, freeze_start=0.0, head=head)
        return
    freezer = LayerFreezer(model, optimizer, freeze_start=0.0, head=head)

    def step(inputs: tuple[torch.Tensor, ...]) -> None:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = model(*inputs).square().mean()
            loss.backward()
            return loss

        optimizer.step(closure)

    for inputs in batches[:2]:
        step(inputs)
    freezer.freeze_units(1)
    frozen = set(freezer.units[0].parameter_names)
    before = _params(model)
    for inputs in batches[2:]:
        step(inputs)
    changed = set(_differing(before, _params(model)))
    assert frozen and not changed & frozen, sorted(changed & frozen)
    assert changed == before.keys() - frozen


def test_zero_redundancy_optimizer_is_refused_by_name():
    """`ZeroRedundancyOptimizer` partitions its parameters into a local optimizer at construction (which needs a
    process group: an unbuilt instance stands in, recognised by class alone)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    with pytest.raises(NotImplementedError, match=r"ZeroRedundancyOptimizer: it keeps its own list.*_all_params"):
        check_supported_optimizer(ZeroRedundancyOptimizer.__new__(ZeroRedundancyOptimizer))
