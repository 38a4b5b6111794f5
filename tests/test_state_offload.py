"""The memory freezing frees: frozen parameters' optimizer state offloaded to the host and back (exactly), its
checkpoints, resume and hand-back, and the gradient / optimizer-state accounting (`state_offload.py`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import RandomImages, tiny_timm, train_steps
from test_callback import _args
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, Trainer

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback
from hf_layer_freeze.state_offload import StateOffload


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _state_tensors(optimizer: torch.optim.Optimizer, params) -> list[torch.Tensor]:
    return [v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():  # the full layout, through the freezer's hooks
        for key, value in entry.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).clone()
    return tensors


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched[:5]


def _run(offload: bool, record: dict | None = None):
    """AdamW on resnet10t: 2 steps, 10 units frozen (a backward's gradients still stored), 2 steps, 20 frozen, 2 steps,
    everything given back, 2 steps. The freeze decisions are forced (`freeze_units`)."""
    model = tiny_timm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    train_steps(model, optimizer, steps=2, seed=0)
    freezer = LayerFreezer(model, optimizer, offload_frozen_state=offload)
    listener = freezer.listener(StateOffload)
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # gradients stored when the freeze comes
    for step, count in enumerate((10, 20)):
        on_host = {id(v) for v in listener.offloaded_tensors()}
        before = {id(v): v for v in _state_tensors(optimizer, model.parameters()) if id(v) not in on_host}
        freezer.freeze_units(count)
        frozen = [p for unit in freezer.units[:count] for p in unit.parameters]
        if record is not None:
            record[count] = {
                "metrics": freezer.metrics(),
                "frozen": frozen,
                "before": before,
                "state": {id(p): dict(optimizer.state.get(p, {})) for p in frozen},
                "offloaded": listener.offloaded_tensors(),
                "count": listener.offloaded_parameters,
                "grads": [p.grad for p in frozen],
            }
        train_steps(model, optimizer, steps=2, seed=1 + step)
    freezer.unfreeze()
    if record is not None:
        record["unfrozen"] = {"metrics": freezer.metrics(), "count": listener.offloaded_parameters}
    train_steps(model, optimizer, steps=2, seed=3)
    freezer.close()
    return model, optimizer, freezer


def test_offload_moves_frozen_state_to_host_tensors_of_its_own_and_back_and_the_run_is_bitwise_the_same():
    record: dict = {}
    model, optimizer, _ = _run(offload=True, record=record)
    reference_model, reference_optimizer, _ = _run(offload=False)
    # with offload on or off, the same run, bitwise (parameters and the optimizer's full state)
    _assert_bitwise_equal(_snapshot(model, optimizer), _snapshot(reference_model, reference_optimizer))
    for count in (10, 20):
        seen = record[count]
        frozen_state = [v for p in seen["frozen"] for v in seen["state"][id(p)].values()]
        # every tensor of every frozen parameter's state is one of the listener's host tensors, a new one: the
        # tensor the optimizer held on the device before is no longer referenced by it
        assert {id(v) for v in frozen_state} == {id(v) for v in seen["offloaded"]}
        assert all(v.device.type == "cpu" for v in seen["offloaded"])
        assert not {id(v) for v in frozen_state} & set(seen["before"])
        assert not {v.data_ptr() for v in frozen_state} & {v.data_ptr() for v in seen["before"].values()}
        assert seen["count"] == len([p for p in seen["frozen"] if seen["state"][id(p)]]) > 0
        # the accounting: offloaded = the frozen state's bytes; on the device what the trainable parameters keep
        metrics = seen["metrics"]
        frozen_ids = {id(p) for p in seen["frozen"]}
        trainable = [p for p in model.parameters() if id(p) not in frozen_ids]
        assert metrics["layer_freeze/offloaded_state_bytes"] == sum(map(_nbytes, frozen_state))
        assert metrics["layer_freeze/optimizer_state_bytes"] == sum(map(_nbytes, _state_tensors(optimizer, trainable)))
        # the frozen parameters' gradients were dropped; the trainable ones' take what their parameters take
        assert all(grad is None for grad in seen["grads"])
        assert metrics["layer_freeze/grad_bytes"] == sum(map(_nbytes, trainable))
    # given back: nothing on the host, every state tensor on its parameter's device again
    assert record["unfrozen"]["count"] == 0
    assert record["unfrozen"]["metrics"]["layer_freeze/offloaded_state_bytes"] == 0
    assert all(v.device == p.device for p in model.parameters() for v in _state_tensors(optimizer, [p]))


def test_accounting_without_offload_counts_what_freezing_frees_and_logs_each_event():
    model = tiny_timm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, steps=1)
    freezer = LayerFreezer(model, optimizer)
    params = list(model.parameters())
    state = sum(map(_nbytes, _state_tensors(optimizer, params)))
    assert freezer.metrics()["layer_freeze/grad_bytes"] == sum(map(_nbytes, params))
    assert freezer.metrics()["layer_freeze/optimizer_state_bytes"] == state
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("hf_layer_freeze.state_offload")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        freezer.freeze_units(14)
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    frozen = [p for unit in freezer.units[:14] for p in unit.parameters]
    frozen_bytes = sum(map(_nbytes, frozen))
    metrics = freezer.metrics()
    assert metrics["layer_freeze/grad_bytes"] == sum(map(_nbytes, params)) - frozen_bytes
    assert metrics["layer_freeze/optimizer_state_bytes"] == state  # kept on the device without offload
    assert metrics["layer_freeze/offloaded_state_bytes"] == 0
    assert freezer.listener(StateOffload).offloaded_parameters == 0
    (message,) = messages
    assert message.startswith("Freeze event (14 of 28 units frozen), on cpu: gradients ")
    assert "offload_frozen_state=True would move the frozen parameters' " in message


@pytest.mark.parametrize("freeze_before_load", [False, True], ids=["load-then-freeze", "freeze-then-load"])
def test_the_checkpoint_is_the_same_with_offload_and_loads_offloaded_again(freeze_before_load):
    saved = {}
    for offload in (False, True):
        model = tiny_timm()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        train_steps(model, optimizer, steps=2)
        freezer = LayerFreezer(model, optimizer, offload_frozen_state=offload)
        freezer.freeze_units(14)
        train_steps(model, optimizer, steps=1, seed=1)
        saved[offload] = (optimizer.state_dict(), freezer.state_dict(), _snapshot(model, optimizer))
    # the full standard layout, the same values, offload on or off
    _assert_bitwise_equal(saved[True][2], saved[False][2])
    assert saved[True][0]["param_groups"] == saved[False][0]["param_groups"]

    model = tiny_timm(seed=1)
    model.load_state_dict(tiny_timm().state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, steps=1, seed=5)  # state of its own, which the load replaces
    freezer = LayerFreezer(model, optimizer, offload_frozen_state=True)
    optimizer_state, freezer_state, _ = saved[True]
    if freeze_before_load:
        freezer.load_state_dict(freezer_state)
        optimizer.load_state_dict(optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
        freezer.load_state_dict(freezer_state)
    listener = freezer.listener(StateOffload)
    frozen = [p for unit in freezer.units[:14] for p in unit.parameters]
    frozen_state = _state_tensors(optimizer, frozen)
    loaded = {id(v) for entry in optimizer_state["state"].values() for v in entry.values()}
    # offloaded again: the frozen state is the listener's own host tensors (torch's load had put it on the device)
    assert frozen_state and {id(v) for v in frozen_state} == {id(v) for v in listener.offloaded_tensors()}
    assert not {id(v) for v in frozen_state} & loaded
    expected = sum(map(_nbytes, frozen_state))
    assert freezer.metrics()["layer_freeze/offloaded_state_bytes"] == expected > 0
    # and it holds the saved values
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optimizer_state["state"][index][key]))
    freezer.unfreeze()
    assert listener.offloaded_parameters == 0


def test_close_without_giving_back_puts_the_state_back_on_its_device_and_removes_the_hook():
    model = tiny_timm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, steps=1)
    freezer = LayerFreezer(model, optimizer, offload_frozen_state=True)
    freezer.freeze_units(14)
    listener = freezer.listener(StateOffload)
    offloaded = listener.offloaded_tensors()
    values = [v.clone() for v in offloaded]
    assert offloaded
    freezer.close()  # keep_frozen=True's end: frozen, and the user's, with the optimizer as torch keeps it
    assert listener.offloaded_parameters == 0 and not listener._handles
    frozen = [p for unit in freezer.units[:14] for p in unit.parameters]
    assert not any(p.requires_grad for p in frozen)
    # same values; on CPU the move back is `.to(cpu)`, so they are the very host tensors
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(optimizer, frozen), values, strict=True))
    optimizer.load_state_dict(optimizer.state_dict())  # no hook of a closed listener runs
    assert listener.offloaded_parameters == 0


def test_ddp_run_with_offload_equals_the_run_without(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        snapshots = []
        for offload in (False, True):
            ddp = torch.nn.parallel.DistributedDataParallel(tiny_timm())
            optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
            train_steps(ddp, optimizer, steps=2)
            freezer = LayerFreezer(ddp, optimizer, offload_frozen_state=offload)
            freezer.freeze_units(14)
            offloaded = freezer.listener(StateOffload).offloaded_parameters
            assert offloaded > 0 if offload else offloaded == 0
            train_steps(ddp, optimizer, steps=2, seed=1)
            freezer.unfreeze()
            train_steps(ddp, optimizer, steps=1, seed=2)
            snapshots.append(_snapshot(ddp.module, optimizer))
            freezer.close()
        _assert_bitwise_equal(*snapshots)
    finally:
        dist.destroy_process_group()


def test_fsdp_and_schedule_free_optimizers_are_refused_with_the_next_step(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    class ScheduleFree(torch.optim.AdamW):  # train/eval modes, as schedule-free optimizers have
        def train(self):
            pass

        def eval(self):
            pass

    model = tiny_timm()
    refused = r"does not support test_state_offload\..*ScheduleFree: it has train and eval modes"
    with pytest.raises(NotImplementedError, match=refused):
        LayerFreezer(model, ScheduleFree(model.parameters(), lr=1e-3), offload_frozen_state=True)
    LayerFreezer(model, ScheduleFree(model.parameters(), lr=1e-3)).close()  # without offload: served
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        fsdp = FullyShardedDataParallel(tiny_timm(), device_id=torch.device("cpu"), use_orig_params=True)
        optimizer = torch.optim.AdamW(fsdp.parameters(), lr=1e-3)
        with pytest.raises(NotImplementedError, match=r"does not support FSDP.*CPUOffloadPolicy\(\)"):
            LayerFreezer(fsdp, optimizer, offload_frozen_state=True)
        LayerFreezer(fsdp, optimizer).close()
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="^offload_frozen_state must be True or False, got 'yes'$"):
        LayerFreezer(model, torch.optim.AdamW(model.parameters()), offload_frozen_state="yes")


def _trainer(output_dir: Path, seed: int = 0, **callback_options) -> tuple[Trainer, LayerFreezingCallback]:
    torch.manual_seed(seed)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=10))
    callback = LayerFreezingCallback(freeze_start=0.2, freeze_every="step", **callback_options)
    args = _args(output_dir, max_steps=10, weight_decay=0.0, save_strategy="steps", save_steps=6)
    return Trainer(model=model, args=args, train_dataset=RandomImages(64), callbacks=[callback]), callback


def test_trainer_with_offload_logs_the_bytes_resumes_bitwise_and_gives_the_state_back(tmp_path):
    full, callback = _trainer(tmp_path / "full", offload_frozen_state=True)
    full.train()
    logs = [log for log in full.state.log_history if "loss" in log]
    assert all("layer_freeze/offloaded_state_bytes" in log and "layer_freeze/grad_bytes" in log for log in logs)
    assert logs[-1]["layer_freeze/offloaded_state_bytes"] > 0  # units froze from step 2 on
    # training ended: the model and the optimizer's state given back, on the parameters' device
    assert callback.freezer.listener(StateOffload).offloaded_parameters == 0
    assert all(p.requires_grad for p in full.model.parameters())

    resumed, resumed_callback = _trainer(tmp_path / "resumed", seed=7, offload_frozen_state=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert 0 < resumed_callback.frozen_units
    resumed_logs = [log for log in resumed.state.log_history if "loss" in log]
    assert resumed_logs[-1]["layer_freeze/offloaded_state_bytes"] == logs[-1]["layer_freeze/offloaded_state_bytes"]
    _assert_bitwise_equal(_snapshot(resumed.model, resumed.optimizer), _snapshot(full.model, full.optimizer))
