from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import tiny_timm, train_steps
from torch import nn

from hf_layer_freeze import LayerFreezer, freezable_units, frozen_param_groups


def _optimizers(model):
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return {
        "sgd_momentum": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
        "adamw_two_groups": torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
        ),
    }


def _group_ids(optimizer):
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("name", ["resnet10t", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("opt", ["sgd_momentum", "adamw_two_groups"])
def test_frozen_parameters_leave_the_optimizer_and_stay_bitwise_unchanged(name, opt):
    model = tiny_timm(name)
    optimizer = _optimizers(model)[opt]
    train_steps(model, optimizer, steps=2)  # momentum / Adam state exists before the freeze
    freezer = LayerFreezer(model, optimizer, freeze_start=0.5, freeze_level=1.0)
    result = freezer.update(0.75)
    assert result.frozen_units == freezer.num_units // 2 and result.changed
    frozen = [p for unit in freezer.units[: result.frozen_units] for p in unit.parameters]
    assert result.frozen_params == sum(p.numel() for p in frozen)
    assert not {id(p) for p in frozen} & _group_ids(optimizer)
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    before = [p.detach().clone() for p in frozen]
    trainable_before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    train_steps(model, optimizer, steps=3, seed=1)
    assert all(torch.equal(a, p) for a, p in zip(before, frozen, strict=True))
    # the rest still trains
    trainable_after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, p) for a, p in zip(trainable_before, trainable_after, strict=True))
    # state of frozen parameters is kept, as the method card says
    assert all(p in optimizer.state for p in frozen)


def test_update_is_monotonic_and_idempotent():
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert freezer.update(0.3).frozen_units == 0
    assert freezer.update(0.9).frozen_units == freezer.num_units_at(0.9)
    again = freezer.update(0.9)
    assert again.frozen_units == freezer.num_units_at(0.9) and not again.changed
    assert freezer.update(0.6).frozen_units == freezer.num_units_at(0.9)  # never unfreezes
    assert freezer.update(1.0).frozen_units == freezer.num_units
    assert all(p.requires_grad for p in model.get_classifier().parameters())


@pytest.mark.parametrize(
    "progress", [np.float64(0.75), np.float32(0.75), torch.tensor(0.75), torch.tensor(3) / 4, Fraction(3, 4)]
)
def test_update_takes_numpy_numbers_and_0d_tensors(progress):
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert freezer.update(progress).frozen_units == freezer.num_units_at(0.75) == 14


@pytest.mark.parametrize(
    ("progress", "match"),
    [
        (torch.tensor([0.5]), r"got a tensor of shape \(1,\)"),
        (torch.tensor(True), "got a tensor of shape"),
        (np.float64(1.5), r"progress must be a number in \[0, 1\].*got .*1\.5"),
        (np.bool_(True), "progress must be a number"),
        ("0.5", "progress must be a number"),
    ],
)
def test_update_rejects_what_is_not_a_progress(progress, match):
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=match):
        freezer.update(progress)


