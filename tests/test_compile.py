"""Compiled training gets the speedup: after every freeze event the next step runs a graph traced for the new frozen
set (its backward computes no frozen gradient), whatever compiled the model; freeze events stay within Dynamo's
recompile limit."""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo
from helpers import RandomImages, tiny_timm
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import lookup_backend

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback
from hf_layer_freeze.compiled import (
    CompiledCodeInvalidation,
    check_dynamo_internals,
    invalidate_compiled_code,
    missing_dynamo_internals,
    recompile_limit,
    resolve_max_freeze_events,
)
from hf_layer_freeze.events import FreezeEvent

slow = pytest.mark.slow  # subprocesses, compiles or whole-model FLOP counts: not in `make test-fast`


class CountingBackend:
    """aot_eager, counting how many graphs Dynamo hands it (each compile and each recompile)."""

    def __init__(self):
        self.compiles = 0
        self.aot_eager = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return self.aot_eager(gm, example_inputs)


class BackwardRecorder:
    """
    A Dynamo backend (AOTAutograd running the traced aten graphs eagerly) that records, for each backward graph it
    compiles, how many gradients that graph computes: the ground truth of what a compiled step differentiates.
    """

    def __init__(self):
        self.backward_grads: list[int] = []
        self.backend = aot_autograd(fw_compiler=self._forward, bw_compiler=self._backward)

    @staticmethod
    def _forward(gm, example_inputs):
        from functorch.compile import make_boxed_func

        return make_boxed_func(gm.forward)

    def _backward(self, gm, example_inputs):
        (output,) = [node for node in gm.graph.nodes if node.op == "output"]
        self.backward_grads.append(sum(grad is not None for grad in output.args[0]))
        return self._forward(gm, example_inputs)

    def __call__(self, gm, example_inputs):
        return self.backend(gm, example_inputs)


def _trainable(model) -> int:
    return sum(p.requires_grad for p in model.parameters())


def _register_as_aot_eager(backend, monkeypatch) -> None:
    """Accelerate and the Trainer name their backend by a string: let `aot_eager` name `backend` in this test."""
    from torch._dynamo.backends import registry

    torch._dynamo.list_backends()  # registers the built-in backends first, as a later lookup would
    monkeypatch.setitem(registry._COMPILER_FNS, "aot_eager", backend)


def _compiled(route: str, model, backend, monkeypatch):
    """`model` compiled the way users do, with `backend` (under the name `aot_eager` for Accelerate)."""
    if route == "torch.compile":
        return torch.compile(model, backend=backend)
    if route == "module.compile":
        model.compile(backend=backend)
        return model
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    _register_as_aot_eager(backend, monkeypatch)
    AcceleratorState._reset_state()  # older Accelerate keeps the dynamo setting of an earlier Accelerator
    prepared = Accelerator(cpu=True, dynamo_backend="aot_eager").prepare_model(model)
    assert type(prepared).__name__ == "OptimizedModule"
    return prepared


