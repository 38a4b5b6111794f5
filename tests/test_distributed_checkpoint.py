"""Saving and loading through torch's distributed checkpoint (DCP) state-dict API across freeze events, on a plain
model in one process (`tests/workers/fsdp_worker.py` does the same under FSDP2 and FSDP1 with 2 processes):
`get_optimizer_state_dict` gives the full standard layout, the frozen parameters' state included, exactly what the
same tensors frozen by hand give; it loads into a fresh optimizer and into a frozen one; a resume through `dcp.save`
/ `dcp.load` ends bitwise equal to the uninterrupted run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from hf_layer_freeze import LayerFreezer
from hf_layer_freeze.param_groups import freeze_parameters

OPTIONS = {"nested": None, "flattened": StateDictOptions(flatten_optimizer_state_dict=True)}


def _model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _freezer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LayerFreezer:
    return LayerFreezer(model, optimizer, freeze_start=0.0, freeze_level=1.0, head="4")


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(6, 4, generator=generator), torch.randint(0, 3, (6,), generator=generator)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def _assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, (where, a, b)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("layout", list(OPTIONS))
def test_dcp_optimizer_state_dict_after_a_freeze_is_the_full_layout_and_loads_into_fresh_and_frozen_optimizers(
    layout,
):
    options = OPTIONS[layout]
    model = _model()
    optimizer = _optimizer(model)
    reference = copy.deepcopy(model)  # the same tensors frozen by hand: they stay in their group
    reference_optimizer = _optimizer(reference)
    freezer = _freezer(model, optimizer)
    for step in (1, 2):
        _step(model, optimizer, step)
        _step(reference, reference_optimizer, step)
    freezer.freeze_units(1)
    frozen = set(freezer.units[0].parameter_names)
    freeze_parameters(p for name, p in reference.named_parameters() if name in frozen)
    _step(model, optimizer, 3)
    _step(reference, reference_optimizer, 3)
    assert len(optimizer.param_groups[0]["params"]) == 6 - len(frozen) > 0

    saved = get_optimizer_state_dict(model, optimizer, options=options)
    _assert_same(saved, get_optimizer_state_dict(reference, reference_optimizer, options=options))
    if layout == "nested":  # every parameter in its group, the frozen ones with their state
        names = [name for name, _ in model.named_parameters()]
        assert saved["param_groups"][0]["params"] == names and list(saved["state"]) == names
    assert len(optimizer.param_groups[0]["params"]) == 6 - len(frozen)  # taken out again

    fresh = _model(seed=1)
    fresh_optimizer = _optimizer(fresh)
    set_optimizer_state_dict(fresh, fresh_optimizer, copy.deepcopy(saved), options=options)
    _assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())

    frozen_model = _model(seed=1)
    frozen_optimizer = _optimizer(frozen_model)
    _freezer(frozen_model, frozen_optimizer).freeze_units(1)
    before = _params(frozen_model)
    set_optimizer_state_dict(frozen_model, frozen_optimizer, copy.deepcopy(saved), options=options)
    _assert_same(frozen_optimizer.state_dict(), optimizer.state_dict())  # the frozen parameters' state too
    _assert_same(_params(frozen_model), before)  # loading moved no parameter
    in_groups = {id(p) for p in frozen_optimizer.param_groups[0]["params"]}
    for name, param in frozen_model.named_parameters():
        assert (name in frozen) == (not param.requires_grad) == (id(param) not in in_groups), name
        assert param.grad is None


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process: no group, by design
def test_resume_through_dcp_mid_freeze_equals_the_uninterrupted_run(tmp_path):
    """Freezes forced at steps 2 and 4 (`freeze_units`); saved with `dcp.save` after step 3, between them; the
    resumed run (other initial weights: everything comes from the checkpoint) ends bitwise equal."""
    freezes = {2: 1, 4: 2}
    model = _model()
    optimizer = _optimizer(model)
    freezer = _freezer(model, optimizer)
    for step in range(1, 7):
        _step(model, optimizer, step)
        if step in freezes:
            freezer.freeze_units(freezes[step])
        if step == 3:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp_path / "checkpoint")
            freezer_state = freezer.state_dict()

    resumed = _model(seed=7)
    resumed_optimizer = _optimizer(resumed)
    resumed_freezer = _freezer(resumed, resumed_optimizer)
    resumed_freezer.load_state_dict(freezer_state)  # frozen before the load, as a callback resuming does
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=tmp_path / "checkpoint")
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for step in range(4, 7):
        _step(resumed, resumed_optimizer, step)
        if step in freezes:
            resumed_freezer.freeze_units(freezes[step])
    _assert_same(_params(resumed), _params(model))
    _assert_same(resumed_optimizer.state_dict(), optimizer.state_dict())