def test_emptied_param_group_is_kept_and_lr_scheduler_still_steps():
    model = tiny_timm()
    head = list(model.get_classifier().parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.SGD([{"params": body}, {"params": head, "lr": 0.01}], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 0.5**s, lambda s: 1.0])
    LayerFreezer(model, optimizer).update(1.0)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[0]["params"] == []
    train_steps(model, optimizer, steps=1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("opt", ["sgd_momentum", "adamw_two_groups"])
def test_state_dict_mid_freeze_has_the_full_standard_layout(opt):
    model = tiny_timm()
    optimizer = _optimizers(model)[opt]
    train_steps(model, optimizer)
    reference = optimizer.state_dict()
    layout = [len(g["params"]) for g in reference["param_groups"]]
    LayerFreezer(model, optimizer).update(0.8)
    saved = optimizer.state_dict()  # torch alone raises KeyError here
    assert [len(g["params"]) for g in saved["param_groups"]] == layout
    assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in reference["param_groups"]]
    assert saved["state"].keys() == reference["state"].keys()
    for key, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(reference["state"][key][name]))

    # it loads into a fresh optimizer over a fresh model ...
    fresh_model = tiny_timm(seed=1)
    fresh = _optimizers(fresh_model)[opt]
    fresh.load_state_dict(saved)
    assert [len(g["params"]) for g in fresh.state_dict()["param_groups"]] == layout
    # ... and back into the frozen one, which stays frozen
    trainable = [len(g["params"]) for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    assert [len(g["params"]) for g in optimizer.param_groups] == trainable
    # and into another frozen optimizer, frozen at a different depth
    other_model = tiny_timm(seed=2)
    other = _optimizers(other_model)[opt]
    LayerFreezer(other_model, other).update(0.6)
    other.load_state_dict(saved)
    assert other.state_dict()["param_groups"] == saved["param_groups"]


def test_named_param_groups_stay_aligned():
    model = tiny_timm()
    optimizer = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    train_steps(model, optimizer)
    freezer = LayerFreezer(model, optimizer)
    freezer.update(0.8)
    group = optimizer.param_groups[0]
    names = dict(model.named_parameters())
    assert len(group["param_names"]) == len(group["params"])
    assert all(names[n] is p for n, p in zip(group["param_names"], group["params"], strict=True))
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_one_bookkeeper_per_optimizer():
    model = tiny_timm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = LayerFreezer(model, optimizer)
    first.update(0.8)
    first.close()  # trainer.train() with keep_frozen=True: what it froze is the user's now
    second = LayerFreezer(model, optimizer)  # e.g. trainer.train() called twice with keep_frozen=True
    assert second.num_units == first.num_units - first.frozen_units > 0  # what trains now
    assert second._param_groups == [frozen_param_groups(optimizer)]
    assert len(optimizer.state_dict()["param_groups"][0]["params"]) == len(list(model.parameters()))


def test_accelerated_optimizer_is_unwrapped():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_timm()
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    freezer = LayerFreezer(model, optimizer)
    freezer.update(1.0)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.get_classifier().parameters()
    }
    assert len(optimizer.state_dict()["param_groups"][0]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"freeze_start": 1.0}, r"freeze_start must be a number in \[0, 1\), got 1.0"),
        ({"freeze_start": -0.2}, r"freeze_start must be a number in \[0, 1\), got -0.2"),
        ({"freeze_level": 1.2}, r"freeze_level must be a number in \[0, 1\], got 1.2"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    model = tiny_timm()
    with pytest.raises(ValueError, match=match):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_bad_progress():
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"progress must be a number in \[0, 1\].*got 1.5"):
        freezer.update(1.5)
    with pytest.raises(ValueError, match=r"count must be an integer in \[0, 28\], got 29"):
        freezer.freeze_units(29)


def test_model_without_freezable_unit():
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 2))  # its only unit is the head
    with pytest.raises(ValueError, match="has no freezable unit"):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_optimizer_without_model_parameters():
    model = tiny_timm()
    other = tiny_timm(seed=1)
    with pytest.raises(ValueError, match="optimizer holds none of the model's parameters"):
        LayerFreezer(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_freezing_never_empties_the_optimizer():
    model = tiny_timm()
    units = freezable_units(model)
    body_only = torch.optim.SGD([p for u in units for p in u.parameters], lr=0.1)  # no head in it
    freezer = LayerFreezer(model, body_only)
    with pytest.warns(UserWarning, match="would leave the optimizer with no parameter, so freezing stops at 27"):
        result = freezer.update(1.0)
    assert result.frozen_units == len(units) - 1
    assert [id(p) for g in body_only.param_groups for p in g["params"]] == [id(p) for p in units[-1].parameters]


def test_fp16_grad_scaler_keeps_working_through_freeze_events():
    model = tiny_timm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    freezer = LayerFreezer(model, optimizer, freeze_start=0.0, freeze_level=1.0)
    generator = torch.Generator().manual_seed(0)
    snapshots = {}
    for step in range(1, 7):
        x = torch.randn(4, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (4,), generator=generator)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # raises if the optimizer had no parameter with a gradient
        scaler.update()
        optimizer.zero_grad()
        for name, param in snapshots.items():
            assert torch.equal(param, dict(model.named_parameters())[name]), name
        freezer.update(step / 6)
        for unit in freezer.units[: freezer.frozen_units]:
            for name, param in zip(unit.parameter_names, unit.parameters, strict=True):
                snapshots.setdefault(name, param.detach().clone())
    assert freezer.frozen_units == freezer.num_units
    assert scaler.get_scale() > 0


def test_under_distributed_a_bare_model_outside_ddp_fails_loudly(monkeypatch):
    import hf_layer_freeze.distributed as distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    freezer.update(0.9)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # evaluation outside DDP is fine
    model.train()
    with pytest.raises(RuntimeError, match="not running inside a DistributedDataParallel wrapper"):
        model(torch.randn(2, 3, 32, 32))


def _deepspeed_class(module: str, name: str, base: type = object, **namespace) -> type:
    """A stand-in named and placed as DeepSpeed's own class, so these tests need no deepspeed."""
    return type(name, (base,), {"__module__": module, **namespace})


DEEPSPEED_OPTIMIZERS = {
    "zero2": ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"),
    "zero3": ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3"),
    "bf16": ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer"),
}


def _zero_optimizer(model, kind: str = "zero2"):
    """
    A stand-in for DeepSpeed's ZeRO (or bf16) optimizer: no torch optimizer, its base optimizer in `.optimizer`, over
    a flat fp32 copy of the parameters, whose groups it shows as its own `param_groups`.
    """
    param_groups = property(lambda self: self.optimizer.param_groups)
    zero = _deepspeed_class(*DEEPSPEED_OPTIMIZERS[kind], param_groups=param_groups)()
    flat = nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters()]))
    zero.optimizer = torch.optim.AdamW([flat], lr=1e-3)
    return zero