@slow
@pytest.mark.parametrize("route", ["torch.compile", "module.compile", "accelerate"])
def test_after_each_freeze_the_compiled_backward_computes_no_frozen_gradient(route, monkeypatch):
    torch._dynamo.reset()
    model = tiny_timm("resnet10t")
    recorder = BackwardRecorder()
    compiled = _compiled(route, model, recorder, monkeypatch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = LayerFreezer(compiled, optimizer, freeze_start=0.0, max_freeze_events=None)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for count in (0, 9, 14, freezer.num_units):
        freezer.freeze_units(count)
        before = len(recorder.backward_grads)
        torch.nn.functional.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # a new backward graph, which differentiates exactly the parameters that still train
        assert len(recorder.backward_grads) == before + 1, f"no graph traced after freezing {count} units"
        assert recorder.backward_grads[-1] == _trainable(model)
    assert recorder.backward_grads[0] == len(list(model.parameters())) > recorder.backward_grads[-1]


@slow
def test_trainer_torch_compile_bounds_events_and_steps_without_frozen_gradients(tmp_path, monkeypatch):
    from transformers import (
        TimmWrapperConfig,
        TimmWrapperForImageClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch._dynamo.reset()
    recorder = BackwardRecorder()
    _register_as_aot_eager(recorder, monkeypatch)
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=10))
    graphs_by_step: list[tuple[int, list[int]]] = []  # (tensors that train at the step, its new backward graphs)

    class GraphsAtEachStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.trainable, self.seen = _trainable(model), len(recorder.backward_grads)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            graphs_by_step.append((self.trainable, recorder.backward_grads[self.seen :]))

    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step")
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=16, learning_rate=1e-3,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
        torch_compile=True, torch_compile_backend="aot_eager",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(64), callbacks=[callback, GraphsAtEachStep()])
    trainer.train()
    assert trainer.model_wrapped is not model and "OptimizedModule" in type(trainer.model_wrapped).__name__
    # the callback saw torch_compile=True although the Trainer hands it the uncompiled model
    assert callback.freezer.max_freeze_events == (recompile_limit() - 2) // 2 == 3
    frozen_sets = sorted({trainable for trainable, _ in graphs_by_step}, reverse=True)
    assert 2 <= len(frozen_sets) <= 4  # the first frozen set, then at most 3 events
    for trainable, graphs in graphs_by_step:
        # a graph compiled during a step differentiates exactly what trains at that step
        assert all(grads == trainable for grads in graphs), (trainable, graphs)
    # each frozen set the run trained with got its own backward graph (not the one traced before the freeze)
    assert {grads for _, graphs in graphs_by_step for grads in graphs} == set(frozen_sets)


@slow
def test_invalidation_leaves_other_compiled_functions_alone():
    torch._dynamo.reset()
    backend = CountingBackend()
    other = torch.compile(lambda t: torch.sin(t) * 2, backend=backend)
    model = tiny_timm("resnet10t")
    compiled = torch.compile(model, backend=backend)
    other(torch.randn(3))
    compiled(torch.randn(2, 3, 32, 32))
    assert backend.compiles == 2
    assert invalidate_compiled_code(model) == 1  # ResNet.forward
    other(torch.randn(3))
    assert backend.compiles == 2  # the user's other function kept its graph
    compiled(torch.randn(2, 3, 32, 32))
    assert backend.compiles == 3
    assert invalidate_compiled_code(tiny_timm("resnet10t")) == 1  # same class: same code; harmless, recompiles once
    assert invalidate_compiled_code(torch.nn.Linear(2, 2)) == 0


def _loss_and_grads(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@slow
def test_compiled_model_recompiles_once_per_freeze_event_and_matches_eager():
    torch._dynamo.reset()
    eager = tiny_timm("resnet10t")
    backend = CountingBackend()
    compiled = torch.compile(eager, backend=backend)
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.05)
    freezer = LayerFreezer(compiled, optimizer, freeze_start=0.0)
    limit = torch._dynamo.config.recompile_limit
    assert freezer.max_freeze_events == (limit - 2) // 2 == 3  # the default for a compiled model

    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    counts, events = [], 0
    epochs = 10
    for epoch in range(epochs):
        eager.train()
        loss_c, grads_c = _loss_and_grads(compiled, x, y)
        loss_e, grads_e = _loss_and_grads(eager, x, y)  # the same parameters, run eagerly
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_c:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5)
        compiled(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        eager.eval()
        with torch.no_grad():
            compiled(x)  # evaluation each epoch, as the Trainer does
        result = freezer.update((epoch + 1) / epochs)
        events += result.changed
        counts.append(result.frozen_units)
    assert 1 <= events <= 3 and counts[-1] == freezer.num_units
    # one training and one evaluation graph at the start, then one of each per freeze event (the last freeze,
    # at the very end of training, is never run)
    assert backend.compiles == 2 + 2 * (events - 1)
    assert backend.compiles <= limit


@slow
def test_too_many_freeze_events_for_a_compiled_model_warn():
    model = torch.compile(tiny_timm(), backend="aot_eager")
    with pytest.warns(UserWarning, match="recompile_limit=8.*Keep max_freeze_events <= 3"):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_freeze_events=10)


@slow
def test_max_freeze_events_bounds_distinct_frozen_sets():
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.0, max_freeze_events=4)
    counts = [freezer.num_units_at(step / 100) for step in range(101)]
    assert sorted(set(counts)) == [0, 7, 14, 21, 28]
    assert counts == sorted(counts)
    uncompiled = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert uncompiled.max_freeze_events is None
    with pytest.raises(ValueError, match="max_freeze_events must be None or an integer >= 1, got 0"):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_freeze_events=0)


@slow
def test_recompile_limit_falls_back_to_cache_size_limit_and_names_a_torch_too_old(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch._dynamo, "config", SimpleNamespace(cache_size_limit=6))  # torch before 2.7
    assert recompile_limit() == 6
    monkeypatch.setattr(torch._dynamo, "config", SimpleNamespace())
    with pytest.raises(NotImplementedError, match=r"torch .* has neither .*recompile_limit.*torch >= 2.11"):
        recompile_limit()


# Dynamo's internals, checked when built (fast: no compile runs, `torch.compile(model)` only wraps the model).
DYNAMO_INTERNALS = [
    ("torch._dynamo", "reset_code", "torch._dynamo.reset_code"),
    (
        "torch._dynamo.eval_frame",
        "_debug_get_cache_entry_list",
        "torch._dynamo.eval_frame._debug_get_cache_entry_list",
    ),
    ("torch._dynamo.resume_execution.ContinueExecutionCache", "cache", "ContinueExecutionCache.cache"),
]


def test_this_torch_has_every_dynamo_internal_the_freezer_uses():
    assert missing_dynamo_internals() == []
    check_dynamo_internals()


@pytest.mark.parametrize(("owner", "attribute", "named"), DYNAMO_INTERNALS)
def test_a_missing_dynamo_internal_fails_when_a_compiled_models_freezer_is_built(monkeypatch, owner, attribute, named):
    monkeypatch.delattr(f"{owner}.{attribute}")
    message = rf"torch {re.escape(torch.__version__)} lacks .*{re.escape(named)}.* or train the model uncompiled"
    with pytest.raises(NotImplementedError, match=message):
        check_dynamo_internals()
    model = tiny_timm("resnet10t")
    with pytest.raises(NotImplementedError, match=message):
        CompiledCodeInvalidation(torch.compile(model))
    with pytest.raises(NotImplementedError, match=message):
        CompiledCodeInvalidation(model, compiled=True)  # the Trainer's torch_compile: compiled after the callback
    with pytest.raises(NotImplementedError, match=message):  # at build, not at the first freeze
        LayerFreezer(torch.compile(model), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(NotImplementedError, match=message):  # what the callback calls under torch_compile=True
        resolve_max_freeze_events(model, None, compiled=True)


def test_a_missing_dynamo_internal_leaves_an_uncompiled_model_alone(monkeypatch):
    monkeypatch.delattr("torch._dynamo.eval_frame._debug_get_cache_entry_list")
    model = tiny_timm("resnet10t")
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.0)
    assert freezer.update(0.5).frozen_units == freezer.num_units // 2  # the listeners drop nothing, raise nothing
    listener = CompiledCodeInvalidation(model)
    model.compile()  # compiled in place after the listener was built: the next freeze event says so
    with pytest.raises(NotImplementedError, match="_debug_get_cache_entry_list"):
        listener.on_freeze_event(FreezeEvent(tuple(freezer.units), 1, parameters=tuple(model.parameters())[:1]))


def test_a_torch_without_a_recompile_limit_fails_when_a_compiled_models_freezer_is_built(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch._dynamo, "config", SimpleNamespace())
    with pytest.raises(
        NotImplementedError, match=r"lacks torch._dynamo.config.recompile_limit \(or cache_size_limit\)"
    ):
        CompiledCodeInvalidation(tiny_timm("resnet10t"), compiled=True)