def _accelerate_wrapper(optimizer):
    """What `accelerator.prepare` returns under DeepSpeed, and the Trainer hands its callbacks."""
    from accelerate import Accelerator
    from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper

    Accelerator(cpu=True)  # the wrapper reads Accelerate's state
    return DeepSpeedOptimizerWrapper(optimizer)


def _partition_like_zero3(model):
    for index, param in enumerate(model.parameters()):
        param.ds_id, param.ds_status = index, "NOT_AVAILABLE"
    return model


def _dummy_optim(model):
    from accelerate.utils.deepspeed import DummyOptim

    return DummyOptim(model.parameters())


def _engine(model):
    engine = _deepspeed_class("deepspeed.runtime.engine", "DeepSpeedEngine", nn.Module)()
    engine.add_module("module", model)
    return engine


# Every (model, optimizer) a freezer can be given under DeepSpeed.
DEEPSPEED_SETUPS = {
    # The Trainer's callbacks: the bare model, and Accelerate's wrapper around DeepSpeed's optimizer.
    "trainer_zero2": lambda m: (m, _accelerate_wrapper(_zero_optimizer(m))),
    "trainer_zero3": lambda m: (_partition_like_zero3(m), _accelerate_wrapper(_zero_optimizer(m, "zero3"))),
    "trainer_bf16": lambda m: (m, _accelerate_wrapper(_zero_optimizer(m, "bf16"))),
    "trainer_zero_off_fp32": lambda m: (m, _accelerate_wrapper(torch.optim.AdamW(m.parameters(), lr=1e-3))),
    "trainer_several_optimizers": lambda m: (
        m,
        [torch.optim.SGD(m.parameters(), lr=0.1), _accelerate_wrapper(_zero_optimizer(m))],
    ),
    # An Accelerate loop: accelerator.prepare returns the engine and the wrapper.
    "accelerate_engine": lambda m: (_engine(m), _accelerate_wrapper(_zero_optimizer(m))),
    # deepspeed.initialize's own returns, with the engine or the model inside it.
    "deepspeed_engine": lambda m: (_engine(m), _zero_optimizer(m)),
    "deepspeed_inner_model": lambda m: (m, _zero_optimizer(m)),
    # Each sign alone: the engine, even compiled, with a plain optimizer.
    "engine_alone": lambda m: (_engine(m), torch.optim.SGD(m.parameters(), lr=0.1)),
    "compiled_engine_alone": lambda m: (torch.compile(_engine(m)), torch.optim.SGD(m.parameters(), lr=0.1)),
    # Accelerate's placeholder for an optimizer the DeepSpeed config defines.
    "dummy_optim": lambda m: (m, _dummy_optim(m)),
    # ZeRO-3's partitioned parameters, whatever optimizer comes with them.
    "zero3_parameters": lambda m: (_partition_like_zero3(m), torch.optim.SGD(m.parameters(), lr=0.1)),
}


@pytest.mark.parametrize("setup", list(DEEPSPEED_SETUPS))
def test_deepspeed_is_refused_with_the_next_step(setup):
    model, optimizer = DEEPSPEED_SETUPS[setup](tiny_timm())
    with pytest.raises(NotImplementedError, match=r"does not support DeepSpeed.*Use DDP or FSDP.*\(Found: "):
        LayerFreezer(model, optimizer, freeze_start=0.5)


@pytest.fixture
def no_accelerate_state():
    """Accelerate's state as in a process where nothing initialized it yet; restored afterwards."""
    from accelerate.state import AcceleratorState, PartialState

    saved = [(cls._shared_state, dict(cls._shared_state)) for cls in (AcceleratorState, PartialState)]
    for shared, _ in saved:
        shared.clear()
    yield
    for shared, values in saved:
        shared.clear()
        shared.update(values)


def test_deepspeed_is_refused_when_accelerate_runs_it(monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    Accelerator(cpu=True)
    monkeypatch.setitem(AcceleratorState._shared_state, "distributed_type", DistributedType.DEEPSPEED)
    model = tiny_timm()
    with pytest.raises(NotImplementedError, match="does not support DeepSpeed.*AcceleratorState"):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.5)


def test_deepspeed_is_refused_when_the_environment_asks_for_it(monkeypatch, no_accelerate_state):
    from accelerate.state import AcceleratorState, PartialState

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    model = tiny_timm()
    with pytest.raises(NotImplementedError, match="does not support DeepSpeed.*ACCELERATE_USE_DEEPSPEED"):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.5)
    assert not AcceleratorState._shared_state and not PartialState._shared_state, "the check initialized Accelerate"


def test_an_initialized_accelerator_not_running_deepspeed_outweighs_the_environment(monkeypatch):
    from accelerate import Accelerator

    Accelerator(cpu=True)  # Accelerate itself ignores ACCELERATE_USE_DEEPSPEED with cpu=True
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    model = tiny_timm()
    LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.5)


@pytest.mark.parametrize("given", ["wrapper", "inner_module"])
def test_fsdp1_flat_parameters_are_refused_whichever_module_is_given(tmp_path, given):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        flat = FullyShardedDataParallel(tiny_timm(), device_id=torch.device("cpu"), use_orig_params=False)
        optimizer = torch.optim.SGD(flat.parameters(), lr=0.1)
        with pytest.raises(NotImplementedError, match="needs FSDP's `use_orig_params=True`"):
            LayerFreezer(flat if given == "wrapper" else flat.module, optimizer, freeze_start=0.5)
        # with the original parameters, the same model is frozen unit by unit
        orig = FullyShardedDataParallel(tiny_timm(), device_id=torch.device("cpu"), use_orig_params=True)
        freezer = LayerFreezer(
            orig if given == "wrapper" else orig.module, torch.optim.SGD(orig.parameters(), lr=0.1), freeze_start=0.5
        )
        assert freezer.num_units > 1
    finally:
        dist.destroy_process_group()


def test_missing_ddp_internals_fail_loudly_when_the_freezer_is_built(monkeypatch):
    import hf_layer_freeze.distributed as distributed

    # A torch that renamed one of the reducer's internals: the freezer refuses at once, naming it and the version.
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "_REDUCER_INTERNALS", (*distributed._REDUCER_INTERNALS, "_renamed_by_torch"))
    model = tiny_timm()
    with pytest.raises(RuntimeError, match=re.escape(f"torch {torch.__version__} lacks Reducer._renamed_by_torch")):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_missing_ddp_instance_internals_are_named():
    from hf_layer_freeze.distributed import check_ddp_internals

    class NotQuiteDDP:
        reducer = logger = None
        static_graph = True

    with pytest.raises(RuntimeError, match=r"lacks DistributedDataParallel\(\)._comm_hooks, .*_has_rebuilt_buckets"):
        check_ddp_internals(NotQuiteDDP())


def test_every_private_ddp_attribute_the_rebuild_touches_is_checked():
    """distributed.py may touch a private attribute of DDP, its reducer or logger, or torch.distributed only if
    `check_ddp_internals` checks it: otherwise a torch that renames it fails mid-training instead of at once."""
    import ast
    import inspect

    import hf_layer_freeze.distributed as distributed

    checked = set(
        distributed._DDP_CLASS_INTERNALS
        + distributed._REDUCER_INTERNALS
        + distributed._LOGGER_INTERNALS
        + distributed._DIST_INTERNALS
        + distributed._DDP_INSTANCE_INTERNALS
        + distributed._STATIC_GRAPH_INTERNALS
    )
    roots = {"ddp", "ddp_model", "dist", "DistributedDataParallel"}
    touched = set()
    for node in ast.walk(ast.parse(inspect.getsource(distributed))):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        base = node.value
        while isinstance(base, ast.Attribute) and base.attr in ("ddp", "reducer", "logger"):
            base = base.value
        if isinstance(base, ast.Name) and base.id in roots | {"self"}:
            if base.id == "self" and not (isinstance(node.value, ast.Attribute) and node.value.attr != "self"):
                continue  # the sync object's own attributes
            touched.add(node.attr)
    assert touched, "the walk found nothing: the test no longer sees distributed.py's code"
    assert touched <= checked, sorted(touched - checked)


def test_the_checked_ddp_internals_exist_in_this_torch(tmp_path):
    import torch.distributed as dist

    from hf_layer_freeze.distributed import check_ddp_internals

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for static_graph in (False, True):
            ddp = nn.parallel.DistributedDataParallel(tiny_timm(), static_graph=static_graph)
            check_ddp_internals(ddp)
    finally:
        dist.destroy_process_group()


def test_several_optimizers_each_lose_the_frozen_parameters_and_keep_their_layout():
    model = tiny_timm()
    head = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    body = torch.optim.AdamW([p for p in model.parameters() if id(p) not in head_ids], lr=1e-3)
    head_optimizer = torch.optim.SGD(head, lr=0.1, momentum=0.9)
    train_steps(model, _Both(body, head_optimizer))
    layouts = [[len(g["params"]) for g in o.state_dict()["param_groups"]] for o in (body, head_optimizer)]
    freezer = LayerFreezer(model, [body, head_optimizer], freeze_start=0.0)
    freezer.update(1.0)  # every unit: the body optimizer is emptied, the head's keeps training
    frozen = {id(p) for unit in freezer.units for p in unit.parameters}
    for optimizer in (body, head_optimizer):
        assert not {id(p) for g in optimizer.param_groups for p in g["params"]} & frozen
    assert [len(g["params"]) for g in head_optimizer.param_groups] == layouts[1]
    # checkpoints keep each optimizer's full standard layout
    assert [[len(g["params"]) for g in o.state_dict()["param_groups"]] for o in (body, head_optimizer)] == layouts
    freezer.unfreeze()
    assert sorted(id(p) for g in body.param_groups for p in g["params"]) == sorted(frozen)


def test_trainable_parameters_in_no_optimizer_given_are_counted_in_a_warning():
    model = tiny_timm()
    units = freezable_units(model)
    half = [p for unit in units[:10] for p in unit.parameters]
    given = torch.optim.SGD([p for p in model.parameters() if all(p is not q for q in half)], lr=0.1)
    expected = f"{len(half)} trainable parameter tensors \\({sum(p.numel() for p in half):,} elements\\)"
    with pytest.warns(UserWarning, match=f"{expected} that this LayerFreezer may freeze are in none of the 1"):
        LayerFreezer(model, given)


@pytest.mark.parametrize("optimizer", [[], "adam", [torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1), 3]])
def test_a_bad_optimizer_argument_is_a_one_line_value_error(optimizer):
    with pytest.raises(ValueError, match="^optimizer must be a torch.optim.Optimizer or a non-empty list of them"):
        LayerFreezer(tiny_timm(), optimizer)


class _Both:
    """Steps two optimizers as one, for `train_steps`."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def zero_grad(self):
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()


class _EventLog:
    """A user-defined listener: counts the events and the parameters they changed, with metrics and state."""

    def __init__(self):
        self.events, self.parameters, self.closed, self.loaded = [], 0, False, None

    def on_freeze_event(self, event):
        self.events.append((event.frozen_units, len(event.frozen), len(event.unfrozen)))
        self.parameters += len(event.parameters)

    def metrics(self):
        return {"layer_freeze/user_events": float(len(self.events))}

    def state_dict(self):
        return {"user_parameters": self.parameters}

    def load_state_dict(self, state):
        self.loaded = state.get("user_parameters")

    def close(self):
        self.closed = True


def test_a_listener_added_from_outside_is_notified_reports_and_is_closed_with_the_freezer():
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.5)
    log = _EventLog()
    freezer.add_listener(log)
    assert freezer.listener(_EventLog) is log and log.events == []  # future events only
    freezer.update(0.75)
    half = freezer.num_units // 2
    assert log.events == [(half, half, 0)] and log.parameters == len(freezer.record)
    metrics = freezer.metrics()
    assert metrics["layer_freeze/user_events"] == 1.0 and metrics["layer_freeze/frozen_units"] == half
    assert list(metrics)[:3] == ["layer_freeze/fraction", "layer_freeze/frozen_units", "layer_freeze/frozen_params"]
    state = freezer.state_dict()
    assert state["user_parameters"] == log.parameters and state["frozen_units"] == half
    freezer.load_state_dict(state)
    assert log.loaded == log.parameters
    freezer.unfreeze()
    assert log.events[-1] == (0, 0, half)
    freezer.close()
    assert log.closed
    with pytest.raises(RuntimeError, match="closed"):
        freezer.add_listener(_EventLog())
    with pytest.raises(ValueError, match="on_freeze_event"):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1)).add_listener(object())


def test_a_listener_may_not_overwrite_the_freezers_metrics_or_state_nor_be_added_twice():
    """A listener returning a key the freezer (or another listener) gives would silently change a logged count or a
    checkpoint's `frozen_units`: it is an error naming the listener and the key."""
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.0)
    log = _EventLog()
    freezer.add_listener(log)
    with pytest.raises(ValueError, match="added already"):
        freezer.add_listener(log)
    freezer.update(0.5)
    log.metrics = lambda: {"layer_freeze/fraction": 42.0}
    with pytest.raises(ValueError, match=r"_EventLog\.metrics\(\) returns \['layer_freeze/fraction'\]"):
        freezer.metrics()
    log.state_dict = lambda: {"frozen_units": 0}
    with pytest.raises(ValueError, match=r"_EventLog\.state_dict\(\) returns \['frozen_units'\]"):
        freezer.state_dict()
    del log.metrics, log.state_dict  # its own keys again
    assert freezer.state_dict()["frozen_units"] == freezer.frozen_units > 0


def test_the_engine_applies_a_lower_count_a_schedule_returns_by_giving_units_back():
    model = tiny_timm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = LayerFreezer(model, optimizer, freeze_start=0.0)

    class UpThenDown:  # a gradual-unfreezing schedule in miniature
        acts_every_step, budget = False, freezer.schedule.budget

        def units_at(self, progress, freezer):
            return 6 if progress < 0.5 else 2

        def fraction(self, progress, freezer):
            return freezer.frozen_units / freezer.num_units

        def close(self):
            pass

    freezer.schedule = UpThenDown()
    assert freezer.update(0.25).frozen_units == 6
    result = freezer.update(0.75)
    assert result.frozen_units == 2 and freezer.record.frozen_units == 2
    assert freezer.record.names == [n for unit in freezer.units[:2] for n in unit.parameter_names]
    assert all(p.requires_grad for unit in freezer.units[2:] for p in unit.parameters)
    assert _group_ids(optimizer) == {id(p) for p in model.parameters() if p.requires_grad}


def test_building_listeners_closes_those_built_when_one_refuses(monkeypatch):
    from hf_layer_freeze import listeners

    closed = []

    class Refuses:
        @classmethod
        def from_freezer(cls, freezer):
            raise NotImplementedError("not this setup")

    class Built(_EventLog):
        @classmethod
        def from_freezer(cls, freezer):
            return cls()

        def close(self):
            closed.append(self)

    monkeypatch.setattr(listeners, "LISTENERS", (*listeners.LISTENERS, Built, Refuses))
    model = tiny_timm()
    before = {id(m): (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()}
    with pytest.raises(NotImplementedError, match="not this setup"):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert len(closed) == 1
    assert {id(m): (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()} == before
